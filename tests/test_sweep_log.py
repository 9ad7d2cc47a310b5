"""jvt.sweep prints each finished run's accuracy."""
import json
import os

from jvt import sweep


def _trainer(accuracy):
  def run(overrides, workdir):
    with open(os.path.join(workdir, sweep.FINAL_METRICS), "w") as f:
      json.dump({"test_accuracy": accuracy[overrides["seed"]], "val_accuracy": None,
                 "trainable_params": 1924}, f)
  return run


def test_sweep_logs_accuracies(tmp_path):
  runs = sweep.expand_sweep({"seed": [0, 1]})
  lines = []
  sweep.run_sweep(runs[:1], str(tmp_path), _trainer({0: 0.5}), log=lines.append)
  sweep.run_sweep(runs, str(tmp_path), _trainer({1: 0.8125}), log=lines.append)
  root = str(tmp_path)
  assert lines == [
      f"[1/1] running: {root}/seed=0",
      f"[1/1] done: {root}/seed=0: accuracy test 0.500, 1,924 trainable",
      f"[1/2] finished already: {root}/seed=0: accuracy test 0.500, 1,924 trainable",
      f"[2/2] running: {root}/seed=1",
      f"[2/2] done: {root}/seed=1: accuracy test 0.812, 1,924 trainable"]
