"""AdaptFormer: a parallel bottleneck beside each block's MLP,
`x <- x + MLP(LN(x)) + scale * Up(dropout(relu(Down(u))))`.

By default it runs as the authors' code does (ShoufaChen/AdaptFormer, `models/adapter.py`
with the image configs' `adapter_layernorm_option="none"`): the branch reads the
un-normalised residual stream `u = x` (`norm="none"`), drops out 10% of the bottleneck in
training (`dropout=0.1`), and initialises Down as torch's nn.Linear default
(kaiming_uniform(a=sqrt 5): uniform(+-1/sqrt(D))) with a zero bias, Up zero (`init="lora"`).
jvt's earlier behaviour, the paper figure's `u = LN(x)` (the block's own norm before the MLP)
with a xavier-uniform Down and no dropout, is `norm="ln", dropout=0.0, init="xavier"`.

Leaves `Transformer/encoderblock_{i}/adaptformer/{down,up}/{kernel,bias}`. Not mergeable.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jvt.methods.base import Method
from jvt.methods.dense import Dense
from jvt.methods.leaves import BLOCK

NORMS = ("none", "ln")
INITS = ("lora", "xavier")
# torch.nn.Linear's default weight init, kaiming_uniform(a=sqrt(5)): bound 1 / sqrt(fan_in).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class ParallelBottleneck(nn.Module):
  """Up(dropout(relu(Down(x)))): Down per `down_init` ("lora" / "xavier"), Up zero."""
  dim: int
  dropout: float = 0.0
  down_init: str = "lora"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = x.shape[-1]
    down_init = TORCH_LINEAR_INIT if self.down_init == "lora" else nn.initializers.xavier_uniform()
    h = Dense(self.dim, dtype=self.dtype, name="down", kernel_init=down_init)(x)
    h = nn.relu(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return Dense(d, dtype=self.dtype, name="up", kernel_init=nn.initializers.zeros)(h)


@dataclasses.dataclass(frozen=True)
class AdaptFormer(Method):
  """dim: bottleneck width; scale: the branch's factor s; norm: the branch input ("none": the
  residual stream, "ln": the block's normed MLP input); dropout: inside the bottleneck (training
  only); init: "lora" (torch nn.Linear default for Down) or "xavier"."""
  name = "adaptformer"
  family = "adapter"
  summary = "AdaptFormer parallel adapter beside the MLP"
  order = 40
  mergeable = False
  dim: int = 8
  scale: float = 0.1
  norm: str = "none"
  dropout: float = 0.1
  init: str = "lora"

  def resolve(self, num_layers):
    if self.dim <= 0:
      raise ValueError(f"adaptformer.dim={self.dim}: must be > 0.")
    if self.norm not in NORMS:
      raise ValueError(f"adaptformer.norm={self.norm!r}; allowed: {NORMS}.")
    if self.init not in INITS:
      raise ValueError(f"adaptformer.init={self.init!r}; allowed: {INITS}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"adaptformer.dropout={self.dropout}: must be in [0, 1).")
    return self

  def claims(self, num_layers):
    return {"adaptformer_dim": int(self.dim), "adaptformer_scale": float(self.scale)}

  def partition_rules(self, num_layers):
    return ((rf"{BLOCK}/adaptformer/.*", "adapter"),)

  def on_branch(self, scope, x, z, y, site):
    if site.name != "mlp":
      return y
    u = x if self.norm == "none" else z
    branch = ParallelBottleneck(self.dim, self.dropout, self.init, dtype=site.dtype,
                                name="adaptformer")
    return y + self.scale * branch(u, site.train)
