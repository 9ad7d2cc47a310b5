"""jvt.scratch: the preloaded allocator shim that keeps XLA:CPU's scratch block between steps.

The shim only acts when preloaded, so each behaviour runs in a child interpreter started with
LD_PRELOAD (and JVT_SCRATCH_MIN_MB=1, so that megabyte-sized blocks count as large; malloc
blocks only where a test lowers JVT_SCRATCH_MALLOC_MIN_MB from the 1 GiB set here). Expected
counts and pointers follow from the rules in jvt/native/scratch_reuse.c, worked out by hand
per case; values computed through the shim are compared with numpy.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from jvt import scratch
from helpers_train import cli_args, cli_env, load_trainable, run_cli, train_data_dir  # noqa: F401

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (os.environ.get("CC") or shutil.which("cc")
                                                 or shutil.which("gcc")),
    reason="jvt.scratch builds a glibc preload library: needs Linux and a C compiler")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
  return scratch.library_path(tmp_path_factory.mktemp("scratch_lib"))


def run_preloaded(library, code: str, extra_env: dict | None = None) -> str:
  """Runs `code` in a child with the library preloaded; its stdout."""
  env = dict(os.environ, LD_PRELOAD=str(library), JVT_SCRATCH_MIN_MB="1",
             JVT_SCRATCH_MALLOC_MIN_MB="1024")
  env.pop("XLA_FLAGS", None)
  env.update(extra_env or {})
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


# A child's helpers: posix_memalign / free / realloc through ctypes (the process's symbols, so
# the preloaded ones), and the shim's counters.
ALLOC = """
import ctypes, json, threading, time
from jvt import scratch
libc = ctypes.CDLL(None)
libc.free.argtypes = [ctypes.c_void_p]
libc.realloc.restype = ctypes.c_void_p
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MB = 1 << 20
def alloc(mb):
  p = ctypes.c_void_p()
  assert libc.posix_memalign(ctypes.byref(p), 64, int(mb * MB)) == 0
  return p.value
"""


def test_library_is_built_once_under_a_name_hashing_its_source(tmp_path):
  first = scratch.library_path(tmp_path)
  mtime = first.stat().st_mtime_ns
  second = scratch.library_path(tmp_path)
  assert first == second and second.stat().st_mtime_ns == mtime  # not rebuilt
  assert first.name.startswith("scratch_reuse-") and first.suffix == ".so"
  assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temporary left


def test_not_loaded_here():
  assert not scratch.active()
  scratch.set_slots(4)  # no-op
  scratch.release()  # no-op
  with pytest.raises(RuntimeError, match="python -m jvt.scratch"):
    scratch.stats()


def test_a_freed_block_goes_to_the_next_request_that_fits(library):
  out = run_preloaded(library, ALLOC + """
a = alloc(8); libc.free(a)
b = alloc(6)            # 8 MB kept block fits 6 MB (at least 6, at most 12)
libc.free(b)
c = alloc(3)            # does not fit (8 > 2 x 3): kept block freed, a new one mapped
small = alloc(0.5)      # under JVT_SCRATCH_MIN_MB: glibc's, untouched
libc.free(small)
d = libc.realloc(c, 3 * MB + 4096)  # resized: glibc's again, not kept when freed
libc.free(d)
bad_alignment = libc.posix_memalign(ctypes.byref(ctypes.c_void_p()), 24, 16 * MB)
print(json.dumps(dict(same=(a == b), bad_alignment=bad_alignment, stats=scratch.stats())))
""")
  result = __import__("json").loads(out.strip().splitlines()[-1])
  assert result["same"]
  assert result["bad_alignment"] == 22  # EINVAL, as glibc answers
  assert result["stats"] == dict(reused=1, mapped=2, waited=0, timed_out=0, in_use=0, kept=0,
                                 slots=1, malloc_reused=0, malloc_mapped=0)


def test_a_request_waits_for_the_block_in_use_to_come_back(library):
  # XLA asks for step N+1's block a few ms before it frees step N's: the request waits for it.
  out = run_preloaded(library, ALLOC + """
a = alloc(8)
threading.Timer(0.01, libc.free, (a,)).start()
b = alloc(8)            # one fitting block in use (slots 1): waits for it, then reuses it
libc.free(b)
stats_reuse = scratch.stats()
c = alloc(8)            # the kept block
t = time.perf_counter()
d = alloc(8)            # c stays in use: waits 50 ms, then maps a new block
waited_s = time.perf_counter() - t
libc.free(c); libc.free(d)
print(json.dumps(dict(same=(a == b == c), stats_reuse=stats_reuse, stats=scratch.stats(),
                      waited_s=waited_s)))
