"""LoRA: a low-rank update of chosen projections, `y = x W + b + (alpha / r) (x A) B`.

Leaves `<projection>/lora_a` [*in, r] and `<projection>/lora_b` [r, *out] beside the frozen
kernel (e.g. `.../MultiHeadDotProductAttention_0/query/lora_a`). A is drawn as loralib draws it
(`kaiming_uniform_(A, a=sqrt(5))`: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), std
1/sqrt(3 fan_in)) and B is zero, so training starts at the pretrained function;
`init="normal"` keeps jvt's earlier draw (normal, std 1/sqrt(fan_in)). Mergeable:
W <- W + (alpha / r) A B.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jvt import precision
from jvt.methods.base import Method

TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


def check_low_rank(name: str, rank: int, targets) -> None:
  """The rank and projection targets of a low-rank method (lora, dora), or a clear error."""
  if rank <= 0:
    raise ValueError(f"{name}.rank={rank}: must be a positive integer.")
  targets = tuple(targets)
  bad = [t for t in targets if t not in TARGETS]
  if bad or not targets:
    raise ValueError(f"{name}.targets={targets}: unknown {bad}; allowed values are "
                     f"{TARGETS} (at least one).")
INITS = ("kaiming_uniform", "normal")


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
  """rank r > 0, alpha (the update is scaled by alpha / r), targets from `TARGETS`
  ("mlp_in" / "mlp_out" are the MLP's Dense_0 / Dense_1), init from `INITS`."""
  name = "lora"
  family = "parameter"
  summary = "low-rank updates of chosen projections"
  order = 10  # before SSF, whose scale then also applies to the update (as merge_ssf assumes)
  rank: int = 8
  alpha: float = 8.0
  targets: tuple[str, ...] = ("query", "value")
  init: str = "kaiming_uniform"

  def resolve(self, num_layers):
    check_low_rank("lora", self.rank, self.targets)
    if self.init not in INITS:
      raise ValueError(f"lora.init={self.init!r}; allowed: {INITS}.")
    return self

  def claims(self, num_layers):
    return {"lora_rank": int(self.rank), "lora_alpha": float(self.alpha),
            "lora_targets": tuple(self.targets)}

  def partition_rules(self, num_layers):
    return ((r".*/lora_(a|b)", "lora"),)

  def on_projection(self, scope, x, y, site):
    if site.name not in self.targets:
      return y
    in_shape = x.shape[-site.in_axes:]
    fan_in = int(np.prod(in_shape))
    if self.init == "kaiming_uniform":
      bound = 1.0 / np.sqrt(fan_in)
      init = lambda key, shape: jax.random.uniform(key, shape, minval=-bound, maxval=bound)
    else:
      init = nn.initializers.normal(1.0 / np.sqrt(fan_in))
    a = scope.param("lora_a", init, (*in_shape, self.rank))
    b = scope.param("lora_b", nn.initializers.zeros, (self.rank, *site.features))
    # Products as the backbone's (bf16 operands, fp32 sums on the mixed path; jvt.precision).
    h = precision.dense(x, a, None, site.in_axes, site.dtype, saveable=False)  # [..., r]
    return y + (self.alpha / self.rank) * precision.dense(h, b, None, 1, site.dtype,
                                                          saveable=False)

  def merge(self, params):
    return merge_lora(params, alpha=self.alpha, rank=self.rank)


def _flat(params):
  return traverse_util.flatten_dict(params, sep="/")


def _lora_delta(flat, prefix, alpha, rank):
  a = np.asarray(flat[f"{prefix}/lora_a"], np.float64)  # [*in, r]
  b = np.asarray(flat[f"{prefix}/lora_b"], np.float64)  # [r, *out]
  return (alpha / rank) * np.tensordot(a, b, axes=1)  # [*in, *out]


def merge_lora(params: dict, *, alpha: float, rank: int) -> dict:
  """W <- W + (alpha / r) A B for every projection with LoRA leaves; drops the LoRA leaves."""
  flat = dict(_flat(params))
  for key in [k for k in flat if k.endswith("/lora_a")]:
    prefix = key[: -len("/lora_a")]
    kernel = flat[f"{prefix}/kernel"]
    merged = np.asarray(kernel, np.float64) + _lora_delta(flat, prefix, alpha, rank)
    flat[f"{prefix}/kernel"] = merged.astype(np.asarray(kernel).dtype)
    del flat[f"{prefix}/lora_a"], flat[f"{prefix}/lora_b"]
  return traverse_util.unflatten_dict(flat, sep="/")


def unmerge_lora(merged: dict, lora_params: dict, *, alpha: float, rank: int) -> dict:
  """Inverse of `merge_lora`: subtracts the update and restores the LoRA leaves.

  lora_params: a tree (e.g. the trainable subtree) holding the `lora_a` / `lora_b` leaves.
  """
  flat = dict(_flat(merged))
  lora = {k: v for k, v in _flat(lora_params).items() if k.endswith(("/lora_a", "/lora_b"))}
  for key in [k for k in lora if k.endswith("/lora_a")]:
    prefix = key[: -len("/lora_a")]
    kernel = flat[f"{prefix}/kernel"]
    restored = np.asarray(kernel, np.float64) - _lora_delta(lora, prefix, alpha, rank)
    flat[f"{prefix}/kernel"] = restored.astype(np.asarray(kernel).dtype)
  flat.update(lora)
  return traverse_util.unflatten_dict(flat, sep="/")
