"""XLA:CPU's scratch block kept between steps: builds, launches and reads `scratch_reuse`.

XLA:CPU allocates one scratch block for all of a step's temporaries when the step starts and
frees it when the step ends; glibc maps a block that large afresh each time, so every step
faults in hundreds of MB of new pages (174,000 faults a step for ViT-S/16 fp32 full
fine-tuning at batch 8, about a fifth of the step on a 2-core CPU). The C library
`jvt/native/scratch_reuse.c`, preloaded into the process, keeps the freed block and gives it
to the next step, without holding more scratch blocks at once than the process did before
(docs/performance.md, "XLA:CPU's scratch block kept between steps"). It also keeps the large
buffers XLA:CPU's YNNPACK kernels malloc while they run (32 MiB or more: bf16 ViT-B/16 at
batch 32), a few per size and at most 8, which it holds where glibc would have returned them
(docs/performance.md, "Kernel buffers kept too"). It cannot tell those from other large host
buffers, so `jvt.train.loop.setup` calls `release()` once set-up is done: set-up's freed
buffers (DA-VPT's class examples) are sizes the steps never ask for.

It has to be preloaded (`LD_PRELOAD`) before Python starts, so it is a launcher:

    python -m jvt.scratch -- python -m jvt.main --config=... --workdir=...

builds the library once (a C compiler, `cc` or `$CC`, is needed), puts it in `LD_PRELOAD` and
runs the command. `python -m jvt.scratch` alone prints the library's path. Inside a process,
`active()` says whether it is loaded and `stats()` what it did. Linux with glibc only; GPU and
TPU runs gain nothing from it (their buffers live on the device).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).parent / "native" / "scratch_reuse.c"
# What `stats()` returns, in the order of jvt_scratch_stats's array.
STAT_KEYS = ("reused", "mapped", "waited", "timed_out", "in_use", "kept", "slots",
             "malloc_reused", "malloc_mapped")


def cache_dir() -> Path:
  """Where the built library is kept: $JVT_CACHE_DIR, else $XDG_CACHE_HOME/jvt, else ~/.cache/jvt."""
  if os.environ.get("JVT_CACHE_DIR"):
    return Path(os.environ["JVT_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "jvt"


def library_path(directory: str | os.PathLike | None = None) -> Path:
  """Path of the built library, compiling it first if this source has not been built there.

  The file name carries a hash of the source, so an edited source builds anew. The library is
  written under a temporary name and renamed, so a concurrent or interrupted build never
  leaves a half-written file under the final name.
  """
  if not sys.platform.startswith("linux"):
    raise RuntimeError(f"jvt.scratch preloads a glibc allocator shim: Linux only, not {sys.platform}.")
  source = SOURCE.read_bytes()
  directory = Path(directory) if directory is not None else cache_dir()
  target = directory / f"scratch_reuse-{hashlib.sha256(source).hexdigest()[:16]}.so"
  if target.exists():
    return target
  compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
  if not compiler:
    raise RuntimeError(
        "jvt.scratch needs a C compiler to build its library and found none (no $CC, cc or "
        "gcc on PATH). Install one (Debian/Ubuntu: apt install gcc) or run without "
        "`python -m jvt.scratch`.")
  directory.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".scratch_reuse-", suffix=".so")
  os.close(fd)
  try:
    try:
      proc = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE),
                             "-lpthread"], capture_output=True, text=True)
    except OSError as err:  # e.g. $CC naming a program that does not exist
      raise RuntimeError(f"building {SOURCE}: could not run the C compiler {compiler!r} "
                         f"({err.strerror}). Set $CC to a working compiler or install one "
                         "(Debian/Ubuntu: apt install gcc).") from None
    if proc.returncode != 0:
      raise RuntimeError(f"building {SOURCE} with {compiler} failed (exit code "
                         f"{proc.returncode}):\n{proc.stderr[-2000:]}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
  """A copy of `env` (default: this process's) with the library first in LD_PRELOAD."""
  env = dict(os.environ if env is None else env)
  path = str(library_path())
  rest = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != path]
  env["LD_PRELOAD"] = ":".join([path, *rest])
  return env


def _symbols():
  """The loaded library's functions, or None when it is not preloaded into this process."""
  process = ctypes.CDLL(None)
  if not hasattr(process, "jvt_scratch_stats"):
    return None
  return process


def active() -> bool:
  """Whether the library is preloaded into this process."""
  return _symbols() is not None


def stats() -> dict[str, int]:
  """What the library did so far: scratch blocks reused, scratch blocks mapped afresh, waits
  for a scratch block to come back (and how many of those ran out, after 50 ms), blocks of
  both kinds in use and kept now, the executions it expects at once (`slots`), and malloc
  blocks reused and mapped afresh."""
  lib = _symbols()
  if lib is None:
    raise RuntimeError("jvt.scratch's library is not loaded in this process: start it with "
                       "`python -m jvt.scratch -- <command>`.")
  out = (ctypes.c_long * len(STAT_KEYS))()
  lib.jvt_scratch_stats(out)
  return dict(zip(STAT_KEYS, (int(v) for v in out)))


def set_slots(n: int) -> None:
  """Tells the library how many executions run at once (the CPU device count); no-op if not loaded."""
  lib = _symbols()
  if lib is not None:
    lib.jvt_scratch_set_slots(ctypes.c_int(max(int(n), 1)))


def release() -> None:
  """Returns the kept blocks' memory to the system (the next step maps its block afresh)."""
  lib = _symbols()
  if lib is not None:
    lib.jvt_scratch_release()


USAGE = "usage: python -m jvt.scratch [-- command args...]  (no command: print the library's path)"


def main(argv: list[str]) -> int:
  if argv[:1] in (["-h"], ["--help"]):
    print(USAGE)
    return 0
  if argv[:1] == ["--"]:
    argv = argv[1:]
  if argv and argv[0].startswith("-"):
    print(USAGE, file=sys.stderr)
    return 2
  try:
    if not argv:
      print(library_path())
      return 0
    env = preload_env()
  except RuntimeError as err:
    print(f"jvt.scratch: {err}", file=sys.stderr)
    return 1
  os.execvpe(argv[0], argv, env)
  return 0  # not reached: the command replaced this process


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
