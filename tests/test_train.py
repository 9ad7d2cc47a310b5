"""The train step and the in-process training loop of `jvt.train` on a tiny ViT.

Covered: gradient accumulation equals the whole batch and the step donates its state; one step
from a random checkpoint in the official vision_transformer npz layout on the tiny data set
(finite loss, exactly the trainable leaves change); a finished run's files (metrics rows,
TensorBoard events, curves, final metrics, exact accuracy against a separate forward pass);
and no device-to-host transfer inside the loop except the metric fetches at log and
checkpoint steps.
"""
from __future__ import annotations

import json
import math
import os
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from tensorboardX.proto import event_pb2

import jvt
from jvt import partition
from jvt.train import loop as train
from jvt.train import sharding
from jvt.checkpoints import save_npz
from jvt.train.checkpointing import RunCheckpointer
from jvt.data import pipeline
from jvt.data.sources import get_source
from jvt.data.preprocess import get_preprocess
from helpers_train import DATA, TINY_VIT, read_jsonl, tiny_config, train_data_dir  # noqa: F401

NUM_CLASSES = 4  # the `shape` task of jvt_synthetic
TRAINABLE = {"head/kernel", "head/bias", "Transformer/prompts/block_0",
             "Transformer/prompts/block_1"}


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def _random_backbone(seed: int = 0) -> dict:
  """Random values for a plain tiny ViT's backbone (no head): what a pretrained file holds."""
  model = jvt.build_model("Ti/16", NUM_CLASSES, **TINY_VIT)
  shapes = _flat(jvt.param_shapes(model, DATA["image_size"]))
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in shapes.items():
    if path.startswith("head/"):
      continue
    base = 1.0 if path.endswith("/scale") else 0.0
    out[path] = (base + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return traverse_util.unflatten_dict(out, sep="/")


@pytest.fixture(scope="module")
def official_npz(tmp_path_factory):
  """(path, flat backbone) of a random checkpoint written by `save_npz` (vision_transformer)."""
  backbone = _random_backbone()
  path = tmp_path_factory.mktemp("pretrained") / "ViT-tiny.npz"
  save_npz(path, backbone)
  return str(path), _flat(backbone)


def _random_batch(b: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  s = DATA["image_size"]
  return {"image": rng.standard_normal((b, s, s, 3)).astype(np.float32),
          "label": rng.integers(0, NUM_CLASSES, b).astype(np.int32)}


def _two_steps(s, step_fn) -> tuple:
  """Two steps from a copy of the initial state on two fixed batches; checks donation."""
  state = jax.tree.map(jnp.copy, s.state)
  for seed in (0, 1):
    previous = state
    batch = sharding.shard_batch(_random_batch(16, seed), s.mesh)
    state, metrics = step_fn(state, s.frozen, s.constants, batch)
    # Jitted with donate_argnums=(0,): the input state's buffers are consumed.
    assert all(x.is_deleted() for x in jax.tree.leaves(previous))
  return jax.device_get(state.trainable), jax.device_get(metrics), int(state.step)


@pytest.fixture(scope="module")
def fp32_setup():
  """The tiny model (random backbone) in float32 and its two-step result."""
  s = train.setup(tiny_config(batch=16, lr=0.5), num_classes=NUM_CLASSES, steps_per_epoch=100)
  return s, jax.device_get(s.state.trainable), _two_steps(s, s.train_step)


def test_grad_accumulation_matches_whole_batch_and_donates_state(fp32_setup):
  s, start, (whole, m_whole, steps) = fp32_setup
  accum_step = train.make_train_step(s.model, s.tx, s.objective, accum_steps=2, mesh=s.mesh)
  accum, m_accum, accum_steps_done = _two_steps(s, accum_step)
  chex.assert_trees_all_close(accum, whole, rtol=1e-5, atol=1e-6)
  for key in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_allclose(m_accum[key], m_whole[key], rtol=1e-5, err_msg=key)
  # Every trainable leaf moved (the zero-initialised head passes gradients to the prompts
  # from the second step on), so the comparison covers them all.
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(whole)):
    assert not np.allclose(a, b)
  assert steps == accum_steps_done == 2


def test_bfloat16_compute_with_remat_keeps_float32_parameters(fp32_setup):
  """model.dtype=bfloat16 computes in bf16 and keeps fp32 parameters; with remat="full" the
  two steps land close to the fp32 result (bf16 has an 8-bit mantissa)."""
  config = tiny_config(batch=16, lr=0.5)
  config.unlock()
  config.model.dtype, config.model.remat = "bfloat16", "full"
  config.lock()
  s = train.setup(config, num_classes=NUM_CLASSES, steps_per_epoch=100)
  trainable, metrics, _ = _two_steps(s, s.train_step)
  _, _, (fp32, m_fp32, _) = fp32_setup
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(trainable))
  np.testing.assert_allclose(metrics["loss"], m_fp32["loss"], rtol=3e-2)
  chex.assert_trees_all_close(trainable, fp32, rtol=0.1, atol=2e-2)
  # ... but not equal to it: the forward really ran in bfloat16.
  assert metrics["loss"] != m_fp32["loss"]


