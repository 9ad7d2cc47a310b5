"""A train step's ceiling: its images/s if every matrix product it runs took the least time any
library on this machine takes for it alone, and nothing else took any time.

    python benchmarks/bound.py --variant S/16 --batch 32 --methods full:dots,vpt_deep:dots \
        --reuse-scratch --out DIR

Why: on a CPU where jvt's and PyTorch's products run at about the same rate, how far ahead of
PyTorch can jvt's step be? Its products are a floor on its time that no change elsewhere in the
step removes. This script measures that floor method by method and, in the same invocation,
times jvt's step and PyTorch's (`run.py`'s and `torch_step.py`'s children, back to back; jvt's
with `--reuse-scratch` as `compare.py` runs it), so the table says how close each is to the
ceiling and the most any step running these products could be ahead of PyTorch's on this
machine (ceiling / PyTorch's images/s).

For each method a child process builds the trainer's step as `run.py` does, traces it, and lists
every matrix product of its live jaxpr (what XLA keeps after dead-code elimination) with how
many times one step runs it: a scan's body times its length (row chunks, gradient accumulation),
a cond's branch with the most product FLOPs, a while loop's body once (the table says if the
step has one). Each distinct product is then timed alone on random operands by every back end
the machine has, and the least time counts:
- `xla`: the product exactly as the step writes it (`lax.dot_general` or
  `lax.conv_general_dilated` with the traced parameters, jitted; a batched product with the
  reduction `jvt.precision` adds so that XLA:CPU runs it on every core);
- `numpy` (fp32 only): numpy's BLAS (OpenBLAS in the wheels) on the product rewritten as
  [B, M, K] @ [B, K, N], and with the right operand stored as [B, N, K] (BLAS's transposed
  form);
- `torch` (when installed): `torch.matmul` on the same two forms, at PyTorch's default threads.
The rewrites move no data inside the timed calls (the operands are laid out beforehand), so the
ceiling gives every product its best layout for free: no step running the same products through
the same libraries can beat it. PyTorch's own step computes more products (every token row, in
every block), so its own ceiling is lower.

On a machine whose speed drifts, `--repeats N` measures each method N times (ceiling, then both
steps, which goes first alternating) and reports the median of the rounds' ratios. CPU only
(the other back ends are CPU libraries; on an accelerator `run.py`'s MFU column is the measure).
Writes `DIR/bound.json` (a row per method, its products with every back end's time) and
`DIR/bound.md`; `--no-steps` leaves out the two steps (the ceiling alone).
"""
from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
PRODUCT_PRIMITIVES = ("dot_general", "conv_general_dilated")


@functools.lru_cache(maxsize=None)
def _load(name: str):
  """benchmarks/<name>.py (this folder is not a package; on sys.path its profile.py would
  shadow the standard library's)."""
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                os.path.join(HERE, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ----------------------------------------------------------------- the products of a jaxpr
def product_key(eqn) -> tuple:
  """What makes two product equations the same product: primitive, operand shapes and dtypes,
  and every parameter (hashable as its repr)."""
  avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
  return (eqn.primitive.name, avals, repr(sorted(eqn.params.items())))


def product_flops(eqn) -> float:
  """2 x multiply-adds of a dot_general or convolution equation."""
  out = eqn.outvars[0].aval.shape
  if eqn.primitive.name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[i] for i in contract)
  rhs = eqn.invars[1].aval.shape
  out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
  return 2.0 * math.prod(out) * math.prod(rhs) / out_features


def step_products(jaxpr) -> tuple[dict[tuple, list], bool]:
  """({key: [an equation, times a step runs it]}, whether a while loop's body was counted once).

  Walks sub-jaxprs as `run.jaxpr_flops` does: a scan's body times its length, a cond's branch
  with the most product FLOPs, any other call once."""
  from jax.extend import core as jex
  found: dict[tuple, list] = {}
  saw_while = False

  def walk(j, times: int) -> None:
    nonlocal saw_while
    for eqn in getattr(j, "jaxpr", j).eqns:
      name, params = eqn.primitive.name, eqn.params
      if name in PRODUCT_PRIMITIVES:
        found.setdefault(product_key(eqn), [eqn, 0])[1] += times
      elif name == "scan":
        walk(params["jaxpr"], times * params["length"])
      elif name == "cond":
        walk(max(params["branches"], key=_branch_flops), times)
      else:
        saw_while |= name == "while"
        for sub in jex.jaxprs_in_params(params):
          walk(sub, times)

  walk(jaxpr, 1)
  return found, saw_while


