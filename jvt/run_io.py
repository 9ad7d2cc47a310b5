"""The files of a run's workdir: config guard, metrics (JSON lines + TensorBoard), progress,
final metrics, exports and plots. Only process 0 writes logs and plots.

Workdir layout:
  config.json           the run's config (a different config in the same workdir is refused)
  metrics.jsonl         one JSON object per logged step
  tb/                   TensorBoard event files
  checkpoints/<step>/   orbax run checkpoints
  final_metrics.json    written when the run finishes (read by jvt.sweep / jvt.results)
  export/trainable.npz  the trained parameters alone
  export/merged_vit.npz for mergeable methods: the merged model, vision_transformer layout
  curves.png            training curves
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from flax import traverse_util

# Fields that may differ between a run and its resumption (they do not change the result).
_RESUMABLE_FIELDS = ("progress_bar", "overwrite", "write_plots", "log_every_steps",
                     "keep_checkpoints")


def _comparable(config_json: str) -> dict:
  d = json.loads(config_json)
  for key in _RESUMABLE_FIELDS:
    d.pop(key, None)
  return d


def atomic_write_text(path: str, text: str) -> None:
  directory = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


class RunDirectory:
  """Checks and prepares a workdir for a config; writes the run's result files."""

  def __init__(self, workdir: str, config):
    if not workdir:
      raise ValueError("workdir is empty: pass --workdir=DIR.")
    self.path = os.path.abspath(workdir)
    try:
      os.makedirs(self.path, exist_ok=True)
      probe = os.path.join(self.path, f".write-test-{os.getpid()}")
      with open(probe, "w") as f:
        f.write("")
      os.remove(probe)
    except OSError as err:
      raise PermissionError(f"workdir {self.path} is not writable ({err.strerror}); choose "
                            "another --workdir.") from None
    config_path = os.path.join(self.path, "config.json")
    new = config.to_json(indent=1)
    self._config_text = new
    if os.path.exists(config_path) and not config.get("overwrite", False):
      with open(config_path) as f:
        old = f.read()
      if _comparable(old) != _comparable(new):
        diff = _diff(json.loads(old), json.loads(new))
        raise FileExistsError(
            f"workdir {self.path} holds a run of a different config ({diff}). Use another "
            "--workdir, or pass --config.overwrite=True to start over there.")
    self._clear = os.path.exists(config_path) and config.get("overwrite", False)

  def start(self) -> None:
    """Claims the workdir for this config (after set-up succeeded): writes config.json and, with
    `overwrite`, removes the previous run's files."""
    if jax.process_index() == 0:
      if self._clear:
        _clear_run(self.path)
      atomic_write_text(os.path.join(self.path, "config.json"), self._config_text)

  def write_final(self, final: dict, history: list[dict]) -> None:
    atomic_write_text(os.path.join(self.path, "final_metrics.json"),
                      json.dumps(dict(final, history=history), indent=1))

  def export(self, model, trainable, frozen) -> None:
    """export/trainable.npz always; export/merged_vit.npz when the method merges away."""
    from jvt.checkpoints import save_npz
    from jvt.partition import merge_params
    from jvt.tuning import merge_lora, merge_ssf
    out = os.path.join(self.path, "export")
    os.makedirs(out, exist_ok=True)
    flat = traverse_util.flatten_dict(trainable, sep="/")
    tmp = os.path.join(out, ".trainable.tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
    os.replace(tmp, os.path.join(out, "trainable.npz"))
    spec = model.tuning
    if any(spec.prompt_tokens) or spec.adapter_dim or spec.adaptformer_dim:
      return  # prompts and adapters add computation: nothing to merge into the backbone
    params = merge_params(trainable, frozen)
    if spec.lora_rank:
      params = merge_lora(params, alpha=spec.lora_alpha, rank=spec.lora_rank)
    if spec.ssf:
      params = merge_ssf(params)
    save_npz(os.path.join(out, "merged_vit.npz"), params)

  def plot_curves(self) -> None:
    from jvt import viz
    rows = read_metrics(self.path)
    if rows:
      viz.plot_training_curves(rows, os.path.join(self.path, "curves.png"))


def _clear_run(path: str) -> None:
  import shutil
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
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class _Progress:
  """A tqdm bar (step, loss, img/s, ETA), or nothing."""

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
                           img_s=f"{host.get('img_per_s', 0.0):.1f}", refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()


class MetricWriter:
  """Scalars to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write_header(self, *, config, trainable_params: int, summary: str) -> None:
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
