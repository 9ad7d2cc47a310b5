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

A failed write (disk full, permission), in `save` or in the background, is raised as one
`CheckpointWriteError` naming the step's directory and the cause; orbax's own error logs are
silenced (set JVT_TRACEBACK=1 to see them). `restore_newest` resumes from the newest step that
restores and moves damaged newer ones aside.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jvt.files import RunWriteError, describe_cause

PyTree = Any
log = logging.getLogger("jvt.checkpoints")


class CheckpointWriteError(RunWriteError):
  """A checkpoint could not be written; the message names the directory and the cause."""


class CheckpointRestoreError(ValueError):
  """No checkpoint of a run restores."""


def _errno_of(err: BaseException) -> int | None:
  """The OS error number behind an orbax / tensorstore error (chained OSError, or the
  `os_error_code` / message text tensorstore puts in its ValueError)."""
  seen = err
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return seen.errno
    seen = seen.__cause__ or seen.__context__
  text = str(err)
  match = re.search(r"os_error_code='?(\d+)", text)
  if match:
    return int(match.group(1))
  for number in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
    if os.strerror(number) in text:
      return number
  return None


def _short(err: BaseException, limit: int = 200) -> str:
  """The first line of an error, at most `limit` characters."""
  text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
  text = (text.strip().splitlines() or [type(err).__name__])[0]
  text = f"{type(err).__name__}: {text}" if not isinstance(err, (ValueError, OSError)) else text
  return text if len(text) <= limit else text[:limit] + "..."


class _QuietOrbax(logging.Filter):
  """Drops orbax's error logs (tracebacks of a failed background save): the error itself is
  raised as one CheckpointWriteError. JVT_TRACEBACK=1 keeps them."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not ("orbax" in record.pathname and record.levelno >= logging.ERROR
                and os.environ.get("JVT_TRACEBACK") != "1")


_QUIET = _QuietOrbax()
# The status codes that start tensorstore's storage errors ("DATA_LOSS: Error writing ...").
_STORAGE_ERROR = re.compile(r"(RESOURCE_EXHAUSTED|DATA_LOSS|UNKNOWN|INTERNAL|PERMISSION_DENIED|"
                            r"FAILED_PRECONDITION|UNAVAILABLE|ABORTED|OUT_OF_RANGE): ")


def _quiet_closed_loop_callbacks() -> None:
  """After a failed restore, tensorstore's reads still pending call back into orbax's asyncio
  loop, already closed; each callback's RuntimeError("Event loop is closed") would print a
  traceback through `sys.unraisablehook`. Drops exactly those (JVT_TRACEBACK=1 keeps them);
  installed once per process, every other report goes to the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "jvt_quiet", False):
    return

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
        and os.environ.get("JVT_TRACEBACK") != "1"):
      return
    previous(unraisable)

  hook.jvt_quiet = True
  sys.unraisablehook = hook


