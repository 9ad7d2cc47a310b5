"""Sequential bottleneck adapters, `placement` choosing where they sit in each block:

  * "houlsby" (default; Houlsby et al. 2019): `h <- h + Up(gelu(Down h))` on the output h of
    the attention and/or the MLP sub-layer (`positions`), inside the residual branch. Leaves
    `Transformer/encoderblock_{i}/adapter_{attn,mlp}/{down,up}/{kernel,bias}`.
  * "pfeiffer" (Pfeiffer et al. 2021, as visinf/adapter_plus's `pfeiffer` config): one adapter
    after the MLP, on the block's output h = x + MLP(LN(x)) with its own layer norm,
    `h <- h + Up(gelu(Down(LN_a(h))))`. Leaves `.../adapter_out/{norm/{scale,bias},down,up}`.
  * "adapter_plus" (Adapter+, Steitz & Roth, CVPR 2024, visinf/adapter_plus `post` config with
    channel scaling): one adapter after the block, `h <- h + c * Up(gelu(Down h))` with a
    learned per-channel scale c [D] (init 1), no norm, and the authors' Houlsby init: Down and
    Up weights truncated normal (std 0.01, cut at 2 std), zero biases. Leaves
    `.../adapter_out/{down,up,scale}`.

Houlsby and Pfeiffer draw Down xavier-uniform and Up zero, so training starts at the pretrained
function; Adapter+ starts close to it (its Up is small, not zero), as the authors' code does.
`drop_path` drops the adapter's output per image in training (stochastic depth; 0.1 in
Adapter+'s configs). Label `adapter`. Not mergeable (the bottleneck is non-linear).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jvt.gelu import gelu
from jvt.methods.base import Method
from jvt.methods.dense import Dense
from jvt.methods.leaves import BLOCK

POSITIONS = ("attn", "mlp")
PLACEMENTS = ("houlsby", "pfeiffer", "adapter_plus")


def _houlsby_init(std: float = 0.01):
  """torch trunc_normal_(std=std, a=-2 std, b=2 std), as Adapter+'s `init="houlsby"`."""
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)
  return init


def _bottleneck(x, dim: int, init: str, dtype):
  """Up(gelu(Down(x))) as `down` / `up` Dense layers of the calling (compact) module; `init`
  "zero_up" (xavier Down, zero Up) or "houlsby" (Adapter+)."""
  if init == "houlsby":
    down_init = up_init = _houlsby_init()
  else:
    down_init, up_init = nn.initializers.xavier_uniform(), nn.initializers.zeros
  h = Dense(dim, dtype=dtype, name="down", kernel_init=down_init)(x)
  h = gelu(h)  # exact (erf) GELU, as the authors' nn.GELU()
  return Dense(x.shape[-1], dtype=dtype, name="up", kernel_init=up_init)(h)


class Bottleneck(nn.Module):
  """Up(gelu(Down(x))) with a xavier-uniform Down and a zero Up (Houlsby placement)."""
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _bottleneck(x, self.dim, "zero_up", self.dtype)


class _OutputAdapter(nn.Module):
  """The adapter after the block: Pfeiffer's (with a layer norm) or Adapter+'s (scaled)."""
  dim: int
  placement: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    if self.placement == "pfeiffer":
      u = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(h)
      return _bottleneck(u, self.dim, "zero_up", self.dtype)
    y = _bottleneck(h, self.dim, "houlsby", self.dtype)
    scale = self.param("scale", nn.initializers.ones, (h.shape[-1],))
    return (y.astype(jnp.float32) * scale).astype(y.dtype)  # fp32, as SSF (its gradient's sum)


def drop_path(scope, y, rate: float, train: bool):
  """Stochastic depth on a residual branch: drop it per example, scale the kept ones."""
  if not train or rate == 0.0:
    return y
  keep = jax.random.bernoulli(scope.make_rng("dropout"), 1.0 - rate,
                              (y.shape[0],) + (1,) * (y.ndim - 1))
  return jnp.where(keep, y / (1.0 - rate), jnp.zeros_like(y))


@dataclasses.dataclass(frozen=True)
class Adapter(Method):
  """dim: bottleneck width (> 0); placement from PLACEMENTS; positions (houlsby only): the
  sub-layers followed by an adapter; drop_path: stochastic depth on the adapter in training."""
  name = "adapter"
  family = "adapter"
  summary = "sequential bottleneck adapters (Houlsby, Pfeiffer, Adapter+)"
  order = 30
  mergeable = False
  dim: int = 8
  positions: tuple[str, ...] = ("attn", "mlp")
  placement: str = "houlsby"
  drop_path: float = 0.0

  def resolve(self, num_layers):
    if self.dim <= 0:
      raise ValueError(f"adapter.dim={self.dim}: must be > 0.")
    if self.placement not in PLACEMENTS:
      raise ValueError(f"adapter.placement={self.placement!r}; allowed: {PLACEMENTS}.")
    bad = set(self.positions) - set(POSITIONS)
    if bad or not self.positions:
      raise ValueError(f"adapter.positions={tuple(self.positions)}: allowed values are "
                       f"{POSITIONS} (at least one).")
    if self.placement != "houlsby" and tuple(self.positions) != POSITIONS:
      raise ValueError(f"adapter.positions={tuple(self.positions)} applies to "
                       f"placement='houlsby' only; placement={self.placement!r} puts one "
                       "adapter after each block (leave positions at its default).")
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"adapter.drop_path={self.drop_path}: must be in [0, 1).")
    return self

  def claims(self, num_layers):
    return {"adapter_dim": int(self.dim), "adapter_positions": tuple(self.positions),
            "adapter_placement": self.placement}

  def partition_rules(self, num_layers):
    return ((rf"{BLOCK}/adapter_(attn|mlp|out)/.*", "adapter"),)

  def on_branch(self, scope, x, z, y, site):
    if self.placement == "houlsby":
      if site.name not in self.positions:
        return y
      a = Bottleneck(self.dim, dtype=site.dtype, name=f"adapter_{site.name}")(y)
      return y + drop_path(scope, a, self.drop_path, site.train)
    if site.name != "mlp":
      return y
    # After the block: h = x + y becomes h + A(h); the branch returns y + A(x + y).
    a = _OutputAdapter(self.dim, self.placement, dtype=site.dtype, name="adapter_out")(x + y)
    return y + drop_path(scope, a, self.drop_path, site.train)
