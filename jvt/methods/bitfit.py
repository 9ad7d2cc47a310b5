"""BitFit: only bias vectors train (all of them, or a named subset), label `bias`."""
from __future__ import annotations

import dataclasses

from jvt.methods.base import Method
from jvt.methods.leaves import ALL_BIASES, BIAS_SUBSETS


@dataclasses.dataclass(frozen=True)
class BitFit(Method):
  """subset: None (every bias, layer norms' included) or names from `BIAS_SUBSETS`."""
  name = "bitfit"
  family = "parameter"
  summary = "bias terms only"
  subset: tuple[str, ...] | None = None

  def resolve(self, num_layers):
    if self.subset is None:
      return self
    bad = [s for s in self.subset if s not in BIAS_SUBSETS]
    if bad or not self.subset:
      raise ValueError(f"bitfit.subset={tuple(self.subset)}: unknown {bad}; allowed values are "
                       f"{tuple(BIAS_SUBSETS)} (or subset=None for every bias).")
    return self

  def partition_rules(self, num_layers):
    if self.subset is None:
      return ((ALL_BIASES, "bias"),)
    return tuple((BIAS_SUBSETS[s], "bias") for s in self.subset)