def _branch_flops(branch) -> float:
  found, _ = step_products(branch)
  return sum(product_flops(eqn) * times for eqn, times in found.values())


# ------------------------------------------------------------------- one product, timed
def blas_form(dimension_numbers, lhs_shape, rhs_shape):
  """(lhs axes order, rhs axes order, B, M, K, N) that rewrite a dot_general as
  [B, M, K] @ [B, K, N]: lhs transposed to (batch, free, contracted), rhs to
  (batch, contracted, free); the result's [B, M, N] is the dot_general's in its own order
  (batch, lhs free, rhs free)."""
  (lc, rc), (lb, rb) = dimension_numbers
  lf = [i for i in range(len(lhs_shape)) if i not in lc and i not in lb]
  rf = [i for i in range(len(rhs_shape)) if i not in rc and i not in rb]
  size = lambda shape, axes: math.prod(shape[i] for i in axes)
  return (list(lb) + lf + list(lc), list(rb) + list(rc) + rf, size(lhs_shape, lb),
          size(lhs_shape, lf), size(lhs_shape, lc), size(rhs_shape, rf))


def operands(eqn, rng):
  """Random normal operands of the equation's shapes, as float32 numpy arrays."""
  return [rng.standard_normal(v.aval.shape, dtype="float32") for v in eqn.invars]


def xla_call(eqn, a, b) -> Callable[[], object]:
  """The equation's own primitive with its own parameters, jitted; a batched dot_general's
  result through `jvt.precision._on_both_cores`, as the model runs its batched products."""
  import jax
  import jax.numpy as jnp
  from jvt import precision
  a, b = (jnp.asarray(x, v.aval.dtype) for x, v in zip((a, b), eqn.invars))
  batched = eqn.primitive.name == "dot_general" and eqn.params["dimension_numbers"][1][0]
  finish = precision._on_both_cores if batched else (lambda c: c)
  f = jax.jit(lambda a, b: finish(eqn.primitive.bind(a, b, **eqn.params)))
  return lambda: f(a, b)


def matmul_calls(eqn, a, b, library: str) -> dict[str, Callable[[], object]]:
  """numpy's or torch's matmul on the [B, M, K] @ [B, K, N] form and on the right operand
  stored as [B, N, K] ("nt"), operands laid out before any call."""
  import numpy as np
  lo, ro, nb, m, k, n = blas_form(eqn.params["dimension_numbers"], a.shape, b.shape)
  a3 = np.ascontiguousarray(a.transpose(lo).reshape(nb, m, k))
  b3 = np.ascontiguousarray(b.transpose(ro).reshape(nb, k, n))
  b3t = np.ascontiguousarray(b3.transpose(0, 2, 1))
  if library == "numpy":
    return {"numpy": lambda: np.matmul(a3, b3),
            "numpy nt": lambda: np.matmul(a3, b3t.transpose(0, 2, 1))}
  import torch
  dtype = getattr(torch, str(eqn.invars[0].aval.dtype))
  ta, tb, tbt = (torch.from_numpy(x).to(dtype) for x in (a3, b3, b3t))
  return {"torch": lambda: torch.matmul(ta, tb), "torch nt": lambda: torch.matmul(ta, tbt.mT)}


def _calls_for(fn, sync, budget_s: float) -> int:
  """Calls per timed round so that a round takes about `budget_s`."""
  sync(fn())
  t0 = time.perf_counter()
  sync(fn())
  return max(1, int(budget_s / max(time.perf_counter() - t0, 1e-6)))


