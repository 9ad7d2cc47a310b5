"""A method written entirely in this file, trained through `jvt.train.train_and_evaluate` with
no edit to jvt: its settings (with validation), a plug-in on one hook, its partition rule and a
loss term with state. docs/methods.md ("Write your own method") walks through it.

The config names it by import path, `method="test_toy_method:ChannelGate"` (pytest imports
this file as the module `test_toy_method`).
"""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import jvt
from jvt import train
from jvt.methods import LossTerm, Method

from helpers_train import load_trainable, read_jsonl, tiny_config, train_data_dir  # noqa: F401


class LogitPenalty(LossTerm):
  """weight * mean(logits^2), and how many examples it has seen (its state)."""

  def __init__(self, weight: float):
    self.weight = weight

  def init_state(self, ctx):
    return {"seen": np.zeros((), np.float32), "epochs": np.zeros((), np.int32)}

  def loss(self, logits, aux, batch, state):
    penalty = jnp.mean(jnp.square(logits))
    state = dict(state, seen=state["seen"] + logits.shape[0])
    return self.weight * penalty, {"logit_penalty": penalty}, state

  def end_of_epoch(self, state, epoch):
    return dict(state, epochs=np.asarray(epoch, np.int32))


@dataclasses.dataclass(frozen=True)
class ChannelGate(Method):
  """A learnable gate per channel on each block's MLP branch: y <- y * (1 + gate)."""
  name = "channel_gate"
  family = "parameter"
  summary = "per-channel gates on the MLP branches"
  mergeable = False  # (a gate could fold into Dense_1; kept simple here)
  weight: float = 0.01

  def resolve(self, num_layers):
    if self.weight < 0:
      raise ValueError(f"channel_gate.weight={self.weight}: must be >= 0.")
    return self

  def partition_rules(self, num_layers):
    return ((r"Transformer/encoderblock_\d+/gate", "gate"),)

  def on_branch(self, scope, x, z, y, site):
    if site.name != "mlp":
      return y
    gate = scope.param("gate", nn.initializers.zeros, (y.shape[-1],))  # [D]
    return y * (1.0 + gate.astype(y.dtype))

  def loss_term(self):
    return LogitPenalty(self.weight)


TOY = "test_toy_method:ChannelGate"


def test_toy_method_builds_and_validates():
  model = jvt.build_model("Ti/16", 3, dict(method=TOY, weight=0.5), hidden_size=32, mlp_dim=64,
                          num_heads=2, num_layers=2, patch_size=8)
  shapes = jvt.param_shapes(model, 16)
  assert shapes["Transformer"]["encoderblock_1"]["gate"].shape == (32,)
  labels = jvt.partition.label_params(shapes, model)
  assert labels["Transformer"]["encoderblock_0"]["gate"] == "gate"
  assert jvt.methods.tuning_config(model)[0]["method"] == TOY
  with pytest.raises(ValueError, match=r"channel_gate.weight=-1: must be >= 0"):
    jvt.build_model("Ti/16", 3, dict(method=TOY, weight=-1))
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['wieght'\]"):
    jvt.build_model("Ti/16", 3, dict(method=TOY, wieght=1.0))
  with pytest.raises(ValueError, match=r"\['channel_gate'\] cannot be merged"):
    jvt.merge(model, jvt.init_params(model, __import__("jax").random.key(0), 16))


def test_toy_method_trains_through_train_and_evaluate(train_data_dir, tmp_path):  # noqa: F811
  config = tiny_config(train_data_dir, steps=16, log_every=8)  # one epoch: 256 / batch 16
  config.tuning = dict(method=TOY, weight=0.5)
  state, final = train.train_and_evaluate(config, str(tmp_path))
  assert final["methods"] == [TOY]
  toy = state.method_state["channel_gate"]
  assert float(toy["seen"]) == 16 * config.batch_size  # the state went through every step
  assert int(toy["epochs"]) == 1  # and through the end of the epoch
  rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/logit_penalty" in r]
  assert [r["step"] for r in rows] == [8, 16]
  for r in rows:  # the total is the cross-entropy plus the weighted term
    np.testing.assert_allclose(r["train/loss"], r["train/ce_loss"]
                               + 0.5 * r["train/logit_penalty"], rtol=1e-5)
  gates = {k: v for k, v in load_trainable(tmp_path).items() if k.endswith("/gate")}
  assert sorted(gates) == [f"Transformer/encoderblock_{i}/gate" for i in range(2)]
  assert all(np.abs(v).max() > 0 for v in gates.values())  # the gates trained
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["tuning"]["method"] == TOY
