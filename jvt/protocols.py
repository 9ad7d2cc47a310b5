"""Evaluation protocols as data: which splits a run trains and evaluates on, and which epoch's
accuracy it reports.

  vtab_tune             train800 -> val200, last epoch (pick lr x wd per task)
  vtab_final            train800val200 -> test, last epoch, 5 seeds (the reported number)
  fgvc                  train -> test at the epoch of best val accuracy
  vtab_legacy_max_test  train800val200 -> max test accuracy over epochs (legacy)
  fgvc_legacy_max_test  train -> max test accuracy over epochs (legacy)

A protocol is what the trainer's config expresses with `protocol` (the epoch selection: 'last',
'best_val' or 'legacy_max_test', as in jvt.config_lib) plus the `dataset.*_split` fields;
`Protocol.config_overrides()` gives those fields and `infer_protocol` maps them back.

The legacy protocols reproduce what some released code (DA-VPT's included) reports; they select
on the test set, so every table and file that shows them says so in their label.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import numpy as np

SELECTIONS = ("last", "best_val", "legacy_max_test")  # the trainer's `config.protocol` values
LEGACY_LABEL = "legacy (max test accuracy over epochs)"
SPLIT_KEYS = ("dataset.train_split", "dataset.val_split", "dataset.test_split")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One evaluation protocol.

  Attributes:
    name: protocol name in tables and results files.
    label: the human description printed in tables.
    benchmark: 'vtab' or 'fgvc'.
    train_split: split trained on.
    val_split: split evaluated for selection, or None.
    test_split: split whose accuracy is reported, or None (tuning runs report val).
    selection: the reported epoch, one of SELECTIONS ('last', 'best_val', 'legacy_max_test').
    metric: the key of final_metrics.json that holds the reported accuracy.
    seeds: the seeds a full run of the protocol uses.
    legacy: True when the number is selected on the test set.
  """
  name: str
  label: str
  benchmark: str
  train_split: str
  val_split: str | None
  test_split: str | None
  selection: str
  metric: str
  seeds: tuple[int, ...]
  legacy: bool = False

  def config_overrides(self) -> dict[str, str]:
    """The trainer config fields that select this protocol."""
    return {"protocol": self.selection, "dataset.train_split": self.train_split,
            "dataset.val_split": self.val_split or "", "dataset.test_split": self.test_split or ""}


_FIVE_SEEDS = (0, 1, 2, 3, 4)
PROTOCOLS: Mapping[str, Protocol] = {p.name: p for p in (
    Protocol("vtab_tune", "VTAB-1k tune: train800 -> val200, last epoch", "vtab",
             "train800", "val200", None, "last", "val_accuracy", (0,)),
    Protocol("vtab_final", "VTAB-1k: train800val200 -> test, last epoch", "vtab",
             "train800val200", None, "test", "last", "test_accuracy", _FIVE_SEEDS),
    Protocol("fgvc", "FGVC: train -> test at the best-val epoch", "fgvc",
             "train", "val", "test", "best_val", "test_accuracy", _FIVE_SEEDS),
    Protocol("vtab_legacy_max_test", f"VTAB-1k: train800val200 -> test, {LEGACY_LABEL}", "vtab",
             "train800val200", None, "test", "legacy_max_test", "test_accuracy", _FIVE_SEEDS,
             legacy=True),
    Protocol("fgvc_legacy_max_test", f"FGVC: train -> test, {LEGACY_LABEL}", "fgvc",
             "train", "val", "test", "legacy_max_test", "test_accuracy", _FIVE_SEEDS,
             legacy=True),
)}


def get_protocol(name: str) -> Protocol:
  """The Protocol called `name`; a ValueError lists the known ones otherwise."""
  if name not in PROTOCOLS:
    raise ValueError(f"unknown protocol '{name}'; known protocols: {', '.join(PROTOCOLS)}")
  return PROTOCOLS[name]


def infer_protocol(selection: str, benchmark: str, train_split: str,
                   test_split: str | None) -> Protocol:
  """The protocol of a run from its config: `protocol`, the benchmark and its splits."""
  for p in PROTOCOLS.values():
    if (p.selection, p.benchmark, p.train_split, bool(p.test_split)) == (
        selection, benchmark, train_split, bool(test_split)):
      return p
  raise ValueError(
      f"no {benchmark} protocol trains on '{train_split}' with protocol='{selection}' and "
      f"{'a' if test_split else 'no'} test split; known: " + "; ".join(
          f"{p.name} (protocol={p.selection}, train={p.train_split}, test={p.test_split})"
          for p in PROTOCOLS.values()))


def select_epoch(protocol: Protocol | str, val_accuracy: Sequence[float] | None,
                 test_accuracy: Sequence[float] | None) -> int:
  """Index of the epoch whose accuracy `protocol` reports, from per-epoch accuracy curves.

  last: the last evaluated epoch; best_val: the first epoch with the highest val accuracy;
  legacy_max_test: the first epoch with the highest test accuracy.
  """
  protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
  curve = {"last": test_accuracy if test_accuracy is not None else val_accuracy,
           "best_val": val_accuracy,
           "legacy_max_test": test_accuracy}[protocol.selection]
  if curve is None or len(curve) == 0:
    raise ValueError(f"protocol {protocol.name} ({protocol.selection}) needs a non-empty "
                     f"{'val' if protocol.selection == 'best_val' else 'test'} curve")
  if protocol.selection == "last":
    return len(curve) - 1
  return int(np.argmax(np.asarray(curve)))


def tune_sweep(tasks: Sequence[str], grid: Mapping[str, Sequence[Any]],
               protocol: str = "vtab_tune", task_key: str = "dataset.name",
               task_format: str = "{benchmark}/{task}", seed_key: str = "seed") -> list[dict]:
  """Runs of the tuning stage: every task x the product of `grid`, with the protocol's first
  seed and split fields.

  grid: config field -> values, e.g. {'optimizer.lr': [0.1, 1.0], 'optimizer.weight_decay':
  [0.0, 1e-4]}. task_format renders the value of task_key ('vtab/dtd'; for list folders e.g.
  'list:/data/vtab-1k/{task}').
  """
  p = get_protocol(protocol)
  keys = list(grid)
  return [{task_key: task_format.format(benchmark=p.benchmark, task=task), seed_key: p.seeds[0],
           **p.config_overrides(), **dict(zip(keys, combo))}
          for task in tasks for combo in itertools.product(*(list(grid[k]) for k in keys))]


def final_sweep(best: Mapping[str, Mapping[str, Any]], protocol: str = "vtab_final",
                task_key: str = "dataset.name", task_format: str = "{benchmark}/{task}",
                seed_key: str = "seed", seeds: Sequence[int] | None = None) -> list[dict]:
  """Runs of the final stage: for each task its chosen hyper-parameters x the protocol's seeds.

  best: {task: {config field: value}}, e.g. one entry of jvt.results.best_hparams(...).
  """
  p = get_protocol(protocol)
  return [{task_key: task_format.format(benchmark=p.benchmark, task=task), seed_key: seed,
           **p.config_overrides(), **dict(hparams)}
          for task, hparams in best.items() for seed in (p.seeds if seeds is None else seeds)]
