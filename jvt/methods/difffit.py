"""DiffFit (Xie et al., ICCV 2023): bias terms, layer norms and a learnable per-channel scale
on each block's attention and MLP residual branches, `x <- x + gamma_1 * Attn(LN(x))`,
`x <- x + gamma_2 * MLP(LN(x))`, gamma initialised to 1 (so training starts at the pretrained
function).

Leaves `Transformer/encoderblock_{i}/difffit_attn` and `difffit_mlp` [D] (label `difffit`),
plus every bias (label `bias`, as BitFit's) and the scale and bias of every block norm and the
final norm (label `norm`). Mergeable: gamma folds into the out-projection / Dense_1 kernel and
bias (`kernel * gamma`, `bias * gamma`), the biases and norms are backbone leaves already.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jvt.methods.base import Method
from jvt.methods.leaves import ALL_BIASES, BLOCK

# The projection whose output each branch's gamma scales (the branch's last linear map).
_BRANCH_OWNER = {"attn": "MultiHeadDotProductAttention_0/out",
                 "mlp": "MlpBlock_0/Dense_1"}


@dataclasses.dataclass(frozen=True)
class DiffFit(Method):
  """No fields: gamma per block and branch, every bias and every norm train."""
  name = "difffit"
  family = "parameter"
  summary = "DiffFit: biases, norms and per-block branch scales (init 1)"
  # Last on a branch and last to merge: gamma scales the whole branch output, after the
  # projection-level methods (LoRA, SSF, FacT, DoRA) have been folded into its kernel.
  order = 96

  def partition_rules(self, num_layers):
    return ((rf"{BLOCK}/difffit_(attn|mlp)", "difffit"),
            (ALL_BIASES, "bias"),
            (rf"({BLOCK}/LayerNorm_[01]|Transformer/encoder_norm|fc_norm)/scale", "norm"))

  def on_branch(self, scope, x, z, y, site):
    gamma = scope.param(f"difffit_{site.name}", nn.initializers.ones, (y.shape[-1],))
    return (y.astype(jnp.float32) * gamma).astype(y.dtype)  # fp32, as SSF (its gradient's sum)

  def merge(self, params):
    flat = dict(traverse_util.flatten_dict(params, sep="/"))
    for key in [k for k in flat if k.split("/")[-1] in ("difffit_attn", "difffit_mlp")]:
      block = key.rsplit("/", 1)[0]
      owner = f"{block}/{_BRANCH_OWNER[key.rsplit('_', 1)[-1]]}"
      gamma = np.asarray(flat.pop(key), np.float64)
      for leaf in ("kernel", "bias"):  # kernel [..., D] and bias [D]: output axis last
        value = flat[f"{owner}/{leaf}"]
        flat[f"{owner}/{leaf}"] = (np.asarray(value, np.float64) * gamma).astype(
            np.asarray(value).dtype)
    return traverse_util.unflatten_dict(flat, sep="/")
