"""Sweep expansion, deterministic workdirs, resumable sequential runs and command printing."""
import json
import os
import shlex
import sys
import types

import pytest

from jvt import sweep


def test_expand_product_and_lists():
  runs = sweep.expand_sweep({"seed": [0, 1], "lr": [0.1, 1.0], "task": "dtd"})
  assert runs == [{"seed": 0, "lr": 0.1, "task": "dtd"}, {"seed": 0, "lr": 1.0, "task": "dtd"},
                  {"seed": 1, "lr": 0.1, "task": "dtd"}, {"seed": 1, "lr": 1.0, "task": "dtd"}]
  runs = sweep.expand_sweep([{"task": ["a", "b"]}, {"task": "c", "layers": [[10, 11]]}])
  assert runs == [{"task": "a"}, {"task": "b"}, {"task": "c", "layers": [10, 11]}]
  assert sweep.expand_sweep({}) == [{}]
  with pytest.raises(ValueError, match="empty list"):
    sweep.expand_sweep({"lr": []})
  with pytest.raises(ValueError, match="same run more than once"):
    sweep.expand_sweep([{"lr": 0.1}, {"lr": [0.1, 0.2]}])


def test_run_names():
  assert sweep.run_name({"seed": 0, "lr": 0.001, "task": "dtd"}) == "lr=0.001,seed=0,task=dtd"
  assert sweep.run_name({"b": True, "a": 1e-05}) == "a=1e-05,b=True"
  assert sweep.run_name({"name": "a/b c"}) == "name=a_b_c"
  assert sweep.run_name({}) == "base"
  long_a, long_b = {"x": "a" * 300}, {"x": "a" * 299 + "b"}
  assert len(sweep.run_name(long_a)) == 200
  assert sweep.run_name(long_a) != sweep.run_name(long_b)
  assert sweep.run_workdir("/r", {"lr": 0.1}) == "/r/lr=0.1"


