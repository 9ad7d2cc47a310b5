"""The bad-input and crash corpus of a run: every case ends in one clear message naming the
field or file (exit status 2 through the CLI), leaves the workdir as it was (or absent), and
every crash (preemption, a damaged newest checkpoint, a full disk, a kill) resumes to final
parameters bit-identical to an uninterrupted run.

Most cases run in-process on the tiny run of helpers_train.py (a user error is one of
`jvt.main.USER_ERRORS`, printed by the CLI as `jvt: error: <message>`); a few go through the
CLI in a subprocess to check the printed line and the exit status.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import pytest

from helpers_train import (REFERENCE, REPO, cli_args, cli_env, load_trainable,  # noqa: F401
                           read_jsonl, reference_run, run_cli, tiny_config, train_data_dir)
from jvt import main as jvt_main
from jvt.train import loop as train
from jvt.train import rundir as run_io
from jvt.checkpoints import save_npz
from jvt.train.rundir import RunDirectory, WorkdirLockedError

# The in-process run of the crash cases: 12 steps, checkpoints every 4, logs every 2.
RUN = dict(steps=12, ckpt_every=4, log_every=2)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache: the many in-process runs compile the same steps once."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  before = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path_factory.getbasetemp() / "jax_cache"))
  jax.config.update(keys[1], 0)
  jax.config.update(keys[2], 0)
  yield
  for k, v in before.items():
    jax.config.update(k, v)


def _config(data_dir, **kw):
  return tiny_config(data_dir, **{**RUN, **kw})


def _with(config, **fields):
  """A copy of a locked config with dotted `fields` set."""
  config = config.copy_and_resolve_references()
  config.unlock()
  for key, value in fields.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  config.lock()
  return config


def _snapshot(root) -> dict:
  """{relative path: sha256} of every file under root (None when root does not exist)."""
  if not os.path.exists(root):
    return None
  out = {}
  for dirpath, dirs, files in os.walk(root):
    for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
      path = os.path.join(dirpath, name)
      if os.path.islink(path):
        out[os.path.relpath(path, root)] = "link:" + os.readlink(path)
      else:
        with open(path, "rb") as f:
          out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _user_error(fn, *needles) -> str:
  """Runs fn; it must raise an error that the CLI ends with exit status 2 and one
  `jvt: error:` line (no traceback) holding every needle. Returns the message."""
  with pytest.raises(Exception) as info:
    fn()
  status, line = jvt_main.outcome(info.value) or (None, repr(info.value))
  assert status == 2 and line.startswith("jvt: error: "), line
  message = str(info.value)
  assert "Traceback" not in message
  for needle in needles:
    assert needle in message, message
  return message


def _assert_same_params(workdir, reference) -> None:
  got, want = load_trainable(workdir), load_trainable(reference)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(train_data_dir, tmp_path_factory):
  """The in-process run of RUN, never interrupted: what every crash case must reproduce."""
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  train.train_and_evaluate(_config(train_data_dir), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def preempted(train_data_dir, tmp_path_factory):
  """RUN stopped by SIGTERM at step 10 (checkpoints 8 and 10 on disk), and the error."""
  workdir = tmp_path_factory.mktemp("preempted") / "run"
  with pytest.raises(train.RunPreempted) as info, _signal_at(10, signal.SIGTERM):
    train.train_and_evaluate(_config(train_data_dir), str(workdir))
  return workdir, info.value


class _signal_at:
  """Raises `signum` in this process when the loop has finished step `step`."""

  def __init__(self, step: int, signum: int):
    self.step, self.signum = step, signum

  def __enter__(self):
    self.mp = pytest.MonkeyPatch()
    advance = run_io._Progress.advance
    target = self

    def advance_then_signal(progress, step):
      advance(progress, step)
      if step == target.step:
        signal.raise_signal(target.signum)

    self.mp.setattr(run_io._Progress, "advance", advance_then_signal)
    return self

  def __exit__(self, *exc):
    self.mp.undo()


# --------------------------------------------------------------------- bad inputs, one line
def _zip_without_arrays(tmp_path):
  path = tmp_path / "not_arrays.npz"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("readme.txt", "not an array")
  return dict(pretrained=str(path)), {}, (str(path), "not numpy arrays")


def _pickle_checkpoint(tmp_path):
  path = tmp_path / "model.pth"
  path.write_bytes(pickle.dumps({"model": {"cls_token": [0.0]}}, protocol=4))
  return dict(pretrained=str(path)), {}, (str(path), "pickle")


def _missing_checkpoint(tmp_path):
  path = tmp_path / "ViT-B_16.npz"
  return dict(pretrained=str(path)), {}, (str(path), "no such file")


def _fields(**fields):
  return lambda tmp_path: ({}, fields, ())


# (name, make(tmp_path) -> (tiny_config args, config fields, needles), expected needles)
CONFIG_CASES = [
    ("zip_npz_without_arrays", _zip_without_arrays, ()),
    ("pickle_checkpoint", _pickle_checkpoint, ("safetensors",)),
    ("missing_checkpoint", _missing_checkpoint, ()),
    ("image_size_not_multiple_of_patch", _fields(**{"model.image_size": 20}),
     ("model.image_size=20", "patch size 8", "4 pixels")),
    ("max_to_keep_zero", _fields(max_to_keep=0), ("max_to_keep=0", "--config.max_to_keep")),
    ("eval_batch_size_zero", _fields(eval_batch_size=0), ("eval_batch_size=0",)),
    ("batch_size_zero", _fields(batch_size=0), ("batch_size=0",)),
    ("labels_out_of_range", _fields(**{"dataset.num_classes": 2}),
     ("outside [0, 2)", "dataset.num_classes")),
    ("unknown_protocol", _fields(protocol="best"), ("protocol='best'",)),
]


@pytest.mark.parametrize("name,make,needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_fails_in_one_line_and_leaves_no_trace(name, make, needles, train_data_dir,
                                                           tmp_path):
  args, fields, more = make(tmp_path)
  config = _with(_config(train_data_dir, **args), **fields)
  workdir = tmp_path / "runs" / "new" / "w"  # none of these directories exists yet
  _user_error(lambda: train.train_and_evaluate(config, str(workdir)), *needles, *more)
  assert not (tmp_path / "runs").exists()


def test_dataset_not_prepared(tmp_path):
  empty = tmp_path / "no_data"
  empty.mkdir()
  workdir = tmp_path / "w"
  _user_error(lambda: train.train_and_evaluate(_config(str(empty)), str(workdir)),
              str(empty), "python -m jvt.data.synthetic")
  assert not workdir.exists()


def test_unwritable_workdir(train_data_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  _user_error(lambda: train.train_and_evaluate(_config(train_data_dir), str(blocker / "w")),
              "not writable", "--workdir")
  assert blocker.read_text() == "not a directory"


def test_config_file_with_a_syntax_error(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("def get_config(:\n  pass\n")
  _user_error(lambda: jvt_main._load_config_file(str(path)), f"--config={path}",
              "syntax error", "line 1")


def test_config_file_whose_get_config_raises(tmp_path):
  path = tmp_path / "raises.py"
  path.write_text("def get_config(arg=None):\n  return {}['model']\n")
  _user_error(lambda: jvt_main._load_config_file(f"{path}:x"), f"--config={path}:x",
              "KeyError", "'model'", f"{path} line 2")


def test_config_file_errors_through_the_cli(train_data_dir, tmp_path, tmp_path_factory):
  """The CLI prints the config file's syntax error as one `jvt: error:` line, exit status 2."""
  path = tmp_path / "broken.py"
  path.write_text("def get_config(arg=None)\n  return None\n")
  workdir = tmp_path / "w"
  argv = [sys.executable, "-m", "jvt.main", f"--config={path}", f"--workdir={workdir}"]
  proc = run_cli(argv, cli_env(tmp_path_factory.getbasetemp()), check=False)
  lines = [line for line in proc.stderr.splitlines() if line.startswith("jvt: error:")]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1 and "syntax error" in lines[0] and str(path) in lines[0], lines
  assert not workdir.exists()


