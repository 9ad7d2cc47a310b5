"""Protocols and the results aggregator, against hand-computed numbers."""
import csv
import io
import json
import os

import pytest

from jvt import protocols
from jvt import results
from jvt.data import vtab

# Per-task mean accuracies chosen so that the group means are round numbers:
# natural 0.6, specialized 0.75, structured 0.45; mean of groups 0.6; mean of 19 = 10.8 / 19.
NATURAL = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
SPECIALIZED = [0.8, 0.9, 0.7, 0.6]
STRUCTURED = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
TASK_MEANS = dict(zip(vtab.VTAB_TASKS, NATURAL + SPECIALIZED + STRUCTURED))


def _write_run(root, name, metrics, overrides=None, config=None):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  for filename, content in [("final_metrics.json", metrics), ("sweep_overrides.json", overrides),
                            ("config.json", config)]:
    if content is not None:
      with open(os.path.join(workdir, filename), "w") as f:
        json.dump(content, f)


def _config(name, train, val, test, protocol="last", seed=0):
  """The parts of a trainer config.json the aggregator reads."""
  return {"seed": seed, "protocol": protocol, "dataset": {
      "name": name, "train_split": train, "val_split": val, "test_split": test}}


FINAL_SPLITS = {"dataset.train_split": "train800val200", "dataset.val_split": "",
                "dataset.test_split": "test"}


@pytest.fixture
def runs_root(tmp_path):
  """Runs written the way the trainer and jvt.sweep write them, plus a few hand-made ones."""
  root = str(tmp_path / "runs")
  for i, (task, mean) in enumerate(TASK_MEANS.items()):
    params = 50_000 if i < 7 else 150_000
    for seed, delta in [(0, -0.02), (1, 0.02)]:
      metrics = {"protocol": "last", "test_accuracy": mean + delta, "val_accuracy": None,
                 "trainable_params": params, "methods": ["vpt_deep"]}
      if seed == 0:  # task, splits and seed from config.json
        _write_run(root, f"final/{task}-{seed}", metrics, {"optimizer.lr": 0.5},
                   _config(f"vtab/{task}", "train800val200", "", "test", seed=seed))
      else:  # everything from the sweep's overrides
        _write_run(root, f"final/{task}-{seed}", metrics,
                   {"dataset.name": f"vtab/{task}", "seed": seed, "protocol": "last",
                    "optimizer.lr": 0.5, **FINAL_SPLITS})
  for task, acc in [("cifar100", 0.95), ("dtd", 0.75)]:
    _write_run(root, f"legacy/{task}", {"protocol": "vtab_legacy_max_test", "task": task,
                                        "test_accuracy": acc, "trainable_params": 10,
                                        "method": "da_vpt"})
  for task, acc in zip(["cub", "nabirds", "flowers", "dogs", "cars"], [0.9, 0.8, 0.99, 0.9, 0.8]):
    _write_run(root, f"fgvc/{task}", {"protocol": "best_val", "test_accuracy": acc,
                                      "val_accuracy": 0.1, "trainable_params": 1_000_000,
                                      "methods": ["vpt_deep"]},
               config=_config(f"fgvc/{task}", "train", "val", "test", protocol="best_val"))
  # Tuning: lr=0.1 has the best single run (0.9) but the worse mean (0.6) -> lr=1.0 (0.7).
  for lr, seed, acc in [(0.1, 0, 0.9), (0.1, 1, 0.3), (1.0, 0, 0.7)]:
    _write_run(root, f"tune/lr={lr},seed={seed}",
               {"protocol": "last", "val_accuracy": acc, "test_accuracy": None,
                "trainable_params": 5, "methods": ["vpt_deep"]},
               {"dataset.name": "list:/data/vtab-1k/dtd/", "optimizer.lr": lr, "seed": seed,
                "protocol": "last", "dataset.train_split": "train800",
                "dataset.val_split": "val200", "dataset.test_split": ""})
  return root


def _row(rows, protocol):
  [row] = [r for r in rows if r.protocol.name == protocol]
  return row


