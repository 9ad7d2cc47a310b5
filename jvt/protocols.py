"""Evaluation protocols as data: which splits a run trains and evaluates on, and which epoch's
accuracy it reports; the trainer's epoch selection; VPT's tie-break of tuning results.

Two words, kept apart:
  * a benchmark protocol (`Protocol`, the config arg `protocol=vtab_tune` of
    configs/{vtab,fgvc}/*.py): splits + reported epoch + seeds of a published evaluation;
  * an epoch selection (the trainer's `config.protocol` field, `SELECTIONS`): which evaluated
    epoch's metrics `final_metrics.json` reports.

  benchmark protocol    splits, epoch selection
  vtab_tune             train800 -> val200, last_epoch (pick lr x wd per task)
  vtab_final            train800val200 -> test, last_epoch, 5 seeds (the reported number)
  fgvc                  train -> test at best_val_epoch
  vtab_legacy_max_test  train800val200 -> test, legacy_max_test_epoch (legacy)
  fgvc_legacy_max_test  train -> test, legacy_max_test_epoch (legacy)

`Protocol.config_overrides()` gives the trainer fields of a benchmark protocol and
`infer_protocol` maps them back. The epoch selections were called "last", "best_val" and
"legacy_max_test" before; those names still work (`canonical_selection` maps them, with a
deprecation warning).

The legacy protocols reproduce what some released code (DA-VPT's included) reports; they select
on the test set, so every table and file that shows them says so in their label.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Mapping, Sequence

import numpy as np

# The trainer's `config.protocol` values: the epoch whose metrics a run reports.
SELECTIONS = ("last_epoch", "best_val_epoch", "legacy_max_test_epoch")
# Their former names, still accepted.
SELECTION_ALIASES = {"last": "last_epoch", "best_val": "best_val_epoch",
                     "legacy_max_test": "legacy_max_test_epoch"}
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
    selection: the reported epoch, one of SELECTIONS ('last_epoch', 'best_val_epoch',
      'legacy_max_test_epoch').
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
             "train800", "val200", None, "last_epoch", "val_accuracy", (0,)),
    Protocol("vtab_final", "VTAB-1k: train800val200 -> test, last epoch", "vtab",
             "train800val200", None, "test", "last_epoch", "test_accuracy", _FIVE_SEEDS),
    Protocol("fgvc", "FGVC: train -> test at the best-val epoch", "fgvc",
             "train", "val", "test", "best_val_epoch", "test_accuracy", _FIVE_SEEDS),
    Protocol("vtab_legacy_max_test", f"VTAB-1k: train800val200 -> test, {LEGACY_LABEL}", "vtab",
             "train800val200", None, "test", "legacy_max_test_epoch", "test_accuracy",
             _FIVE_SEEDS, legacy=True),
    Protocol("fgvc_legacy_max_test", f"FGVC: train -> test, {LEGACY_LABEL}", "fgvc",
             "train", "val", "test", "legacy_max_test_epoch", "test_accuracy", _FIVE_SEEDS,
             legacy=True),
)}


def get_protocol(name: str) -> Protocol:
  """The Protocol called `name`; a ValueError lists the known ones otherwise."""
  if name not in PROTOCOLS:
    hint = ""
    if name in SELECTIONS or name in SELECTION_ALIASES:
      hint = (f" ('{name}' is an epoch selection, the trainer's `config.protocol` field; a "
              "benchmark protocol sets it together with the splits)")
    raise ValueError(f"unknown protocol '{name}'{hint}; known protocols: {', '.join(PROTOCOLS)}")
  return PROTOCOLS[name]


_log = logging.getLogger("jvt.protocols")
_warned: set[str] = set()


def canonical_selection(name: str) -> str:
  """The epoch selection `name` (the trainer's `config.protocol`), its former name mapped to
  the current one with a deprecation warning (once per name). A benchmark protocol name or an
  unknown name is a ValueError that says which is which."""
  if name in SELECTIONS:
    return name
  if name in SELECTION_ALIASES:
    new = SELECTION_ALIASES[name]
    if name not in _warned:
      _warned.add(name)
      _log.warning("config.protocol=%r is deprecated; it is now called %r (the same epoch "
                   "selection).", name, new)
    return new
  if name in PROTOCOLS:
    raise ValueError(
        f"config.protocol={name!r}: '{name}' is a benchmark protocol (splits + epoch + seeds), "
        f"the config arg of configs/{{vtab,fgvc}}/*.py (e.g. --config=configs/vtab/"
        f"vpt_deep.py:protocol={name}); config.protocol is the reported epoch, one of "
        f"{', '.join(SELECTIONS)}.")
  raise ValueError(f"config.protocol={name!r}; allowed: {', '.join(SELECTIONS)} (the epoch whose "
                   "metrics the run reports).")


def final_metrics(history: Sequence[Mapping[str, Any]], selection: str) -> dict:
  """The reported metrics of a run: the entry of its per-evaluation `history` (dicts with
  val_accuracy / test_accuracy / epoch / step) that the epoch selection picks.

  last_epoch: the last entry; best_val_epoch: the first entry with the highest val accuracy;
  legacy_max_test_epoch: the first with the highest test accuracy (and a note saying so).
  An empty history gives {}.
  """
  selection = canonical_selection(selection)
  if not history:
    return {}
  keys = ("val_accuracy", "test_accuracy", "epoch", "step")
  if selection == "last_epoch":
    return {k: history[-1].get(k) for k in keys}
  metric = "val_accuracy" if selection == "best_val_epoch" else "test_accuracy"
  with_metric = [h for h in history if h.get(metric) is not None]
  if not with_metric:
    split = "val" if metric == "val_accuracy" else "test"
    raise ValueError(f"protocol='{selection}' needs dataset.{split}_split.")
  best = max(with_metric, key=lambda h: h[metric])  # the first of the best
  out = {k: best.get(k) for k in keys}
  if selection == "legacy_max_test_epoch":
    out["note"] = LEGACY_LABEL
  return out


def check_selection(selection: str, val_split: str, test_split: str) -> str:
  """The canonical epoch selection, checked against the splits a run evaluates."""
  selection = canonical_selection(selection)
  if selection == "best_val_epoch" and not val_split:
    raise ValueError(f"protocol='{selection}' needs dataset.val_split (e.g. "
                     "--config.dataset.val_split=validation).")
  if selection == "legacy_max_test_epoch" and not test_split:
    raise ValueError(f"protocol='{selection}' needs dataset.test_split.")
  return selection


def pick_best(candidates: Sequence[tuple[float, Mapping[str, Any]]],
              lr_key: str = "optimizer.lr") -> int:
  """Index of the best (accuracy, hyper-parameters) candidate of a tuning stage, by the rule of
  VPT's `tune_vtab.py` (`find_best_lrwd`, KMnP/vpt): the highest accuracy; among exactly tied
  candidates the smallest learning rate (`hparams[lr_key]`, "to break tie for stability");
  among candidates still tied, the first in the given order (VPT keeps the first file glob
  returns).
  """
  if not candidates:
    raise ValueError("pick_best: no candidates.")
  best = 0
  for i, (accuracy, hparams) in enumerate(candidates[1:], 1):
    top, top_hparams = candidates[best]
    if accuracy > top:
      best = i
    elif accuracy == top and lr_key in hparams and lr_key in top_hparams and (
        float(hparams[lr_key]) < float(top_hparams[lr_key])):
      best = i
  return best


def infer_protocol(selection: str, benchmark: str, train_split: str,
                   test_split: str | None) -> Protocol:
  """The protocol of a run from its config: `protocol` (an epoch selection, current or former
  name), the benchmark and its splits."""
  selection = SELECTION_ALIASES.get(selection, selection)
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

  last_epoch: the last evaluated epoch; best_val_epoch: the first epoch with the highest val
  accuracy; legacy_max_test_epoch: the first epoch with the highest test accuracy.
  """
  protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
  curve = {"last_epoch": test_accuracy if test_accuracy is not None else val_accuracy,
           "best_val_epoch": val_accuracy,
           "legacy_max_test_epoch": test_accuracy}[protocol.selection]
  if curve is None or len(curve) == 0:
    raise ValueError(f"protocol {protocol.name} ({protocol.selection}) needs a non-empty "
                     f"{'val' if protocol.selection == 'best_val_epoch' else 'test'} curve")
  if protocol.selection == "last_epoch":
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
