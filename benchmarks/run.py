"""Speed, memory and compile time of every tuning method, through the trainer's own step.

    python benchmarks/run.py --variant S/16 --batch 8 --image-size 224 \
        --methods full,linear,vpt_deep,da_vpt,lora,adapter,adaptformer,bitfit,ssf --out DIR

For each method (and each `--remat` policy) a fresh subprocess builds the run with
`jvt.train.setup` (random backbone, synthetic random batches, no dataset), compiles the same
jitted, donated `train_step` the trainer runs, and times `--steps` steps after `--warmup`
warm-up steps, with `jax.block_until_ready` around each step. It then times the eval step the
same way. Writes `DIR/results.json` (one object per row) and `DIR/results.md` (a table with the
ratios to full fine-tuning and DA-VPT vs VPT-Deep, and the performance goals met or missed).
On a GPU or TPU whose bf16 peak is listed (`BF16_PEAK_TFLOPS`, or `--peak-tflops`) each bf16 row
also has its MFU: the step's matrix FLOP/s (counted from its jaxpr there, `step_cost`) over that
peak.

Peak memory: the device allocator's `peak_bytes_in_use` where the backend reports it (GPU, TPU);
on CPU the peak resident set of the child while it runs the timed steps (the high-water mark
is reset after compilation, so XLA's compiler memory does not count; `peak_rss_total_mb` keeps
the whole process's peak, compilation included). Each method has its own process, so no
method's buffers hide in another's.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

REQUIRED_KEYS = ("method", "train_img_s", "train_img_s_min", "train_img_s_max", "eval_img_s",
                 "peak_mem_mb", "compile_s", "trainable_params", "backend", "device_kind",
                 "variant", "batch")
REMAT = ("none", "full", "dots", "nothing")
DTYPES = ("float32", "bfloat16")
# Benchmark method name -> the registry's method name (and fields set from the flags).
PROMPT_METHODS = ("vpt_deep", "vpt_shallow", "da_vpt", "da_vpt_plus")
FROZEN_BACKBONE = ("linear", "vpt_deep", "vpt_shallow", "da_vpt", "da_vpt_plus", "lora",
                   "adapter", "adaptformer", "bitfit", "ssf", "layernorm", "convpass", "fact",
                   "repadapter", "e2vpt", "vp", "dora", "difffit", "adapter_plus")
DEFAULT_METHODS = ("full,linear,vpt_deep,da_vpt,lora,adapter,adaptformer,bitfit,ssf,convpass,"
                   "fact,repadapter,e2vpt,vp,dora,difffit,adapter_plus")
# Goals (docs/PERFORMANCE.md): frozen-backbone train step >= 1.4x full fine-tuning's images/s;
# DA-VPT within 5% of VPT-Deep in time and memory.
FROZEN_SPEEDUP_GOAL = 1.4
DAVPT_OVERHEAD_GOAL = 0.05
# GPU goal (docs/performance.md, goal 6): bf16 VPT-Deep B/16 at batch 128 at >= 40% MFU.
MFU_GOAL = 0.40
# Dense bf16 matrix peak in TFLOP/s by `device_kind` prefix (the vendors' datasheets, without
# sparsity; the SXM parts where the name does not say). The MFU column is the step's counted
# FLOP/s (`step_cost`) over this peak; `--peak-tflops` sets it for devices not listed.
BF16_PEAK_TFLOPS = (
    ("NVIDIA H200", 989.4),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100", 989.4),
    ("NVIDIA A100", 312.0),
    ("NVIDIA L4", 121.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
)


def peak_tflops(device_kind: str, dtype: str, given: float = 0.0) -> float | None:
  """The matrix peak a row's MFU is taken against: `given` if set, else the bf16 datasheet peak
  of a listed device for a bf16 row (None: no MFU, e.g. a CPU or a fp32 row)."""
  if given:
    return given
  if dtype != "bfloat16":
    return None
  return next((peak for prefix, peak in BF16_PEAK_TFLOPS if device_kind.startswith(prefix)), None)


def tuning_for(method: str, num_prompts: int) -> dict:
  """The tuning config of a benchmark method name (registry names pass through)."""
  from jvt.methods import registry
  known = registry()
  if method == "vpt_deep":
    return dict(method="vpt", num_prompts=num_prompts, deep=True)
  if method == "vpt_shallow":
    return dict(method="vpt", num_prompts=num_prompts, deep=False)
  if method in ("da_vpt", "da_vpt_plus"):
    return dict(method=method, num_prompts=num_prompts, num_proxy_prompts=num_prompts)
  if method == "adapter_plus":
    return dict(method="adapter", placement="adapter_plus")
  if method in known and method != "vpt":
    return dict(method=method)
  raise ValueError(f"--methods: unknown method {method!r}; allowed: vpt_deep, vpt_shallow, "
                   "adapter_plus, "
                   f"{', '.join(sorted(set(known) - {'vpt'}))}.")


def bench_config(spec: dict):
  """The training config of one benchmark row (random backbone, SGD momentum)."""
  from jvt.config_lib import base_config
  c = base_config()
  c.model.variant = spec["variant"]
  c.model.image_size = spec["image_size"]
  c.model.dtype = spec["dtype"]
  c.model.remat = spec["remat"]
  c.model.overrides = dict(spec["overrides"])
  c.tuning = tuning_for(spec["method"], spec["num_prompts"])
  c.batch_size = spec["batch"]
  c.eval_batch_size = spec["eval_batch"]
  c.total_steps = spec["warmup"] + spec["steps"]
  c.optimizer.name = "sgd"
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 0
  c.seed = spec["seed"]
  c.forward_chunk_rows = spec.get("forward_chunk_rows", 0)
  c.cpu_devices = spec.get("cpu_devices", 0)
  c.lock()
  return c


def jaxpr_flops(jaxpr) -> float:
  """The matrix FLOPs of a (closed) jaxpr: 2 per multiply-add of every `dot_general` and
  convolution, and of cuDNN's fused attention (forward 4 B N T S H, backward 8 B N T S H: the
  products the unfused attention's two einsums and their gradients do). Into sub-jaxprs: a
  scan's body times its length, a cond's largest branch, any other call once (a while loop's
  body once). Elementwise work is not counted: this is the MFU numerator (model FLOPs of the
  products, recomputation included), not XLA's count.
  """
  from jax.extend import core as jex
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name, params = eqn.primitive.name, eqn.params
    if name == "dot_general":
      (contract, _), _ = params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[params["dimension_numbers"].rhs_spec[0]]
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features
    elif name in ("dot_product_attention_fwd_wrapper", "dot_product_attention_bwd_wrapper"):
      q, k = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      kv_len = k[2] if getattr(params.get("layout"), "value", params.get("layout")) == 1 else k[1]
      total += (4.0 if name.endswith("fwd_wrapper") else 8.0) * math.prod(q) * kv_len
    elif name == "scan":
      total += params["length"] * jaxpr_flops(params["jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in params["branches"])
    else:
      total += sum(jaxpr_flops(sub) for sub in jex.jaxprs_in_params(params))
  return total


def live_jaxpr(closed):
  """The jaxpr without the equations no output needs (what XLA removes before running it):
  e.g. a custom VJP's gradient of a frozen weight, which the step never uses. Uses JAX's own
  dead-code elimination (jax._src: it has no public one)."""
  from jax._src.interpreters import partial_eval as pe
  jaxpr = closed.jaxpr
  return pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0]


def step_cost(s, batch, compiled) -> dict:
  """XLA's cost analysis of one train step (flops, bytes accessed, ...; {} if unknown).

  XLA counts a loop's body once, so for a step whose forward runs in row chunks
  (`s.forward_chunks > 1`) the cost is that of the same step in one piece, lowered (not
  compiled) from the trainer's `make_train_step`. A compiled step over several devices counts
  one device's share (its partitioned module), so that count is scaled back to the whole batch.
  On a GPU, XLA's count leaves out the products, which run as library calls (cuBLAS, cuDNN):
  ViT-B/16's VPT-Deep step read 5.1 GFLOP an image, its elementwise work, instead of 75.3.
  There "flops" is `jaxpr_flops` of the live step (the products alone) and XLA's own count is
  kept as "xla_flops".
  """
  import jax
  step = s.train_step
  if s.forward_chunks > 1:
    from jvt import train
    step = train.make_train_step(s.model, s.tx, s.objective,
                                 accum_steps=int(s.config.grad_accum_steps),
                                 seed=int(s.config.seed), mesh=s.mesh)
  args = (s.state, s.frozen, s.constants, batch)
  cost = step.lower(*args).cost_analysis() if s.forward_chunks > 1 else compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = dict(cost or {})
  if s.forward_chunks <= 1 and s.mesh.devices.size > 1:
    cost = {k: v * s.mesh.devices.size if isinstance(v, (int, float)) else v
            for k, v in cost.items()}
  if jax.default_backend() != "cpu":
    cost["xla_flops"] = cost.get("flops", 0.0)
    cost["flops"] = jaxpr_flops(live_jaxpr(step.trace(*args).jaxpr))
  return cost


def _reset_peak_rss() -> bool:
  """Returns freed heap to the OS and resets the kernel's resident high-water mark (Linux)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _rss_mb() -> float:
  """The process's resident set now (VmRSS) in MB: the libraries' share before any model."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024.0
  return 0.0


def _peak_rss_mb() -> float:
  """The process's resident high-water mark (VmHWM) in MB, since the last reset."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _minor_faults() -> int:
  """The process's minor page faults so far (fresh pages the kernel had to map and zero)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu_ticks(stat_text: str) -> tuple[int, int]:
  """(steal, total) clock ticks of all CPUs from the text of /proc/stat.

  Its first line is `cpu user nice system idle iowait irq softirq steal guest guest_nice`;
  guest time is already counted in user time, so the total is the first eight fields. Steal is
  time a virtual machine's CPUs were ready to run but the hypervisor ran something else."""
  fields = stat_text.split("\n", 1)[0].split()
  if not fields or fields[0] != "cpu" or len(fields) < 9:
    raise ValueError(f"not a /proc/stat 'cpu' line: {fields[:3]}")
  ticks = [int(x) for x in fields[1:9]]
  return ticks[7], sum(ticks)


