"""Backbone layers with built-in extension points for tuning plug-ins.

`Projection` is a dense layer over several input/output axes (the shapes the official ViT
checkpoints store: query kernels are [D, H, Dh]) that optionally carries a LoRA update
(`lora_a`, `lora_b`) and an SSF scale/shift (`ssf_scale`, `ssf_shift`) of its output.
`LayerNorm` likewise carries optional SSF parameters. Plug-in parameters live beside the
pretrained ones, so the backbone's names never change and loading a checkpoint is a tree merge.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def _tensordot(x, w, n_axes):
  """Contract the last `n_axes` axes of x with the first `n_axes` axes of w."""
  return jax.lax.dot_general(
      x, w, (((tuple(range(x.ndim - n_axes, x.ndim))), tuple(range(n_axes))), ((), ())))


class Projection(nn.Module):
  """y = x . kernel + bias over `in_axes` trailing input axes, with optional LoRA and SSF.

  kernel: [*in_shape, *features]. LoRA: y += (alpha / r) * (x . lora_a) . lora_b with lora_a
  [*in_shape, r] (random) and lora_b [r, *features] (zeros, so training starts at the pretrained
  function). SSF: y = y * ssf_scale + ssf_shift (ones / zeros).
  """
  features: tuple[int, ...]
  in_axes: int = 1
  use_bias: bool = True
  lora_rank: int = 0
  lora_alpha: float = 8.0
  ssf: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.in_axes:]
    fan_in = int(np.prod(in_shape))
    fan_out = int(np.prod(self.features))

    def kernel_init(key, shape, dtype=jnp.float32):
      # Initialise as the equivalent 2-D matrix so fan-in/out are those of the flat layer.
      return self.kernel_init(key, (fan_in, fan_out), dtype).reshape(shape)

    kernel = self.param("kernel", kernel_init, (*in_shape, *self.features))
    y = _tensordot(x.astype(self.dtype), kernel.astype(self.dtype), self.in_axes)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, self.features)
      y = y + bias.astype(self.dtype)
    if self.lora_rank > 0:
      a = self.param("lora_a", nn.initializers.normal(1.0 / np.sqrt(fan_in)),
                     (*in_shape, self.lora_rank))
      b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, *self.features))
      h = _tensordot(x.astype(self.dtype), a.astype(self.dtype), self.in_axes)  # [..., r]
      y = y + (self.lora_alpha / self.lora_rank) * _tensordot(h, b.astype(self.dtype), 1)
    if self.ssf:
      y = apply_ssf(self, y, self.features)
    return y


def apply_ssf(module: nn.Module, y, features: Sequence[int]):
  """Per-channel scale and shift (SSF), declared as `ssf_scale` / `ssf_shift` of `module`."""
  scale = module.param("ssf_scale", nn.initializers.ones, tuple(features))
  shift = module.param("ssf_shift", nn.initializers.zeros, tuple(features))
  return y * scale.astype(y.dtype) + shift.astype(y.dtype)


class LayerNorm(nn.Module):
  """Layer normalisation (statistics in fp32) with parameters `scale`, `bias` and optional SSF."""
  epsilon: float = 1e-6
  ssf: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    y = y.astype(self.dtype)
    if self.ssf:
      y = apply_ssf(self, y, (d,))
    return y


class Bottleneck(nn.Module):
  """Adapter bottleneck Up(act(Down(x))) with a zero-initialised up-projection.

  Used both as the sequential (Houlsby/Pfeiffer) adapter and as AdaptFormer's parallel branch.
  """
  dim: int
  activation: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = nn.Dense(self.dim, dtype=self.dtype, name="down",
                 kernel_init=nn.initializers.xavier_uniform())(x)
    h = nn.gelu(h, approximate=False) if self.activation == "gelu" else nn.relu(h)
    return nn.Dense(d, dtype=self.dtype, name="up", kernel_init=nn.initializers.zeros)(h)
