"""A real sweep through the real trainer: 2 seeds x 2 learning rates of `configs/vtab/vpt_deep.py`
on synthetic images laid out as a VTAB-1k list folder (NOAH format, named like the `dtd` task),
interrupted at the third run, resumed without touching finished runs, then aggregated with
`jvt.results` into 2 rows (one per learning rate) of 2 seeds each.

The config file is used as users run it (`task=dtd,lists=<folder>` in its arg); only the model
size, the duration and the batch are shrunk through the same dotted overrides a sweep applies.
"""
import json
import os
import pathlib

import numpy as np
import PIL.Image
import pytest

from helpers_train import train_data_dir  # noqa: F401  (session fixture)
from jvt import results, sweep
from jvt.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "vtab" / "vpt_deep.py")
TASK = "dtd"
SPLITS = {"train800val200": ("train", 64), "test": ("test", 32)}  # list split: (synthetic, n)
# A 1-block ViT of width 16 on 16 x 16 images (4 patches), 4 steps per epoch, 2 epochs. Most of
# a run's time is XLA compilation (model init, train step, eval step), not its size.
TINY_VIT = dict(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1, patch_size=8)
SHRINK = {
    "model.image_size": 16, "model.overrides": TINY_VIT, "pretrained.path": "",
    "batch_size": 16, "eval_batch_size": 32, "total_epochs": 2.0,
    "optimizer.warmup_epochs": 0.5, "log_every_steps": 4, "checkpoint_every_steps": 4,
    "write_plots": False, "progress_bar": False,
}
SPEC = {"seed": [0, 1], "optimizer.lr": [0.5, 5.0]}


def _write_list_folder(data_dir: str, root: pathlib.Path) -> pathlib.Path:
  """Synthetic `shape` images as <root>/dtd/images/*.png with train800val200.txt / test.txt."""
  folder = root / TASK
  (folder / "images").mkdir(parents=True)
  for split, (synthetic_split, n) in SPLITS.items():
    source = sources.get_source(dict(name="jvt_synthetic", data_dir=data_dir, task="shape"),
                                synthetic_split)
    lines = []
    for i in range(n):
      example = source[i]
      name = f"images/{split}_{i:03d}.png"
      PIL.Image.fromarray(example["image"]).save(folder / name)
      lines.append(f"{name} {example['label']}")
    (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
  return root


class Runner:
  """Loads the config file with `arg`, applies SHRINK and the run's overrides, trains. Raises
  once, before training, on the `fail_at`-th run (a preempted sweep)."""

  def __init__(self, arg: str, fail_at: int | None = None):
    self.arg, self.fail_at, self.calls = arg, fail_at, []

  def __call__(self, overrides: dict, workdir: str) -> None:
    from jvt import train  # pylint: disable=g-import-not-at-top
    self.calls.append(dict(overrides))
    if len(self.calls) == self.fail_at:
      raise KeyboardInterrupt("preempted")
    config = sweep.load_config_module(CONFIG).get_config(self.arg)
    train.train_and_evaluate(sweep.apply_overrides(config, {**SHRINK, **overrides}), workdir)


def _mtimes(workdir: str) -> dict[str, int]:
  return {os.path.relpath(os.path.join(d, f), workdir): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(workdir) for f in files}


def _final(workdir: str) -> dict:
  with open(os.path.join(workdir, sweep.FINAL_METRICS)) as f:
    return json.load(f)


def test_sweep_runs_resumes_and_aggregates(train_data_dir, tmp_path):  # noqa: F811
  lists = _write_list_folder(train_data_dir, tmp_path / "vtab-1k")
  arg = f"task={TASK},lists={lists},num_prompts=2"
  root = str(tmp_path / "runs")
  runs = sweep.expand_sweep(SPEC)
  workdirs = [sweep.run_workdir(root, r) for r in runs]

  first = Runner(arg, fail_at=3)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(runs, root, first, log=lambda _: None)
  assert [sweep.is_finished(w) for w in workdirs] == [True, True, False, False]
  before = [_mtimes(w) for w in workdirs[:2]]
  assert all("config.json" in m and "export/trainable.npz" in m for m in before)

  second = Runner(arg)
  assert sweep.run_sweep(runs, root, second, log=lambda _: None) == []
  assert second.calls == runs[2:]  # finished runs are not redone ...
  assert [_mtimes(w) for w in workdirs[:2]] == before  # ... nor touched
  assert all(sweep.is_finished(w) for w in workdirs)

  for overrides, workdir in zip(runs, workdirs):
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    assert (config["seed"], config["optimizer"]["lr"]) == (overrides["seed"],
                                                          overrides["optimizer.lr"])
    assert (config["method"], config["dataset"]["name"]) == ("vpt_deep", f"list:{lists}/{TASK}")
    final = _final(workdir)
    assert final["protocol"] == "last_epoch" and final["methods"] == ["vpt"]
    assert 0.0 <= final["test_accuracy"] <= 1.0

  records = results.load_records(root)
  assert len(records) == 4
  assert {(r.task, r.protocol, r.method) for r in records} == {(TASK, "vtab_final", "vpt_deep")}
  with pytest.raises(ValueError, match="optimizer.lr"):  # two settings in one row
    results.summarize(records)
  rows = results.summarize(records, group_by=["optimizer.lr"])
  assert [row.group for row in rows] == [(("optimizer.lr", 0.5),), (("optimizer.lr", 5.0),)]
  for row, lr in zip(rows, SPEC["optimizer.lr"]):
    accuracy = [_final(w)["test_accuracy"] for r, w in zip(runs, workdirs)
                if r["optimizer.lr"] == lr]
    cell = row.cells[TASK]
    assert cell.n == 2
    np.testing.assert_allclose([cell.mean, cell.std], [np.mean(accuracy), np.std(accuracy)])
    assert row.mean_of_group_means is None  # 18 tasks missing

  out = tmp_path / "out"
  results.write_results(root, str(out), group_by=["optimizer.lr"])
  table = (out / "results.md").read_text()
  assert "vpt_deep [optimizer.lr=0.5]" in table and "vpt_deep [optimizer.lr=5.0]" in table
  assert table.count("(n=2)") == 2
