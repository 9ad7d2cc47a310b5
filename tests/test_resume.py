"""Resuming: `python -m jvt.main` killed with SIGKILL and run again gives bit-identical trainable
parameters to an uninterrupted run; an unfinished (crashed) orbax save is ignored; resumed logs
hold each step once; a finished run run again changes nothing; overwrite clears exactly the
run's files; a truncated newest checkpoint is moved aside and the older one resumes.
"""
from __future__ import annotations

import filecmp
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from helpers_train import (REFERENCE, REPO, cli_args, cli_env, load_trainable, read_jsonl,  # noqa: F401
                           reference_run, run_cli, tiny_config, train_data_dir)
from jvt.train.rundir import RunDirectory


def _finished_steps(workdir) -> list[int]:
  d = workdir / "checkpoints"
  if not d.is_dir():
    return []
  return sorted(int(n) for n in os.listdir(d) if re.fullmatch(r"\d+", n))


def _plant_crashed_save(workdir, step: int, like: int) -> str:
  """An orbax save of `step` killed before its commit: a `<step>.orbax-checkpoint-tmp-<ts>`
  directory holding a copy of checkpoint `like` without its commit markers."""
  ckpt = workdir / "checkpoints"
  tmp = ckpt / f"{step}.orbax-checkpoint-tmp-{int(time.time() * 1e6)}"
  shutil.copytree(ckpt / str(like), tmp)
  for root, _, files in os.walk(tmp):
    for name in files:
      if name in ("commit_success.txt", "_CHECKPOINT_METADATA"):
        os.remove(os.path.join(root, name))
  return tmp.name


def _assert_bit_identical(workdir, reference) -> None:
  got, want = load_trainable(workdir), load_trainable(reference)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _assert_logs_unique(workdir, last: int = 40, every: int = 4) -> None:
  rows = read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows if "train/loss" in r] == list(range(every, last + 1, every))
  assert [r["step"] for r in rows if "test/accuracy" in r] == [last]


def test_kill9_at_a_step_then_rerun_is_bit_identical(train_data_dir, reference_run, tmp_path,
                                                     tmp_path_factory):
  workdir = tmp_path / "killed"
  argv = cli_args(train_data_dir, workdir, **REFERENCE)
  env = cli_env(tmp_path_factory.getbasetemp())
  proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while not _finished_steps(workdir) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    _, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  steps = _finished_steps(workdir)
  assert steps and steps[-1] < 40 and not (workdir / "final_metrics.json").exists()
  # A save killed half-way (orbax's temporary directory) must not be taken for a checkpoint.
  _plant_crashed_save(workdir, steps[-1] + 4, like=steps[-1])

  proc = run_cli(argv, env)
  assert f"Resumed from step {steps[-1]}" in proc.stderr
  _assert_bit_identical(workdir, reference_run)
  _assert_logs_unique(workdir)


def test_crashed_save_is_ignored_and_resumed_logs_hold_each_step_once(
    train_data_dir, reference_run, tmp_path, tmp_path_factory):
  """The reference run as if killed while saving its last checkpoint (step 40): after the
  rerun from step 36, parameters are bit-identical and metrics / events hold step 40 once."""
  workdir = tmp_path / "crashed_save"
  shutil.copytree(reference_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "40")
  _plant_crashed_save(workdir, 40, like=36)  # never restored; orbax saves 40 anew
  for name in ("final_metrics.json", "export"):
    path = workdir / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  argv = cli_args(train_data_dir, workdir, **REFERENCE)
  env = cli_env(tmp_path_factory.getbasetemp())

  proc = run_cli(argv, env)
  assert "Resumed from step 36" in proc.stderr
  _assert_bit_identical(workdir, reference_run)
  _assert_logs_unique(workdir)
  assert _finished_steps(workdir) == [36, 40]
  assert filecmp.cmp(workdir / "config.json", reference_run / "config.json", shallow=False)

  # The same command once more: the finished run is restored, nothing is trained or logged
  # twice, the results stay the same.
  before = hashlib.sha256((workdir / "metrics.jsonl").read_bytes()).hexdigest()
  proc = run_cli(argv, env)
  assert "Resumed from step 40" in proc.stderr
  assert hashlib.sha256((workdir / "metrics.jsonl").read_bytes()).hexdigest() == before
  _assert_bit_identical(workdir, reference_run)


def test_overwrite_deletes_a_run_of_another_config(train_data_dir, reference_run, tmp_path):
  workdir = tmp_path / "other"
  shutil.copytree(reference_run, workdir)
  other = tiny_config(train_data_dir, lr=0.01, **{k: v for k, v in REFERENCE.items()})
  with pytest.raises(FileExistsError, match=r"different config \(optimizer.lr: 0.1 there vs "
                                            r"0.01 now\)"):
    RunDirectory(str(workdir), other)
  other.unlock()
  other.overwrite = True
  other.lock()
  (workdir / "notes.txt").write_text("not the run's")
  run_dir = RunDirectory(str(workdir), other)
  assert (workdir / "checkpoints" / "40").exists()  # nothing deleted before start()
  run_dir.start()  # deletes exactly the run's own files
  assert sorted(os.listdir(workdir)) == ["config.json", "jvt.lock", "notes.txt"]
  run_dir.close()  # releases the workdir lock
  assert sorted(os.listdir(workdir)) == ["config.json", "notes.txt"]
  assert '"lr": 0.01' in (workdir / "config.json").read_text()


def test_finished_run_without_checkpoints_is_not_retrained(train_data_dir, reference_run,
                                                           tmp_path):
  """keep_checkpoints=False deleted the checkpoints: rerunning is refused (not retrained over
  the results); a workdir with only a config.json (stopped before any checkpoint) is reused."""
  workdir = tmp_path / "done"
  shutil.copytree(reference_run, workdir)
  shutil.rmtree(workdir / "checkpoints")
  config = tiny_config(train_data_dir, **REFERENCE)
  with pytest.raises(FileExistsError, match="finished run of this config.*keep_checkpoints"):
    RunDirectory(str(workdir), config)
  for name in ("final_metrics.json", "export", "tb", "metrics.jsonl"):
    path = workdir / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  with RunDirectory(str(workdir), tiny_config(train_data_dir, lr=0.01)) as run_dir:
    run_dir.start()
  assert '"lr": 0.01' in (workdir / "config.json").read_text()


def test_damaged_newest_checkpoint_resumes_from_the_older_one_without_tracebacks(
    train_data_dir, reference_run, tmp_path, tmp_path_factory):
  """Through the CLI: the arrays of the newest checkpoint (40) truncated; the rerun moves it
  aside with one warning, resumes from 36 with no library traceback on stderr and ends
  bit-identical."""
  workdir = tmp_path / "damaged"
  shutil.copytree(reference_run, workdir)
  for name in os.listdir(workdir / "checkpoints" / "40" / "state" / "d"):
    path = workdir / "checkpoints" / "40" / "state" / "d" / name
    os.truncate(path, os.path.getsize(path) // 2)
  (workdir / "final_metrics.json").unlink()
  proc = run_cli(cli_args(train_data_dir, workdir, **REFERENCE),
                 cli_env(tmp_path_factory.getbasetemp()))
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert f"Checkpoint {workdir / 'checkpoints' / '40'} does not restore" in proc.stderr
  assert "Resumed from step 36" in proc.stderr
  assert [n.split("-")[0] for n in os.listdir(workdir / "checkpoints_damaged")] == ["40"]
  _assert_bit_identical(workdir, reference_run)
  _assert_logs_unique(workdir)
