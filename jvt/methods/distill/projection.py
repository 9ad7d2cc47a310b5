"""`distill_proj`: feature distillation's learned projections, a training-only plug-in.

K linear maps [D] -> [dim] (one per matched layer pair) in `distill_proj/{kernel [K, D, dim],
bias [K, dim]}`. The ViT returns them in aux["distill_proj"] (the `outputs` hook) and the
distillation task loss applies them to the block features it matches. Merging drops them: the
tuned model computes the same logits without them.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
from flax import traverse_util

from jvt.methods.base import Method


class DistillProjection(nn.Module):
  """`kernel` [K, D, D'] and `bias` [K, D'] of K linear maps, returned rather than applied."""
  features: int
  num: int

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param("kernel", nn.initializers.lecun_normal(batch_axis=(0,)),
                        (self.num, in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.num, self.features))
    return {"kernel": kernel, "bias": bias}


@dataclasses.dataclass(frozen=True)
class DistillProj(Method):
  """dim: the teacher's width (required); num: the number of matched layer pairs."""
  name = "distill_proj"
  family = "remapping"
  summary = "feature distillation's learned projections (with config.distill)"
  dim: int = 0
  num: int = 1

  def resolve(self, num_layers):
    if self.dim <= 0 or self.num <= 0:
      raise ValueError(f"distill_proj.dim={self.dim} and num={self.num}: both must be > 0 "
                       "(dim = the teacher's width, num = the number of matched layers).")
    return self

  def claims(self, num_layers):
    return {"distill_proj_dim": int(self.dim), "distill_proj_num": int(self.num)}

  def partition_rules(self, num_layers):
    return ((r"distill_proj/(kernel|bias)", "distill"),)

  def on_outputs(self, scope, aux, site):
    proj = DistillProjection(self.dim, self.num, name="distill_proj")(site.hidden_size)
    return dict(aux, distill_proj=proj)

  def merge(self, params):
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if not k.startswith("distill_proj/")}, sep="/")
