"""Evaluation protocols as data: which splits a run trains and evaluates on, and which epoch's
accuracy it reports.

  vtab_tune             train800 -> val200, last epoch (pick lr x wd per task)
  vtab_final            train800val200 -> test, last epoch, 5 seeds (the reported number)
  fgvc                  train -> test at the epoch of best val accuracy
  vtab_legacy_max_test  train800val200 -> max test accuracy over epochs (legacy)
  fgvc_legacy_max_test  train -> max test accuracy over epochs (legacy)

The legacy protocols reproduce what some released code (DA-VPT's included) reports; they select
on the test set, so every table and file that shows them says so in their label.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import numpy as np

SELECTIONS = ("last_epoch", "best_val_epoch", "max_test_over_epochs")
LEGACY_LABEL = "legacy (max test accuracy over epochs)"


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One evaluation protocol.

  Attributes:
    name: the value of `protocol` in configs and final_metrics.json.
    label: the human description printed in tables.
    benchmark: 'vtab' or 'fgvc'.
    train_split: split trained on.
    val_split: split evaluated for selection, or None.
    test_split: split whose accuracy is reported, or None (tune runs report val).
    selection: which epoch is reported, one of SELECTIONS.
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


PROTOCOLS: Mapping[str, Protocol] = {p.name: p for p in (
    Protocol("vtab_tune", "VTAB-1k tune: train800 -> val200, last epoch", "vtab",
             "train800", "val200", None, "last_epoch", "val_accuracy", (0,)),
    Protocol("vtab_final", "VTAB-1k: train800val200 -> test, last epoch", "vtab",
             "train800val200", None, "test", "last_epoch", "test_accuracy", (0, 1, 2, 3, 4)),
    Protocol("fgvc", "FGVC: train -> test at the best-val epoch", "fgvc",
             "train", "val", "test", "best_val_epoch", "test_accuracy", (0, 1, 2, 3, 4)),
    Protocol("vtab_legacy_max_test", f"VTAB-1k: train800val200 -> test, {LEGACY_LABEL}", "vtab",
             "train800val200", None, "test", "max_test_over_epochs", "test_accuracy",
             (0, 1, 2, 3, 4), legacy=True),
    Protocol("fgvc_legacy_max_test", f"FGVC: train -> test, {LEGACY_LABEL}", "fgvc",
             "train", "val", "test", "max_test_over_epochs", "test_accuracy",
             (0, 1, 2, 3, 4), legacy=True),
)}


def get_protocol(name: str) -> Protocol:
  """The Protocol called `name`; a ValueError lists the known ones otherwise."""
  if name not in PROTOCOLS:
    raise ValueError(f"unknown protocol '{name}'; known protocols: {', '.join(PROTOCOLS)}")
  return PROTOCOLS[name]


def select_epoch(protocol: Protocol | str, val_accuracy: Sequence[float] | None,
                 test_accuracy: Sequence[float] | None) -> int:
  """Index of the epoch whose accuracy `protocol` reports, from per-epoch accuracy curves.

  last_epoch: the last evaluated epoch; best_val_epoch: the first epoch with the highest val
  accuracy; max_test_over_epochs: the first epoch with the highest test accuracy (legacy).
  """
  protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
  curve = {"last_epoch": test_accuracy if test_accuracy is not None else val_accuracy,
           "best_val_epoch": val_accuracy,
           "max_test_over_epochs": test_accuracy}[protocol.selection]
  if curve is None or len(curve) == 0:
    raise ValueError(f"protocol {protocol.name} ({protocol.selection}) needs a non-empty "
                     f"{'val' if protocol.selection == 'best_val_epoch' else 'test'} curve")
  if protocol.selection == "last_epoch":
    return len(curve) - 1
  return int(np.argmax(np.asarray(curve)))


def tune_sweep(tasks: Sequence[str], grid: Mapping[str, Sequence[Any]],
               protocol: str = "vtab_tune", task_key: str = "task",
               seed_key: str = "seed") -> list[dict]:
  """Runs of the tuning stage: every task x the product of `grid` (e.g. lr x wd), one seed.

  The overrides carry `protocol`, so the trainer knows its splits and final_metrics.json names
  the protocol.
  """
  p = get_protocol(protocol)
  keys = list(grid)
  return [{task_key: task, "protocol": p.name, seed_key: p.seeds[0], **dict(zip(keys, combo))}
          for task in tasks for combo in itertools.product(*(list(grid[k]) for k in keys))]


def final_sweep(best: Mapping[str, Mapping[str, Any]], protocol: str = "vtab_final",
                task_key: str = "task", seed_key: str = "seed",
                seeds: Sequence[int] | None = None) -> list[dict]:
  """Runs of the final stage: for each task its chosen hyper-parameters x the protocol's seeds.

  best: {task: {override: value}}, e.g. one entry of jvt.results.best_hparams(...).
  """
  p = get_protocol(protocol)
  return [{task_key: task, "protocol": p.name, seed_key: seed, **dict(hparams)}
          for task, hparams in best.items() for seed in (p.seeds if seeds is None else seeds)]
