"""Command line: flags -> config -> `train_and_evaluate` (or an embedded demo job).

    python -m jvt.main --config=configs/demo.py --workdir=/tmp/jvt_demo
    python -m jvt.main --config=configs/vtab/vpt_deep.py:task=cifar100 --workdir=DIR \
        --config.optimizer.lr=0.5

The config is locked: a key that does not exist is an error (with a suggestion). A user error
(bad flag or config key, a config file that does not load, missing file, unfitting checkpoint,
unprepared dataset, a workdir holding another run or locked by another job, a NaN loss, a
failed write such as a full disk...) prints one line `jvt: error: ...` and exits with status 2;
set JVT_TRACEBACK=1 to see the traceback instead.

Exit statuses: 0 done; 2 user error; 75 stopped by SIGTERM / SIGINT with a checkpoint at the
step reached (the same command resumes); 130 interrupted by a second SIGINT; 1 a bug
(traceback).

CPU runs: --reuse_scratch restarts the command under `python -m jvt.scratch` (XLA:CPU's
per-step scratch block kept between steps; docs/training.md).

Multi-host: pass --jax_distributed (or set JVT_DISTRIBUTED=1) to call
`jax.distributed.initialize()` first; on Cloud TPU and SLURM it finds the cluster by itself,
elsewhere pass --coordinator_address, --num_processes and --process_id (see docs/training.md).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


class _ConfigFileParser(flags.ArgumentParser):
  """`--config=path.py[:arg]` read by jvt's one config loader (`jvt.config_lib.load_config`)."""

  def parse(self, argument):
    from jvt.config_lib import load_config
    config = load_config(argument)
    config.lock()
    return config

  def flag_type(self):
    return "config object"


config_flags.DEFINE_config_file("config", None, "Path to a config file (optionally :arg).",
                                lock_config=True)
FLAGS["config"].parser = _ConfigFileParser()
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.DEFINE_bool("jax_distributed", False,
                  "Call jax.distributed.initialize() (multi-host TPU pods, SLURM GPU clusters).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for --jax_distributed outside TPU / SLURM.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for --jax_distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, for --jax_distributed.")
flags.DEFINE_bool("reuse_scratch", False,
                  "CPU runs: restart this command under jvt.scratch's preloaded allocator, "
                  "which keeps XLA:CPU's per-step scratch block between steps instead of "
                  "mapping it afresh (1.09-1.27x faster fp32 steps at batch 8 on the Zen 3 "
                  "measured, same peak memory; docs/training.md). Linux with glibc; builds a small C library once "
                  "with the system's C compiler.")

# Errors that are the user's to fix: one clear line, exit status 2, no traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
EXIT_USER_ERROR = 2
# Stopped by SIGTERM / SIGINT after writing a checkpoint (EX_TEMPFAIL: run again to resume).
EXIT_PREEMPTED = 75
# A second SIGINT: stopped at once (128 + SIGINT, the shell's convention).
EXIT_INTERRUPTED = 130


def _fail(message: str) -> None:
  print(f"jvt: error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _flag_values(argv, name: str) -> list[tuple[str, str]]:
  """(flag, value) for every `--name=V`, `--name V` and `--name.sub...` form in argv."""
  out = []
  for i, arg in enumerate(argv[1:], 1):
    key, eq, value = arg.lstrip("-").partition("=")
    if not arg.startswith("-") or not (key == name or key.startswith(name + ".") or
                                       key.startswith("no" + name + ".")):
      continue
    if not eq and key == name and i + 1 < len(argv):
      value = argv[i + 1]
    out.append((key, value))
  return out


def _check_config_args(argv) -> None:
  """Loads --config and checks every --config.<path> override names an existing field."""
  from jvt.config_lib import check_override_path
  given = _flag_values(argv, "config")
  files = [v for k, v in given if k == "config"]
  if not files:
    return  # absl reports the missing flag
  spec = files[-1]
  config = _load_config_file(spec)
  for key, _ in given:
    if key != "config":
      check_override_path(config, key.split(".", 1)[1])


def _load_config_file(spec: str):
  """`load_config(spec)` with one-line errors for a file that does not load: a syntax error
  (file and line), or any exception of the file's code or its get_config (where it raised)."""
  import traceback
  from jvt.config_lib import load_config
  try:
    return load_config(spec)
  except FileNotFoundError:
    raise
  except SyntaxError as err:
    if os.environ.get("JVT_TRACEBACK") == "1":
      raise
    raise ValueError(f"--config={spec}: syntax error in {err.filename} line {err.lineno}: "
                     f"{err.msg}.") from None
  except (TypeError, ValueError) as err:  # e.g. get_config(arg) refusing its arg
    if os.environ.get("JVT_TRACEBACK") == "1":
      raise
    raise ValueError(f"--config={spec}: {err}") from None
  except Exception as err:  # noqa: BLE001 -- the config file's own code failed
    if os.environ.get("JVT_TRACEBACK") == "1":
      raise
    frames = traceback.extract_tb(err.__traceback__)
    where = next((f"{f.filename} line {f.lineno}" for f in reversed(frames)
                  if os.path.abspath(f.filename) == os.path.abspath(spec.partition(":")[0])),
                 spec.partition(":")[0])
    raise ValueError(f"--config={spec}: loading the config raised {type(err).__name__}: "
                     f"{err} ({where}). Fix the config file, or run with JVT_TRACEBACK=1 for "
                     "the traceback.") from None


def _parse_flags(argv):
  """absl's flag parsing with one-line errors for bad flags, config files and config keys."""
  try:
    _check_config_args(argv)
    return FLAGS(argv)
  except flags.Error as err:
    _fail(str(err).splitlines()[0])
  except USER_ERRORS as err:
    if os.environ.get("JVT_TRACEBACK") == "1":
      raise
    _fail(str(err))


def _init_distributed() -> None:
  import jax
  explicit = {k: getattr(FLAGS, k) for k in ("coordinator_address", "num_processes",
                                              "process_id")}
  if (FLAGS.jax_distributed or os.environ.get("JVT_DISTRIBUTED") == "1"
      or explicit["coordinator_address"]):
    jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})