def time_product(eqn, rng, rounds: int, budget_s: float, with_torch: bool) -> dict[str, float]:
  """Milliseconds per call of every back end that can run the equation's product."""
  import jax
  time_calls = _load("products").time_calls
  a, b = operands(eqn, rng)
  calls = {"xla": (xla_call(eqn, a, b), jax.block_until_ready)}
  if eqn.primitive.name == "dot_general":
    if str(eqn.invars[0].aval.dtype) == "float32" == str(eqn.invars[1].aval.dtype):
      calls.update((k, (f, lambda x: x)) for k, f in matmul_calls(eqn, a, b, "numpy").items())
    if with_torch:
      calls.update((k, (f, lambda x: x)) for k, f in matmul_calls(eqn, a, b, "torch").items())
  return {name: time_calls(fn, sync, rounds, _calls_for(fn, sync, budget_s))[0]
          for name, (fn, sync) in calls.items()}


def _describe(eqn) -> str:
  """The product in short: 'dot [8,197,384] x [384,1536], contract (2,),(0,)'."""
  shapes = " x ".join("[" + ",".join(map(str, v.aval.shape)) + "]" for v in eqn.invars)
  if eqn.primitive.name == "dot_general":
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    dims = f"contract {tuple(lc)},{tuple(rc)}" + (f" batch {tuple(lb)},{tuple(rb)}" if lb else "")
    return f"dot {shapes}, {dims}"
  return f"conv {shapes}"


def measure(spec: dict) -> dict:
  """One method's products (traced from its step) and each one's times: the ceiling's row."""
  import jax
  import numpy as np
  from jvt import train
  from jvt.train import sharding
  if jax.default_backend() != "cpu":
    raise SystemExit(f"bound.py times the products with CPU libraries (numpy's BLAS, PyTorch on "
                     f"CPU) beside XLA, but JAX runs on {jax.default_backend()}: run it with "
                     f"JAX_PLATFORMS=cpu, or use run.py's MFU column on an accelerator.")
  run = _load("run")
  config = run.bench_config(spec)
  rng = np.random.default_rng(spec["seed"])
  b, size, classes = spec["batch"], spec["image_size"], spec["num_classes"]
  s = train.setup(config, num_classes=classes, steps_per_epoch=10**9,
                  class_examples=run.random_class_examples(rng, classes, size))
  host = {"image": np.zeros((b, size, size, 3), np.float32), "label": np.zeros((b,), np.int32)}
  batch = sharding.shard_batch(host, s.mesh)
  traced = s.train_step.trace(s.state, s.frozen, s.constants, batch).jaxpr
  found, saw_while = step_products(run.live_jaxpr(traced))
  forward_chunks = s.forward_chunks
  del s, batch, traced
  gc.collect()
  products = []
  for eqn, times in found.values():
    ms = time_product(eqn, rng, spec["rounds"], spec["budget_s"], spec["with_torch"])
    best = min(ms, key=ms.get)
    products.append(dict(product=_describe(eqn), dtype=str(eqn.invars[0].aval.dtype),
                         times_per_step=times, gflop=product_flops(eqn) / 1e9, ms=ms,
                         best=best, best_ms=ms[best]))
  products.sort(key=lambda p: -p["times_per_step"] * p["best_ms"])
  floor_ms = sum(p["times_per_step"] * p["best_ms"] for p in products)
  xla_ms = sum(p["times_per_step"] * p["ms"]["xla"] for p in products)
  return dict(method=spec["method"], remat=spec["remat"], variant=spec["variant"], batch=b,
              image_size=size, dtype=spec["dtype"], forward_chunks=forward_chunks,
              backend=jax.default_backend(), while_loop_counted_once=saw_while,
              step_gflop_per_img=sum(p["times_per_step"] * p["gflop"] for p in products) / b,
              floor_ms=floor_ms, ceiling_img_s=b / floor_ms * 1e3,
              xla_products_ms=xla_ms, products=products)


