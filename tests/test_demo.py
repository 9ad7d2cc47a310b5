"""The embedded demo shows the point of visual tuning, and the docs' Python example runs."""
import json
import os
import re

import pytest

from jvt.config_lib import load_config
from jvt.demo import run_config, run_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARGIN = 0.05  # accuracy a prompt method must beat the linear probe by, on every seed


def test_demo_config_is_one_run_of_the_target_task():
  config = load_config(os.path.join(REPO, "configs/demo.py:steps=10"))
  assert (config.train.total_steps, config.train.dataset.task) == (10, "count")
  assert config.demo.tune_steps == 10 and config.demo.methods[0] == "linear"
  assert config.train.tuning.to_dict() == {"method": "linear"} and config.train.optimizer.lr == 0.1
  c = run_config(config.train, total_steps=3, **{"dataset.task": "shape", "optimizer.lr": 0.5})
  assert (c.total_steps, c.dataset.task, c.optimizer.lr) == (3, "shape", 0.5)
  assert config.train.total_steps == 10  # a copy
  with pytest.raises(KeyError, match="no field 'optimizer.lrr'"):
    run_config(config.train, **{"optimizer.lrr": 1.0})


@pytest.mark.slow
def test_docs_python_example_runs_as_written(tmp_path):
  """docs/training.md's example, with its /tmp paths moved under tmp_path."""
  with open(os.path.join(REPO, "docs", "training.md")) as f:
    text = f.read()
  code = re.search(r"```python\n(from jvt.config_lib import.*?load_config.*?)```", text, re.S)[1]
  code = code.replace('"configs/demo.py', f'"{REPO}/configs/demo.py').replace(
      '"/tmp/', f'"{tmp_path}/')
  scope = {}
  exec(compile(code, "docs/training.md", "exec"), scope)  # pylint: disable=exec-used
  with open(os.path.join(tmp_path, "run", "final_metrics.json")) as f:
    final = json.load(f)
  assert final["step"] == 10
  assert 0.0 <= scope["final"]["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_demo_prompts_beat_the_linear_probe(tmp_path):
  """Over 3 tuning seeds: VPT-Deep and DA-VPT clearly above the linear probe on the target.

  The backbone is pretrained once (its seed is fixed); later seeds reuse it, as the demo's
  re-runs would."""
  import shutil
  for seed in (0, 1, 2):
    workdir = tmp_path / f"seed{seed}"
    if seed:
      for name in ("data", "pretrain", "pretrained"):
        shutil.copytree(tmp_path / "seed0" / name, workdir / name)
    config = load_config(os.path.join(REPO, f"configs/demo.py:seed={seed},"
                                      "methods=linear+vpt_deep+da_vpt"))
    rows = {r["method"]: r["accuracy"] for r in run_demo(config, str(workdir))}
    assert rows["vpt_deep"] > rows["linear"] + MARGIN, (seed, rows)
    assert rows["da_vpt"] > rows["linear"] + MARGIN, (seed, rows)
    assert os.path.exists(workdir / "accuracy_vs_params.png")
