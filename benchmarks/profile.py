"""What XLA makes of one method's train step: FLOPs, bytes, buffers, the optimised HLO, a trace.

    python benchmarks/profile.py --method vpt_deep --variant S/16 --batch 8 --out DIR
    python benchmarks/profile.py --method da_vpt --trace 3 --out DIR   # + a jax.profiler trace

Builds the run exactly as `benchmarks/run.py` does (the trainer's `setup` and jitted, donated
`train_step`), compiles the step and writes to DIR:
  * `<method>.json`: FLOPs, transcendentals and bytes accessed per image (XLA's cost analysis),
    and the executable's argument / output / temp buffer sizes;
  * `<method>.hlo.txt`: the optimised HLO module (fusions, copies, what was rematerialised);
  * with `--trace N`: a `jax.profiler` trace of N steps under `DIR/trace/` (open it with
    TensorBoard's profile plugin or Perfetto), and `<method>.ops.md`: the milliseconds per
    step of every HLO operation, read from the trace and named by the model code that made it
    (`encoderblock_<i>` folded to `block`, so a row is one operation of every block). This
    table found the backward chain that XLA:CPU fused into every block (docs/performance.md).
Cost analysis and buffer sizes do not depend on machine load, so they compare methods even
when timings cannot.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time


def profile(spec: dict, out: str, trace_steps: int = 0) -> dict:
  """Compiles one method's train step and writes its cost, buffers, HLO (and trace) to `out`."""
  import jax
  import numpy as np
  import run
  from jvt import train
  from jvt.train import sharding

  config = run.bench_config(spec)
  b, size, classes = spec["batch"], spec["image_size"], spec["num_classes"]
  rng = np.random.default_rng(spec["seed"])
  s = train.setup(config, num_classes=classes, steps_per_epoch=10**9,
                  class_examples=lambda k: (
                      rng.standard_normal((classes, size, size, 3)).astype(np.float32),
                      np.arange(classes, dtype=np.int32)))
  batch = sharding.shard_batch(
      {"image": rng.standard_normal((b, size, size, 3)).astype(np.float32),
       "label": rng.integers(0, classes, b).astype(np.int32)}, s.mesh)
  t0 = time.perf_counter()
  step = s.train_step.lower(s.state, s.frozen, s.constants, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = run.step_cost(s, batch, step)  # a chunked step's counted as the step in one piece
  mem = step.memory_analysis()
  name = spec["method"] if spec["remat"] == "none" else f"{spec['method']}_remat_{spec['remat']}"
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{name}.hlo.txt"), "w") as f:
    f.write(step.as_text())
  report = {
      "method": spec["method"], "remat": spec["remat"], "variant": spec["variant"], "batch": b,
      "dtype": spec["dtype"], "compile_s": compile_s, "trainable_params": s.trainable_params,
      "forward_chunks": s.forward_chunks,
      "gflop_per_img": cost.get("flops", 0.0) / b / 1e9,
      "transcendentals_per_img": cost.get("transcendentals", 0.0) / b,
      "gbytes_accessed_per_img": cost.get("bytes accessed", 0.0) / b / 1e9,
      "argument_mb": mem.argument_size_in_bytes / 2**20,
      "output_mb": mem.output_size_in_bytes / 2**20,
      "alias_mb": mem.alias_size_in_bytes / 2**20,
      "temp_mb": mem.temp_size_in_bytes / 2**20,
  }
  if trace_steps:
    state = s.state
    state, _ = jax.block_until_ready(step(state, s.frozen, s.constants, batch))  # warm-up
    trace_dir = os.path.join(out, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(trace_steps):
        state, metrics = step(state, s.frozen, s.constants, batch)
        jax.block_until_ready((state, metrics))
    found = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True))
    if found:
      with gzip.open(found[-1]) as f:
        events = json.load(f)
      events = events["traceEvents"] if isinstance(events, dict) else events
      rows = op_table(events, hlo_op_names(step.as_text()), trace_steps)
      with open(os.path.join(out, f"{name}.ops.md"), "w") as f:
        f.write(ops_markdown(rows, report))
  with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report


