"""One ViT block's matrix products, each alone: milliseconds, GFLOP/s and cores used.

    python benchmarks/products.py --variant S/16 --batch 8 --dtype bfloat16 --torch --out DIR

Why: `profile.py --trace` times each product inside the step, where independent operations
run at the same time and share the cores, so a product's time there mixes its kernel with
its neighbours. Alone, a product shows what the backend's kernel makes of its shape and
layout, and `--torch` puts PyTorch's kernel for the same shape beside it.

Every product of a block's train step: the forward, input-gradient and weight-gradient
products of the four projections (query, key and value share one shape) and the two attention
products (q.k^T, p.v) with their gradients, at the variant's widths, `--batch` images and
(image / patch)^2 + 1 tokens. jvt's side is `jvt.precision.einsum`, jitted: the function the
model's projections and attention call (on CPU in bf16: bf16 operands, fp32 accumulation and
result). PyTorch's side (`--torch`) is `torch.einsum` on the same operands in `--dtype` (result
in that dtype, as autocast runs products) at PyTorch's default threads. The table's header
names the date, the CPU (family, model, ISA) and the load before and after.

Cores used: the process's CPU time (user + system) over the wall time of the timed calls; 1.0
is one core busy. Only on CPU (elsewhere the host's time says nothing about the device).
Writes `DIR/products.json` (one object per product) and `DIR/products.md`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from typing import Callable, Sequence

# (name, calls per block, spec). Indices: b batch, t / q / k tokens, d model width, f MLP
# width, h heads, e head width. The gradient specs are those of `jvt.precision._grad_specs`,
# written out so that this table is checked against it (tests/test_benchmark.py).
PRODUCTS = (
    ("qkv projection", 3, "btd,dhe->bthe"),
    ("qkv projection: input grad", 3, "bthe,dhe->btd"),
    ("qkv projection: weight grad", 3, "bthe,btd->dhe"),
    ("out projection", 1, "bthe,hed->btd"),
    ("out projection: input grad", 1, "btd,hed->bthe"),
    ("out projection: weight grad", 1, "btd,bthe->hed"),
    ("mlp in", 1, "btd,df->btf"),
    ("mlp in: input grad", 1, "btf,df->btd"),
    ("mlp in: weight grad", 1, "btf,btd->df"),
    ("mlp out", 1, "btf,fd->btd"),
    ("mlp out: input grad", 1, "btd,fd->btf"),
    ("mlp out: weight grad", 1, "btd,btf->fd"),
    ("attention q.k", 1, "bhqe,bhke->bhqk"),
    ("attention q.k: query grad", 1, "bhqk,bhke->bhqe"),
    ("attention q.k: key grad", 1, "bhqk,bhqe->bhke"),
    ("attention p.v", 1, "bhqk,bhke->bhqe"),
    ("attention p.v: probs grad", 1, "bhqe,bhke->bhqk"),
    ("attention p.v: value grad", 1, "bhqe,bhqk->bhke"),
)


def index_sizes(variant: str, batch: int, image_size: int) -> dict[str, int]:
  """The size of every index letter of PRODUCTS for a variant at `batch` images."""
  from jvt.models.variants import variant_config
  v = variant_config(variant)
  tokens = (image_size // v["patch_size"]) ** 2 + 1
  return dict(b=batch, t=tokens, q=tokens, k=tokens, d=v["hidden_size"], f=v["mlp_dim"],
              h=v["num_heads"], e=v["hidden_size"] // v["num_heads"])


def operand_shapes(spec: str, sizes: dict[str, int]) -> tuple[tuple[int, ...], ...]:
  """The two operands' shapes of "A,B->C"."""
  a, b = spec.split("->")[0].split(",")
  return tuple(sizes[i] for i in a), tuple(sizes[i] for i in b)


def gflop(spec: str, sizes: dict[str, int]) -> float:
  """2 x the product of every distinct index's size (one multiply-add each), in GFLOP."""
  letters = set(spec.replace(",", "").replace("->", ""))
  return 2 * math.prod(sizes[i] for i in letters) / 1e9


def time_calls(fn: Callable[[], object], sync: Callable[[object], object], rounds: int,
               calls: int) -> tuple[float, float]:
  """(median ms per call over `rounds` rounds of `calls` calls, CPU time / wall time)."""
  sync(fn())  # warm-up (and compilation for jax)
  per_call, cpu, wall = [], 0.0, 0.0
  for _ in range(rounds):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(calls):
      out = fn()
    sync(out)
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    per_call.append(dt / calls * 1e3)
    cpu += (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    wall += dt
  return statistics.median(per_call), cpu / wall


def jvt_product(spec: str, a, b, dtype: str) -> Callable[[], object]:
  """A call of jitted `jvt.precision.einsum(spec, a, b, dtype)` on the numpy operands a, b
  (placed on the device in `dtype` once, outside the timed calls)."""
  import jax
  import jax.numpy as jnp
  from jvt import precision
  a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
  f = jax.jit(lambda a, b: precision.einsum(spec, a, b, jnp.dtype(dtype)))
  return lambda: f(a, b)


def torch_product(spec: str, a, b, dtype: str) -> Callable[[], object]:
  """A call of `torch.einsum(spec, a, b)` on the numpy operands a, b in `dtype`."""
  import torch
  a, b = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in (a, b))
  return lambda: torch.einsum(spec, a, b)


