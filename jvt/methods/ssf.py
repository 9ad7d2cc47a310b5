"""SSF: a per-channel scale and shift `y * ssf_scale + ssf_shift` after every operation.

Leaves `ssf_scale` / `ssf_shift` [D] of the patch embedding (at the root), of every projection
(query, key, value, out, Dense_0, Dense_1) and of every block norm and `encoder_norm`. Drawn as
the official SSF code draws them (scale ~ N(1, 0.02), shift ~ N(0, 0.02)); `init="identity"`
(ones / zeros) starts exactly at the pretrained function. Mergeable into the preceding linear
map or norm.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jvt.methods.base import Method

INITS = ("normal", "identity")
_STD = 0.02


@dataclasses.dataclass(frozen=True)
class SSF(Method):
  name = "ssf"
  family = "parameter"
  summary = "scale and shift of every operation's output"
  order = 90  # last at a projection: the scale applies to a LoRA update too
  init: str = "normal"

  def resolve(self, num_layers):
    if self.init not in INITS:
      raise ValueError(f"ssf.init={self.init!r}; allowed: {INITS}.")
    return self

  def claims(self, num_layers):
    return {"ssf": True}

  def partition_rules(self, num_layers):
    return ((r"(.*/)?ssf_(scale|shift)", "ssf"),)

  def _apply(self, scope, y, features):
    if self.init == "normal":
      scale_init = lambda key, shape: 1.0 + _STD * jax.random.normal(key, shape)
      shift_init = nn.initializers.normal(_STD)
    else:
      scale_init, shift_init = nn.initializers.ones, nn.initializers.zeros
    scale = scope.param("ssf_scale", scale_init, tuple(features))
    shift = scope.param("ssf_shift", shift_init, tuple(features))
    # In fp32 whatever the compute dtype: the parameter gradients are sums over every row and
    # token, which bf16 would round (and XLA:CPU runs bf16 element-wise work and reductions
    # slowly: SSF in bf16 ran at half PyTorch's speed, docs/performance.md).
    return (y.astype(jnp.float32) * scale + shift).astype(y.dtype)

  def on_patch_embedding(self, scope, x, site):
    return self._apply(scope, x, (x.shape[-1],))

  def on_projection(self, scope, x, y, site):
    return self._apply(scope, y, site.features)

  def on_norm(self, scope, x, y, site):
    if site.name == "fc_norm":
      return y
    return self._apply(scope, y, (y.shape[-1],))

  def merge(self, params):
    return merge_ssf(params)


def merge_ssf(params: dict) -> dict:
  """Folds every `ssf_scale` / `ssf_shift` into the op it follows; drops the SSF leaves.

  Projection / Dense: kernel * scale (over output axes), bias * scale + shift, and a LoRA
  `lora_b` still present * scale (so `merge_ssf` and `merge_lora` commute).
  LayerNorm: scale * g, bias * g + shift. Patch embedding (top-level SSF): likewise on
  `embedding`.
  """
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for key in [k for k in flat if k.endswith("ssf_scale")]:
    owner = key[: -len("ssf_scale")].rstrip("/")
    scale = np.asarray(flat[key], np.float64)
    shift = np.asarray(flat[f"{owner}/ssf_shift" if owner else "ssf_shift"], np.float64)
    if not owner:  # the patch embedding's SSF lives at the root
      owner = "embedding"
    cast = lambda v, ref: v.astype(np.asarray(ref).dtype)
    if f"{owner}/kernel" in flat:
      kernel = flat[f"{owner}/kernel"]
      flat[f"{owner}/kernel"] = cast(np.asarray(kernel, np.float64) * scale, kernel)
      if f"{owner}/lora_b" in flat:  # an unmerged LoRA update is scaled too: (xW + xAB) * s
        lora_b = flat[f"{owner}/lora_b"]
        flat[f"{owner}/lora_b"] = cast(np.asarray(lora_b, np.float64) * scale, lora_b)
    else:  # LayerNorm
      g = flat[f"{owner}/scale"]
      flat[f"{owner}/scale"] = cast(np.asarray(g, np.float64) * scale, g)
    bias = flat[f"{owner}/bias"]
    flat[f"{owner}/bias"] = cast(np.asarray(bias, np.float64) * scale + shift, bias)
    del flat[key], flat[key.replace("ssf_scale", "ssf_shift")]
  return traverse_util.unflatten_dict(flat, sep="/")
