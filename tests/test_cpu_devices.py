"""`cpu_devices`: the host CPU split into several XLA devices (`jvt.train.use_cpu_devices`).

The device count of JAX's CPU backend is fixed when the backend starts, so the positive cases
run in fresh interpreters: one started with no device count at all, one where the backend
already runs. The in-process cases check what is refused.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from helpers_train import REPO
from jvt.train import sharding, use_cpu_devices


def _python(code: str) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter without any device count in XLA_FLAGS."""
  from conftest import xla_flags
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(None))
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def test_splits_the_cpu_before_the_backend_starts():
  proc = _python(
      "import json, jax\n"
      "from jvt.train import sharding\n"
      "sharding.use_cpu_devices(3)\n"
      "sharding.use_cpu_devices(3)  # again, same count: nothing to do\n"
      "mesh = sharding.make_mesh()\n"
      "print(json.dumps([jax.device_count(), int(mesh.devices.size)]))\n")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == [3, 3]


def test_a_started_backend_keeps_its_count_and_refuses_another():
  proc = _python(
      "import jax\n"
      "from jvt.train import use_cpu_devices\n"
      "jax.numpy.zeros(1).block_until_ready()  # the backend starts with one CPU device\n"
      "use_cpu_devices(0)\n"
      "use_cpu_devices(1)  # what it has: accepted\n"
      "try:\n"
      "  use_cpu_devices(2)\n"
      "except ValueError as err:\n"
      "  print('refused:', err)\n"
      "print('devices:', jax.device_count())\n")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "devices: 1" in out
  assert "refused: cpu_devices=2: JAX's CPU backend already runs with 1 device(s)" in out
  assert "before the first JAX computation" in out
  assert "--xla_force_host_platform_device_count=2" in out


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_counts_are_refused(bad):
  with pytest.raises(ValueError, match=r"cpu_devices=.*expected an integer >= 0"):
    use_cpu_devices(bad)


def test_in_a_running_process():
  count = jax.local_device_count()
  sharding.use_cpu_devices(0)
  sharding.use_cpu_devices(count)
  with pytest.raises(ValueError, match=f"cpu_devices={count + 1}: .* {count} device"):
    sharding.use_cpu_devices(count + 1)
  assert jax.local_device_count() == count
