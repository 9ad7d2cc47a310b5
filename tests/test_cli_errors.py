"""`python -m jvt.main` on bad input: one `jvt: error:` line saying what is wrong and what to
do, exit status 2, no traceback, and nothing written to the workdir (or a run there left
byte-for-byte as it was). Also the embedded demo job as a quick end-to-end CLI run.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys

import jax
import numpy as np
import pytest

import jvt
from jvt.checkpoints import save_npz
from jvt.train.checkpointing import RunCheckpointer
from helpers_train import (DATA, REFERENCE, REPO, TINY_VIT, cli_args, cli_env,  # noqa: F401
                           reference_run, run_cli, train_data_dir)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return cli_env(tmp_path_factory.getbasetemp())


def _fails(argv, env, *needles) -> str:
  """Runs argv; checks the one-line user error and returns it."""
  proc = run_cli(argv, env, check=False)
  lines = [line for line in proc.stderr.splitlines() if line.startswith("jvt: error:")]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  message = proc.stderr[proc.stderr.index("jvt: error:"):]
  for needle in needles:
    assert needle in message, message
  return message


def _untouched(workdir) -> bool:
  return not workdir.exists() or not any(workdir.iterdir())


def _snapshot(root) -> dict:
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_typo_in_config_key(train_data_dir, env, tmp_path):
  workdir = tmp_path / "w"
  argv = cli_args(train_data_dir, workdir) + ["--config.optimzer.lr=1"]
  _fails(argv, env, "--config.optimzer.lr", "no field 'optimzer'", "did you mean 'optimizer'")
  assert _untouched(workdir)


def test_typo_in_nested_config_key_and_bad_value(train_data_dir, env, tmp_path):
  workdir = tmp_path / "w"
  _fails(cli_args(train_data_dir, workdir) + ["--config.optimizer.lrr=1"], env,
         "config.optimizer has no field 'lrr'", "did you mean 'lr'")
  _fails(cli_args(train_data_dir, workdir) + ["--config.optimizer.lr=fast"], env,
         "--config.optimizer.lr")
  assert _untouched(workdir)


def test_missing_checkpoint(train_data_dir, env, tmp_path):
  workdir = tmp_path / "w"
  missing = tmp_path / "ViT-B_16.npz"
  _fails(cli_args(train_data_dir, workdir, pretrained=missing), env, str(missing),
         "no such file")
  assert _untouched(workdir)


def test_pickle_checkpoint(train_data_dir, env, tmp_path):
  workdir = tmp_path / "w"
  path = tmp_path / "model.pth"
  path.write_bytes(pickle.dumps({"model": {"cls_token": [0.0]}}, protocol=4))
  _fails(cli_args(train_data_dir, workdir, pretrained=path), env, "pickle", "safetensors")
  assert _untouched(workdir)


def test_checkpoint_of_another_width(train_data_dir, env, tmp_path):
  workdir = tmp_path / "w"
  wide = jvt.build_model("Ti/16", 4, **dict(TINY_VIT, hidden_size=48, mlp_dim=96))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                        jvt.param_shapes(wide, DATA["image_size"]))
  params.pop("head")
  path = tmp_path / "wide.npz"
  save_npz(path, params)
  _fails(cli_args(train_data_dir, workdir, pretrained=path), env, "hidden size 48 in file vs 32")
  assert _untouched(workdir)


def test_dataset_not_prepared(env, tmp_path):
  workdir, empty = tmp_path / "w", tmp_path / "no_data"
  empty.mkdir()
  _fails(cli_args(str(empty), workdir), env, "not", str(empty), "python -m jvt.data.synthetic")
  assert _untouched(workdir)


def test_labels_out_of_range(train_data_dir, env, tmp_path):
  workdir = tmp_path / "w"
  _fails(cli_args(train_data_dir, workdir, num_classes=2), env, "outside [0, 2)",
         "dataset.num_classes")
  assert _untouched(workdir)


def test_batch_not_divisible_by_devices(train_data_dir, tmp_path, tmp_path_factory):
  workdir = tmp_path / "w"
  eight = cli_env(tmp_path_factory.getbasetemp(), devices=8)
  _fails(cli_args(train_data_dir, workdir, batch=12), eight, "batch_size=12",
         "8 devices", "multiple of 8")
  assert _untouched(workdir)


def test_unwritable_workdir(train_data_dir, env, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  _fails(cli_args(train_data_dir, blocker / "run"), env, "not writable", "--workdir")
  assert blocker.read_text() == "not a directory"


def test_workdir_of_another_config_is_refused(train_data_dir, env, reference_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(reference_run, workdir)
  before = _snapshot(workdir)
  _fails(cli_args(train_data_dir, workdir, **dict(REFERENCE, lr=0.3)), env,
         "different config", "optimizer.lr: 0.1 there vs 0.3 now", "--config.overwrite=True")
  assert _snapshot(workdir) == before


def test_nan_loss_stops_with_step_range_and_keeps_last_checkpoint(train_data_dir, env,
                                                                   tmp_path):
  """lr=1e18 after a 4-step warm-up (step 1 updates with lr 0): the parameters overflow at
  step 3; the check at step 4 reports steps 3-4 and keeps the checkpoint of step 2."""
  workdir = tmp_path / "w"
  argv = cli_args(train_data_dir, workdir, lr=1e18, warmup=4, ckpt_every=2, log_every=4)
  _fails(argv, env, "between steps 3 and 4", "last good checkpoint (step 2)")
  assert os.listdir(workdir / "checkpoints") == ["2"]
  assert not (workdir / "final_metrics.json").exists()
  with RunCheckpointer(workdir / "checkpoints") as ckpt:
    state, meta = ckpt.restore(2)
  assert int(state["step"]) == 2 and meta["data"]["step"] == 2
  for leaf in jax.tree.leaves(state["trainable"]):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_demo_job_quick_run(env, tmp_path):
  """The embedded demo, shrunk: a 1-block ViT pretrained 2 steps, a linear probe tuned 2."""
  workdir = tmp_path / "demo"
  argv = [sys.executable, "-m", "jvt.main",
          f"--config={REPO}/configs/demo.py:steps=2,pretrain_steps=2,methods=linear,"
          "num_train=64,num_validation=16,num_test=16",
          "--config.train.write_plots=False", "--config.train.eval_batch_size=16",
          "--config.train.batch_size=16", "--config.train.model.overrides.num_layers=1",
          f"--workdir={workdir}"]
  proc = run_cli(argv, env)
  assert "| linear |" in proc.stdout
  for name in ("results.md", "results.json", "pretrained/vit_small.npz",
               "runs/linear/final_metrics.json", "runs/linear/export/trainable.npz"):
    assert (workdir / name).exists(), name
