"""Convpass (Jie & Deng 2022, "Convolutional Bypasses Are Better Vision Transformer Adapters",
JieShibo/PETL-ViT `convpass/`): a convolutional bypass beside the attention and beside the MLP
of every block,

  x <- x + Attn(LN1(x)) + s * Convpass(LN1(x)),   x <- x + MLP(LN2(x)) + s * Convpass(LN2(x)),
  Convpass(z) = Up(drop(act(Conv3x3(act(Down(z)))))),   act(u) = u * sigmoid(1.702 u) (QuickGELU).

Down [D, dim] (xavier-uniform, zero bias) and Up [dim, D] (zero, so training starts at the
pretrained function) act on every token; the 3x3 convolution (stride 1, zero padding 1) runs
on the image tokens laid out on their h x w grid. As the authors' code does for [CLS], every
token outside the grid ([CLS] and any prompt tokens) goes through the same convolution as a
1x1 image, so only the kernel's centre tap and the bias reach it. Conv init "identity" (zero
kernel with the identity at the centre tap, the authors' default) or "xavier" (their
`xavier_init=True` tasks); dropout 0.1 in training as in the authors' code.

Leaves `Transformer/encoderblock_{i}/convpass_{attn,mlp}/{down,conv,up}/{kernel,bias}`, label
`adapter`. Not mergeable (the convolution mixes tokens).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jvt import precision
from jvt.methods.base import Method
from jvt.methods.dense import Dense
from jvt.methods.leaves import BLOCK

CONV_INITS = ("identity", "xavier")
POSITIONS = ("attn", "mlp")


def quick_gelu(x):
  """The authors' QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _identity_centre(key, shape, dtype=jnp.float32):
  """[3, 3, r, r] zeros with the identity at the centre tap."""
  del key
  kernel = np.zeros(shape, np.float32)
  kernel[shape[0] // 2, shape[1] // 2] = np.eye(shape[2], shape[3])
  return jnp.asarray(kernel, dtype)


class Conv3x3(nn.Module):
  """The bypass's 3x3 convolution (stride 1, zero padding 1): `nn.Conv`'s leaves and arithmetic,
  with its parameters declared whether or not a call holds image rows (the last block may
  compute [CLS] alone: `Site.image_rows`)."""
  dim: int
  conv_init: str = "identity"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, grid, rest):
    """grid: [B, h, w, dim] image tokens (h * w may be 0); rest: [B, R, dim] the other tokens,
    each a 1x1 image (the centre tap only). Returns both, convolved, in `dtype`."""
    init = (_identity_centre if self.conv_init == "identity"
            else nn.initializers.xavier_uniform())
    kernel = self.param("kernel", init, (3, 3, self.dim, self.dim))  # [3, 3, dim, dim]
    bias = self.param("bias", nn.initializers.zeros, (self.dim,))
    if grid.shape[1] * grid.shape[2]:
      grid = jax.lax.conv_general_dilated(
          grid.astype(self.dtype), kernel.astype(self.dtype), (1, 1), ((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias.astype(self.dtype)
    rest = precision.dense(rest, kernel[1, 1], bias, 1, self.dtype)
    return grid, rest


class Bypass(nn.Module):
  """The bypass for tokens [B, T, D] whose last n tokens are the image grid (n = h * w, or 0
  when the block computes no image row)."""
  dim: int
  grid: tuple[int, int]
  conv_init: str = "identity"
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool, n: int):
    b, t, d = z.shape
    h, w = self.grid if n else (0, 0)
    u = Dense(self.dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
              name="down")(z)
    u = quick_gelu(u)  # [B, T, dim]
    grid, rest = Conv3x3(self.dim, self.conv_init, self.dtype, name="conv")(
        u[:, t - n:].reshape(b, h, w, self.dim), u[:, :t - n])
    u = quick_gelu(jnp.concatenate([rest, grid.reshape(b, n, self.dim)], axis=1))  # [B, T, dim]
    u = nn.Dropout(self.dropout)(u, deterministic=not train)
    return Dense(d, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="up")(u)


@dataclasses.dataclass(frozen=True)
class Convpass(Method):
  """dim: bottleneck channels (8); scale: s, the bypass's weight (the authors choose it per task
  from {0.01, 0.1, 1, 10, 100}); conv_init from CONV_INITS; dropout: inside the bypass, in
  training; positions: "attn" and/or "mlp" (("attn",) is the authors' Convpass-attn)."""
  name = "convpass"
  family = "adapter"
  summary = "Convpass: convolutional bypasses beside attention and MLP"
  order = 40
  mergeable = False
  rowwise = False  # the convolution mixes the token grid's rows,
  grid_local = True  # and only those: a block computes every image row or none
  dim: int = 8
  scale: float = 1.0
  conv_init: str = "identity"
  dropout: float = 0.1
  positions: tuple[str, ...] = ("attn", "mlp")

  def resolve(self, num_layers):
    if self.dim <= 0:
      raise ValueError(f"convpass.dim={self.dim}: must be > 0.")
    if self.conv_init not in CONV_INITS:
      raise ValueError(f"convpass.conv_init={self.conv_init!r}; allowed: {CONV_INITS}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"convpass.dropout={self.dropout}: must be in [0, 1).")
    bad = set(self.positions) - set(POSITIONS)
    if bad or not self.positions:
      raise ValueError(f"convpass.positions={tuple(self.positions)}: allowed values are "
                       f"{POSITIONS} (at least one).")
    return self

  def partition_rules(self, num_layers):
    return ((rf"{BLOCK}/convpass_(attn|mlp)/.*", "adapter"),)

  def on_branch(self, scope, x, z, y, site):
    if site.name not in self.positions:
      return y
    bypass = Bypass(self.dim, tuple(site.grid), self.conv_init, self.dropout, dtype=site.dtype,
                    name=f"convpass_{site.name}")
    return y + self.scale * bypass(z, site.train, site.image_rows())
