"""Partial-k: the last k blocks, the final norm and the head train (label `backbone`)."""
from __future__ import annotations

import dataclasses

from jvt.methods.base import Method


@dataclasses.dataclass(frozen=True)
class Partial(Method):
  name = "partial"
  family = "parameter"
  summary = "last k blocks + final norm + head"
  k: int = 1

  def resolve(self, num_layers):
    if not 0 < self.k <= num_layers:
      raise ValueError(f"partial.k={self.k}: must be in 1..{num_layers} (the model's blocks).")
    return self

  def partition_rules(self, num_layers):
    blocks = "|".join(str(i) for i in range(num_layers - self.k, num_layers))
    return ((rf"Transformer/encoderblock_({blocks})/.*", "backbone"),
            (r"(Transformer/encoder_norm|fc_norm)/(scale|bias)", "backbone"))
