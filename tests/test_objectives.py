"""Objectives compose: the task loss plus every method's loss term, each term's state under its
method's name. DA-VPT together with distillation trains both (metrics of both, the mapping
refreshes); runs saved with the earlier method-state layout restore; clashes name both sides."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jvt
from jvt import objectives, sharding
from jvt import train as train_lib
from jvt.checkpoints import save_npz
from jvt.checkpoints.runs import RunCheckpointer
from jvt.config_lib import base_config
from jvt.methods.terms import CrossEntropy, LossTerm

from conftest import small_params

IMAGE, CLASSES = 16, 4
STUDENT = dict(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2, patch_size=8)
TEACHER = dict(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=2, patch_size=8)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _data(rng, per_class):
  patterns = rng.normal(size=(CLASSES, IMAGE, IMAGE, 3))
  ys = np.repeat(np.arange(CLASSES), per_class).astype(np.int32)
  xs = patterns[ys] + 0.5 * rng.normal(size=(len(ys), IMAGE, IMAGE, 3))
  return xs.astype(np.float32), ys


def _config(teacher_path, method="da_vpt"):
  c = base_config()
  c.model.variant = "B/16"
  c.model.image_size = IMAGE
  c.model.overrides = STUDENT
  c.tuning = dict(method=method, num_prompts=2, num_proxy_prompts=2, proxy_layers=(1,),
                  patch_weight=1.0, cls_weight=1.0)
  c.distill.enabled = True
  c.distill.weight = 0.5
  c.distill.temperature = 2.0
  c.distill.teacher.path = teacher_path
  c.distill.teacher.variant = "B/16"
  c.distill.teacher.overrides = TEACHER
  c.batch_size = 8
  c.total_steps = 8
  c.optimizer.name = "adamw"
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 0
  return c


@pytest.mark.parametrize("method", ["da_vpt", "da_vpt_plus"])
def test_da_vpt_with_distillation_trains_both_and_refreshes_the_mapping(tmp_path, method):
  teacher = jvt.build_model("B/16", CLASSES, **TEACHER)
  path = str(tmp_path / "teacher.npz")
  save_npz(path, small_params(teacher, seed=2), model=teacher)
  xs, ys = _data(np.random.default_rng(0), 8)
  s = train_lib.setup(_config(path, method), num_classes=CLASSES, steps_per_epoch=4,
                      class_examples=lambda k: (xs, ys))
  assert type(s.objective.task).__name__ == "DistillationObjective"
  assert list(s.objective.terms) == [method]
  state = s.state
  initial = jax.device_get(state.method_state[method])
  rng = np.random.default_rng(1)
  for step in range(4):  # one epoch
    pick = rng.choice(len(xs), 8, replace=False)
    batch = sharding.shard_batch({"image": xs[pick], "label": ys[pick]}, s.mesh)
    state, metrics = s.train_step(state, s.frozen, s.constants, batch)
    metrics = jax.device_get(metrics)
    assert {"ce_loss", "kd_loss", "teacher_accuracy", "patch_loss", "cls_loss"} <= set(metrics)
    assert all(np.isfinite(float(v)) and float(v) > 0 for k, v in metrics.items()
               if k.endswith("_loss"))
  # The total is the distillation blend plus the weighted DA-VPT terms (weights 1).
  np.testing.assert_allclose(
      metrics["loss"], 0.5 * metrics["ce_loss"] + 0.5 * metrics["kd_loss"]
      + metrics["patch_loss"] + metrics["cls_loss"], rtol=1e-5)
  host = jax.device_get(state.method_state[method])
  assert host["class_counts"].sum() == 4 * 8  # every trained example counted
  # End of epoch 1 (refresh_from_epoch=1): C = 4 classes on M = 2 prompts re-clustered from this
  # epoch's class means, warm-started at the initial centroids; sums restart.
  means = host["class_sums"] / host["class_counts"][:, None]
  new = s.objective.end_of_epoch({method: host}, 1)[method]
  np.testing.assert_array_equal(new["class_counts"], 0.0)
  assert not np.allclose(new["centroids"], initial["centroids"], atol=1e-4)
  # A k-means fixed point: each class sits with its most similar new centroid (layer-normed
  # class means, as the code preset clusters them).
  ln = (means - means.mean(1, keepdims=True)) / np.sqrt(means.var(1, keepdims=True) + 1e-6)
  np.testing.assert_array_equal(np.argmax(_unit(ln) @ new["centroids"].T, axis=1),
                                new["mapping"])


class _Counter(LossTerm):
  def __init__(self, metric):
    self.metric = metric

  def init_state(self, ctx):
    return {"n": np.zeros((), np.int32)}

  def loss(self, logits, aux, batch, state):
    return 0.0, {self.metric: jnp.zeros(())}, {"n": state["n"] + 1}


def test_terms_add_up_keep_their_state_and_clashes_name_both():
  objective = objectives.Objective(CrossEntropy(), {"a": _Counter("a_loss"),
                                                               "b": _Counter("b_loss")})
  logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0]])
  batch = {"label": jnp.asarray([0, 0])}
  state = {"a": {"n": 3}, "b": {"n": 7}}
  total, metrics, new = objective.loss(logits, {}, batch, state, {})
  want_ce = -np.mean([np.log(np.exp(2) / (np.exp(2) + 1)), np.log(1 / (1 + np.e))])
  np.testing.assert_allclose(total, want_ce, rtol=1e-6)
  assert set(metrics) == {"ce_loss", "a_loss", "b_loss"} and new == {"a": {"n": 4}, "b": {"n": 8}}
  clash = objectives.Objective(CrossEntropy(), {"a": _Counter("x"),
                                                           "b": _Counter("x")})
  with pytest.raises(ValueError, match=r"methods 'a' and 'b' cannot train together"):
    clash.loss(logits, {}, batch, state, {})
  with pytest.raises(ValueError, match=r"'the task loss' and 'a'"):
    objectives.Objective(CrossEntropy(), {"a": _Counter("ce_loss")}).loss(
        logits, {}, batch, state, {})


def test_a_run_saved_with_the_earlier_method_state_layout_restores(tmp_path):
  """Before loss terms were named, DA-VPT's state was the whole method_state."""
  model = jvt.build_model("B/16", CLASSES, dict(method="da_vpt", num_proxy_prompts=2),
                          **STUDENT)
  objective = objectives.make_objective(model, base_config())
  old = {"mapping": np.asarray([1, 0, 1, 0], np.int32),
         "centroids": np.ones((2, 32), np.float32),
         "class_sums": np.zeros((CLASSES, 32), np.float32),
         "class_counts": np.zeros((CLASSES,), np.float32)}
  saved = train_lib.TrainState(step=np.asarray(5, np.int32), trainable={"w": np.ones(3)},
                               opt_state={}, method_state=old)
  with RunCheckpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    ckpt.save(5, saved, {"k": 1})
  target = saved.replace(method_state={"da_vpt": jax.tree.map(np.zeros_like, old)},
                         step=np.asarray(0, np.int32))
  with RunCheckpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    state, meta = train_lib._restore(ckpt, 5, target, objective)
  assert meta == {"k": 1} and int(state.step) == 5
  np.testing.assert_array_equal(state.method_state["da_vpt"]["mapping"], old["mapping"])
  np.testing.assert_array_equal(state.method_state["da_vpt"]["centroids"], old["centroids"])