# ---------------------------------------------------------------- a workdir holding a run
def _damage_config(workdir):
  (workdir / "config.json").write_text('{"seed": 0,\n "model": {"varia')


def _damage_metrics_middle(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
  lines[1] = lines[1][:10] + "\x01\n"
  (workdir / "metrics.jsonl").write_text("".join(lines))


def _link_checkpoints(workdir):
  """checkpoints/ moved elsewhere and replaced by a link to it."""
  target = workdir.parent / "elsewhere"
  shutil.move(workdir / "checkpoints", target)
  os.symlink(target, workdir / "checkpoints")


def _link_tb(workdir):
  target = workdir.parent / "other_tb"
  target.mkdir()
  (target / "keep.txt").write_text("another run's events")
  shutil.rmtree(workdir / "tb")
  os.symlink(target, workdir / "tb")


def _lock_by(pid_fn, host=None):
  def plant(workdir):
    pid = pid_fn()
    holder = {"host": host or socket.gethostname(), "pid": pid,
              "pid_start": run_io._process_start_ticks(pid), "started": "2026-01-02 03:04:05",
              "job": "another-job"}
    (workdir / "jvt.lock").write_text(json.dumps(holder))
  return plant


@pytest.fixture(scope="module")
def live_process():
  proc = subprocess.Popen(["sleep", "600"])
  yield proc.pid
  proc.kill()
  proc.wait()


# (name, damage(workdir), config fields, needles)
WORKDIR_CASES = [
    ("damaged_config_json", _damage_config, {}, ("config.json is damaged",
                                                 "--config.overwrite=True")),
    ("damaged_metrics_line", _damage_metrics_middle, {}, ("metrics.jsonl is damaged at line 2",
                                                          "Delete that line")),
    ("symlinked_checkpoints_with_overwrite", _link_checkpoints, {"optimizer.lr": 0.3,
                                                                 "overwrite": True},
     ("symbolic links", "checkpoints ->")),
    ("symlinked_tb", _link_tb, {}, ("symbolic links", "tb ->")),
    ("other_config", lambda w: None, {"optimizer.lr": 0.3},
     ("different config", "optimizer.lr: 0.1 there vs 0.3 now", "--config.overwrite=True")),
    ("locked_by_a_live_process", "live", {}, ("in use by another run", "started 2026-01-02",
                                              socket.gethostname(), "jvt.lock")),
    ("locked_from_another_host", _lock_by(lambda: 4242, host="node-17"), {},
     ("pid 4242 on host node-17", "delete")),
]


@pytest.mark.parametrize("name,damage,fields,needles", WORKDIR_CASES,
                         ids=[c[0] for c in WORKDIR_CASES])
def test_workdir_problem_fails_in_one_line_and_changes_nothing(
    name, damage, fields, needles, uninterrupted, train_data_dir, tmp_path, live_process):
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted, workdir)
  if damage == "live":
    damage = _lock_by(lambda: live_process)
  damage(workdir)
  before, around = _snapshot(workdir), _snapshot(tmp_path)
  config = _with(_config(train_data_dir), **fields)
  _user_error(lambda: train.train_and_evaluate(config, str(workdir)), *needles)
  assert _snapshot(workdir) == before and _snapshot(tmp_path) == around