""")
  result = __import__("json").loads(out.strip().splitlines()[-1])
  assert result["same"]
  assert result["stats_reuse"] == dict(reused=1, mapped=1, waited=1, timed_out=0, in_use=0,
                                       kept=1, slots=1, malloc_reused=0, malloc_mapped=0)
  assert 0.04 <= result["waited_s"] < 1.0
  # c and d both freed: slots 1 keeps one of them.
  assert result["stats"] == dict(reused=2, mapped=2, waited=2, timed_out=1, in_use=0, kept=1,
                                 slots=1, malloc_reused=0, malloc_mapped=0)


def test_a_block_resized_past_the_library_is_not_kept(library):
  # glibc's own realloc (__libc_realloc), called past the library's, shrinks a tracked block in
  # place: free() must see that the chunk is smaller now and hand it back to glibc.
  out = run_preloaded(library, ALLOC + """
libc_realloc = getattr(libc, "__libc_realloc")
libc_realloc.restype = ctypes.c_void_p
libc_realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
a = alloc(8)
d = libc_realloc(a, 2 * MB)
libc.free(d)
b = alloc(8)  # nothing kept: a new block
libc.free(b)
print(json.dumps(dict(same=(a == d), stats=scratch.stats())))
""")
  result = __import__("json").loads(out.strip().splitlines()[-1])
  assert result["same"]  # shrunk in place (glibc mremaps an mmapped chunk where it is)
  assert result["stats"] == dict(reused=0, mapped=2, waited=0, timed_out=0, in_use=0, kept=1,
                                 slots=1, malloc_reused=0, malloc_mapped=0)


def test_a_freed_malloc_block_goes_to_the_next_malloc_of_its_size(library):
  # XLA:CPU's YNNPACK kernels malloc their large intermediates while they run, two sizes in
  # turn, the same every step. malloc blocks fit closely, never wait, stay kept when another
  # size misses, and are kept apart from the scratch blocks.
  out = run_preloaded(library, ALLOC + """
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
def m(mb):
  p = libc.malloc(int(mb * MB))
  ctypes.memset(p, 7, int(mb * MB))  # written through: a usable block of that size
  return p
s = alloc(8); libc.free(s)  # a scratch block, kept
a = m(8); libc.free(a)
b = m(7.5)              # the kept 8 MB block fits 7.5 MB (at most an eighth more)
libc.free(b)
c = m(6)                # 8 MB is a third more than 6: a new block; the 8 MB one stays kept
t = time.perf_counter()
d = m(6)                # c in use: a malloc never waits; a second block is mapped
malloc_s = time.perf_counter() - t
small = m(2)            # under JVT_SCRATCH_MALLOC_MIN_MB: glibc's, untouched
libc.free(small)
libc.free(c); libc.free(d)  # two of one size, slots 1: the one freed last is kept
e = m(6); f = m(8)      # both sizes in turn: each finds its kept block
u = alloc(8)            # the scratch block outlived the malloc blocks' misses
libc.free(u); libc.free(e); libc.free(f)
stats_two_sizes = scratch.stats()
# Ten more sizes, each a quarter over the last (none fits another), each freed: at most 8
# malloc blocks stay, the ones freed last. (Not written to: their pages are never touched.)
sizes = [int(10 * 1.25 ** i * MB) for i in range(10)]
more = [libc.malloc(size) for size in sizes]
for p in more: libc.free(p)
g = m(8)                # freed longest ago: gone, a new block
h = libc.malloc(sizes[-1])  # the last of the ten: kept
print(json.dumps(dict(b_is_a=(a == b), c_is_not_d=(c != d), e_is_d=(e == d), f_is_a=(f == a),
                      u_is_s=(u == s), h_is_last=(h == more[-1]), malloc_s=malloc_s,
                      stats_two_sizes=stats_two_sizes, stats=scratch.stats())))
""", {"JVT_SCRATCH_MALLOC_MIN_MB": "4"})
  result = __import__("json").loads(out.strip().splitlines()[-1])
  for key in ("b_is_a", "c_is_not_d", "e_is_d", "f_is_a", "u_is_s", "h_is_last"):
    assert result[key], (key, result)
  assert result["malloc_s"] < 0.04  # no 50 ms wait
  # Mapped: a, c, d (malloc) and s (scratch); reused: b, e, f (malloc) and u (scratch). Kept:
  # s's block, one 6 MB and one 8 MB malloc block.
  assert result["stats_two_sizes"] == dict(reused=1, mapped=1, waited=0, timed_out=0, in_use=0,
                                           kept=3, slots=1, malloc_reused=3, malloc_mapped=3)
  # Then 10 + 1 (g) mapped and 1 (h) reused; in use g, h; kept 7 malloc blocks and s's.
  assert result["stats"] == dict(reused=1, mapped=1, waited=0, timed_out=0, in_use=2, kept=8,
                                 slots=1, malloc_reused=4, malloc_mapped=14)


def test_jitted_bf16_attention_reuses_its_kernel_buffers_and_computes_the_same(library):
  # bf16 attention on CPU (jvt.precision.einsum, softmax between the products) runs in YNNPACK
  # fusions that malloc a [B, H, Q, K] fp32 intermediate as they run: 2.4 MB here, over the
  # 2 MiB floor set for this test (scratch blocks left to glibc). After the first call of
  # each program nothing new is mapped.
  out = run_preloaded(library, """
