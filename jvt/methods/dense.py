"""The dense layer of the plug-ins' own parameters (adapters' down / up projections).

Flax `nn.Dense`'s parameters (`kernel` [in, features], `bias` [features], fp32) and, in fp32,
its arithmetic; in bf16 on CPU the product takes the backbone's mixed path (`jvt.precision`):
bf16 operands with fp32 accumulation, forward and backward, where `nn.Dense` would convert both
operands of each product to fp32 (ViT-S/16, bf16, batch 32: the sequential adapter's step
1.07-1.09x faster on a CPU with AVX-512 BF16, RepAdapter's 1.33x on one without;
docs/performance.md).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jvt import precision


class Dense(nn.Module):
  """y = x . kernel + bias over x's last axis; x [..., in] -> y [..., features] in `dtype`."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
    return precision.dense(x, kernel, bias, 1, self.dtype)