def test_vtab_means(runs_root):
  rows = results.summarize(results.load_records(runs_root))
  row = _row(rows, "vtab_final")
  assert row.method == "vpt_deep"
  for task, mean in TASK_MEANS.items():
    cell = row.cells[task]
    assert cell.n == 2
    assert cell.mean == pytest.approx(mean)
    assert cell.std == pytest.approx(0.02)  # population std of (m - 0.02, m + 0.02)
    assert cell.hparams == {"optimizer.lr": 0.5}
  assert row.group_means["natural"] == pytest.approx(0.6)
  assert row.group_means["specialized"] == pytest.approx(0.75)
  assert row.group_means["structured"] == pytest.approx(0.45)
  assert row.mean_of_group_means == pytest.approx(0.6)
  assert row.mean_of_tasks == pytest.approx(10.8 / 19)
  assert row.trainable_params == pytest.approx((7 * 50_000 + 12 * 150_000) / 19)


def test_incomplete_and_fgvc_rows(runs_root):
  rows = results.summarize(results.load_records(runs_root))
  legacy = _row(rows, "vtab_legacy_max_test")
  assert list(legacy.cells) == ["cifar100", "dtd"]
  assert legacy.group_means == {"natural": None, "specialized": None, "structured": None}
  assert legacy.mean_of_group_means is None and legacy.mean_of_tasks is None
  fgvc_row = _row(rows, "fgvc")
  assert fgvc_row.mean_of_tasks == pytest.approx((0.9 + 0.8 + 0.99 + 0.9 + 0.8) / 5)
  assert fgvc_row.cells["flowers"].mean == pytest.approx(0.99)  # test, not val, accuracy


def test_tuning_keeps_best_mean(runs_root):
  rows = results.summarize(results.load_records(runs_root))
  tune = _row(rows, "vtab_tune")
  assert tune.cells["dtd"].hparams == {"optimizer.lr": 1.0}
  assert tune.cells["dtd"].mean == pytest.approx(0.7)
  assert results.best_hparams(rows) == {"vpt_deep": {"dtd": {"optimizer.lr": 1.0}}}


def test_outputs_label_legacy(runs_root):
  rows = results.summarize(results.load_records(runs_root))
  markdown = results.to_markdown(rows)
  assert markdown.count("legacy (max test accuracy over epochs)") >= 2  # heading and warning
  assert "| 60.00 | 75.00 | 45.00 | 60.00 | 56.84 | 0.113 |" in markdown
  assert "90.00 ± 2.00 (n=2)" in markdown  # cifar100 under vtab_final
  table = list(csv.DictReader(io.StringIO(results.to_csv(rows))))
  legacy = [r for r in table if r["protocol"] == "vtab_legacy_max_test"]
  assert legacy and all("legacy (max test accuracy over epochs)" in r["protocol_label"]
                        for r in legacy)
  final = {r["task"]: r for r in table if r["protocol"] == "vtab_final"}
  assert float(final["mean_of_tasks"]["accuracy_mean_pct"]) == pytest.approx(100 * 10.8 / 19)
  assert float(final["group:specialized"]["accuracy_mean_pct"]) == pytest.approx(75.0)
  assert float(final["dtd"]["accuracy_std_pct"]) == pytest.approx(2.0)


def test_differing_hparams_need_group_by(tmp_path):
  root = str(tmp_path)
  for lr, acc in [(0.1, 0.5), (1.0, 0.7)]:
    _write_run(root, f"lr={lr}", {"protocol": "vtab_final", "test_accuracy": acc},
               {"task": "dtd", "lr": lr, "seed": 0})
  with pytest.raises(ValueError, match=r"dtd: runs differ in \['lr'\]"):
    results.summarize(results.load_records(root, task_key="task"), task_key="task")
  rows = results.summarize(results.load_records(root, task_key="task"), group_by=["lr"],
                           task_key="task")
  assert [(r.label, r.cells["dtd"].mean) for r in rows] == [
      ("(no method) [lr=0.1]", pytest.approx(0.5)), ("(no method) [lr=1.0]", pytest.approx(0.7))]


