"""Sequential bottleneck adapters (Houlsby / Pfeiffer): `h <- h + Up(gelu(Down h))` after the
attention and/or the MLP sub-layer, inside the residual branch.

Leaves `Transformer/encoderblock_{i}/adapter_attn/{down,up}/{kernel,bias}` (and `adapter_mlp`);
Down xavier-uniform, Up zero, so training starts at the pretrained function. Not mergeable.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jvt.methods.base import Method
from jvt.methods.leaves import BLOCK

POSITIONS = ("attn", "mlp")


class Bottleneck(nn.Module):
  """Up(gelu(Down(x))) with a xavier-uniform down- and a zero up-projection."""
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = nn.Dense(self.dim, dtype=self.dtype, name="down",
                 kernel_init=nn.initializers.xavier_uniform())(x)
    h = nn.gelu(h, approximate=False)
    return nn.Dense(d, dtype=self.dtype, name="up", kernel_init=nn.initializers.zeros)(h)


@dataclasses.dataclass(frozen=True)
class Adapter(Method):
  """dim: bottleneck width (> 0); positions: sub-layers followed by an adapter."""
  name = "adapter"
  family = "adapter"
  summary = "sequential bottleneck adapters"
  order = 30
  mergeable = False
  dim: int = 8
  positions: tuple[str, ...] = ("attn", "mlp")

  def resolve(self, num_layers):
    if self.dim <= 0:
      raise ValueError(f"adapter.dim={self.dim}: must be > 0.")
    bad = set(self.positions) - set(POSITIONS)
    if bad or not self.positions:
      raise ValueError(f"adapter.positions={tuple(self.positions)}: allowed values are "
                       f"{POSITIONS} (at least one).")
    return self

  def claims(self, num_layers):
    return {"adapter_dim": int(self.dim), "adapter_positions": tuple(self.positions)}

  def partition_rules(self, num_layers):
    return ((rf"{BLOCK}/adapter_(attn|mlp)/.*", "adapter"),)

  def on_branch(self, scope, x, z, y, site):
    if site.name not in self.positions:
      return y
    return y + Bottleneck(self.dim, dtype=site.dtype, name=f"adapter_{site.name}")(y)