def run_child(spec: dict, timeout: float | None) -> dict:
  """Runs `measure(spec)` in a fresh interpreter and returns its row."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"ceiling of {spec['method']} failed with exit code {proc.returncode}:\n"
                       f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1])


RATIOS = (("jvt_over_ceiling", "jvt_img_s", "ceiling_img_s"),
          ("torch_over_ceiling", "torch_img_s", "ceiling_img_s"),
          ("ceiling_over_torch", "ceiling_img_s", "torch_img_s"))


def rounds_of(spec: dict, args: argparse.Namespace, with_torch: bool) -> dict:
  """One method's row over `args.repeats` rounds, each the ceiling's child and then (unless
  --no-steps) jvt's and PyTorch's steps, which goes first alternating between rounds. The row
  keeps the products of the round with the median ceiling; each ratio is the median of the
  rounds' own ratios (the machine's speed drifts between rounds, less within one)."""
  rounds = []
  for r in range(args.repeats):
    row = run_child(dict(spec, rounds=args.rounds, budget_s=args.round_seconds,
                         with_torch=with_torch), args.timeout)
    if not args.no_steps:
      sides = [("jvt_img_s", _load("run"), dict(spec, reuse_scratch=args.reuse_scratch)),
               ("torch_img_s", _load("torch_step"), dict(spec, device="cpu"))]
      for key, module, side_spec in (sides if r % 2 == 0 else sides[::-1]):
        row[key] = module.run_child(side_spec, args.timeout)["train_img_s"]
    for name, num, den in RATIOS:
      row[name] = _ratio(row.get(num), row.get(den))
    rounds.append(row)
  by_ceiling = sorted(rounds, key=lambda x: x["ceiling_img_s"])
  out = dict(by_ceiling[(len(rounds) - 1) // 2])
  for key in ("jvt_img_s", "torch_img_s") + tuple(name for name, _, _ in RATIOS):
    values = [x[key] for x in rounds if x.get(key) is not None]
    if values:
      out[key] = statistics.median(values)
      out[key + "_range"] = (min(values), max(values))
  out["rounds"] = [{k: x.get(k) for k in ("ceiling_img_s", "floor_ms", "jvt_img_s",
                                           "torch_img_s")} for x in rounds]
  return out


# ------------------------------------------------------------------------------ the table
def _f(x, spec=".2f", suffix=""):
  return "-" if x is None else f"{x:{spec}}{suffix}"


def _ratio(a, b):
  return a / b if a and b else None


def _with_range(row: dict, key: str, suffix: str) -> str:
  text = _f(row.get(key), ".2f", suffix)
  lo, hi = row.get(key + "_range") or (None, None)
  return text + (f" ({lo:.2f}-{hi:.2f})" if lo is not None and lo != hi else "")


def markdown(rows: Sequence[dict], header: str) -> str:
  """The summary table (a row per method) and each method's products, heaviest first."""
  out = [header, "",
         "| method | GFLOP / img (products) | product floor, ms a step (jvt's XLA alone) | "
         "ceiling img/s | jvt img/s | PyTorch img/s | jvt / ceiling | PyTorch / ceiling | "
         "ceiling / PyTorch |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    label = r["method"] + (f" ({r['remat']})" if r["remat"] != "none" else "")
    ratios = " | ".join(_with_range(r, name, "x" if name == "ceiling_over_torch" else "")
                        for name, _, _ in RATIOS)
    out.append(
        f"| {label} | {r['step_gflop_per_img']:.2f} | {r['floor_ms']:.0f} "
        f"({r['xla_products_ms']:.0f}) | {r['ceiling_img_s']:.2f} | {_f(r.get('jvt_img_s'))} | "
        f"{_f(r.get('torch_img_s'))} | {ratios} |")
  if rows and len(rows[0].get("rounds", [])) > 1:
    out += ["", f"Over {len(rows[0]['rounds'])} rounds: the ceiling and its products from the "
            "round with the median ceiling, images/s and each ratio the median of the rounds' "
            "(range)."]
  for r in rows:
    backends = sorted({k for p in r["products"] for k in p["ms"]})
    out += ["", f"### {r['method']} ({r['remat']}): its products, ms a call"
            + (" (a while loop's body counted once)" if r["while_loop_counted_once"] else ""), "",
            "| product | dtype | a step | GFLOP | " + " | ".join(backends)
            + " | best GFLOP/s | ms a step at best |",
            "|---|---|---:|---:|" + "---:|" * (len(backends) + 2)]
    for p in r["products"]:
      cells = [_f(p["ms"].get(k), ".3f") for k in backends]
      out.append(f"| {p['product']} | {p['dtype']} | {p['times_per_step']} | {p['gflop']:.3f} | "
                 + " | ".join(cells) + f" | {p['gflop'] / p['best_ms'] * 1e3:.0f} | "
                 f"{p['times_per_step'] * p['best_ms']:.1f} |")
  return "\n".join(out) + "\n"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="S/16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--methods", default="full,vpt_deep",
                 help="Comma-separated; METHOD:REMAT builds jvt's step with that remat policy.")
  p.add_argument("--num-prompts", type=int, default=10)
  p.add_argument("--num-classes", type=int, default=100)
  p.add_argument("--forward-chunk-rows", type=int, default=0,
                 help="config.forward_chunk_rows (0: the trainer's choice).")
  p.add_argument("--overrides", default="{}", help="JSON of ViT fields (jvt names).")
  p.add_argument("--rounds", type=int, default=3, help="Timed rounds per product and back end.")
  p.add_argument("--round-seconds", type=float, default=0.1,
                 help="About how long one timed round of calls takes.")
  p.add_argument("--reuse-scratch", action="store_true",
                 help="jvt's step runs with jvt.scratch's library preloaded (as compare.py's "
                      "flag); the ceiling and PyTorch's step are unchanged by it.")
  p.add_argument("--no-steps", action="store_true",
                 help="Only the ceiling: do not time jvt's and PyTorch's steps.")
  p.add_argument("--repeats", type=int, default=1,
                 help="Rounds of (ceiling, both steps) per method; medians over rounds.")
  p.add_argument("--steps", type=int, default=5, help="Timed steps of each side's step.")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--timeout", type=float, default=None, help="Seconds per child.")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if not args.methods:
    p.error("--methods is empty.")
  if args.rounds < 1 or args.repeats < 1 or args.round_seconds <= 0:
    p.error("--rounds and --repeats must be >= 1 and --round-seconds > 0.")
  try:
    args.overrides = json.loads(args.overrides)
  except json.JSONDecodeError as err:
    p.error(f"--overrides is not valid JSON ({err}).")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  repo = os.path.dirname(HERE)
  if repo not in sys.path:  # this checkout's jvt, also where another one is installed
    sys.path.insert(0, repo)
  if argv[:1] == ["--child"]:
    print(json.dumps(measure(json.loads(argv[1]))), flush=True)
    return 0
  args = parse(argv)
  compare = _load("compare")
  with_torch = importlib.util.find_spec("torch") is not None
  if not args.no_steps and (not with_torch or importlib.util.find_spec("timm") is None):
    raise SystemExit("PyTorch's step needs torch and timm: pip install -e \".[bench]\", or "
                     "pass --no-steps for the ceiling alone.")
  for text in args.methods:
    try:
      _load("run").tuning_for(compare.parse_method(text)[0], args.num_prompts)
    except ValueError as err:
      raise SystemExit(str(err)) from None
  uptime_before = compare.uptime()
  base = dict(variant=args.variant, batch=args.batch, eval_batch=args.batch,
              image_size=args.image_size, dtype=args.dtype, num_prompts=args.num_prompts,
              num_classes=args.num_classes, overrides=args.overrides, seed=0,
              forward_chunk_rows=args.forward_chunk_rows, steps=args.steps, warmup=args.warmup)
  os.makedirs(args.out, exist_ok=True)
  rows, failed = [], False
  for text in args.methods:
    method, remat = compare.parse_method(text)
    try:
      row = rounds_of(dict(base, method=method, remat=remat), args, with_torch)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
      print(err, file=sys.stderr)
      failed = True
      continue
    rows.append(row)
    print(f"{text:>16}: ceiling {row['ceiling_img_s']:.2f} img/s, jvt "
          f"{_f(row.get('jvt_img_s'))}, torch {_f(row.get('torch_img_s'))}", file=sys.stderr)
  detail = compare.cpu_detail()
  header = (f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, CPU {compare.cpu_model()}"
            f"{f' ({detail})' if detail else ''}, {os.cpu_count()} CPUs. ViT-{args.variant}, "
            f"batch {args.batch}, {args.image_size} px, {args.dtype}. uptime before: "
            f"{uptime_before}; after: {compare.uptime()}.\n\n`python benchmarks/bound.py "
            + " ".join(shlex.quote(a) for a in argv) + "`")
  with open(os.path.join(args.out, "bound.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(args.out, "bound.md"), "w") as f:
    f.write(markdown(rows, header))
  print(markdown(rows, header))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