def _read_cpu_ticks() -> tuple[int, int] | None:
  """_cpu_ticks of this machine now; None where there is no /proc/stat (not Linux)."""
  try:
    with open("/proc/stat") as f:
      return _cpu_ticks(f.read())
  except OSError:
    return None


def _steal_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None
                    ) -> float | None:
  """Share of all CPUs' time stolen by the hypervisor between two _read_cpu_ticks readings."""
  if before is None or after is None or after[1] <= before[1]:
    return None
  return (after[0] - before[0]) / (after[1] - before[1])


def _time_calls(fn, n_warmup: int, n_timed: int,
                finish=lambda out: out) -> tuple[list[float], float, float | None]:
  """Seconds of each of `n_timed` calls of fn() after `n_warmup` calls, the minor page faults
  per timed call, and the share of the machine's CPU time the hypervisor stole during the timed
  calls (None off Linux): a timing taken while it did is slow for a reason outside the step.
  `finish(out)` waits for a call's result (jax.block_until_ready for JAX; PyTorch's CPU calls
  return finished)."""
  times = []
  for i in range(n_warmup + n_timed):
    if i == n_warmup:
      faults, ticks = _minor_faults(), _read_cpu_ticks()
    t0 = time.perf_counter()
    finish(fn())
    if i >= n_warmup:
      times.append(time.perf_counter() - t0)
  return (times, (_minor_faults() - faults) / max(n_timed, 1),
          _steal_fraction(ticks, _read_cpu_ticks()))


