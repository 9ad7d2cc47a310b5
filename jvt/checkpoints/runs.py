"""`RunCheckpointer`: orbax checkpoints of a training run (state pytree + JSON metadata).

A step is saved as one orbax directory `<directory>/<step>/` with two items:
- `state`: any pytree of arrays (trainable params, optimizer state, method state such as the
  DA-VPT class->prompt mapping). Save only what training changes: the frozen backbone comes
  back from the pretrained file, so a tuned run is megabytes.
- `metadata`: a JSON dict (config, data-iterator position, teacher source...).

Orbax writes each step into `<step>.orbax-checkpoint-tmp-<timestamp>/` and renames it when
complete, so a crash mid-save leaves a temporary directory that is never listed as a step;
`latest_step()` and `restore()` see only finished checkpoints. Every process of a multi-process
run must call `save` and `restore` (orbax coordinates the writes and the barrier).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class RunCheckpointer:
  """Save/restore of `(state, metadata)` per step with orbax's CheckpointManager.

  Args:
    directory: the run's checkpoint directory (created if missing; local path or gs://).
    max_to_keep: newest steps kept on disk (None keeps all).
    async_save: write in a background thread; `save` returns once the arrays are copied
      off the devices. Call `wait_until_finished()` (or `close()`) before exiting.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)

  def save(self, step: int, state: PyTree, metadata: dict | None = None) -> None:
    """Saves `state` and the JSON-serialisable `metadata` as `step` (atomic per step)."""
    metadata = {} if metadata is None else metadata
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as err:
      raise ValueError(f"checkpoint metadata must be JSON-serialisable "
                       f"(use config.to_dict() for a ConfigDict): {err}") from None
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              metadata=ocp.args.JsonSave(metadata))
    self._manager.save(int(step), args=args)

  def latest_step(self) -> int | None:
    """The newest finished step, or None when the directory holds none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The finished steps on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def restore(self, step: int | None = None, target: PyTree = None) -> tuple[PyTree, dict]:
    """Returns `(state, metadata)` of `step` (default: the latest).

    `target` is a pytree of arrays or `jax.ShapeDtypeStruct`s with the structure, dtypes
    and shardings to restore into (each process then reads only its shards); without it
    the saved structure comes back with the arrays on the default device.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {self._manager.directory}.")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self._manager.directory}; "
          f"finished steps: {self.all_steps()}.")
    abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              metadata=ocp.args.JsonRestore())
    restored = self._manager.restore(int(step), args=args)
    return restored.state, restored.metadata

  def wait_until_finished(self) -> None:
    """Blocks until the pending asynchronous save (if any) is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> RunCheckpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