def test_stale_lock_of_a_dead_process_is_taken_over(uninterrupted, train_data_dir, tmp_path,
                                                    caplog):
  """A lock left by a process of this host that is gone: taken over with a warning naming
  it, released (removed) when the run ends."""
  dead = subprocess.Popen(["true"])
  dead.wait()
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted, workdir)
  _lock_by(lambda: dead.pid)(workdir)
  with caplog.at_level(logging.WARNING, logger="jvt"):
    with RunDirectory(str(workdir), _config(train_data_dir)) as run_dir:
      holder = json.loads((workdir / "jvt.lock").read_text())
      assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
      run_dir.start()
  assert f"stale workdir lock {workdir / 'jvt.lock'}" in caplog.text
  assert f"process {dead.pid}" in caplog.text
  assert not (workdir / "jvt.lock").exists()


def test_second_run_on_a_locked_workdir_is_refused(train_data_dir, tmp_path):
  """Two runs in one workdir (here: in one process): the second is refused naming this pid,
  and the first's files stay as they were."""
  workdir = tmp_path / "run"
  with RunDirectory(str(workdir), _config(train_data_dir)) as run_dir:
    run_dir.start()
    before = _snapshot(workdir)
    _user_error(lambda: train.train_and_evaluate(_config(train_data_dir, lr=0.3),
                                                 str(workdir)),
                f"pid {os.getpid()} on host {socket.gethostname()}", "in use by another run")
    assert _snapshot(workdir) == before


_CONTENDER = """
import sys, time
from helpers_train import tiny_config
from jvt.train.rundir import RunDirectory, WorkdirLockedError
workdir, start_at, lr = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
config = tiny_config(lr=lr)
time.sleep(max(0.0, start_at - time.time()))
try:
  with RunDirectory(workdir, config) as run_dir:
    run_dir.start()
    print("HELD", flush=True)
    time.sleep(3)
except WorkdirLockedError as err:
  print("REFUSED", err, flush=True)
"""


