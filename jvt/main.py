"""Command line: flags -> config -> `train_and_evaluate` (or the embedded demo).

    python -m jvt.main --config=configs/demo.py --workdir=/tmp/jvt_demo
    python -m jvt.main --config=configs/vtab/vpt_deep.py:task=cifar100 --workdir=DIR \
        --config.optimizer.lr=0.5

The config is locked: a key that does not exist is an error. Multi-host: pass
--jax_distributed (or set JVT_DISTRIBUTED=1) to call `jax.distributed.initialize()` first.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (optionally :arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.DEFINE_bool("jax_distributed", False,
                  "Call jax.distributed.initialize() (multi-host TPU pods, SLURM GPU clusters).")

# Errors that are the user's to fix: one clear line, exit code 2, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError,
               TypeError, AttributeError, FloatingPointError)


def run(argv) -> int:
  del argv
  import jax
  if FLAGS.jax_distributed or os.environ.get("JVT_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  config = FLAGS.config
  if config is None:
    raise ValueError("--config is required, e.g. --config=configs/demo.py")
  if not FLAGS.workdir:
    raise ValueError("--workdir is required.")
  # jvt's own messages at INFO on process 0; libraries (orbax, tfds) only warnings.
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("jvt").setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  if config.get("job", "train") == "demo":
    from jvt import demo
    demo.run_demo(config, FLAGS.workdir)
    return 0
  if config.get("job", "train") == "distill_demo":
    from jvt import distill_demo
    distill_demo.run_distill_demo(config, FLAGS.workdir)
    return 0
  from jvt.train import train_and_evaluate
  _, final = train_and_evaluate(config, FLAGS.workdir)
  if jax.process_index() == 0:
    print({k: v for k, v in final.items() if k != "history"})
  return 0


def main(argv) -> None:
  try:
    sys.exit(run(argv))
  except USER_ERRORS as err:
    print(f"jvt: error: {err}", file=sys.stderr)
    sys.exit(2)


def entry() -> None:
  """Console entry point: parses flags, reporting a bad config as one line."""
  try:
    app.run(main)
  except SystemExit:
    raise
  except USER_ERRORS as err:
    print(f"jvt: error: {err}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  entry()
