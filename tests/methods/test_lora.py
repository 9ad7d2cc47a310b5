"""LoRA's A is drawn as loralib draws it (`kaiming_uniform_(A, a=sqrt(5))`: uniform with bound
1/sqrt(fan_in), std 1/sqrt(3 fan_in)) and B is zero; `init="normal"` keeps jvt's earlier
N(0, 1/fan_in)."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import jvt

from conftest import flat

D, MLP = 128, 256
TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")
FAN_IN = {"query": D, "key": D, "value": D, "out": D, "Dense_0": D, "Dense_1": MLP}


def _lora_leaves(init):
  model = jvt.build_model("B/16", 3, dict(method="lora", rank=16, targets=TARGETS, init=init),
                          hidden_size=D, mlp_dim=MLP, num_heads=4, num_layers=2, patch_size=8)
  return flat(jvt.init_params(model, jax.random.key(0, impl="rbg"), 16))


@pytest.mark.parametrize("init", ["kaiming_uniform", "normal"])
def test_init_matches_the_reference(init):
  params = _lora_leaves(init)
  a_leaves = {k: v for k, v in params.items() if k.endswith("lora_a")}
  assert len(a_leaves) == 2 * len(TARGETS)
  for key, a in a_leaves.items():
    fan_in = FAN_IN[key.split("/")[-2]]
    a = np.asarray(a)
    assert a.shape[-1] == 16 and math.prod(a.shape[:-1]) == fan_in
    if init == "kaiming_uniform":
      # loralib: kaiming_uniform_(a=sqrt(5)) -> bound sqrt(2 / 6) * sqrt(3 / fan_in).
      bound = math.sqrt(2.0 / 6.0) * math.sqrt(3.0 / fan_in)
      assert np.abs(a).max() <= bound and np.abs(a).max() > 0.97 * bound, key
      np.testing.assert_allclose(a.std(), 1.0 / math.sqrt(3 * fan_in), rtol=0.05, err_msg=key)
    else:
      np.testing.assert_allclose(a.std(), 1.0 / math.sqrt(fan_in), rtol=0.05, err_msg=key)
      assert np.abs(a).max() > 2.5 / math.sqrt(fan_in)  # tails: not a uniform draw
    np.testing.assert_array_equal(params[key.replace("lora_a", "lora_b")], 0.0)