def test_two_processes_started_together_one_gets_the_workdir(tmp_path, tmp_path_factory):
  """Two configs started at the same instant on one workdir: exactly one holds it, the other
  is refused naming the holder's pid, and config.json is the holder's."""
  script = tmp_path / "contender.py"
  script.write_text(_CONTENDER)
  env = cli_env(tmp_path_factory.getbasetemp())
  env["PYTHONPATH"] = f"{REPO}{os.pathsep}{REPO / 'tests'}"
  workdir = tmp_path / "run"
  start_at = time.time() + 8  # both have imported jax by then
  procs = [subprocess.Popen([sys.executable, str(script), str(workdir), str(start_at), lr],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for lr in ("0.1", "0.3")]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  held = [i for i, (out, _) in enumerate(outs) if out.startswith("HELD")]
  refused = [i for i, (out, _) in enumerate(outs) if out.startswith("REFUSED")]
  assert len(held) == 1 and len(refused) == 1, outs
  assert f"pid {procs[held[0]].pid} on host" in outs[refused[0]][0]
  lr = ("0.1", "0.3")[held[0]]
  assert json.loads((workdir / "config.json").read_text())["optimizer"]["lr"] == float(lr)
  assert sorted(os.listdir(workdir)) == ["config.json"]


# ----------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomically_written_files_get_the_umask_mode(umask, tmp_path):
  """Not mkstemp's 0600: what `open()` would give a new file under the umask."""
  import jvt
  model = jvt.build_model("Ti/16", 3, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                          patch_size=8)
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), jvt.param_shapes(model, 16))
  old = os.umask(umask)
  try:
    run_io.atomic_write_text(str(tmp_path / "final_metrics.json"), "{}")
    save_npz(tmp_path / "merged_vit.npz", params)
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: a normally created file
      f.write("x")
  finally:
    os.umask(old)
  want = 0o666 & ~umask
  assert os.stat(tmp_path / "plain.txt").st_mode & 0o777 == want
  for name in ("final_metrics.json", "merged_vit.npz"):
    assert os.stat(tmp_path / name).st_mode & 0o777 == want, name


def test_a_run_writes_files_with_the_umask_mode(uninterrupted):
  """The finished run's own files (config, metrics, final metrics, export) are 0644 under the
  test's umask 022, readable by the other users of a shared file system."""
  mask = os.umask(0o022)
  os.umask(mask)
  for name in ("config.json", "final_metrics.json", "metrics.jsonl", "export/trainable.npz"):
    assert os.stat(uninterrupted / name).st_mode & 0o777 == 0o666 & ~mask, name


# ----------------------------------------------------------------------------- crash cases
def _tb_steps(tb_dir, tag="train/loss") -> list[int]:
  from tensorboardX.proto import event_pb2
  import struct
  steps = []
  for name in sorted(os.listdir(tb_dir)):
    data = (tb_dir / name).read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


def test_sigterm_checkpoints_the_step_and_the_rerun_is_bit_identical(
    preempted, uninterrupted, train_data_dir, tmp_path):
  workdir, err = preempted
  assert err.step == 10
  assert jvt_main.outcome(err)[0] == 75
  assert str(err) == (f"stopped by SIGTERM at step 10 of 12; checkpoint saved in "
                      f"{workdir / 'checkpoints' / '10'}. Run the same command again to resume.")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "8"]
  assert not (workdir / "jvt.lock").exists()
  # The events were flushed with each metrics row: both hold steps 2..10.
  rows = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r]
  assert rows == [2, 4, 6, 8, 10] == _tb_steps(workdir / "tb")
  resumed = tmp_path / "run"
  shutil.copytree(workdir, resumed)
  train.train_and_evaluate(_config(train_data_dir), str(resumed))
  _assert_same_params(resumed, uninterrupted)
  rows = [r["step"] for r in read_jsonl(resumed / "metrics.jsonl") if "train/loss" in r]
  assert rows == [2, 4, 6, 8, 10, 12] == _tb_steps(resumed / "tb")


def test_sigint_at_a_random_step_then_rerun_is_bit_identical(uninterrupted, train_data_dir,
                                                             tmp_path):
  step = int(np.random.default_rng().integers(1, 12))
  workdir = tmp_path / "run"
  with pytest.raises(train.RunPreempted, match=f"SIGINT at step {step} of 12") as info, \
      _signal_at(step, signal.SIGINT):
    train.train_and_evaluate(_config(train_data_dir), str(workdir))
  assert info.value.step == step
  assert str(step) in os.listdir(workdir / "checkpoints")
  train.train_and_evaluate(_config(train_data_dir), str(workdir))
  _assert_same_params(workdir, uninterrupted)


