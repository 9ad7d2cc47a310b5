"""The files of a run's workdir: config guard, metrics (JSON lines + TensorBoard), progress,
final metrics, exports and plots. Only process 0 writes logs, exports and plots.

Workdir layout:
  config.json           the run's config (a run of a different config here is refused)
  metrics.jsonl         one JSON object per logged step (train/*) and per evaluation (val/*,
                        test/*)
  tb/                   TensorBoard event files (the same scalars)
  checkpoints/<step>/   orbax run checkpoints (unfinished saves are `<step>.orbax-checkpoint-tmp-*`
                        and are never restored)
  final_metrics.json    written when the run finishes (read by jvt.sweep / jvt.results)
  export/trainable.npz  the trained parameters alone, `/`-joined keys
  export/merged_vit.npz for mergeable methods: the merged model, vision_transformer layout
  curves.png            training curves
  checkpoints_damaged/  checkpoints that failed to restore, moved aside on resume
  jvt.lock              the workdir lock of the running job (host, pid, start time, job id)
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time

import jax
import numpy as np
from flax import traverse_util

from jvt import protocols
from jvt.files import atomic_file, atomic_write_text, write_error

log = logging.getLogger("jvt.train.rundir")

# Fields that may differ between a run and its resumption (they do not change the result).
_RESUMABLE_FIELDS = ("progress_bar", "overwrite", "write_plots", "log_every_steps",
                     "keep_checkpoints", "checkpoint_every_steps", "max_to_keep",
                     "eval_batch_size", "release_setup_caches")
# What a run writes in its workdir (the lock file aside): `overwrite` removes exactly these.
RUN_FILES = ("config.json", "metrics.jsonl", "final_metrics.json", "curves.png")
RUN_DIRS = ("checkpoints", "tb", "export", "checkpoints_damaged")
LOCK_FILE = "jvt.lock"
class WorkdirLockedError(FileExistsError):
  """Another run (another process or job) holds the workdir's lock."""


def _comparable(config: dict) -> dict:
  d = {k: v for k, v in config.items() if k not in _RESUMABLE_FIELDS}
  if isinstance(d.get("protocol"), str):  # the epoch selection under its former name
    d["protocol"] = protocols.SELECTION_ALIASES.get(d["protocol"], d["protocol"])
  return d


def with_new_defaults(old: dict, new: dict, defaults: dict) -> dict:
  """`old` (a stored config) plus every key that `new` has and `old` lacks whose value in
  `new` is its default in the base config: a key added to jvt after a run started, left at
  its default, does not make the run a different config (the run resumes)."""
  out = dict(old)
  for key, value in new.items():
    default = defaults.get(key) if isinstance(defaults, dict) else None
    if key not in old:
      if key in (defaults or {}) and value == default:
        out[key] = value
    elif isinstance(old[key], dict) and isinstance(value, dict):
      out[key] = with_new_defaults(old[key], value, default if isinstance(default, dict) else {})
  return out


def finished_steps(checkpoint_dir: str) -> list[int]:
  """Steps with a finished orbax checkpoint (`<step>/`); unfinished `*-tmp-*` saves excluded."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoint_dir)
                if re.fullmatch(r"\d+", n) and os.path.isdir(os.path.join(checkpoint_dir, n)))


def _process_start_ticks(pid: int) -> str | None:
  """The start time of process `pid` in clock ticks since boot (Linux), to tell a live holder
  from a new process that reuses a dead holder's pid; None where /proc is not available."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _flock(fd: int) -> bool | None:
  """An exclusive, non-blocking fcntl lock on `fd`: True taken, False held by another process,
  None where the system or file system has no such locks."""
  try:
    import fcntl
  except ImportError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  except OSError:
    return None


