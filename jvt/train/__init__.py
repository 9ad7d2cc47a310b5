"""Training: one trainer for every method (the training layer of jvt).

  loop           train_and_evaluate, set-up, the jitted train / eval steps
  objectives     task loss + every active method's loss term, composed
  rundir         the run's workdir: lock, config guard, metrics, exports, plots
  checkpointing  orbax checkpoints of a run (save, restore newest intact)
  sharding       the device mesh and batch shardings

`jvt.partition` (labels -> optimizer) and `jvt.config_lib` (the base config) belong to this
layer too; they keep their public names.
"""
from jvt.train.loop import (NonFiniteLossError, RunPreempted, Setup, TrainState, evaluate,
                            make_eval_step, make_train_step, model_from_config,
                            step_compiler_options, setup, train_and_evaluate)
from jvt.train.sharding import use_cpu_devices

__all__ = ["NonFiniteLossError", "RunPreempted", "Setup", "TrainState", "evaluate",
           "make_eval_step", "make_train_step", "model_from_config", "step_compiler_options",
           "setup", "train_and_evaluate", "use_cpu_devices"]
