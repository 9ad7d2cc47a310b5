"""The registry: explicit, side-effect free, and `tuning_config(model)` gives back JSON-able
method dicts that rebuild the same model."""
from __future__ import annotations

import dataclasses
import json

import pytest

import jvt
from jvt.methods import Method, method_defaults, registry, tuning_config

from conftest import SMALL, small_model

CONFIGS = {
    "vpt": dict(method="vpt", num_prompts=3, deep=False, proj_dim=8),
    "da_vpt": dict(method="da_vpt", proxy_layers=(-1, 0), num_proxy_prompts=2),
    "da_vpt_plus": dict(method="da_vpt_plus", preset="paper", num_proxy_prompts=2),
    "adapter": dict(method="adapter", dim=4, positions=["mlp"]),
    "adaptformer": dict(method="adaptformer", norm="ln", dropout=0.0, init="xavier"),
    "lora": dict(method="lora", rank=2, targets=("query", "mlp_out"), init="normal"),
    "bitfit": dict(method="bitfit", subset=("key", "norm1")),
    "ssf": dict(method="ssf", init="identity"),
    "layernorm": dict(method="layernorm"),
    "linear": dict(method="linear", train_head=False),
    "partial": dict(method="partial", k=2, rules=(("cls", "cls"),)),
    "full": dict(method="full"),
    "distill_proj": dict(method="distill_proj", dim=8, num=2),
}


def test_every_method_has_a_round_trip_case():
  assert set(CONFIGS) == set(registry())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tuning_config_rebuilds_the_same_model(name):
  other = "linear" if name != "linear" else "layernorm"  # a composition of two methods
  model = small_model([CONFIGS[name], dict(method=other)])
  cfg = json.loads(json.dumps(tuning_config(model)))  # JSON-able
  assert [d["method"] for d in cfg] == [name, other]
  again = jvt.build_model("B/16", model.num_classes, cfg, **SMALL)
  assert again == model
  assert again.partition_rules == model.partition_rules


def test_registry_is_a_fresh_mapping_of_settings_classes():
  first = registry()
  first.pop("lora")
  assert "lora" in registry()  # nothing global to mutate
  for name, cls in registry().items():
    assert issubclass(cls, Method) and cls.name == name
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
  assert method_defaults("adaptformer") == dict(dim=8, scale=0.1, norm="none", dropout=0.1,
                                                init="lora")
  assert method_defaults("ssf") == dict(init="normal")