class WorkdirLock:
  """An exclusive lock on a workdir: the file `<workdir>/jvt.lock`, created with O_EXCL (atomic
  on local and network file systems) and holding the holder's host, pid, start time and job id,
  plus a flock on it while the run lives (where the file system has them).

  A second process is refused with `WorkdirLockedError` naming the holder. A lock left by a
  dead process of this host (pid gone, or reused by a process started later) is taken over
  with a warning; one of another host is refused, since its liveness cannot be checked here
  (the message says to delete the file once that run is known to be gone).

  Multi-process jobs: process 0 takes the lock with the job's id, a random token it makes and
  broadcasts to every process (through jax.distributed); the other processes check that the
  file names their job, so a job holds its workdir as one, and a second job is refused.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None
    self.job_id = None

  def acquire(self) -> None:
    pc = jax.process_count()
    token = os.urandom(8).hex()
    if pc == 1:
      self.job_id = token
      self._acquire_here()
      return
    from jax.experimental import multihost_utils
    self.job_id = _broadcast_text(token, 16)
    problem = ""
    if jax.process_index() == 0:
      try:
        self._acquire_here()
      except (OSError, ValueError) as err:
        problem = str(err)[:1000]
    problem = _broadcast_text(problem, 1000)
    if problem:
      raise WorkdirLockedError(problem)
    ok = True
    if jax.process_index() != 0:
      holder = _read_holder(self.path)
      ok = holder is not None and holder.get("job") == self.job_id
    oks = multihost_utils.process_allgather(np.int32(ok))
    if not np.all(oks):
      bad = [i for i, x in enumerate(np.ravel(oks)) if not x]
      self.release()
      raise WorkdirLockedError(
          f"processes {bad} do not see the lock file {self.path} that process 0 wrote: the "
          "workdir must be the same (shared) directory on every host.")

  def _info(self) -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start_ticks(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "job": self.job_id,
            "processes": jax.process_count(),
            "slurm_job": os.environ.get("SLURM_JOB_ID")}

  def _acquire_here(self) -> None:
    data = json.dumps(self._info()).encode()
    for _ in range(50):
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
      except FileExistsError:
        pass
      else:
        _flock(fd)
        try:
          os.write(fd, data)
          os.fsync(fd)
        except OSError as err:
          os.close(fd)
          os.remove(self.path)
          raise write_error(self.path, err) from None
        self._fd = fd
        return
      holder = _read_holder(self.path)
      if holder is None:  # being written by its creator, or left empty by a crash
        if time.time() - _mtime(self.path) < 10:
          time.sleep(0.2)
          continue
      elif _holder_alive(holder):
        raise WorkdirLockedError(_locked_message(self.path, holder))
      if self._take_over(holder, data):
        return
    raise WorkdirLockedError(f"could not take the lock {self.path}; delete it if no run uses "
                             "this workdir.")

  def _take_over(self, holder: dict | None, data: bytes) -> bool:
    """Replaces a dead holder's lock by ours; False if the file changed meanwhile."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
      return False
    if _flock(fd) is False:  # a live process holds it after all
      os.close(fd)
      raise WorkdirLockedError(_locked_message(self.path, _read_holder(self.path) or {}))
    current = os.pread(fd, 1 << 16, 0)
    if _parse_holder(current) != holder:
      os.close(fd)
      return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    self._fd = fd
    what = (f"process {holder.get('pid')} on {holder.get('host')} (started "
            f"{holder.get('started')}), which is gone" if holder else "no holder information")
    log.warning("Took over the stale workdir lock %s: it was left by %s.", self.path, what)
    return True

  def release(self) -> None:
    """Removes the lock file (process 0) and drops the fcntl lock."""
    if self._fd is None:
      return
    try:
      holder = _read_holder(self.path)
      if holder is not None and holder.get("pid") == os.getpid() and \
          holder.get("job") == self.job_id:
        os.remove(self.path)
    except OSError:
      pass
    finally:
      os.close(self._fd)
      self._fd = None


def _broadcast_text(text: str, size: int) -> str:
  """Process 0's `text` (at most `size` bytes) on every process."""
  from jax.experimental import multihost_utils
  raw = np.zeros((size,), np.uint8)
  encoded = text.encode()[:size]
  raw[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(raw))
  return bytes(out.astype(np.uint8)).rstrip(b"\0").decode(errors="replace")


def _mtime(path: str) -> float:
  try:
    return os.lstat(path).st_mtime
  except OSError:
    return 0.0