import json
import jax, jax.numpy as jnp, numpy as np
from jvt import precision, scratch
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((4, 6, 160, 64)).astype(np.float32) for _ in range(3))
def attention(q, k, v):
  probs = jax.nn.softmax(precision.einsum("bhqd,bhkd->bhqk", q, k, jnp.bfloat16), axis=-1)
  return precision.einsum("bhqk,bhkd->bhqd", probs.astype(jnp.bfloat16), v, jnp.bfloat16)
step = jax.jit(jax.value_and_grad(lambda q, k, v: attention(q, k, v).astype(jnp.float32).sum()))
mapped = []
for _ in range(6):
  y, dq = step(q, k, v)
  y = np.asarray(attention(q, k, v))
  mapped.append(scratch.stats()["malloc_mapped"])
as_bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
logits = np.einsum("bhqd,bhkd->bhqk", as_bf16(q), as_bf16(k))
probs = np.exp(logits - logits.max(-1, keepdims=True))
probs = as_bf16(probs / probs.sum(-1, keepdims=True))
ref = np.einsum("bhqk,bhkd->bhqd", probs, as_bf16(v))
print(json.dumps(dict(err=float(np.abs(y - ref).max() / np.abs(ref).max()), mapped=mapped,
                      stats=scratch.stats())))
""", {"JVT_SCRATCH_MALLOC_MIN_MB": "2", "JVT_SCRATCH_MIN_MB": "1024"})
  result = __import__("json").loads(out.strip().splitlines()[-1])
  # bf16 operands with fp32 accumulation; the probabilities rounded to bf16 on both sides
  # (one bf16 step apart where fp32 and float64 round differently).
  assert result["err"] < 1e-3, result
  assert result["mapped"][0] >= 1, result  # XLA:CPU (jax 0.10) mallocs the fused intermediate
  assert result["stats"]["malloc_reused"] >= 5, result
  assert result["mapped"][-1] == result["mapped"][1], result
  assert result["stats"]["mapped"] == 0 and result["stats"]["reused"] == 0  # scratch: glibc's


def test_setup_returns_the_buffers_the_library_kept_while_setting_up(library):
  # DA-VPT's set-up builds its class examples on the host (here 400 images: a 2.4 MB float64
  # draw, then 1.2 MB in float32, over the 1 MiB floor set for this test) and frees them once
  # the mapping exists. The library keeps freed buffers that large for the steps to reuse;
  # the steps never ask for these sizes, so whatever set-up freed would stay resident for the
  # whole run unless set-up hands it back. Without that hand-back (`scratch.release` made a
  # no-op) the same set-up leaves blocks kept.
  out = run_preloaded(library, """
import json, sys
sys.path.insert(0, TESTS_DIR)
import numpy as np
from jvt import scratch
from jvt.train import loop
from helpers_train import SMALL_TUNING, tiny_config
config = tiny_config(method="da_vpt", batch=8)
config.unlock()
config.tuning = dict(method="da_vpt", **SMALL_TUNING["da_vpt"])
config.lock()
def class_examples(k):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((400, 16, 16, 3)).astype(np.float32)
  return images, np.arange(400, dtype=np.int32) % 4
def kept_after_setup():
  loop.setup(config, num_classes=4, steps_per_epoch=10, class_examples=class_examples)
  return scratch.stats()
release = scratch.release
scratch.release = lambda: None
without = kept_after_setup()
scratch.release = release
release()
print(json.dumps(dict(without=without, stats=kept_after_setup())))
""".replace("TESTS_DIR", repr(os.path.dirname(os.path.abspath(__file__)))),
                       {"JVT_SCRATCH_MALLOC_MIN_MB": "1"})
  result = __import__("json").loads(out.strip().splitlines()[-1])
  assert result["without"]["kept"] >= 2, result  # the float64 draw and the float32 images
  assert result["stats"]["malloc_mapped"] > result["without"]["malloc_mapped"], result
  assert result["stats"]["kept"] == 0, result


def test_slots_follow_the_cpu_device_count(library):
  out = run_preloaded(library, """
