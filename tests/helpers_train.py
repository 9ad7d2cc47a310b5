"""Shared pieces of the trainer tests: a tiny run config, the synthetic data set built once per
session, and the CLI run in a subprocess.

This file is also a config file for the CLI:

    python -m jvt.main --config=tests/helpers_train.py:data_dir=DIR,steps=8 --workdir=W

The tiny run: a 2-block ViT of width 32 with 8x8 patches on 16x16 images, VPT-Deep with 2
prompts (prompts + head train, the backbone is frozen), SGD, batch 16, on the `shape` task of
`jvt_synthetic` (256 training images, 4 classes).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jvt.config_lib import base_config, parse_arg

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = dict(num_train=256, num_validation=32, num_test=32, image_size=16, seed=0)
TINY_VIT = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, patch_size=8)


# The smallest settings of each registered method on the tiny ViT (16 px images, 2 blocks).
# Dropout off: tests that compare two step functions need the same masks.
SMALL_TUNING = {"vpt": dict(num_prompts=2), "da_vpt": dict(num_prompts=2, num_proxy_prompts=2),
                "da_vpt_plus": dict(num_prompts=2, num_proxy_prompts=2),
                "e2vpt": dict(num_prompts=2, num_kv_prompts=2, dropout=0.0), "vp": dict(pad=2),
                "distill_proj": dict(dim=8, num=1), "fact": dict(rank=4, dropout=0.0),
                "convpass": dict(dim=4, dropout=0.0), "repadapter": dict(dim=4, dropout=0.0),
                "adaptformer": dict(dropout=0.0)}


def tiny_config(data_dir: str = "", **kw):
  """The tiny run's locked ConfigDict; keyword arguments as in `get_config`'s arg."""
  a = parse_arg(",".join(f"{k}={v}" for k, v in kw.items()) or None, **_ARGS)
  c = base_config()
  c.model.variant = "Ti/16"
  c.model.image_size = DATA["image_size"]
  c.model.overrides = dict(TINY_VIT)
  c.tuning = dict(method="vpt", num_prompts=2, deep=True) if a.method == "vpt" else dict(
      method=a.method)
  c.pretrained.path = a.pretrained
  c.dataset.data_dir = data_dir or a.data_dir
  c.dataset.task = "shape"
  c.dataset.val_split = "validation"
  c.dataset.preprocess = "vit"
  c.dataset.num_classes = a.num_classes
  c.batch_size = a.batch
  c.eval_batch_size = 32
  c.total_steps = a.steps
  c.grad_accum_steps = a.accum
  c.optimizer.lr = a.lr
  c.optimizer.warmup_steps = a.warmup
  c.log_every_steps = a.log_every
  c.checkpoint_every_steps = a.ckpt_every
  c.eval_every_epochs = 0.0
  c.max_to_keep = 2
  c.write_plots = a.plots
  c.progress_bar = False
  c.seed = a.seed
  # Keeps JAX's caches across the suite's many set-ups (the default drops them: about 40 s
  # more in tests/methods; tests/test_setup_memory.py covers it).
  c.release_setup_caches = False
  c.lock()
  return c


def small_method_setup(method: str, *, batch: int = 8, image_size: int = 16, chunk_rows: int = 0,
                       dtype: str = "float32", pretrained: str = ""):
  """`jvt.train.setup` of the tiny ViT with `method` at its SMALL_TUNING settings (4 classes,
  random class examples for DA-VPT's mapping): for tests that compare two step functions."""
  import numpy as np
  from jvt.train import loop
  config = tiny_config(batch=batch, pretrained=pretrained)
  config.unlock()
  config.model.image_size = image_size
  config.model.dtype = dtype
  config.tuning = dict(method=method, **SMALL_TUNING.get(method, {}))
  config.forward_chunk_rows = chunk_rows
  if method == "fact":  # FacT's factors need mlp_dim = 4 * hidden_size
    config.model.overrides = dict(config.model.overrides, mlp_dim=128)
  config.lock()
  rng = np.random.default_rng(0)
  return loop.setup(config, num_classes=4, steps_per_epoch=10, class_examples=lambda k: (
      rng.standard_normal((4, image_size, image_size, 3)).astype(np.float32),
      np.arange(4, dtype=np.int32)))


_ARGS = dict(data_dir="", steps=8, batch=16, accum=1, lr=0.1, warmup=-1, log_every=2,
             ckpt_every=4, num_classes=-1, method="vpt", pretrained="", plots=False, seed=0)


def get_config(arg=None):
  """The CLI entry: `tests/helpers_train.py:data_dir=DIR,steps=8,...` (keys of `_ARGS`)."""
  a = parse_arg(arg, **_ARGS)
  return tiny_config(**a.to_dict())


def build_data(root: pathlib.Path) -> str:
  """The tiny jvt_synthetic set in `root/jvt_train_data` (reused when already built)."""
  from jvt.data.synthetic import build_synthetic
  data_dir = str(root / "jvt_train_data")
  build_synthetic(data_dir, **DATA)
  return data_dir


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory) -> str:
  """The tiny data set, built once per session (a second module's call reuses the files)."""
  return build_data(tmp_path_factory.getbasetemp())


def cli_env(tmp_root: pathlib.Path, devices: int = 1) -> dict:
  """Environment of a CLI subprocess: `devices` fake CPU devices, a shared compilation cache."""
  from conftest import xla_flags  # here, not at the top: the CLI loads this file as a config
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  env["XLA_FLAGS"] = xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_root / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env.pop("JVT_TRACEBACK", None)
  return env


def cli_args(data_dir: str, workdir, **kw) -> list[str]:
  """argv of `python -m jvt.main` for the tiny config with `kw` as config args."""
  arg = ",".join(f"{k}={v}" for k, v in dict(data_dir=data_dir, **kw).items())
  return [sys.executable, "-m", "jvt.main", f"--config={REPO}/tests/helpers_train.py:{arg}",
          f"--workdir={workdir}"]


def run_cli(argv: list[str], env: dict, timeout: float = 240,
            check: bool = True) -> subprocess.CompletedProcess:
  """Runs argv (from the repo root); with `check`, fails the test showing its stderr."""
  proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    pytest.fail(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
  return proc


def load_trainable(workdir) -> dict[str, np.ndarray]:
  """export/trainable.npz of a finished run, as {path: array}."""
  with np.load(os.path.join(workdir, "export", "trainable.npz")) as f:
    return {k: f[k] for k in f.files}


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def reference_run(train_data_dir, tmp_path_factory) -> pathlib.Path:
  """The tiny run (40 steps, checkpoints every 4) through the CLI on one CPU device."""
  root = tmp_path_factory.getbasetemp()
  workdir = root / "reference_run"
  if not (workdir / "final_metrics.json").exists():
    run_cli(cli_args(train_data_dir, workdir, **REFERENCE), cli_env(root, 1))
  return workdir


# The run the multi-device, multi-process and kill/restart tests compare with the reference.
REFERENCE = dict(steps=40, ckpt_every=4, log_every=4)