def _truncate_arrays(step_dir):
  files = glob.glob(str(step_dir / "state" / "d" / "*"))
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


DAMAGES = {
    "truncated_array_file": _truncate_arrays,
    "deleted_state": lambda d: shutil.rmtree(d / "state"),
    "broken_metadata": lambda d: (d / "metadata" / "metadata").write_text('{"config": "x",\n'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_is_moved_aside_and_the_older_one_resumes(
    damage, preempted, uninterrupted, train_data_dir, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(preempted[0], workdir)
  DAMAGES[damage](workdir / "checkpoints" / "10")
  # A kill during a write can also leave a half-written last line in metrics.jsonl.
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 11, "train/lo')
  with caplog.at_level(logging.INFO, logger="jvt"):
    train.train_and_evaluate(_config(train_data_dir), str(workdir))
  moved = os.listdir(workdir / "checkpoints_damaged")
  assert len(moved) == 1 and moved[0].startswith("10-")
  assert f"Checkpoint {workdir / 'checkpoints' / '10'} does not restore" in caplog.text
  assert str(workdir / "checkpoints_damaged" / moved[0]) in caplog.text
  assert "Resumed from step 8" in caplog.text and "half-written last line" in caplog.text
  _assert_same_params(workdir, uninterrupted)
  rows = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r]
  assert rows == [2, 4, 6, 8, 10, 12]


def test_no_checkpoint_restores_is_an_error_that_moves_nothing(preempted, train_data_dir,
                                                                tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(preempted[0], workdir)
  for step in ("8", "10"):
    shutil.rmtree(workdir / "checkpoints" / step / "state")
  before = _snapshot(workdir / "checkpoints")
  _user_error(lambda: train.train_and_evaluate(_config(train_data_dir), str(workdir)),
              "no checkpoint in", "step 10: ", "step 8: ", 'Item "state" was not found')
  assert _snapshot(workdir / "checkpoints") == before
  assert not (workdir / "checkpoints_damaged").exists()


class _full_disk:
  """A full disk at `path`: with `mount`, a small tmpfs (if this process may mount one:
  root) that `fill()` fills; otherwise a plain directory where, after `fill()`, every
  `os.write` to a file under it fails with ENOSPC (what the writers of metrics and events
  see first on a real full disk when their next row needs a new block)."""

  def __init__(self, path, mount: bool, only_under: str = ""):
    self.path = path
    self.mount = mount
    self.only_under = only_under  # mocked: only writes to files under path/only_under fail
    self.mounted = False
    self.mp = pytest.MonkeyPatch()

  def __enter__(self):
    self.path.mkdir()
    if self.mount and os.geteuid() == 0:
      proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(self.path)],
                            capture_output=True)
      self.mounted = proc.returncode == 0
    return self

  def fill(self):
    if self.mounted:
      fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
      try:
        while True:
          os.write(fd, b"\0" * 4096)
      except OSError as err:
        assert err.errno == errno.ENOSPC
      finally:
        os.close(fd)
      return
    write, root = os.write, str(self.path / self.only_under)

    def full(fd, data):
      if os.readlink(f"/proc/self/fd/{fd}").startswith(root):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return write(fd, data)

    self.mp.setattr(os, "write", full)

  def free(self):
    if self.mounted:
      os.remove(self.path / "filler")
    self.mp.undo()

  def __exit__(self, *exc):
    self.mp.undo()
    if self.mounted:
      subprocess.run(["umount", str(self.path)], check=True)


@pytest.mark.parametrize("fields,failing,mount,only_under", [
    (dict(log_every=2), os.path.join("{run}", "metrics.jsonl"), False, ""),
    (dict(log_every=2), os.path.join("{run}", "tb", "events.out.tfevents."), False,
     os.path.join("run", "tb")),
    (dict(log_every=100, ckpt_every=2), "checkpoint " + os.path.join("{run}", "checkpoints", "6"),
     True, "")], ids=["metrics_write", "event_write", "checkpoint_write_on_a_full_tmpfs"])
def test_full_disk_stops_with_one_line_then_resumes_bit_identically(
    fields, failing, mount, only_under, uninterrupted, train_data_dir, tmp_path):
  """The disk fills after step 5: the next write fails (metrics.jsonl at step 6, the events
  file when only its writes fail, or with logging off and checkpoints every 2 steps, the
  checkpoint of step 6, reported when step 8 is saved); the run stops with the path and the
  cause, without waiting on any writer, the checkpoint of step 4 intact;
  once freed, the rerun matches the uninterrupted run (how often a run checkpoints or logs
  does not change its result)."""
  with _full_disk(tmp_path / "disk", mount, only_under) as disk:
    if mount and not disk.mounted:
      pytest.skip("cannot mount a tmpfs here (needs root)")
    workdir = disk.path / "run"
    config = _config(train_data_dir, **fields)
    mp = pytest.MonkeyPatch()
    advance = run_io._Progress.advance

    def advance_then_fill(progress, step):
      advance(progress, step)
      if step == 5:  # once the asynchronous save of step 4 is complete
        checkpoints = workdir / "checkpoints"
        deadline = time.time() + 60
        while time.time() < deadline and not (
            (checkpoints / "4").is_dir() and not any("tmp" in n for n in os.listdir(checkpoints))):
          time.sleep(0.01)
        disk.fill()

    mp.setattr(run_io._Progress, "advance", advance_then_fill)
    try:
      started = time.time()
      message = _user_error(lambda: train.train_and_evaluate(config, str(workdir)),
                            f"cannot write {failing.format(run=workdir)}",
                            ": No space left on device (the disk is full; free space).",
                            f"newest intact checkpoint is {workdir / 'checkpoints' / '4'}",
                            "run the same command again")
      assert time.time() - started < 120  # no hang
    finally:
      mp.undo()
    assert "\n" not in message
    disk.free()
    train.train_and_evaluate(config, str(workdir))
    _assert_same_params(workdir, uninterrupted)


@pytest.mark.slow
def test_cli_sigterm_and_sigkill_at_random_steps_resume_bit_identically(
    train_data_dir, reference_run, tmp_path, tmp_path_factory):
  """Through the CLI: a second run is refused while the first holds the workdir; SIGTERM at a
  random step prints one line and exits 75; the rerun, SIGKILLed at a random later step,
  leaves the lock of a dead process, taken over by the last rerun, which ends bit-identical
  to the uninterrupted reference."""
  rng = np.random.default_rng()
  workdir = tmp_path / "run"
  argv = cli_args(train_data_dir, workdir, **REFERENCE)
  env = cli_env(tmp_path_factory.getbasetemp())
  after = 0
  for signum in (signal.SIGTERM, signal.SIGKILL):
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
      deadline = time.time() + 240
      rows = []
      while proc.poll() is None and time.time() < deadline and not (
          rows and rows[-1]["step"] > after):
        rows = read_jsonl(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() \
            else []
        time.sleep(0.002)
      time.sleep(float(rng.uniform(0, 0.03)))  # a random step from here on
      proc.send_signal(signal.SIGSTOP)
      rows = read_jsonl(workdir / "metrics.jsonl")
      assert proc.poll() is None and rows[-1]["step"] < 40, "the run ended before the signal"
      with pytest.raises(WorkdirLockedError, match=f"pid {proc.pid} on host"):
        RunDirectory(str(workdir), tiny_config(train_data_dir, **REFERENCE))
      proc.send_signal(signum)
      proc.send_signal(signal.SIGCONT)
    finally:
      _, err = proc.communicate(timeout=120)
    if signum == signal.SIGTERM:
      assert proc.returncode == jvt_main.EXIT_PREEMPTED, err[-3000:]
      lines = [line for line in err.splitlines() if line.startswith("jvt: ")]
      assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
      assert lines[0].startswith("jvt: stopped by SIGTERM at step ") and "resume" in lines[0]
      after = int(lines[0].split("at step ")[1].split()[0])
      assert str(after) in os.listdir(workdir / "checkpoints")
      assert not (workdir / "jvt.lock").exists()
    else:
      assert proc.returncode == -signal.SIGKILL
      assert (workdir / "jvt.lock").exists()  # a dead process's lock, taken over below
      # Events are flushed with each metrics row: the killed run's files hold the same steps.
      logged = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r]
      assert _tb_steps(workdir / "tb") == logged
  proc = run_cli(argv, env)
  assert "stale workdir lock" in proc.stderr
  _assert_same_params(workdir, reference_run)