# Set in the environment of the command restarted by --reuse_scratch, so that a library the
# dynamic loader refused to preload is an error instead of a restart loop.
_RESTARTED = "JVT_SCRATCH_RESTARTED"


def _restart_with_scratch_reuse() -> None:
  """--reuse_scratch: replaces this process with the same command, jvt.scratch preloaded.

  The allocator must be in place before Python starts, so the flag restarts the process
  (`exec`, same PID) with the library in LD_PRELOAD; the restarted process finds it loaded
  and runs. Nothing has been computed yet, so nothing is lost.
  """
  from jvt import scratch
  if scratch.active():
    return
  if os.environ.get(_RESTARTED) == "1":
    raise ValueError(
        "--reuse_scratch: restarted with jvt.scratch's library in LD_PRELOAD but it is not "
        f"loaded (LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}; a set-uid Python or a "
        "non-glibc system ignores it). Run without --reuse_scratch.")
  try:
    env = scratch.preload_env()
  except RuntimeError as err:
    raise ValueError(f"--reuse_scratch: {err}") from None
  env[_RESTARTED] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", "jvt.main", *sys.argv[1:]], env)


def _log_scratch_reuse() -> None:
  """One log line of what jvt.scratch's library did in this run, when it is loaded."""
  from jvt import scratch
  if scratch.active():
    logging.getLogger("jvt").info("jvt.scratch: %s", scratch.stats())


def run(argv) -> int:
  del argv
  if FLAGS.reuse_scratch:
    _restart_with_scratch_reuse()
  import jax
  _init_distributed()
  config = FLAGS.config
  if config is None:
    raise ValueError("--config is required, e.g. --config=configs/demo.py")
  if not FLAGS.workdir:
    raise ValueError("--workdir is required.")
  from jvt.train import sharding
  sharding.use_cpu_devices(config.get("cpu_devices", 0))  # before JAX's backend starts
  # jvt's own messages at INFO on process 0; libraries (orbax, tfds) only warnings.
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("jvt").setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  _run_job(config)
  _log_scratch_reuse()
  return 0


def _run_job(config) -> None:
  """The config's job: an embedded demo, or training (printing its final metrics)."""
  import jax
  if config.get("job", "train") == "demo":
    from jvt import demo
    demo.run_demo(config, FLAGS.workdir)
    return
  if config.get("job", "train") == "distill_demo":
    from jvt import distill_demo
    distill_demo.run_distill_demo(config, FLAGS.workdir)
    return
  from jvt.train import train_and_evaluate
  _, final = train_and_evaluate(config, FLAGS.workdir)
  if jax.process_index() == 0:
    print({k: v for k, v in final.items() if k != "history"})


def outcome(err: BaseException) -> tuple[int, str] | None:
  """The exit status and the one line the CLI ends with for `err`; None for a bug (which
  keeps its traceback)."""
  from jvt.train import RunPreempted
  if isinstance(err, RunPreempted):
    return EXIT_PREEMPTED, f"jvt: {err}"
  if isinstance(err, KeyboardInterrupt):
    return EXIT_INTERRUPTED, ("jvt: interrupted; the newest finished checkpoint in the workdir "
                              "(if any) is intact and the same command resumes from it.")
  if isinstance(err, USER_ERRORS):
    return EXIT_USER_ERROR, f"jvt: error: {err}"
  return None


def main(argv) -> None:
  from jvt.train import RunPreempted
  try:
    sys.exit(run(argv))
  except (Exception, KeyboardInterrupt, RunPreempted) as err:  # noqa: BLE001 -- mapped below
    result = outcome(err)
    if result is None or (os.environ.get("JVT_TRACEBACK") == "1" and
                          result[0] != EXIT_PREEMPTED):
      raise
    print(result[1], file=sys.stderr)
    sys.exit(result[0])


def entry() -> None:
  """Console entry point."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  entry()
