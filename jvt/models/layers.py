"""Backbone layers whose outputs pass through the hooks of the active methods.

`Projection` is a dense layer over several input/output axes (the shapes the official ViT
checkpoints store: query kernels are [D, H, Dh]); its `kernel` and output go through each
method's `kernel` / `projection` hook. `LayerNorm` (statistics in fp32) passes its output
through the `norm` hooks. `PatchEmbedding` is the stride-p p x p convolution of the official
checkpoints (`embedding/kernel` [p, p, C, D]), computed on CPU as one product of the flattened
patches. Plug-in parameters a hook creates live beside the pretrained ones
(`query/lora_a`, `LayerNorm_0/ssf_scale`), so the backbone's names never change and loading a
checkpoint is a tree merge.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jvt import precision

Dtype = Any


class Projection(nn.Module):
  """y = x . kernel + bias over `in_axes` trailing input axes; kernel [*in_shape, *features].

  `methods` (already in hook order) may replace the kernel (`kernel` hook) and change the
  output (`projection` hook) at `site` (its `name`: "query", ..., "mlp_in", "mlp_out").
  """
  features: tuple[int, ...]
  in_axes: int = 1
  use_bias: bool = True
  methods: tuple = ()
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x, site):
    in_shape = x.shape[-self.in_axes:]
    fan_in = int(np.prod(in_shape))
    fan_out = int(np.prod(self.features))

    def kernel_init(key, shape, dtype=jnp.float32):
      # Initialise as the equivalent 2-D matrix so fan-in/out are those of the flat layer.
      return self.kernel_init(key, (fan_in, fan_out), dtype).reshape(shape)

    site = site.at(in_axes=self.in_axes, features=tuple(self.features), dtype=self.dtype)
    kernel = self.param("kernel", kernel_init, (*in_shape, *self.features))
    for m in self.methods:
      kernel = m.on_kernel(self, kernel, site)
    x = x.astype(self.dtype)  # what the projection hooks see
    bias = self.param("bias", nn.initializers.zeros, self.features) if self.use_bias else None
    y = precision.dense(x, kernel, bias, self.in_axes, self.dtype)
    for m in self.methods:
      y = m.on_projection(self, x, y, site)
    return y


class LayerNorm(nn.Module):
  """Layer normalisation (statistics in fp32) with parameters `scale`, `bias`; its output goes
  through the `norm` hooks of `methods` at `site` (`name`: the norm's module name)."""
  epsilon: float = 1e-6
  methods: tuple = ()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, site):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    y = y.astype(self.dtype)
    site = site.at(name=self.name, dtype=self.dtype)
    for m in self.methods:
      y = m.on_norm(self, x, y, site)
    return y


class PatchEmbedding(nn.Module):
  """[B, H, W, C] images -> [B, H/p, W/p, D] tokens: the official stride-p p x p convolution.

  Parameters as `nn.Conv(D, (p, p), strides=p, padding="VALID")` keeps them (`kernel` [p, p, C,
  D], lecun-normal; `bias` [D], zero), so checkpoints load unchanged. On CPU the convolution is
  written as what it is, one product of each non-overlapping p x p x C patch with the kernel
  (`patch_product`): XLA:CPU runs the convolution's input gradient, which VP's pixel prompt
  needs, as a generic convolution at about 10 GFLOP/s (99 ms of a 1,028 ms ViT-S/16 batch-8
  step, docs/performance.md), and the product in a few ms. Elsewhere it stays a convolution.
  Images whose sides are not a multiple of p are refused (the trainer checks
  `model.image_size` before building the step; this covers images given to `apply` directly).
  """
  features: int
  patch_size: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    _, h, w, _ = images.shape
    if h % p or w % p:
      raise ValueError(f"images {h}x{w} are not a multiple of the patch size {p}: resize or "
                       f"crop them to a multiple of {p} (config: model.image_size).")
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, images.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    if jax.default_backend() == "cpu":
      return patch_product(images, kernel, bias, self.dtype)
    return patch_convolution(images, kernel, bias, self.dtype)


def patchify(images, p: int):
  """[B, H, W, C] -> [B, H/p, W/p, p, p, C]: the non-overlapping p x p patches, row-major."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5)


def patch_product(images, kernel, bias, dtype):
  """The patch embedding as a product: patches [B, h, w, p, p, C] . kernel [p, p, C, D]."""
  return precision.dense(patchify(images.astype(dtype), kernel.shape[0]), kernel, bias, 3, dtype)


def patch_convolution(images, kernel, bias, dtype):
  """The patch embedding as flax `nn.Conv` computes it: operands in `dtype`, stride p, VALID."""
  p = kernel.shape[0]
  y = jax.lax.conv_general_dilated(images.astype(dtype), kernel.astype(dtype), (p, p), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y if bias is None else y + bias.astype(dtype)