from jvt import scratch
from jvt.train import sharding
before = scratch.stats()["slots"]
sharding.use_cpu_devices(3)
print(before, scratch.stats()["slots"])
""")
  assert out.split() == ["1", "3"]
  out = run_preloaded(library, "from jvt import scratch; print(scratch.stats()['slots'])",
                      {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert out.split() == ["4"]


def test_jitted_steps_reuse_one_block_and_compute_the_same(library):
  out = run_preloaded(library, """
import json
import jax, jax.numpy as jnp, numpy as np
from jvt import scratch
x = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)
@jax.jit
def step(x):
  h = jnp.tanh(x @ x.T)   # [512, 512] temporaries: the program's scratch block is ~MBs
  return h @ x + jnp.sin(h).sum()
mapped = []
for _ in range(6):
  y = np.asarray(step(x))
  mapped.append(scratch.stats()["mapped"])
h = np.tanh(x.astype(np.float64) @ x.T.astype(np.float64))
ref = h @ x + np.sin(h).sum()
print(json.dumps(dict(err=float(np.abs(y - ref).max() / np.abs(ref).max()), mapped=mapped,
                      stats=scratch.stats())))
""")
  result = __import__("json").loads(out.strip().splitlines()[-1])
  assert result["err"] < 1e-4
  assert result["stats"]["reused"] >= 4
  # After the first steps nothing new is mapped: every later step runs in a kept block.
  assert result["mapped"][-1] == result["mapped"][2]


def test_launcher_preloads_the_library_into_the_command(library, tmp_path):
  env = dict(os.environ, JVT_CACHE_DIR=str(library.parent))
  path = subprocess.run([sys.executable, "-m", "jvt.scratch"], capture_output=True, text=True,
                        env=env, check=True).stdout.strip()
  assert path == str(library)
  proc = subprocess.run(
      [sys.executable, "-m", "jvt.scratch", "--", sys.executable, "-c",
       "import os; from jvt import scratch; print(scratch.active(), os.environ['LD_PRELOAD'])"],
      capture_output=True, text=True, env=env, check=True)
  assert proc.stdout.split() == ["True", str(library)]


def test_main_reuse_scratch_flag_restarts_the_run_with_the_library(library, train_data_dir,
                                                                    tmp_path):
  """`python -m jvt.main --reuse_scratch`: the run restarts preloaded (its last log line is
  the library's counters), and trains to the same trainable weights as without the flag."""
  env = dict(cli_env(tmp_path), JVT_CACHE_DIR=str(library.parent), JVT_SCRATCH_MIN_MB="1")
  env.pop("LD_PRELOAD", None)
  # 128 px (the 16 px images resized; 257 tokens): the step's scratch block is several MB.
  size = "--config.model.image_size=128"
  plain = run_cli(cli_args(train_data_dir, tmp_path / "plain", steps=4) + [size], env)
  reused = run_cli(cli_args(train_data_dir, tmp_path / "reused", steps=4) +
                   [size, "--reuse_scratch"], env)
  assert "jvt.scratch:" not in plain.stderr
  line = next(l for l in reused.stderr.splitlines() if "jvt.scratch: {" in l)
  counters = ast.literal_eval(line[line.index("{"):])
  assert counters["reused"] > 0, line
  a, b = load_trainable(tmp_path / "plain"), load_trainable(tmp_path / "reused")
  assert a.keys() == b.keys()
  for key in a:
    # Same program, same data: only the memory the temporaries live in differs.
    assert (a[key] == b[key]).all(), key


def test_main_reuse_scratch_without_a_compiler_is_one_user_error(train_data_dir, tmp_path):
  env = dict(cli_env(tmp_path), JVT_CACHE_DIR=str(tmp_path / "empty_cache"),
             CC=str(tmp_path / "no_such_cc"))
  proc = run_cli(cli_args(train_data_dir, tmp_path / "w", steps=4) + ["--reuse_scratch"], env,
                 check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("jvt: error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "--reuse_scratch" in errors[0] and "no_such_cc" in errors[0], errors[0]
  assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_main_reuse_scratch_refused_preload_is_one_user_error(train_data_dir, tmp_path):
  """A restarted run that finds the library not loaded (the loader ignored LD_PRELOAD) stops
  with one error line instead of restarting again."""
  env = dict(cli_env(tmp_path), JVT_SCRATCH_RESTARTED="1")
  env.pop("LD_PRELOAD", None)
  proc = run_cli(cli_args(train_data_dir, tmp_path / "w", steps=4) + ["--reuse_scratch"], env,
                 check=False, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("jvt: error:")]
  assert len(errors) == 1 and "not loaded" in errors[0], proc.stderr[-3000:]
  assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
