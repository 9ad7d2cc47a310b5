"""Data parallelism gives the single-device result: 8 fake CPU devices in one process, and two
processes joined by `jax.distributed` on 127.0.0.1, each run through `python -m jvt.main`.

Each run trains the tiny config for 40 steps on the same global batches; the trainable
parameters they export must match the one-device reference run to 1e-5 (the gradient sums
are reduced in a different order, so they are close, not bit-equal).
"""
from __future__ import annotations

import os
import socket
import subprocess

import numpy as np
import pytest

from helpers_train import (REFERENCE, REPO, cli_args, cli_env, load_trainable, read_jsonl,  # noqa: F401
                           reference_run, run_cli, train_data_dir)


def _assert_params_match(workdir, reference) -> None:
  got, want = load_trainable(workdir), load_trainable(reference)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
  # The runs trained: the reference moved far from its start (zero head).
  assert np.abs(want["head/kernel"]).max() > 1e-2


def test_eight_devices_match_one(train_data_dir, reference_run, tmp_path, tmp_path_factory):
  workdir = tmp_path / "eight"
  proc = run_cli(cli_args(train_data_dir, workdir, **REFERENCE),
                 cli_env(tmp_path_factory.getbasetemp(), devices=8))
  assert "'step': 40" in proc.stdout
  _assert_params_match(workdir, reference_run)


def test_eight_devices_with_row_chunks_match_one(train_data_dir, reference_run, tmp_path,
                                                 tmp_path_factory):
  # 2 rows per device in chunks of 1: each chunk's strided rows stay spread over all 8 devices.
  workdir = tmp_path / "eight_chunked"
  argv = cli_args(train_data_dir, workdir, **REFERENCE) + ["--config.forward_chunk_rows=1"]
  proc = run_cli(argv, cli_env(tmp_path_factory.getbasetemp(), devices=8))
  assert "'step': 40" in proc.stdout
  _assert_params_match(workdir, reference_run)


def test_cpu_devices_key_splits_the_cpu(train_data_dir, tmp_path, tmp_path_factory):
  """`--config.cpu_devices=8` in a process whose XLA_FLAGS ask for one CPU device: the run
  has 8 devices, so batch 12 is refused for them (before anything is written)."""
  one = cli_env(tmp_path_factory.getbasetemp(), devices=1)
  bad = run_cli(cli_args(train_data_dir, tmp_path / "bad", batch=12) +
                ["--config.cpu_devices=8"], one, check=False)
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert "batch_size=12 is not divisible by the 8 devices" in bad.stderr


@pytest.mark.slow
def test_cpu_devices_key_matches_one(train_data_dir, reference_run, tmp_path,
                                     tmp_path_factory):
  """The 8 devices of `--config.cpu_devices=8` train as one device does."""
  one = cli_env(tmp_path_factory.getbasetemp(), devices=1)
  workdir = tmp_path / "eight_by_key"
  proc = run_cli(cli_args(train_data_dir, workdir, **REFERENCE) + ["--config.cpu_devices=8"],
                 one)
  assert "'step': 40" in proc.stdout
  _assert_params_match(workdir, reference_run)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_and_only_process_0_writes_logs(train_data_dir, reference_run,
                                                                tmp_path, tmp_path_factory):
  """Two processes with one CPU device each; the coordinator on 127.0.0.1.

  jax's CPU backend runs the cross-process all-reduce through gloo (the default of
  `jax_cpu_collectives_implementation` in jax >= 0.5)."""
  workdir = tmp_path / "two_hosts"
  port = _free_port()
  env = cli_env(tmp_path_factory.getbasetemp(), devices=1)
  procs = []
  for i in range(2):
    argv = cli_args(train_data_dir, workdir, **REFERENCE) + [
        "--jax_distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
        f"--process_id={i}"]
    procs.append(subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=300))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  _assert_params_match(workdir, reference_run)

  # Process 0 alone printed the summary and the final metrics, and wrote the logs: one row
  # per logged step, one TensorBoard event file, the curves and exports.
  assert "'step': 40" in outputs[0][0] and "'step': 40" not in outputs[1][0]
  assert "Trainable parameters" in outputs[0][1]
  assert "Trainable parameters" not in outputs[1][1]
  rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r]
  assert [r["step"] for r in rows] == list(range(4, 41, 4))
  assert len(os.listdir(workdir / "tb")) == 1
  assert (workdir / "final_metrics.json").exists()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["36", "40"]