class FakeTrainer:
  """Writes final_metrics.json; raises once on the `fail_at`-th call."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at = [], fail_at

  def __call__(self, overrides, workdir):
    self.calls.append(dict(overrides))
    if len(self.calls) == self.fail_at:
      raise RuntimeError("preempted")
    with open(os.path.join(workdir, sweep.FINAL_METRICS), "w") as f:
      json.dump({"test_accuracy": 0.5, "protocol": "vtab_final", "trainable_params": 1}, f)


def test_interrupted_sweep_resumes(tmp_path):
  root = str(tmp_path)
  runs = sweep.expand_sweep({"seed": [0, 1], "lr": [0.1, 1.0]})
  first = FakeTrainer(fail_at=3)
  with pytest.raises(RuntimeError, match="preempted"):
    sweep.run_sweep(runs, root, first, log=lambda _: None)
  assert first.calls == runs[:3]
  assert [sweep.is_finished(sweep.run_workdir(root, r)) for r in runs] == [True, True, False,
                                                                         False]
  second = FakeTrainer()
  assert sweep.run_sweep(runs, root, second, log=lambda _: None) == []
  assert second.calls == runs[2:]  # only the unfinished runs
  assert all(sweep.is_finished(sweep.run_workdir(root, r)) for r in runs)
  with open(os.path.join(sweep.run_workdir(root, runs[2]), sweep.OVERRIDES_FILE)) as f:
    assert json.load(f) == {"seed": 1, "lr": 0.1}
  third = FakeTrainer()
  sweep.run_sweep(runs, root, third, log=lambda _: None)
  assert third.calls == []


def test_keep_going_and_silent_run(tmp_path):
  runs = sweep.expand_sweep({"seed": [0, 1, 2]})
  trainer = FakeTrainer(fail_at=2)
  failed = sweep.run_sweep(runs, str(tmp_path), trainer, keep_going=True, log=lambda _: None)
  assert failed == [sweep.run_workdir(str(tmp_path), {"seed": 1})]
  assert len(trainer.calls) == 3
  with pytest.raises(RuntimeError, match="without writing final_metrics.json"):
    sweep.run_sweep([{"seed": 9}], str(tmp_path), lambda o, w: None, log=lambda _: None)
  os.makedirs(tmp_path / "seed=8")
  (tmp_path / "seed=8" / sweep.FINAL_METRICS).write_text('{"test_acc')  # torn write
  assert not sweep.is_finished(str(tmp_path / "seed=8"))


def test_print_commands_skip_finished(tmp_path, capsys):
  root = str(tmp_path / "runs")
  spec = json.dumps({"seed": [0, 1], "task": "svhn", "layers": [[10, 11]]})
  sweep.run_sweep([{"layers": [10, 11], "seed": 0, "task": "svhn"}], root, FakeTrainer(),
                  log=lambda _: None)
  status = sweep.main(["--config=configs/vpt.py:task=svhn", f"--root={root}", f"--sweep={spec}",
                       "--print_commands"])
  captured = capsys.readouterr()
  assert status == 0 and "1 of 2 runs finished" in captured.err
  [line] = captured.out.strip().splitlines()
  assert shlex.split(line) == [
      "python", "-m", "jvt.main", "--config=configs/vpt.py:task=svhn",
      f"--workdir={root}/layers=(10,_11),seed=1,task=svhn",
      "--config.seed=1", "--config.task=svhn", "--config.layers=(10, 11)"]


def test_cli_runs_with_spec_from_config_file(tmp_path):
  config = tmp_path / "cfg.py"
  config.write_text("def get_sweep(arg):\n  return {'seed': [0, 1], 'task': arg}\n")
  trainer = FakeTrainer()
  root = str(tmp_path / "runs")
  assert sweep.main([f"--config={config}:dtd", f"--root={root}"], run_fn=trainer) == 0
  assert trainer.calls == [{"seed": 0, "task": "dtd"}, {"seed": 1, "task": "dtd"}]
  assert sorted(os.listdir(root)) == ["seed=0,task=dtd", "seed=1,task=dtd"]


def test_cli_errors(tmp_path, capsys):
  config = tmp_path / "cfg.py"
  config.write_text("def get_config():\n  return None\n")
  assert sweep.main([f"--config={config}", f"--root={tmp_path}"]) == 2
  assert "define get_sweep(arg)" in capsys.readouterr().err
  assert sweep.main([f"--config={config}", f"--root={tmp_path}", "--sweep={bad"]) == 2
  assert "not valid JSON" in capsys.readouterr().err


def test_apply_overrides_and_default_run_fn(tmp_path, monkeypatch):
  ml_collections = pytest.importorskip("ml_collections")
  config = tmp_path / "cfg.py"
  config.write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  c = ml_collections.ConfigDict({'lr': 0.1, 'optim': {'wd': 0.0}, 'arg': arg})\n"
      "  c.lock()\n  return c\n")
  base = ml_collections.ConfigDict({"lr": 0.1, "optim": {"wd": 0.0}})
  base.lock()
  sweep.apply_overrides(base, {"lr": 1.0, "optim.wd": 1e-4})
  assert (base.lr, base.optim.wd) == (1.0, 1e-4)
  with pytest.raises((KeyError, AttributeError)):
    sweep.apply_overrides(base, {"optim.w": 1.0})  # a typo fails on a locked config

  seen = []
  fake_train = types.ModuleType("jvt.train")
  fake_train.train_and_evaluate = lambda cfg, workdir: seen.append((cfg.lr, cfg.arg, workdir))
  monkeypatch.setitem(sys.modules, "jvt.train", fake_train)
  import jvt  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jvt, "train", fake_train, raising=False)
  sweep.default_run_fn(f"{config}:x")({"lr": 2.0}, "/w")
  assert seen == [(2.0, "x", "/w")]
