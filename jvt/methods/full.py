"""Full fine-tuning: every backbone leaf trains (label `backbone`)."""
from __future__ import annotations

import dataclasses

from jvt.methods.base import Method
from jvt.methods.leaves import BACKBONE_LEAVES


@dataclasses.dataclass(frozen=True)
class Full(Method):
  name = "full"
  family = "baseline"
  summary = "full fine-tuning"

  def partition_rules(self, num_layers):
    return ((BACKBONE_LEAVES, "backbone"),)