def _computations(hlo: str) -> tuple[str, dict[str, list[str]]]:
  """(the ENTRY computation's name, {computation: its instruction lines}) of an HLO module."""
  comps, entry, current = {}, "", None
  for line in hlo.splitlines():
    header = re.match(r"(ENTRY )?%(\S+) \(", line)
    if header and line.rstrip().endswith("{"):
      current = header.group(2)
      comps[current] = []
      entry = current if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      comps[current].append(line)
  return entry, comps


# Computations a control-flow instruction runs as thunks of their own (a fusion's `calls=` and
# a reduction's `to_apply=` run inside one kernel and get no trace events).
_RUNS = re.compile(r" (?:while|call|conditional)\(")
_CALLED = re.compile(r"\b(?:condition|body|to_apply|true_computation|false_computation)=%([^\s,]+)"
                     r"|branch_computations=\{([^}]*)\}")


def hlo_op_names(hlo: str) -> dict[str, tuple[str, str]]:
  """{instruction: (the op_name of the model code that made it, result shape)} for every
  instruction the runtime executes: the optimised module's ENTRY computation and, through its
  `while` / `call` / `conditional` instructions, the computations they run (a step in row
  chunks runs its forward and backward inside `lax.map`'s while loop). `jit(...)/` is dropped
  and `encoderblock_<i>` folded to `block`."""
  entry, comps = _computations(hlo)
  runtime, todo = set(), [entry]
  while todo:
    comp = todo.pop()
    if comp in runtime or comp not in comps:
      continue
    runtime.add(comp)
    for line in comps[comp]:
      if _RUNS.search(line):
        for single, group in _CALLED.findall(line):
          todo.extend([single] if single else re.findall(r"%([^\s,]+)", group))
  names = {}
  for comp in runtime:
    for line in comps[comp]:
      m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]+)\"", line)
      if m:
        op = re.sub(r"encoderblock_\d+", "block", m.group(3))
        names[m.group(1)] = (re.sub(r"^jit\([^)]*\)/", "", op), m.group(2))
  return names


def op_table(events, names: dict, steps: int) -> list[dict]:
  """Trace events ("X" events named by HLO instruction) summed per (op_name, shape): ms per
  step and calls per step, slowest first. Events of other names (runtime, Python) are left
  out. Operations that ran concurrently on several threads each count in full."""
  total, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in names:
      key = names[e["name"]]
      total[key] += float(e.get("dur", 0.0))  # microseconds
      calls[key] += 1
  return [{"op": op, "shape": shape, "ms_per_step": us / 1e3 / steps,
           "calls_per_step": calls[(op, shape)] / steps}
          for (op, shape), us in total.most_common()]


def ops_markdown(rows: list[dict], report: dict, limit: int = 60) -> str:
  """The slowest `limit` rows of `op_table` with their share of the summed time."""
  summed = sum(r["ms_per_step"] for r in rows) or 1.0
  lines = [f"{report['method']}, ViT-{report['variant']}, batch {report['batch']}, "
           f"{report['dtype']}, remat {report['remat']}: {summed:.1f} ms of operations per "
           "step (summed over threads)", "",
           "| ms / step | share | calls / step | result | operation |", "|---:|---:|---:|---|---|"]
  for r in rows[:limit]:
    lines.append(f"| {r['ms_per_step']:.1f} | {100 * r['ms_per_step'] / summed:.1f}% | "
                 f"{r['calls_per_step']:g} | `{r['shape']}` | `{r['op']}` |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--method", required=True)
  p.add_argument("--variant", default="S/16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--remat", choices=("none", "full", "dots", "nothing"), default="none")
  p.add_argument("--num-prompts", type=int, default=10)
  p.add_argument("--num-classes", type=int, default=100)
  p.add_argument("--overrides", default="{}", help="JSON of ViT fields.")
  p.add_argument("--trace", type=int, default=0, help="Steps to trace with jax.profiler (0: none).")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for path in (repo, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
      sys.path.insert(0, path)
  spec = dict(method=args.method, variant=args.variant, batch=args.batch,
              eval_batch=args.batch, image_size=args.image_size, dtype=args.dtype,
              remat=args.remat, steps=1, warmup=0, num_prompts=args.num_prompts,
              num_classes=args.num_classes, overrides=json.loads(args.overrides), seed=0)
  print(json.dumps(profile(spec, args.out, args.trace), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