def test_runs_launched_without_sweep_read_config(tmp_path):
  """A run started from a printed command has no sweep_overrides.json: its config.json says."""
  root = str(tmp_path)
  metrics = {"protocol": "last", "test_accuracy": 0.5, "methods": ["lora"]}
  config = _config("vtab/dtd", "train800val200", "", "test", seed=1)
  _write_run(root, "a", metrics, {"optimizer.lr": 0.1, "seed": 0},
             _config("vtab/dtd", "train800val200", "", "test"))
  _write_run(root, "b", dict(metrics, test_accuracy=0.7),
             config=dict(config, optimizer={"lr": 0.1}))
  [row] = results.summarize(results.load_records(root))
  assert (row.protocol.name, row.method, row.cells["dtd"].n) == ("vtab_final", "lora", 2)
  assert row.cells["dtd"].mean == pytest.approx(0.6)
  _write_run(root, "c", metrics, config=dict(config, optimizer={"lr": 0.2}))
  with pytest.raises(ValueError, match=r"runs differ in \['optimizer.lr'\]"):
    results.summarize(results.load_records(root))


def test_task_names():
  assert results.task_from_dataset_name("vtab/clevr_dist") == "clevr_dist"
  assert results.task_from_dataset_name("fgvc/cub") == "cub"
  assert results.task_from_dataset_name("list:/data/vtab-1k/svhn/") == "svhn"
  assert results.task_from_dataset_name("folder:/data/pets/") == "pets"
  assert results.task_from_dataset_name("dtd") == "dtd"


def test_bad_records(tmp_path):
  _write_run(str(tmp_path / "a"), "r", {"protocol": "vtab_final", "test_accuracy": 87.0,
                                         "task": "dtd"})
  with pytest.raises(ValueError, match="not a fraction"):
    results.summarize(results.load_records(str(tmp_path / "a")))
  _write_run(str(tmp_path / "b"), "r", {"protocol": "vtab_final", "test_accuracy": 0.5})
  with pytest.raises(ValueError, match="no task in final_metrics.json"):
    results.load_records(str(tmp_path / "b"))
  _write_run(str(tmp_path / "c"), "r", {"protocol": "best_of_all", "task": "dtd"})
  with pytest.raises(ValueError, match="unknown protocol 'best_of_all'"):
    results.load_records(str(tmp_path / "c"))
  _write_run(str(tmp_path / "d"), "r", {"protocol": "vtab_final", "task": "imagenet",
                                         "test_accuracy": 0.5})
  with pytest.raises(ValueError, match=r"\['imagenet'\] are not vtab tasks"):
    results.summarize(results.load_records(str(tmp_path / "d")))
  _write_run(str(tmp_path / "f"), "r", {"protocol": "best_val", "test_accuracy": 0.5},
             config=_config("vtab/dtd", "train800", "val200", "test", protocol="best_val"))
  with pytest.raises(ValueError, match="no vtab protocol trains on 'train800' with "
                                       "protocol='best_val_epoch'"):
    results.load_records(str(tmp_path / "f"))


def test_other_tasks(tmp_path, capsys):
  """Runs outside VTAB/FGVC (the demo's layout): one column per task, no cross-task mean."""
  root = str(tmp_path / "demo")
  for method, params, accs in [("linear", 388, (0.30, 0.32, 0.28)),
                               ("vpt", 1924, (0.50, 0.46, 0.48))]:
    for seed, acc in enumerate(accs):
      config = _config("jvt_synthetic", "train", "validation", "test", seed=seed)
      config["dataset"]["task"] = "count"
      _write_run(root, f"s{seed}/runs/{method}", {"protocol": "last", "test_accuracy": acc,
                                                  "val_accuracy": 0.9, "trainable_params": params,
                                                  "methods": [method]}, config=config)
  config = _config("folder:/data/shop_items", "all[:80%]", "", "", protocol="best_val")
  _write_run(root, "shop", {"protocol": "best_val", "test_accuracy": None, "val_accuracy": 0.75,
                            "trainable_params": 10, "methods": ["linear"]}, config=config)
  rows = results.summarize(results.load_records(root))
  assert [(r.protocol.name, r.method) for r in rows] == [
      ("other_best_val_epoch_val", "linear"), ("other_last_epoch_test", "linear"),
      ("other_last_epoch_test", "vpt")]
  vpt = rows[2].cells["jvt_synthetic/count"]
  assert (vpt.n, vpt.trainable_params) == (3, 1924)
  assert vpt.mean == pytest.approx(0.48) and vpt.std == pytest.approx((0.0008 / 3) ** 0.5)
  assert rows[0].cells["shop_items"].mean == 0.75 and rows[0].mean_of_tasks is None
  out = str(tmp_path / "out")
  assert results.main([f"--root={root}", f"--out={out}"]) == 0
  text = capsys.readouterr().out
  assert "| Method | jvt_synthetic/count | Trainable params |" in text
  assert "| vpt | 48.00 ± 1.63 (n=3) | 1,924 |" in text
  assert "| linear | 75.00 ± 0.00 (n=1) | 10 |" in text and "val accuracy, best val epoch" in text


