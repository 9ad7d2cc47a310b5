"""LayerNorm tuning: scale and bias of every block norm, `encoder_norm` and `fc_norm`."""
from __future__ import annotations

import dataclasses

from jvt.methods.base import Method
from jvt.methods.leaves import BLOCK


@dataclasses.dataclass(frozen=True)
class LayerNormTuning(Method):
  name = "layernorm"
  family = "parameter"
  summary = "layer-norm scales and biases"

  def partition_rules(self, num_layers):
    return ((rf"({BLOCK}/LayerNorm_[01]|Transformer/encoder_norm|fc_norm)/(scale|bias)",
             "norm"),)