def measure(variant: str, batch: int, image_size: int, dtype: str, rounds: int, calls: int,
            with_torch: bool, seed: int = 0) -> list[dict]:
  """One row per product of PRODUCTS: jvt's (and with_torch, PyTorch's) time on the same
  random normal operands."""
  import jax
  import numpy as np
  sizes = index_sizes(variant, batch, image_size)
  on_cpu = jax.default_backend() == "cpu"
  rng = np.random.default_rng(seed)
  rows = []
  for name, per_block, spec in PRODUCTS:
    shapes = operand_shapes(spec, sizes)
    a, b = (rng.standard_normal(s, dtype=np.float32) for s in shapes)
    work = gflop(spec, sizes)
    ms, cores = time_calls(jvt_product(spec, a, b, dtype), jax.block_until_ready, rounds, calls)
    row = dict(product=name, spec=spec, calls_per_block=per_block, shapes=shapes, gflop=work,
               jvt_ms=ms, jvt_gflops=work / ms * 1e3, jvt_cores=cores if on_cpu else None)
    if with_torch:
      ms_t, cores_t = time_calls(torch_product(spec, a, b, dtype), lambda x: x, rounds, calls)
      row.update(torch_ms=ms_t, torch_gflops=work / ms_t * 1e3, torch_cores=cores_t,
                 speed_ratio=ms_t / ms)
    rows.append(row)
  return rows


def _f(x, spec=".1f"):
  return "-" if x is None else format(x, spec)


def markdown(rows: Sequence[dict], header: str) -> str:
  has_torch = "torch_ms" in rows[0]
  cols = ["product", "spec", "GFLOP", "jvt ms", "jvt GFLOP/s", "jvt cores"]
  if has_torch:
    cols += ["torch ms", "torch GFLOP/s", "torch cores", "jvt speed / torch"]
  out = [header, "", "| " + " | ".join(cols) + " |",
         "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
  for r in rows:
    cells = [r["product"], f"`{r['spec']}`", _f(r["gflop"], ".3f"), _f(r["jvt_ms"], ".2f"),
             _f(r["jvt_gflops"], ".0f"), _f(r["jvt_cores"], ".2f")]
    if has_torch:
      cells += [_f(r["torch_ms"], ".2f"), _f(r["torch_gflops"], ".0f"),
                _f(r["torch_cores"], ".2f"), _f(r["speed_ratio"], ".2f") + "x"]
    out.append("| " + " | ".join(cells) + " |")
  block = {side: sum(r[f"{side}_ms"] * r["calls_per_block"] for r in rows)
           for side in ("jvt", "torch") if f"{side}_ms" in rows[0]}
  total = (f"One block's products, each counted as often as a train step runs it: jvt "
           f"{block['jvt']:.1f} ms")
  if has_torch:
    total += f", PyTorch {block['torch']:.1f} ms"
  return "\n".join(out + ["", total + " (no remat: forward once).", ""])


def _load_compare():
  """benchmarks/compare.py, for its CPU description (this folder is not a package)."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare.py")
  spec = importlib.util.spec_from_file_location("benchmarks_compare", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv: Sequence[str] | None = None) -> int:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if repo not in sys.path:  # this checkout's jvt, also where another one is installed
    sys.path.insert(0, repo)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="S/16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--calls", type=int, default=10, help="Calls per timed round.")
  p.add_argument("--torch", action="store_true", help="Also time PyTorch's einsum.")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  if args.rounds < 1 or args.calls < 1:
    p.error("--rounds and --calls must be >= 1.")
  if args.torch:
    try:
      import torch  # noqa: F401
    except ImportError:
      p.error("--torch needs PyTorch: pip install -e '.[bench]'.")
  import jax
  load_before = os.getloadavg()[0]
  rows = measure(args.variant, args.batch, args.image_size, args.dtype, args.rounds,
                 args.calls, args.torch)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "products.json"), "w") as f:
    json.dump(rows, f, indent=1)
  compare = _load_compare()
  detail = compare.cpu_detail()
  header = (f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC. ViT-{args.variant}, batch "
            f"{args.batch}, {args.image_size} px, {args.dtype}, jax {jax.__version__} backend "
            f"{jax.default_backend()} ({jax.devices()[0].device_kind}), CPU "
            f"{compare.cpu_model()}{f' ({detail})' if detail else ''}, "
            f"{os.cpu_count()} CPUs, 1-minute load {load_before:.2f} before and "
            f"{os.getloadavg()[0]:.2f} after; median of {args.rounds} "
            f"rounds of {args.calls} calls.\n\n`python benchmarks/products.py "
            + " ".join(sys.argv[1:] if argv is None else argv) + "`")
  with open(os.path.join(args.out, "products.md"), "w") as f:
    f.write(markdown(rows, header))
  print(markdown(rows, header))
  return 0


if __name__ == "__main__":
  sys.exit(main())