def test_cli(runs_root, tmp_path, capsys):
  out = str(tmp_path / "out")
  assert results.main([f"--root={runs_root}", f"--out={out}"]) == 0
  assert sorted(os.listdir(out)) == ["best_hparams.json", "results.csv", "results.md"]
  assert "Mean (19 tasks)" in capsys.readouterr().out
  with open(os.path.join(out, "best_hparams.json")) as f:
    assert json.load(f) == {"vpt_deep": {"dtd": {"optimizer.lr": 1.0}}}
  assert results.main([f"--root={tmp_path}/missing", f"--out={out}"]) == 2
  assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Protocols.

def test_select_epoch():
  val, test = [0.1, 0.5, 0.5, 0.3], [0.2, 0.1, 0.9, 0.4]
  assert protocols.select_epoch("vtab_final", None, test) == 3
  assert protocols.select_epoch("vtab_tune", val, None) == 3
  assert protocols.select_epoch("fgvc", val, test) == 1  # first epoch of the best val
  assert protocols.select_epoch("fgvc_legacy_max_test", val, test) == 2
  with pytest.raises(ValueError, match="needs a non-empty val curve"):
    protocols.select_epoch("fgvc", None, test)


def test_protocol_table():
  p = protocols.PROTOCOLS
  assert (p["vtab_tune"].train_split, p["vtab_tune"].val_split) == ("train800", "val200")
  assert (p["vtab_final"].train_split, p["vtab_final"].test_split) == ("train800val200", "test")
  assert p["vtab_final"].seeds == (0, 1, 2, 3, 4)
  assert p["fgvc"].selection == "best_val_epoch"
  for name, protocol in p.items():
    assert protocol.legacy == ("legacy" in name)
    assert ("legacy (max test accuracy over epochs)" in protocol.label) == protocol.legacy
    assert protocol.selection in ("last_epoch", "best_val_epoch", "legacy_max_test_epoch")
    o = protocol.config_overrides()
    inferred = protocols.infer_protocol(o["protocol"], protocol.benchmark,
                                        o["dataset.train_split"], o["dataset.test_split"])
    assert inferred == protocol
  assert p["vtab_tune"].config_overrides() == {
      "protocol": "last_epoch", "dataset.train_split": "train800", "dataset.val_split": "val200",
      "dataset.test_split": ""}


def test_two_stage_sweeps():
  tune = protocols.tune_sweep(["dtd", "svhn"], {"optimizer.lr": [0.1, 1.0], "wd": [0.0]})
  splits = {"protocol": "last_epoch", "dataset.train_split": "train800",
            "dataset.val_split": "val200", "dataset.test_split": ""}
  assert tune == [
      {"dataset.name": "vtab/dtd", "seed": 0, **splits, "optimizer.lr": 0.1, "wd": 0.0},
      {"dataset.name": "vtab/dtd", "seed": 0, **splits, "optimizer.lr": 1.0, "wd": 0.0},
      {"dataset.name": "vtab/svhn", "seed": 0, **splits, "optimizer.lr": 0.1, "wd": 0.0},
      {"dataset.name": "vtab/svhn", "seed": 0, **splits, "optimizer.lr": 1.0, "wd": 0.0}]
  final = protocols.final_sweep({"dtd": {"optimizer.lr": 1.0}}, seeds=[3, 4],
                                task_format="list:/d/{task}")
  assert final == [
      {"dataset.name": "list:/d/dtd", "seed": s, "protocol": "last_epoch", **FINAL_SPLITS,
       "optimizer.lr": 1.0} for s in (3, 4)]
  assert len(protocols.final_sweep({"dtd": {}, "svhn": {}})) == 10
  assert protocols.final_sweep({"cub": {}}, protocol="fgvc", seeds=[0]) == [
      {"dataset.name": "fgvc/cub", "seed": 0, "protocol": "best_val_epoch",
       "dataset.train_split": "train", "dataset.val_split": "val", "dataset.test_split": "test"}]
