"""jvt.protocols: epoch selection (the trainer's `config.protocol`), its names and former names,
and VPT's tie-break of tuning results."""
import json
import itertools
import logging

import numpy as np
import pytest

from jvt import protocols, results
from jvt.train import rundir as run_io

HISTORY = [
    {"epoch": 1, "step": 10, "val_accuracy": 0.5, "test_accuracy": 0.40},
    {"epoch": 2, "step": 20, "val_accuracy": 0.7, "test_accuracy": 0.45},
    {"epoch": 3, "step": 30, "val_accuracy": 0.7, "test_accuracy": 0.60},
    {"epoch": 4, "step": 40, "val_accuracy": 0.6, "test_accuracy": 0.60},
]


def _pick(history, metric):
  """The first entry with the highest `metric`, found by hand."""
  values = [h[metric] for h in history]
  return history[values.index(max(values))]


@pytest.mark.parametrize("selection,former", [("last_epoch", "last"),
                                              ("best_val_epoch", "best_val"),
                                              ("legacy_max_test_epoch", "legacy_max_test")])
def test_final_metrics_per_selection_and_former_name(selection, former):
  want = {"last_epoch": HISTORY[-1], "best_val_epoch": _pick(HISTORY, "val_accuracy"),
          "legacy_max_test_epoch": _pick(HISTORY, "test_accuracy")}[selection]
  got = protocols.final_metrics(HISTORY, selection)
  assert {k: got[k] for k in ("epoch", "step", "val_accuracy", "test_accuracy")} == want
  assert ("note" in got) == (selection == "legacy_max_test_epoch")
  assert protocols.final_metrics(HISTORY, former) == got
  assert protocols.final_metrics([], selection) == {}


def test_final_metrics_needs_the_selected_curve():
  no_val = [{k: v for k, v in h.items() if k != "val_accuracy"} for h in HISTORY]
  with pytest.raises(ValueError, match="needs dataset.val_split"):
    protocols.final_metrics(no_val, "best_val_epoch")
  with pytest.raises(ValueError, match="needs dataset.test_split"):
    protocols.check_selection("legacy_max_test", "val", "")
  with pytest.raises(ValueError, match="needs dataset.val_split"):
    protocols.check_selection("best_val", "", "test")
  assert protocols.check_selection("best_val", "val", "test") == "best_val_epoch"


def test_names_that_cannot_be_confused(caplog):
  assert not set(protocols.SELECTIONS) & set(protocols.PROTOCOLS)
  assert not set(protocols.SELECTION_ALIASES) & set(protocols.PROTOCOLS)
  assert set(protocols.SELECTION_ALIASES.values()) == set(protocols.SELECTIONS)
  # A benchmark protocol given as the trainer's field, and the other way round: errors that
  # say which word is which.
  with pytest.raises(ValueError, match="'vtab_tune' is a benchmark protocol.*protocol=vtab_tune"
                                       ".*last_epoch, best_val_epoch, legacy_max_test_epoch"):
    protocols.canonical_selection("vtab_tune")
  with pytest.raises(ValueError, match="'best_val' is an epoch selection"):
    protocols.get_protocol("best_val")
  with pytest.raises(ValueError, match="config.protocol='best'; allowed: last_epoch"):
    protocols.canonical_selection("best")
  # Former names: mapped, with a deprecation warning.
  protocols._warned.clear()
  with caplog.at_level(logging.WARNING, logger="jvt.protocols"):
    assert protocols.canonical_selection("legacy_max_test") == "legacy_max_test_epoch"
  assert "deprecated" in caplog.text and "'legacy_max_test_epoch'" in caplog.text


def test_a_run_written_with_a_former_name_resumes():
  """config.json of a run started before the rename compares equal to today's config."""
  old = {"protocol": "best_val", "seed": 0}
  assert run_io._comparable(old) == run_io._comparable({"protocol": "best_val_epoch", "seed": 0})
  assert run_io._comparable(old) != run_io._comparable({"protocol": "last_epoch", "seed": 0})


def _vpt_find_best_lrwd(runs):
  """KMnP/vpt `tune_vtab.py` `find_best_lrwd`, written out over (val top-1, lr, wd) in the
  order its glob returns the files: a strictly higher accuracy wins; an equal one replaces the
  best only with a smaller lr."""
  best_lr = best_wd = None
  best_acc = -1
  for acc, lr, wd in runs:
    if acc == best_acc:
      if best_lr is not None and lr < best_lr:
        best_lr, best_wd, best_acc = lr, wd, acc
    elif acc > best_acc:
      best_acc, best_lr, best_wd = acc, lr, wd
  return best_lr, best_wd


def test_pick_best_is_vpts_tie_break():
  rng = np.random.default_rng(0)
  lrs, wds = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5), (0.01, 0.001, 0.0001, 0.0)
  for trial in range(200):
    grid = list(itertools.product(lrs, wds))
    order = rng.permutation(len(grid))
    # Few distinct accuracies: many exact ties.
    runs = [(float(rng.choice([0.5, 0.6, 0.7])), *grid[i]) for i in order]
    candidates = [(acc, {"optimizer.lr": lr, "optimizer.weight_decay": wd})
                  for acc, lr, wd in runs]
    i = protocols.pick_best(candidates)
    assert runs[i][1:] == _vpt_find_best_lrwd(runs), trial
  # Without an lr among the hyper-parameters: the first of the best.
  assert protocols.pick_best([(0.5, {"tuning.num_prompts": 10}),
                              (0.7, {"tuning.num_prompts": 50}),
                              (0.7, {"tuning.num_prompts": 5})]) == 1
  with pytest.raises(ValueError, match="no candidates"):
    protocols.pick_best([])


def test_results_break_tuning_ties_by_the_smaller_lr():
  """Two tuning runs of one task with the same val accuracy: best_hparams keeps the smaller
  lr (VPT), although the larger one comes first in the candidates' order ("10.0" < "5.0")."""
  splits = {"dataset.train_split": "train800", "dataset.val_split": "val200",
            "dataset.test_split": ""}
  records = [results.RunRecord(
      workdir=f"/r/{lr}", task="dtd", protocol="vtab_tune", method="vpt_deep", seed=0,
      overrides={"dataset.name": "vtab/dtd", "seed": 0, "protocol": "last_epoch", **splits,
                 "optimizer.lr": lr, "tuning.num_prompts": n},
      metrics={"protocol": "last_epoch", "val_accuracy": acc, "test_accuracy": None})
      for lr, n, acc in ((10.0, 5, 0.8), (5.0, 50, 0.8), (0.1, 1, 0.7))]
  best = results.best_hparams(results.summarize(records))
  assert best == {"vpt_deep": {"dtd": {"optimizer.lr": 5.0, "tuning.num_prompts": 50}}}


def test_a_run_written_before_new_config_keys_compares_equal():
  """Keys added to the base config after a run started, left at their defaults, do not make it
  a different config; a key set away from its default still does."""
  from jvt.config_lib import base_config
  new = json.loads(base_config().to_json())
  old = json.loads(base_config().to_json())
  del old["optimizer"]["decay_cls"], old["optimizer"]["min_lr"]
  filled = run_io.with_new_defaults(old, new, run_io._base_config_dict())
  assert run_io._comparable(filled) == run_io._comparable(new)
  new["optimizer"]["min_lr"] = 1e-6
  filled = run_io.with_new_defaults(old, new, run_io._base_config_dict())
  assert run_io._comparable(filled) != run_io._comparable(new)