def _parse_holder(raw: bytes) -> dict | None:
  try:
    holder = json.loads(raw.decode())
  except (UnicodeDecodeError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _read_holder(path: str) -> dict | None:
  try:
    with open(path, "rb") as f:
      return _parse_holder(f.read())
  except OSError:
    return None


def _holder_alive(holder: dict) -> bool:
  """False only when the holder is provably gone: a process of this host that no longer runs
  (or whose pid now belongs to a process started later)."""
  if holder.get("host") != socket.gethostname():
    return True
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  recorded, now = holder.get("pid_start"), _process_start_ticks(pid)
  return not (recorded and now and recorded != now)


def _locked_message(path: str, holder: dict) -> str:
  return (f"workdir {os.path.dirname(path)} is in use by another run: pid {holder.get('pid')} "
          f"on host {holder.get('host')}, started {holder.get('started')} (lock file {path}). "
          "Wait for it to finish or use another --workdir; if that run is gone (e.g. its host "
          f"crashed), delete {path} and run again.")


def check_no_links(path: str) -> None:
  """Refuses a workdir whose run files or directories (or anything inside those directories)
  are symbolic links: jvt never writes or deletes through a link into another directory."""
  links = []
  for name in RUN_FILES + RUN_DIRS + (LOCK_FILE,):
    full = os.path.join(path, name)
    if os.path.islink(full):
      links.append(full)
    elif name in RUN_DIRS and os.path.isdir(full):
      for root, dirs, files in os.walk(full):
        links += [os.path.join(root, n) for n in dirs + files
                  if os.path.islink(os.path.join(root, n))]
  if links:
    shown = ", ".join(f"{p} -> {os.readlink(p)}" for p in links[:3])
    raise ValueError(
        f"workdir {path} holds symbolic links where the run writes its files ({shown}"
        f"{', ...' if len(links) > 3 else ''}); jvt never writes or deletes through a link. "
        "Remove the links (and move what they point to into the workdir if it belongs to this "
        "run), or use another --workdir.")


class RunDirectory:
  """Locks a workdir, checks it for a config (on construction) and claims it (`start`).

  A workdir "holds a run" once it has a finished checkpoint or a final_metrics.json. Such a
  run is resumed when its config.json matches `config` (up to `_RESUMABLE_FIELDS`) and is
  refused otherwise, unless `config.overwrite`, which then deletes it in `start`. A workdir
  whose config.json has neither (a run stopped before its first checkpoint) is simply reused.

  The workdir lock (`WorkdirLock`) is held from construction to `close()`; use it as a
  context manager. Closed before `start`, it leaves no trace: the lock file is removed, and
  so are the directories its construction created.
  """

  def __init__(self, workdir: str, config):
    if not workdir:
      raise ValueError("workdir is empty: pass --workdir=DIR.")
    self.path = os.path.abspath(workdir)
    self.checkpoint_dir = os.path.join(self.path, "checkpoints")
    self.damaged_dir = os.path.join(self.path, "checkpoints_damaged")
    self._config_text = config.to_json(indent=1)
    self._started = False
    self._created = _make_dirs(self.path)
    self.lock = WorkdirLock(self.path)
    try:
      _check_writable(self.path)
      self.lock.acquire()
      check_no_links(self.path)
      self._clear = self._check_config(bool(config.get("overwrite", False)))
    except BaseException:
      self.close()
      raise

  def _check_config(self, overwrite: bool) -> bool:
    """Whether `start` must delete a previous run (raises if it is refused)."""
    config_path = os.path.join(self.path, "config.json")
    metrics_path = os.path.join(self.path, "metrics.jsonl")
    if os.path.exists(metrics_path) and not overwrite:
      _parse_metrics(metrics_path)  # a damaged line (other than a half-written last one) fails
    has_checkpoint = bool(finished_steps(self.checkpoint_dir))
    finished = os.path.exists(os.path.join(self.path, "final_metrics.json"))
    if not (has_checkpoint or finished):
      return False
    if not os.path.exists(config_path):
      problem = f"workdir {self.path} holds checkpoints or results but no config.json"
    else:
      with open(config_path) as f:
        old = f.read()
      try:
        old_config = json.loads(old)
      except ValueError as err:
        if overwrite:
          return True
        raise ValueError(
            f"{config_path} is damaged ({err}); it should hold the config of the run in this "
            "workdir. Restore it from a backup (each checkpoint's metadata also holds the "
            "config, as JSON, under 'config'), or pass --config.overwrite=True to delete the "
            "run and start over.") from None
      problem = None
      new_config = json.loads(self._config_text)
      old_config = with_new_defaults(old_config, new_config, _base_config_dict())
      if _comparable(old_config) != _comparable(new_config):
        problem = (f"workdir {self.path} holds a run of a different config "
                   f"({_diff(old_config, new_config)})")
      elif not has_checkpoint:
        problem = (f"workdir {self.path} holds a finished run of this config whose checkpoints "
                   "were removed (keep_checkpoints=False); its results are in "
                   "final_metrics.json")
    if problem is None:
      return False
    if not overwrite:
      raise FileExistsError(f"{problem}. Use another --workdir, or pass "
                            "--config.overwrite=True to delete it and start over.")
    return True

  def start(self) -> None:
    """Claims the workdir for this config (after set-up succeeded): with `overwrite`, deletes
    the previous run's files; writes config.json. All processes wait for process 0."""
    if jax.process_index() == 0:
      if self._clear:
        _clear_run(self.path)
      atomic_write_text(os.path.join(self.path, "config.json"), self._config_text)
    self._started = True
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("jvt.train.rundir.RunDirectory.start")

  def close(self) -> None:
    """Releases the lock; before `start`, also removes the directories construction made."""
    self.lock.release()
    if not self._started and jax.process_index() == 0:
      for path in reversed(self._created):
        try:
          os.rmdir(path)
        except OSError:
          break

  def __enter__(self) -> RunDirectory:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def write_final(self, final: dict, history: list[dict]) -> None:
    atomic_write_text(os.path.join(self.path, "final_metrics.json"),
                      json.dumps(dict(final, history=history), indent=1))

  def export(self, model, trainable, frozen) -> None:
    """export/trainable.npz always; export/adapter.safetensors (jvt.load_adapter) when the run
    started from a checkpoint; export/merged_vit.npz when the method merges away."""
    from jvt.checkpoints import save_npz
    from jvt.methods import merge, mergeable
    from jvt.partition import merge_params
    out = os.path.join(self.path, "export")
    try:
      os.makedirs(out, exist_ok=True)
    except OSError as err:
      raise write_error(out, err, "create") from None
    flat = traverse_util.flatten_dict(trainable, sep="/")
    with atomic_file(os.path.join(out, "trainable.npz"), binary=True) as f:
      np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
    from jvt.adapters import save_run_adapter
    save_run_adapter(os.path.join(out, "adapter.safetensors"), model,
                     merge_params(trainable, frozen), json.loads(self._config_text))
    if not mergeable(model):
      return  # prompts and adapters add computation: nothing to merge into the backbone
    plain, params = merge(model, merge_params(trainable, frozen))
    path = os.path.join(out, "merged_vit.npz")
    try:
      save_npz(path, params, model=plain)
    except OSError as err:
      raise write_error(path, err) from None

  def plot_curves(self) -> None:
    from jvt import viz
    path = os.path.join(self.path, "curves.png")
    try:
      viz.plot_run_curves(read_metrics(self.path), path,
                          title=viz.run_title(json.loads(self._config_text), self.path))
    except OSError as err:
      raise write_error(path, err) from None


def _make_dirs(path: str) -> list[str]:
  """os.makedirs(path); returns the directories it created, outermost first."""
  missing = []
  head = path
  while head and not os.path.exists(head):
    missing.append(head)
    parent = os.path.dirname(head)
    if parent == head:
      break
    head = parent
  missing.reverse()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as err:
    for created in reversed(missing):
      with contextlib.suppress(OSError):
        os.rmdir(created)
    raise PermissionError(f"workdir {path} is not writable ({err.strerror or err}); choose "
                          "another --workdir.") from None
  return missing


def _check_writable(path: str) -> None:
  if not os.path.isdir(path):
    raise PermissionError(f"workdir {path} is not a directory; choose another --workdir.")
  try:
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
    os.close(fd)
    os.remove(probe)
  except OSError as err:
    raise PermissionError(f"workdir {path} is not writable ({err.strerror or err}); choose "
                          "another --workdir.") from None


def _clear_run(path: str) -> None:
  """Deletes exactly the run's own files and directories (never through a link: the workdir
  was checked by `check_no_links`, and rmtree does not follow links inside a directory)."""
  for name in RUN_DIRS:
    full = os.path.join(path, name)
    if os.path.islink(full):
      raise ValueError(f"{full} is a symbolic link; jvt does not delete through links.")
    if os.path.isdir(full):
      shutil.rmtree(full)
  for name in RUN_FILES:
    full = os.path.join(path, name)
    if os.path.lexists(full):
      os.remove(full)


def _base_config_dict() -> dict:
  """The trainer's base config (every key at its default) as the JSON a run stores."""
  from jvt.config_lib import base_config
  return json.loads(base_config().to_json())


def _diff(old: dict, new: dict, prefix: str = "") -> str:
  diffs = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      sub = _diff(a, b, f"{prefix}{key}.")
      if sub:
        diffs.append(sub)
    elif a != b and key not in _RESUMABLE_FIELDS:
      diffs.append(f"{prefix}{key}: {a!r} there vs {b!r} now")
  return "; ".join(diffs[:5])


def _parse_metrics(path: str) -> tuple[list[dict], bool]:
  """(rows, whether a half-written last line was dropped) of a metrics.jsonl file.

  A kill during a write can leave the last line incomplete: it is dropped. A damaged line
  before it is an error naming the file and the line.
  """
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  rows, dropped = [], False
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line.decode())
      if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
      if all(not rest.strip() for rest in lines[i + 1:]):
        dropped = True
        break
      raise ValueError(
          f"{path} is damaged at line {i + 1} ({err}); it is the run's log of metrics, one JSON "
          f"object per line. Delete that line (or the file, losing the logged curves) and run "
          "again.") from None
    rows.append(row)
  return rows, dropped


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl` (empty if there is none; a half-written last line,
  which a killed run can leave, is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return _parse_metrics(path)[0]


class _Progress:
  """A tqdm bar (step, loss, img/s, share of time waiting for input, ETA), or nothing."""

  def __init__(self, total, initial, enabled):
    self.bar = None
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                      file=sys.stderr, mininterval=1.0)
    self.step = initial

  def advance(self, step):
    if self.bar is not None:
      self.bar.update(step - self.step)
    self.step = step

  def update_metrics(self, host: dict):
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{host.get('loss', float('nan')):.4f}",
                           img_s=f"{host.get('img_per_s', 0.0):.1f}",
                           input_wait=f"{host.get('input_wait_frac', 0.0):.0%}", refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()


class _EventFile:
  """TensorBoard scalars written synchronously to one event file, flushed after every write.

  Synchronous on purpose: a background writer that dies (disk full) leaves the loop blocked on
  its queue; here a failed write raises at once, and a killed run's events hold exactly the
  rows of metrics.jsonl. `purge_step` hides events at and after it from earlier runs (the
  SessionLog START that TensorBoard reads as "restarted here").
  """

  def __init__(self, directory: str, purge_step: int):
    from tensorboardX.proto import event_pb2, summary_pb2
    self._pb, self._summary_pb = event_pb2, summary_pb2
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as err:
      raise write_error(directory, err, "create") from None
    self.path = os.path.join(directory, f"events.out.tfevents.{time.time():.6f}."
                                        f"{socket.gethostname()}.{os.getpid()}")
    self._fd = None
    try:
      self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o666)
    except OSError as err:
      raise write_error(self.path, err, "create") from None
    pb = event_pb2
    self._write([pb.Event(wall_time=time.time(), step=purge_step, file_version="brain.Event:2"),
                 pb.Event(wall_time=time.time(), step=purge_step,
                          session_log=pb.SessionLog(status=pb.SessionLog.START))])

  def _write(self, events) -> None:
    from tensorboardX.record_writer import masked_crc32c
    out = []
    for event in events:
      data = event.SerializeToString()
      header = struct.pack("<Q", len(data))
      out += [header, struct.pack("<I", masked_crc32c(header)), data,
              struct.pack("<I", masked_crc32c(data))]
    blob = b"".join(out)
    try:
      while blob:
        blob = blob[os.write(self._fd, blob):]
    except OSError as err:
      raise write_error(self.path, err) from None

  def scalars(self, step: int, scalars: dict) -> None:
    sp = self._summary_pb
    summary = sp.Summary(value=[sp.Summary.Value(tag=k, simple_value=float(v))
                                for k, v in scalars.items()])
    self._write([self._pb.Event(wall_time=time.time(), step=int(step), summary=summary)])

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


class MetricWriter:
  """Scalars to metrics.jsonl and TensorBoard (process 0 only), written and flushed in the
  calling thread, so a failed write (disk full, permission) raises a `RunWriteError` naming
  the file and its cause in the training loop.

  `resume_step`: the step training continues from. Rows and events logged past it by an
  interrupted run are dropped (metrics.jsonl rewritten, TensorBoard purge), so a resumed run's
  logs hold each step once; a half-written last line of metrics.jsonl is dropped too.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      rows, dropped = _parse_metrics(self.path) if os.path.exists(self.path) else ([], False)
      kept = [r for r in rows if r.get("step", 0) <= resume_step]
      if dropped:
        log.warning("Dropped the half-written last line of %s (left by an interrupted run).",
                    self.path)
      if dropped or len(kept) != len(rows):
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
      self.tb = _EventFile(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

  def write_header(self, *, trainable_params: int, summary: str) -> None:
    if self.enabled:
      print(f"Trainable parameters: {trainable_params:,}\n{summary}", file=sys.stderr)

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
      try:
        data = (json.dumps(row) + "\n").encode()
        while data:
          data = data[os.write(fd, data):]
      finally:
        os.close(fd)
    except OSError as err:
      raise write_error(self.path, err) from None
    self.tb.scalars(step, scalars)

  def progress(self, total: int, initial: int, enabled: bool) -> _Progress:
    return _Progress(total, initial, enabled and self.enabled)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
