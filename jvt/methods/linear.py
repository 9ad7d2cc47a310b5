"""Linear probe: only the new head trains (the head's rule is added for every method)."""
from __future__ import annotations

import dataclasses

from jvt.methods.base import Method


@dataclasses.dataclass(frozen=True)
class Linear(Method):
  name = "linear"
  family = "parameter"
  summary = "linear probe: the head only"
