"""RepAdapter (Luo et al. 2023, "Towards Efficient Visual Adaption via Structural
Re-parameterization", luogen1996/RepAdapter): a linear adapter without non-linearity on the
input of the attention and of the MLP of every block,

  z <- z + s * (Up_g(drop(Down(z)))),  z = LN1(x) before attention, LN2(x) before the MLP,

Down [D, dim] with bias (xavier-uniform, zero bias), Up_g a group-wise linear map dim -> D in
`groups` groups (the authors' `Conv1d(dim, D, 1, groups)`: output group j reads only input
group j), zero-initialised so training starts at the pretrained function; dropout 0.1 on the
bottleneck in training (the authors' value).

Leaves `Transformer/encoderblock_{i}/LayerNorm_{0,1}/repadapter/down/{kernel [D, dim], bias}`
and `.../repadapter/up/{kernel [groups, dim/groups, D/groups], bias [D]}`, label `adapter`.
Mergeable exactly (the authors' structural re-parameterisation): with M = I + s Down Up and
c = s (b_down Up + b_up), the next projections (query, key, value after LN1; Dense_0 after LN2)
become W <- M W, b <- b + c W, so inference costs nothing extra.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jvt.methods.base import Method
from jvt.methods.dense import Dense
from jvt.methods.leaves import BLOCK

# The norm whose output each adapter changes -> the projections that read it.
NEXT_PROJECTIONS = {
    "LayerNorm_0": ("MultiHeadDotProductAttention_0/query", "MultiHeadDotProductAttention_0/key",
                    "MultiHeadDotProductAttention_0/value"),
    "LayerNorm_1": ("MlpBlock_0/Dense_0",),
}
POSITIONS = {"attn": "LayerNorm_0", "mlp": "LayerNorm_1"}


class GroupLinear(nn.Module):
  """y = x Up_g + b: `groups` independent [dim/groups, D/groups] maps (kernel zeros)."""
  features: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    g = self.groups
    din = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.zeros, (g, din // g, self.features // g))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    xg = x.reshape(*x.shape[:-1], g, din // g)
    y = jnp.einsum("...gi,gio->...go", xg, kernel.astype(self.dtype))
    return y.reshape(*x.shape[:-1], self.features) + bias.astype(self.dtype)


def dense_up(kernel: np.ndarray) -> np.ndarray:
  """The group-wise kernel [g, dim/g, D/g] as the block-diagonal dense [dim, D]."""
  g, ri, do = kernel.shape
  dense = np.zeros((g * ri, g * do), kernel.dtype)
  for j in range(g):
    dense[j * ri:(j + 1) * ri, j * do:(j + 1) * do] = kernel[j]
  return dense


@dataclasses.dataclass(frozen=True)
class RepAdapter(Method):
  """dim: bottleneck width (8); groups: of the up-projection (2, the authors'; must divide dim
  and the model width); scale: s (the authors choose it per task, 0.1 to 10); dropout: on the
  bottleneck in training; positions: "attn" and/or "mlp" (("attn",) is the authors'
  RepAttn)."""
  name = "repadapter"
  family = "adapter"
  summary = "RepAdapter: linear group-wise adapters merged into the next projections"
  # Last at a norm and last to merge: it folds into the final kernels of the projections it
  # feeds, after LoRA / DoRA / FacT / SSF have been folded into them.
  order = 95
  dim: int = 8
  groups: int = 2
  scale: float = 1.0
  dropout: float = 0.1
  positions: tuple[str, ...] = ("attn", "mlp")

  def resolve(self, num_layers):
    if self.dim <= 0 or self.groups <= 0 or self.dim % self.groups:
      raise ValueError(f"repadapter.dim={self.dim}, groups={self.groups}: both must be > 0 and "
                       "groups must divide dim.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"repadapter.dropout={self.dropout}: must be in [0, 1).")
    bad = set(self.positions) - set(POSITIONS)
    if bad or not self.positions:
      raise ValueError(f"repadapter.positions={tuple(self.positions)}: allowed values are "
                       f"{tuple(POSITIONS)} (at least one).")
    return self

  def partition_rules(self, num_layers):
    return ((rf"{BLOCK}/LayerNorm_[01]/repadapter/.*", "adapter"),)

  def on_norm(self, scope, x, y, site):
    if site.name not in (POSITIONS[p] for p in self.positions):
      return y
    d = y.shape[-1]
    if d % self.groups:
      raise ValueError(f"repadapter.groups={self.groups} must divide the model width {d}.")
    adapter = _Adapter(self.dim, self.groups, self.dropout, dtype=site.dtype, name="repadapter")
    return y + self.scale * adapter(y, site.train)

  def merge(self, params):
    return merge_repadapter(params, scale=self.scale)


class _Adapter(nn.Module):
  dim: int
  groups: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool):
    h = Dense(self.dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
              name="down")(z)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return GroupLinear(z.shape[-1], self.groups, dtype=self.dtype, name="up")(h)


def merge_repadapter(params: dict, *, scale: float) -> dict:
  """Folds every RepAdapter into the projections that read its norm (float64 arithmetic)."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for key in [k for k in flat if k.endswith("/repadapter/down/kernel")]:
    norm = key[: -len("/repadapter/down/kernel")]
    block, norm_name = norm.rsplit("/", 1)
    a = np.asarray(flat.pop(key), np.float64)  # [D, dim]
    a_bias = np.asarray(flat.pop(f"{norm}/repadapter/down/bias"), np.float64)
    up = dense_up(np.asarray(flat.pop(f"{norm}/repadapter/up/kernel"), np.float64))  # [dim, D]
    up_bias = np.asarray(flat.pop(f"{norm}/repadapter/up/bias"), np.float64)
    m = np.eye(a.shape[0]) + scale * a @ up  # [D, D]
    c = scale * (a_bias @ up + up_bias)  # [D]
    for proj in NEXT_PROJECTIONS[norm_name]:
      kernel, bias = flat[f"{block}/{proj}/kernel"], flat[f"{block}/{proj}/bias"]
      w = np.asarray(kernel, np.float64)
      flat[f"{block}/{proj}/kernel"] = np.tensordot(m, w, axes=1).astype(np.asarray(kernel).dtype)
      flat[f"{block}/{proj}/bias"] = (np.asarray(bias, np.float64)
                                      + np.tensordot(c, w, axes=1)).astype(np.asarray(bias).dtype)
  return traverse_util.unflatten_dict(flat, sep="/")