class _QuietUnretrievedReads(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" reports of orbax's restore reads.

  When one array of a damaged checkpoint fails to read, orbax's restore raises with that error
  (which `restore_newest` reports as one warning, `restore` raises) while the reads of the other arrays, run as
  asyncio tasks, may fail after it; their exceptions are never retrieved, and asyncio prints
  each with a traceback when the task is collected, or not, depending on timing. Only reports
  whose traceback runs through a deserialize function of orbax are dropped; JVT_TRACEBACK=1
  keeps them.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if (os.environ.get("JVT_TRACEBACK") == "1" or not record.exc_info
        or not str(record.msg).startswith("Task exception was never retrieved")):
      return True
    tb = record.exc_info[2]
    while tb is not None:
      code = tb.tb_frame.f_code
      if "orbax" in code.co_filename and "deserialize" in code.co_name:
        return False
      tb = tb.tb_next
    return True


_QUIET_READS = _QuietUnretrievedReads()


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
    self.directory = os.path.abspath(os.fspath(directory))
    logging.getLogger("absl").addFilter(_QUIET)  # once per process: filters are a set
    logging.getLogger("asyncio").addFilter(_QUIET_READS)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._failed = False
    self._pending = None

  @contextlib.contextmanager
  def _writing(self, step):
    """Turns an error of a save (this one or the pending background one) into one
    CheckpointWriteError naming the step's directory and the cause."""
    try:
      yield
    except CheckpointWriteError:
      raise
    except Exception as err:  # orbax / tensorstore raise ValueError, OSError, RuntimeError
      number = _errno_of(err)
      if number is None and not isinstance(err, OSError) and not _STORAGE_ERROR.match(str(err)):
        raise  # not a storage error: a bug keeps its traceback
      self._failed = True
      path = os.path.join(self.directory, str(step if step is not None else "?"))
      cause = describe_cause(number, _short(err)) if number else _short(err)
      raise CheckpointWriteError(f"cannot write checkpoint {path}: {cause}", number) from None

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
    with self._writing(self._pending):  # the pending save's error surfaces here
      self._manager.wait_until_finished()
    self._pending = int(step)
    with self._writing(step):
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

  def restore_newest(self, target: PyTree = None, *, check=None,
                     damaged_dir: str | None = None, restore_fn=None):
    """Restores the newest step that restores: returns `(step, state, metadata)`, or None when
    there is no finished step.

    `restore_fn(step) -> (state, metadata)` replaces `self.restore(step, target)` (e.g. to read
    an earlier state layout).

    A newer step that fails (truncated array file, missing `state/`, broken metadata, or
    `check(metadata)` raising) is moved into `damaged_dir` (default `<directory>_damaged`),
    never deleted, with a warning naming it, once an older step has restored. When no step
    restores, nothing is moved and CheckpointRestoreError lists each step's failure.
    Every process must call it (processes agree on each step's success).
    """
    failures = []
    _quiet_closed_loop_callbacks()  # before the first read: a failed one calls back at once
    for step in reversed(self.all_steps()):
      try:
        state, metadata = (restore_fn(step) if restore_fn is not None
                           else self.restore(step, target))
        if check is not None:
          check(metadata)
        ok = True
      except Exception as err:  # any damage: tensorstore, orbax, JSON, missing keys
        failures.append((step, _short(err)))
        ok = False
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        ok = bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
        if not ok and (not failures or failures[-1][0] != step):
          failures.append((step, "failed to restore on another process"))
      if ok:
        self._move_aside([s for s, _ in failures], damaged_dir, failures)
        return step, state, metadata
    if failures:
      listing = "; ".join(f"step {s}: {why}" for s, why in failures)
      raise CheckpointRestoreError(
          f"no checkpoint in {self.directory} restores ({listing}). If the files are damaged, "
          "move them away and run again (it starts over), or pass --config.overwrite=True to "
          "delete the run; if the code or the config changed what a checkpoint holds, go back "
          "to the version that wrote them.")
    return None

  def _move_aside(self, steps, damaged_dir, failures) -> None:
    if not steps:
      return
    damaged_dir = damaged_dir or self.directory + "_damaged"
    if jax.process_index() == 0:
      os.makedirs(damaged_dir, exist_ok=True)
      reasons = dict(failures)
      for step in steps:
        dest = os.path.join(damaged_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        while os.path.exists(dest):
          dest += "+"
        shutil.move(os.path.join(self.directory, str(step)), dest)
        log.warning("Checkpoint %s does not restore (%s): moved to %s; resuming from an older "
                    "one.", os.path.join(self.directory, str(step)), reasons[step], dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("jvt.train.checkpointing.move_aside")
    self._manager.reload()

  def check_for_errors(self) -> None:
    """Raises the error of a finished background save, if any (does not wait)."""
    with self._writing(self._pending):
      self._manager.check_for_errors()

  def wait_until_finished(self) -> None:
    """Blocks until the pending asynchronous save (if any) is on disk."""
    with self._writing(self._pending):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources. After a write error was raised,
    a failure of the pending save is not raised again."""
    reported = self._failed
    try:
      with self._writing(self._pending):
        self._manager.close()
    except CheckpointWriteError:
      if not reported:
        raise

  def __enter__(self) -> RunCheckpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
