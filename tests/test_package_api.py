"""The README's Python API resolves after a bare `import jvt` (issue 15.12), and the import
stays light: JAX, Flax and the trainer load on first use."""
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# Every `jvt.<...>` name the README shows, plus the other top-level API names.
README_NAMES = ("jvt.build_model", "jvt.init_params", "jvt.load_pretrained", "jvt.param_shapes",
                "jvt.losses.proxy_anchor_loss", "jvt.losses.da_vpt_terms", "jvt.losses.kd_loss",
                "jvt.train.train_and_evaluate", "jvt.partition.trainable_mask",
                "jvt.partition.split_params", "jvt.partition.merge_params",
                "jvt.partition.make_optimizer", "jvt.partition.summary")


def _run(script: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def _readme_names() -> list[str]:
  text = (REPO / "README.md").read_text()
  return sorted(set(re.findall(r"\bjvt(?:\.[a-z_]+)+", text)) | set(README_NAMES))


def test_readme_names_resolve_in_a_fresh_interpreter():
  names = _readme_names()
  assert set(README_NAMES) <= set(names) and len(names) >= len(README_NAMES)
  script = (
      "import sys\n"
      "import jvt\n"
      "heavy = [m for m in ('jax', 'flax', 'optax', 'jvt.train', 'jvt.losses') "
      "if m in sys.modules]\n"
      "assert not heavy, heavy\n"
      f"for dotted in {README_NAMES!r}:\n"
      "  obj = jvt\n"
      "  for part in dotted.split('.')[1:]:\n"
      "    obj = getattr(obj, part)\n"
      "  assert callable(obj), dotted\n"
      f"for dotted in {names!r}:  # every jvt.x.y the README mentions: a module or an attribute\n"
      "  obj = jvt\n"
      "  for part in dotted.split('.')[1:]:\n"
      "    obj = getattr(obj, part)\n"
      "assert jvt.train.train_and_evaluate is sys.modules['jvt.train'].train_and_evaluate\n"
      "assert 'losses' in dir(jvt) and 'build_model' in dir(jvt)\n"
      "try:\n"
      "  jvt.no_such_name\n"
      "except AttributeError as e:\n"
      "  assert \"no attribute 'no_such_name'\" in str(e)\n"
      "else:\n"
      "  raise AssertionError('jvt.no_such_name resolved')\n"
      "print('ok')\n")
  out = _run(script)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