def test_one_step_from_official_npz_changes_only_trainable_leaves(train_data_dir,
                                                                   official_npz):
  npz_path, backbone = official_npz
  config = tiny_config(train_data_dir, pretrained=npz_path, lr=0.5)
  loader = pipeline.make_train_loader(
      config.dataset, "train", global_batch_size=config.batch_size, image_size=16,
      preprocess=config.dataset.preprocess, seed=0)
  with loader:
    s = train.setup(config, num_classes=loader.num_classes,
                    steps_per_epoch=loader.steps_per_epoch)
    host_batch = next(loader)
  assert loader.num_classes == NUM_CLASSES
  before = _flat(jax.device_get(s.state.trainable))
  frozen = _flat(jax.device_get(s.frozen))
  assert set(before) == TRAINABLE
  # Every backbone leaf comes from the file, untouched; nothing else is frozen.
  assert set(frozen) == set(backbone)
  for k, v in backbone.items():
    np.testing.assert_array_equal(frozen[k], v, err_msg=k)

  batch = sharding.shard_batch(host_batch, s.mesh)
  state, metrics = s.train_step(s.state, s.frozen, s.constants, batch)
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  after = _flat(jax.device_get(state.trainable))
  assert set(after) == TRAINABLE
  for k in ("head/kernel", "head/bias"):
    assert not np.allclose(after[k], before[k]), k
  # The head starts at zero, so the logits do not depend on the prompts in the first step:
  # their gradient is exactly zero. A second step moves them.
  for k in TRAINABLE - {"head/kernel", "head/bias"}:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  state, _ = s.train_step(state, s.frozen, s.constants, batch)
  second = _flat(jax.device_get(state.trainable))
  for k in TRAINABLE:
    assert not np.allclose(second[k], after[k]), k
  for k, v in _flat(jax.device_get(s.frozen)).items():
    np.testing.assert_array_equal(v, backbone[k], err_msg=k)
  # The loss is the mean cross-entropy of the pre-step parameters on this batch: with the zero
  # head, log(4) for every example.
  np.testing.assert_allclose(metrics["loss"], math.log(NUM_CLASSES), rtol=1e-6)


# ------------------------------------------------------------------ one finished run, shared
RUN = dict(steps=6, log_every=3, ckpt_every=2, plots=True, lr=0.05)


@pytest.fixture(scope="module")
def finished_run(train_data_dir, official_npz, tmp_path_factory):
  """A 6-step run whose loop runs under a device-to-host transfer guard, counting fetches.

  "disallow" refuses implicit transfers (float(x) or np.asarray(x) of a device array) and
  lets explicit ones (jax.device_get) pass; orbax's save is allowed its own copies.
  """
  workdir = tmp_path_factory.mktemp("finished_run")
  config = tiny_config(train_data_dir, pretrained=official_npz[0], **RUN)
  config.unlock()
  config.eval_batch_size = 24  # 32 test images: one full batch and one padded batch
  config.lock()
  fetched = []
  save, loop = RunCheckpointer.save, train._loop

  def fetch(tree):
    fetched.append(len(fetched))
    return jax.device_get(tree)

  def save_allowing_transfers(self, *args, **kwargs):
    with jax.transfer_guard_device_to_host("allow"):
      return save(self, *args, **kwargs)

  def guarded_loop(*args, **kwargs):
    with jax.transfer_guard_device_to_host("disallow"):
      return loop(*args, **kwargs)

  mp = pytest.MonkeyPatch()
  mp.setattr(train, "_fetch", fetch)
  mp.setattr(train, "_loop", guarded_loop)
  mp.setattr(RunCheckpointer, "save", save_allowing_transfers)
  try:
    state, final = train.train_and_evaluate(config, str(workdir))
  finally:
    mp.undo()
  return dict(workdir=workdir, state=state, final=final, fetched=fetched, config=config)


