"""The files of a run's workdir: config guard, metrics (JSON lines + TensorBoard), progress,
final metrics, exports and plots. Only process 0 writes logs, exports and plots.

Workdir layout:
  config.json           the run's config (a run of a different config here is refused)
  metrics.jsonl         one JSON object per logged step (train/*) and per evaluation (val/*,
                        test/*)
  tb/                   TensorBoard event files (the same scalars)
  checkpoints/<step>/   orbax run checkpoints (unfinished saves are `<step>.orbax-checkpoint-tmp-*`
                        and are never restored)
  final_metrics.json    written when the run finishes (read by jvt.sweep / jvt.results)
  export/trainable.npz  the trained parameters alone, `/`-joined keys
  export/merged_vit.npz for mergeable methods: the merged model, vision_transformer layout
  curves.png            training curves
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from flax import traverse_util

# Fields that may differ between a run and its resumption (they do not change the result).
_RESUMABLE_FIELDS = ("progress_bar", "overwrite", "write_plots", "log_every_steps",
                     "keep_checkpoints", "checkpoint_every_steps", "max_to_keep",
                     "eval_batch_size")
# Curves plotted in curves.png, when logged.
_CURVES = ("train/loss", "train/accuracy", "val/accuracy", "test/accuracy", "train/lr",
           "train/grad_norm", "train/img_per_s", "train/input_wait_frac")


def _comparable(config_json: str) -> dict:
  d = json.loads(config_json)
  for key in _RESUMABLE_FIELDS:
    d.pop(key, None)
  return d


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to a temporary file next to `path`, then renames it (never a half file)."""
  directory = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def finished_steps(checkpoint_dir: str) -> list[int]:
  """Steps with a finished orbax checkpoint (`<step>/`); unfinished `*-tmp-*` saves excluded."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoint_dir)
                if re.fullmatch(r"\d+", n) and os.path.isdir(os.path.join(checkpoint_dir, n)))


class RunDirectory:
  """Checks a workdir for a config (on construction) and claims it (`start`).

  A workdir "holds a run" once it has a finished checkpoint or a final_metrics.json. Such a
  run is resumed when its config.json matches `config` (up to `_RESUMABLE_FIELDS`) and is
  refused otherwise, unless `config.overwrite`, which then deletes it in `start`. A workdir
  whose config.json has neither (a run stopped before its first checkpoint) is simply reused.
  """

  def __init__(self, workdir: str, config):
    if not workdir:
      raise ValueError("workdir is empty: pass --workdir=DIR.")
    self.path = os.path.abspath(workdir)
    self.checkpoint_dir = os.path.join(self.path, "checkpoints")
    _check_writable(self.path)
    config_path = os.path.join(self.path, "config.json")
    self._config_text = config.to_json(indent=1)
    overwrite = bool(config.get("overwrite", False))
    has_checkpoint = bool(finished_steps(self.checkpoint_dir))
    finished = os.path.exists(os.path.join(self.path, "final_metrics.json"))
    self._clear = False
    if not (has_checkpoint or finished):
      return
    if not os.path.exists(config_path):
      problem = f"workdir {self.path} holds checkpoints or results but no config.json"
    else:
      with open(config_path) as f:
        old = f.read()
      problem = None
      if _comparable(old) != _comparable(self._config_text):
        problem = (f"workdir {self.path} holds a run of a different config "
                   f"({_diff(json.loads(old), json.loads(self._config_text))})")
      elif not has_checkpoint:
        problem = (f"workdir {self.path} holds a finished run of this config whose checkpoints "
                   "were removed (keep_checkpoints=False); its results are in "
                   "final_metrics.json")
    if problem is None:
      return
    if not overwrite:
      raise FileExistsError(f"{problem}. Use another --workdir, or pass "
                            "--config.overwrite=True to delete it and start over.")
    self._clear = True

  def start(self) -> None:
    """Claims the workdir for this config (after set-up succeeded): with `overwrite`, deletes
    the previous run's files; writes config.json. All processes wait for process 0."""
    if jax.process_index() == 0:
      if self._clear:
        _clear_run(self.path)
      atomic_write_text(os.path.join(self.path, "config.json"), self._config_text)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("jvt.run_io.RunDirectory.start")

  def write_final(self, final: dict, history: list[dict]) -> None:
    atomic_write_text(os.path.join(self.path, "final_metrics.json"),
                      json.dumps(dict(final, history=history), indent=1))

  def export(self, model, trainable, frozen) -> None:
    """export/trainable.npz always; export/merged_vit.npz when the method merges away."""
    from jvt.checkpoints import save_npz
    from jvt.methods import merge, mergeable
    from jvt.partition import merge_params
    out = os.path.join(self.path, "export")
    os.makedirs(out, exist_ok=True)
    flat = traverse_util.flatten_dict(trainable, sep="/")
    tmp = os.path.join(out, ".trainable.tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
    os.replace(tmp, os.path.join(out, "trainable.npz"))
    if not mergeable(model):
      return  # prompts and adapters add computation: nothing to merge into the backbone
    plain, params = merge(model, merge_params(trainable, frozen))
    save_npz(os.path.join(out, "merged_vit.npz"), params, model=plain)

  def plot_curves(self) -> None:
    from jvt import viz
    rows = read_metrics(self.path)
    keys = [k for k in _CURVES if any(k in r for r in rows)]
    if keys:
      viz.plot_training_curves(rows, os.path.join(self.path, "curves.png"), keys=keys)


def _check_writable(path: str) -> None:
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
    os.close(fd)
    os.remove(probe)
  except OSError as err:
    raise PermissionError(f"workdir {path} is not writable ({err.strerror or err}); choose "
                          "another --workdir.") from None


def _clear_run(path: str) -> None:
  for name in ("checkpoints", "tb", "export"):
    shutil.rmtree(os.path.join(path, name), ignore_errors=True)
  for name in ("metrics.jsonl", "final_metrics.json", "curves.png"):
    if os.path.exists(os.path.join(path, name)):
      os.remove(os.path.join(path, name))


def _diff(old: dict, new: dict, prefix: str = "") -> str:
  diffs = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      sub = _diff(a, b, f"{prefix}{key}.")
      if sub:
        diffs.append(sub)
    elif a != b and key not in _RESUMABLE_FIELDS:
      diffs.append(f"{prefix}{key}: {a!r} there vs {b!r} now")
  return "; ".join(diffs[:5])


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl` (empty if there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class _Progress:
  """A tqdm bar (step, loss, img/s, share of time waiting for input, ETA), or nothing."""

  def __init__(self, total, initial, enabled):
    self.bar = None
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                      file=sys.stderr, mininterval=1.0)
    self.step = initial

  def advance(self, step):
    if self.bar is not None:
      self.bar.update(step - self.step)
    self.step = step

  def update_metrics(self, host: dict):
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{host.get('loss', float('nan')):.4f}",
                           img_s=f"{host.get('img_per_s', 0.0):.1f}",
                           input_wait=f"{host.get('input_wait_frac', 0.0):.0%}", refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()


class MetricWriter:
  """Scalars to metrics.jsonl and TensorBoard (process 0 only).

  `resume_step`: the step training continues from. Rows and events logged past it by an
  interrupted run are dropped (metrics.jsonl rewritten, TensorBoard `purge_step`), so a
  resumed run's logs hold each step once.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      rows = read_metrics(workdir)
      kept = [r for r in rows if r.get("step", 0) <= resume_step]
      if len(kept) != len(rows):
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

  def write_header(self, *, trainable_params: int, summary: str) -> None:
    if self.enabled:
      print(f"Trainable parameters: {trainable_params:,}\n{summary}", file=sys.stderr)

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in scalars.items():
      self.tb.add_scalar(k, float(v), int(step))

  def progress(self, total: int, initial: int, enabled: bool) -> _Progress:
    return _Progress(total, initial, enabled and self.enabled)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