def random_class_examples(rng, num_classes: int, image_size: int):
  """`class_examples` for `jvt.train.setup`: one random image per class, whatever K.

  DA-VPT's class -> prompt mapping only has to initialise here, not to mean anything.
  """
  import numpy as np

  def class_examples(k):
    del k
    images = rng.standard_normal((num_classes, image_size, image_size, 3)).astype(np.float32)
    return images, np.arange(num_classes, dtype=np.int32)

  return class_examples


def measure(spec: dict) -> dict:
  """One row: builds the method's run, compiles and times its train and eval steps."""
  import jax
  import numpy as np
  from jvt import scratch, train
  from jvt.train import sharding

  load_before = os.getloadavg()[0]
  sharding.use_cpu_devices(spec.get("cpu_devices", 0))  # before the backend starts
  jax.devices()  # the backend is up: what is resident now is the libraries, not the model
  base_rss = _rss_mb()
  config = bench_config(spec)
  b, size, classes = spec["batch"], spec["image_size"], spec["num_classes"]
  rng = np.random.default_rng(spec["seed"])

  s = train.setup(config, num_classes=classes, steps_per_epoch=10**9,
                  class_examples=random_class_examples(rng, classes, size))
  host = {"image": rng.standard_normal((b, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, classes, b).astype(np.int32)}
  batch = sharding.shard_batch(host, s.mesh)
  t0 = time.perf_counter()
  step = s.train_step.lower(s.state, s.frozen, s.constants, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = step_cost(s, batch, step)
  flops = float(cost.get("flops", 0.0))
  memory = step.memory_analysis()
  device = jax.devices()[0]
  rss_reset = _reset_peak_rss()
  state = s.state

  def train_call():
    nonlocal state
    state, metrics = step(state, s.frozen, s.constants, batch)
    return state, metrics

  train_times, train_faults, train_steal = _time_calls(train_call, spec["warmup"], spec["steps"],
                                                       jax.block_until_ready)
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak_mb, mem_source = stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
  else:
    peak_mb = _peak_rss_mb()
    mem_source = "peak RSS during steps" if rss_reset else "peak RSS of the process"
  eb = spec["eval_batch"]
  eval_host = {"image": rng.standard_normal((eb, size, size, 3)).astype(np.float32),
               "label": rng.integers(0, classes, eb).astype(np.int32),
               "mask": np.ones((eb,), bool)}
  eval_batch = sharding.shard_batch(eval_host, s.mesh)
  evaluate = s.eval_step.lower(state.trainable, s.frozen, eval_batch).compile()
  eval_times, _, _ = _time_calls(lambda: evaluate(state.trainable, s.frozen, eval_batch),
                                 max(1, spec["warmup"] // 2), spec["steps"], jax.block_until_ready)
  rates = [b / t for t in train_times]
  step_tflops = flops / b * statistics.median(rates) / 1e12
  peak = peak_tflops(device.device_kind, spec["dtype"], spec.get("peak_tflops", 0.0))
  peak = peak if flops else None  # no MFU from an unknown count
  row = {
      "method": spec["method"],
      "train_img_s": statistics.median(rates),
      "train_img_s_min": min(rates),
      "train_img_s_max": max(rates),
      "eval_img_s": statistics.median(eb / t for t in eval_times),
      "peak_mem_mb": peak_mb,
      "compile_s": compile_s,
      "trainable_params": int(s.trainable_params),
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "variant": spec["variant"],
      "batch": b,
      "image_size": size,
      "dtype": spec["dtype"],
      "remat": spec["remat"],
      "forward_chunks": s.forward_chunks,
      "num_devices": len(jax.devices()),
      "flops_per_img": flops / b,
      "flops_source": "XLA cost analysis" if jax.default_backend() == "cpu" else "jaxpr products",
      "xla_flops_per_img": float(cost.get("xla_flops", flops)) / b,
      # The step's counted FLOP/s, and that over the device's matrix peak (None: unknown).
      "step_tflops": step_tflops,
      "peak_tflops": peak,
      "mfu": step_tflops / peak if peak else None,
      "xla_temp_mb": getattr(memory, "temp_size_in_bytes", 0) / 2**20,
      "mem_source": mem_source,
      # Fresh pages a timed step touched (on CPU about XLA's scratch block / 4 KB: glibc maps
      # that block afresh every call; docs/performance.md, "Fresh pages every step").
      "page_faults_per_step": train_faults,
      # Share of all CPUs' time the hypervisor stole during the timed train steps (None off
      # Linux): a slow row with a high share was slowed by other work on the host.
      "cpu_steal_frac": train_steal,
      # jvt.scratch's counters when its library was preloaded (--reuse-scratch), else None.
      "scratch_reuse": scratch.stats() if scratch.active() else None,
      "peak_rss_total_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
      # Resident MB of the imported libraries and the backend before the run was built:
      # peak_mem_mb - base_rss_mb is the step's own memory (on CPU).
      "base_rss_mb": base_rss,
      # 1-minute load average before this child started: timings taken on a busy machine
      # (above the number of cores) are not comparable.
      "load_avg_1m": load_before,
  }
  if spec["overrides"]:
    row["overrides"] = dict(spec["overrides"])
  return row


# ------------------------------------------------------------------------------ the parent
def probe_backend() -> str:
  """JAX's default backend, asked in a short child so that this process never takes the device."""
  code = "import jax; print(jax.default_backend())"
  return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                        text=True).stdout.strip().splitlines()[-1]


def run_child(spec: dict, timeout: float | None) -> dict:
  """Runs `measure(spec)` in a fresh interpreter and returns its row."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
  if spec.get("reuse_scratch"):
    from jvt import scratch
    env = scratch.preload_env(env)
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"benchmark of {spec['method']} (remat={spec['remat']}) failed with exit "
                       f"code {proc.returncode}:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1])


def _ratio(a: float, b: float) -> float | None:
  return a / b if a and b else None


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
  return "-" if x is None else f"{x:{spec}}{suffix}"


def _find(rows, method: str, remat: str):
  return next((r for r in rows if r["method"] == method and r.get("remat", "none") == remat), None)


def goals(rows: Sequence[dict]) -> list[str]:
  """Lines saying which performance goals the rows meet, with the numbers."""
  out = []
  for remat in dict.fromkeys(r.get("remat", "none") for r in rows):
    full = _find(rows, "full", remat)
    tag = "" if remat == "none" else f" (remat {remat})"
    if full:
      for r in rows:
        if r.get("remat", "none") != remat or r["method"] not in FROZEN_BACKBONE:
          continue
        speedup = r["train_img_s"] / full["train_img_s"]
        ok = "met" if speedup >= FROZEN_SPEEDUP_GOAL else "MISSED"
        out.append(f"- {r['method']}{tag}: {speedup:.2f}x full fine-tuning's images/s "
                   f"(goal >= {FROZEN_SPEEDUP_GOAL}x): {ok}")
    vpt, da = _find(rows, "vpt_deep", remat), _find(rows, "da_vpt", remat)
    if vpt and da:
      time_over = vpt["train_img_s"] / da["train_img_s"] - 1.0
      mem_over = da["peak_mem_mb"] / vpt["peak_mem_mb"] - 1.0
      ok = "met" if max(time_over, mem_over) <= DAVPT_OVERHEAD_GOAL else "MISSED"
      out.append(f"- da_vpt vs vpt_deep{tag}: step time {time_over:+.1%}, peak memory "
                 f"{mem_over:+.1%} (goal <= +{DAVPT_OVERHEAD_GOAL:.0%} each): {ok}")
    if vpt and vpt.get("mfu") is not None:
      ok = "met" if vpt["mfu"] >= MFU_GOAL else "MISSED"
      out.append(f"- vpt_deep{tag}, {vpt['variant']} batch {vpt['batch']} {vpt['dtype']}: "
                 f"{vpt['mfu']:.1%} MFU ({vpt['step_tflops']:.0f} of {vpt['peak_tflops']:.0f} "
                 f"TFLOP/s; goal >= {MFU_GOAL:.0%} at bf16 B/16 batch 128): {ok}")
  return out


def markdown(rows: Sequence[dict]) -> str:
  """A table a person reads: one line per row, ratios to full fine-tuning, then the goals.

  "x full" is the row's train images/s over full fine-tuning's (same remat); "GFLOP/s" is the
  step's XLA-counted FLOPs per image times images/s: equal GFLOP/s means a method's extra time
  is what its extra FLOPs explain. "MFU" is that over the device's matrix peak (`peak_tflops`),
  where the peak is known.
  """
  if not rows:
    return "No results.\n"
  r0 = rows[0]
  head = (f"ViT-{r0['variant']}, batch {r0['batch']}, {r0.get('image_size', '?')} px, "
          f"{r0.get('dtype', '?')}, backend {r0['backend']} ({r0['device_kind']}), "
          f"memory: {r0.get('mem_source', 'peak')}"
          + (", XLA:CPU's scratch block kept between steps (jvt.scratch)"
             if r0.get("scratch_reuse") else ""))
  lines = [head, "",
           "| method | remat | trainable params | train img/s (min-max) | x full | eval img/s "
           "| peak mem MB | XLA temp MB | compile s | train GFLOP/img | GFLOP/s | MFU |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    remat = r.get("remat", "none")
    full = _find(rows, "full", remat)
    x_full = _ratio(r["train_img_s"], full["train_img_s"]) if full else None
    gflop = r.get("flops_per_img", 0.0) / 1e9
    n, d = r.get("forward_chunks", 1), r.get("num_devices", 1)
    notes = ([f"{d} devices"] if d > 1 else []) + ([f"{n} row chunks"] if n > 1 else [])
    chunks = f" ({', '.join(notes)})" if notes else ""
    lines.append(
        f"| {r['method']}{chunks} | {remat} | {r['trainable_params']:,} | "
        f"{r['train_img_s']:.2f} ({r['train_img_s_min']:.2f}-{r['train_img_s_max']:.2f}) | "
        f"{_fmt(x_full, '.2f', 'x')} | {r['eval_img_s']:.2f} | {r['peak_mem_mb']:,.0f} | "
        f"{_fmt(r.get('xla_temp_mb'), ',.0f')} | {r['compile_s']:.1f} | "
        f"{_fmt(gflop or None, '.1f')} | {_fmt(gflop * r['train_img_s'] or None, '.1f')} | "
        f"{_fmt(r.get('mfu') and 100 * r['mfu'], '.1f', '%')} |")
  found = goals(rows)
  if found:
    lines += ["", "Goals:", *found]
  return "\n".join(lines) + "\n"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="S/16", help="ViT variant, e.g. S/16, B/16.")
  p.add_argument("--batch", type=int, default=None,
                 help="Global batch size (default: 8 on CPU, 128 on GPU/TPU).")
  p.add_argument("--eval-batch", type=int, default=None, help="Eval batch (default: --batch).")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--methods", default=DEFAULT_METHODS, help="Comma-separated method names.")
  p.add_argument("--dtype", choices=DTYPES, default=None,
                 help="Compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU).")
  p.add_argument("--remat", default="none",
                 help=f"Per-block remat policy, or a comma list to run each: {', '.join(REMAT)}.")
  p.add_argument("--steps", type=int, default=None,
                 help="Timed steps (default: 5 on CPU, 20 on GPU/TPU).")
  p.add_argument("--warmup", type=int, default=None,
                 help="Untimed steps after compilation (default: 2 on CPU, 5 on GPU/TPU).")
  p.add_argument("--num-prompts", type=int, default=10, help="Prompts per block (VPT, DA-VPT).")
  p.add_argument("--num-classes", type=int, default=100)
  p.add_argument("--overrides", default="{}",
                 help='JSON of ViT fields, e.g. \'{"hidden_size": 32, "num_layers": 2}\'.')
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--forward-chunk-rows", type=int, default=0,
                 help="config.forward_chunk_rows (0: the trainer's choice for the backend).")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="config.cpu_devices: split the CPU into this many data-parallel devices "
                      "(0: the process's devices).")
  p.add_argument("--reuse-scratch", action="store_true",
                 help="Preload jvt.scratch's library into each child: XLA:CPU's scratch block is "
                      "kept between steps instead of mapped afresh (CPU, Linux).")
  p.add_argument("--peak-tflops", type=float, default=0.0,
                 help="The device's matrix peak in TFLOP/s for the MFU column (default: the "
                      "bf16 datasheet peak of a listed GPU/TPU for bf16 rows, else no MFU).")
  p.add_argument("--timeout", type=float, default=None, help="Seconds per method (default none).")
  p.add_argument("--out", required=True, help="Directory for results.json and results.md.")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if repo not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, repo)
  if argv[:1] == ["--child"]:
    print(json.dumps(measure(json.loads(argv[1]))), flush=True)
    return 0
  args = _parse(argv)
  remats = [r.strip() for r in args.remat.split(",") if r.strip()]
  bad = [r for r in remats if r not in REMAT] or ([] if remats else ["(empty)"])
  if bad:
    raise SystemExit(f"--remat: unknown {bad}; allowed: {', '.join(REMAT)}.")
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  try:
    overrides = json.loads(args.overrides)
  except json.JSONDecodeError as err:
    raise SystemExit(f"--overrides is not valid JSON ({err}): {args.overrides!r}") from None
  if not isinstance(overrides, dict):
    raise SystemExit(f"--overrides must be a JSON object, got {args.overrides!r}.")
  for m in methods:
    try:
      tuning_for(m, args.num_prompts)
    except ValueError as err:
      raise SystemExit(str(err)) from None
  # The backend only picks defaults; asking it costs a child interpreter.
  explicit = None not in (args.batch, args.dtype, args.steps, args.warmup)
  cpu = None if explicit else probe_backend() == "cpu"
  batch = args.batch or (8 if cpu else 128)
  base = dict(variant=args.variant, batch=batch, eval_batch=args.eval_batch or batch,
              image_size=args.image_size, dtype=args.dtype or ("float32" if cpu else "bfloat16"),
              steps=args.steps or (5 if cpu else 20),
              warmup=args.warmup if args.warmup is not None else (2 if cpu else 5),
              num_prompts=args.num_prompts, num_classes=args.num_classes, overrides=overrides,
              seed=args.seed, forward_chunk_rows=args.forward_chunk_rows,
              cpu_devices=args.cpu_devices, peak_tflops=args.peak_tflops,
              reuse_scratch=args.reuse_scratch)
  os.makedirs(args.out, exist_ok=True)
  rows, failures = [], []
  for remat in remats:
    for method in methods:
      spec = dict(base, method=method, remat=remat)
      try:
        row = run_child(spec, args.timeout)
      except (RuntimeError, subprocess.TimeoutExpired) as err:
        failures.append(str(err))
        print(err, file=sys.stderr)
        continue
      rows.append(row)
      print(f"{method:>12} remat={remat}: train {row['train_img_s']:.2f} img/s, eval "
            f"{row['eval_img_s']:.2f} img/s, peak {row['peak_mem_mb']:.0f} MB, compile "
            f"{row['compile_s']:.1f} s", file=sys.stderr)
      with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(markdown(rows))
  print(markdown(rows))
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