def test_loop_reads_device_values_only_at_log_and_checkpoint_steps(finished_run):
  # Steps 2 and 4 checkpoint, 3 and 6 log: four fetches in six steps, no implicit transfer.
  assert len(finished_run["fetched"]) == 4


def _lr(step: int, total: int, base: float) -> float:
  """The cosine schedule without warm-up, at the update of step `step` (1-based)."""
  return base * 0.5 * (1 + math.cos(math.pi * (step - 1) / total))


def test_metrics_rows(finished_run):
  rows = read_jsonl(finished_run["workdir"] / "metrics.jsonl")
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [3, 6]
  for r in train_rows:
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "train/lr",
                "train/img_per_s", "train/input_wait_frac", "train/param_norm"):
      assert np.isfinite(r[key]), key
    assert 0 <= r["train/accuracy"] <= 1 and r["train/img_per_s"] > 0
    assert 0 <= r["train/input_wait_frac"] <= 1
    np.testing.assert_allclose(r["train/lr"], _lr(r["step"], 6, RUN["lr"]), rtol=1e-6)
  eval_rows = [r for r in rows if "test/accuracy" in r]
  assert [r["step"] for r in eval_rows] == [6] and "val/accuracy" in eval_rows[0]


def _tb_scalars(tb_dir) -> dict[str, list[int]]:
  """{tag: [steps]} read from the TFRecord event files (length, crc, Event proto, crc)."""
  out: dict[str, list[int]] = {}
  for name in os.listdir(tb_dir):
    with open(os.path.join(tb_dir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append(event.step)
  return out


def test_tensorboard_curves_and_final_metrics(finished_run):
  workdir = finished_run["workdir"]
  tags = _tb_scalars(workdir / "tb")
  assert tags["train/loss"] == [3, 6] and tags["test/accuracy"] == [6]
  with open(workdir / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(workdir / "final_metrics.json") as f:
    final = json.load(f)
  assert final["protocol"] == "last_epoch"
  # Trainable: 2 prompts of width 32 in each of 2 blocks, and a 32 -> 4 head with bias.
  assert final["trainable_params"] == 2 * 2 * 32 + 32 * 4 + 4
  assert 0 <= final["val_accuracy"] <= 1 and 0 <= final["test_accuracy"] <= 1
  assert final["step"] == 6 and final["history"][-1]["step"] == 6
  exported = np.load(workdir / "export" / "trainable.npz")
  assert set(exported.files) == TRAINABLE


def test_test_accuracy_is_exact(finished_run, official_npz):
  """The reported accuracy equals a separate forward pass over all 32 test images at once."""
  config, state = finished_run["config"], finished_run["state"]
  model = train.model_from_config(config, NUM_CLASSES)
  params = partition.merge_params(jax.device_get(state.trainable),
                                  traverse_util.unflatten_dict(official_npz[1], sep="/"))
  source = get_source(config.dataset, "test")
  fn = get_preprocess(config.dataset.preprocess, DATA["image_size"], train=False)
  images = np.stack([fn(source[i]["image"], None) for i in range(len(source))])
  labels = np.asarray([source[i]["label"] for i in range(len(source))])
  logits, _ = jax.jit(model.apply, static_argnames="train")({"params": params}, images,
                                                            train=False)
  expected = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
  assert len(source) == 32
  assert finished_run["final"]["test_accuracy"] == pytest.approx(expected, abs=1e-9)


def test_checkpoint_holds_state_data_position_and_config(finished_run):
  """The last checkpoint: step, trainable, optimizer state, data position, config, history."""
  ckpt = RunCheckpointer(finished_run["workdir"] / "checkpoints")
  try:
    assert ckpt.all_steps() == [4, 6]  # max_to_keep=2
    state, meta = ckpt.restore(6)
  finally:
    ckpt.close()
  assert int(state["step"]) == 6
  chex.assert_trees_all_equal(state["trainable"],
                              jax.device_get(finished_run["state"].trainable))
  assert meta["data"]["epoch"] == 0 and meta["data"]["step"] == 6
  assert json.loads(meta["config"])["total_steps"] == 6
  assert meta["history"][-1]["step"] == 6 and "opt_state" in state
