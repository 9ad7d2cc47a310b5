"""Writing files safely: atomically (a temporary file renamed over the target), with the mode
the umask gives a normal file, and failures reported as one `RunWriteError` naming the path and
the cause. Used by run directories, checkpoints and exports alike.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile

# What the errno of a failed write means for the user.
_CAUSES = {errno.ENOSPC: "the disk is full; free space",
           errno.EDQUOT: "free space or raise the quota",
           errno.EACCES: "check the permissions of the directory, or use another --workdir",
           errno.EPERM: "check the permissions of the directory, or use another --workdir",
           errno.EROFS: "use a writable --workdir",
           errno.EIO: "the disk or the file system failed"}


class RunWriteError(OSError):
  """A file of the run could not be written (disk full, permission...): the message names the
  path and the cause; `errno` is the underlying error number (None when unknown)."""

  def __init__(self, message: str, err_no: int | None = None):
    super().__init__(message)
    self.errno = err_no


def describe_cause(err_no: int | None, detail: str = "") -> str:
  """`"No space left on device (the disk is full; free space)"` for an errno."""
  if err_no is None:
    return detail or "unknown error"
  hint = _CAUSES.get(err_no)
  text = os.strerror(err_no)
  return f"{text} ({hint})" if hint else text


def write_error(path: str, err: OSError, what: str = "write") -> RunWriteError:
  """The RunWriteError for an OSError raised while writing `path`."""
  return RunWriteError(f"cannot {what} {path}: {describe_cause(err.errno, str(err))}",
                       err.errno)


def normal_file_mode() -> int:
  """The mode `open()` gives a new file under the current umask (0o666 & ~umask).

  `tempfile.mkstemp` creates files 0600 whatever the umask; files written through a temporary
  file are chmod-ed to this so that other users of a shared file system can read them.
  """
  try:
    with open("/proc/self/status") as f:  # Linux: read without changing the umask
      for line in f:
        if line.startswith("Umask:"):
          return 0o666 & ~int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(path: str, binary: bool = False):
  """Yields a file object writing a temporary file next to `path`, renamed over `path` when the
  block ends without an error (never a half file; the temporary file removed otherwise).

  The file gets the umask's normal mode (`normal_file_mode`). A symbolic link at `path` is
  replaced by the file, never written through. Write errors become a `RunWriteError`.
  """
  directory = os.path.dirname(os.path.abspath(path))
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    os.fchmod(fd, normal_file_mode())
    with os.fdopen(fd, "wb" if binary else "w") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    tmp = None
  except OSError as err:
    if isinstance(err, RunWriteError):
      raise
    raise write_error(path, err) from None
  finally:
    if tmp is not None and os.path.lexists(tmp):
      os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file (see `atomic_file`)."""
  with atomic_file(path) as f:
    f.write(text)
