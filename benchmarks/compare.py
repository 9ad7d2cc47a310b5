"""jvt against PyTorch + timm, method by method, back to back: the README's comparison table.

    python benchmarks/compare.py --variant S/16 --batch 8 --dtype float32 \
        --methods full,linear,vpt_deep,lora,adapter,adaptformer,bitfit,ssf --out DIR
    python benchmarks/compare.py --join JVT_DIR/results.json TORCH_DIR/results.json --out DIR

For each method it runs `benchmarks/run.py`'s child (jvt's own jitted train step) and then
`benchmarks/torch_step.py`'s child (the same step in torch + timm), so each pair is measured
within seconds of each other; the machine's speed drifts, so only these ratios mean anything.
Writes `DIR/compare.json` (both rows of every method and the run's metadata) and
`DIR/compare.md`: the date, the command, the CPU (lscpu's model name), `uptime`'s load averages
before and after (a 1-minute load above 0.5 before the run spoils it: the table says so; the
load after it includes the run's own busy cores), and per method
jvt and torch images/s, their ratio, both peak memories and their ratio, and each side's
images/s over its own full fine-tuning (jvt's with the same remat policy where that row
exists). `--rounds N` measures each pair N times, alternating which side goes first, and
reports the median of the pairs' ratios. `--join` builds the same
table from existing results.json files (rows matched on method, variant, batch, image size and
dtype). `--device gpu` runs PyTorch's side on the GPU (`torch_step.py --device cuda`) and
checks that jvt's step ran on JAX's GPU backend; peak memory is then each side's device
allocator peak.

    python benchmarks/compare.py --device gpu --variant B/16 --batch 128 --dtype bfloat16 \
        --steps 20 --warmup 5 --methods vpt_deep,full,da_vpt,lora --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
QUIET_LOAD = 0.5  # 1-minute load average above which timings are not comparable
JOIN_KEYS = ("method", "variant", "batch", "image_size", "dtype")
DEFAULT_METHODS = "full,linear,vpt_deep,lora,adapter,adaptformer,bitfit,ssf"


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                os.path.join(HERE, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def cpu_model() -> str:
  """lscpu's "Model name" (or /proc/cpuinfo's), e.g. "AMD EPYC 9B45"."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.strip().startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or "unknown"


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what sets XLA's and torch's kernels


def cpu_detail(path: str = "/proc/cpuinfo") -> str:
  """The first CPU's family and model numbers and which of ISA_FLAGS it has, e.g.
  "cpu family 25 model 1; avx2; no avx512f, avx512_bf16, amx_bf16" ("" where unknown): virtual
  machines often report only "AMD EPYC" as the model name, which does not tell a Zen 3 from a
  Zen 5."""
  fields = {}
  try:
    with open(path) as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if not line.strip() and fields:
          break
        if key in ("cpu family", "model", "flags"):
          fields[key] = value.strip()
  except OSError:
    return ""
  if not fields:
    return ""
  flags = set(fields.get("flags", "").split())
  has = [f for f in ISA_FLAGS if f in flags]
  lacks = [f for f in ISA_FLAGS if f not in flags]
  parts = [f"cpu family {fields.get('cpu family', '?')} model {fields.get('model', '?')}",
           ", ".join(has) or "none of " + ", ".join(ISA_FLAGS)]
  if has and lacks:
    parts.append("no " + ", ".join(lacks))
  return "; ".join(parts)


def uptime() -> str:
  """`uptime`'s line (load averages over 1, 5 and 15 minutes)."""
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def _key(row: dict) -> tuple:
  return tuple(row.get(k) for k in JOIN_KEYS)


def join(jvt_rows: Sequence[dict], torch_rows: Sequence[dict]) -> list[dict]:
  """Pairs of {"jvt": row, "torch": row or None} in jvt's row order; a jvt row with a remat
  policy pairs with torch's row of the same method (PyTorch's step keeps every activation)."""
  by_key = {_key(r): r for r in torch_rows}
  return [{"jvt": r, "torch": by_key.get(_key(r))} for r in jvt_rows]


def parse_method(text: str) -> tuple[str, str]:
  """"full" -> ("full", "none"); "full:dots" -> ("full", "dots"): jvt's remat policy."""
  method, _, remat = text.partition(":")
  return method, remat or "none"


def _merge_side(rows: Sequence[dict]) -> dict:
  """One side's row of several rounds: median speeds, the rounds' extremes, the highest peak."""
  out = dict(rows[0])
  out["train_img_s"] = statistics.median(r["train_img_s"] for r in rows)
  out["train_img_s_min"] = min(r.get("train_img_s_min", r["train_img_s"]) for r in rows)
  out["train_img_s_max"] = max(r.get("train_img_s_max", r["train_img_s"]) for r in rows)
  if all(r.get("eval_img_s") is not None for r in rows):
    out["eval_img_s"] = statistics.median(r["eval_img_s"] for r in rows)
  out["peak_mem_mb"] = max(r["peak_mem_mb"] for r in rows)
  steals = [r["cpu_steal_frac"] for r in rows if r.get("cpu_steal_frac") is not None]
  out["cpu_steal_frac"] = max(steals) if steals else None
  return out


def merge_rounds(rounds: Sequence[dict]) -> dict:
  """A pair from rounds of {"jvt": row, "torch": row or None}, each round measured back to back.

  The pair's ratio is the median of the rounds' own ratios (each round's two steps ran within
  seconds of each other, so drift between rounds cancels in it), not the ratio of the sides'
  medians; both sides' rows keep their median speed and their highest peak memory."""
  pair = {"jvt": _merge_side([r["jvt"] for r in rounds]), "torch": None}
  timed = [r for r in rounds if r["torch"] is not None]
  if timed:
    pair["torch"] = _merge_side([r["torch"] for r in timed])
  if len(rounds) > 1:
    pair["rounds"] = [{"jvt_img_s": r["jvt"]["train_img_s"],
                       "torch_img_s": r["torch"] and r["torch"]["train_img_s"]} for r in rounds]
    ratios = [r["jvt_img_s"] / r["torch_img_s"] for r in pair["rounds"] if r["torch_img_s"]]
    if ratios:
      pair["ratio"] = statistics.median(ratios)
      pair["ratio_range"] = (min(ratios), max(ratios))
  return pair


def pair_ratio(pair: dict) -> float | None:
  """jvt / torch images/s of a pair: the median of its rounds' ratios where it has rounds."""
  if pair.get("ratio") is not None:
    return pair["ratio"]
  t = pair["torch"]
  return _ratio(pair["jvt"]["train_img_s"], t and t["train_img_s"])


def _ratio_text(pair: dict) -> str:
  text = _f(pair_ratio(pair), ".2f", "x")
  if pair.get("ratio_range"):
    lo, hi = pair["ratio_range"]
    text += f" ({lo:.2f}-{hi:.2f}, {len(pair['rounds'])} rounds)"
  return text


def _label(row: dict) -> str:
  """The method, with jvt's remat policy and forward row chunks when it used them."""
  notes = []
  if row.get("remat", "none") != "none":
    notes.append(f"remat {row['remat']}")
  if row.get("num_devices", 1) > 1:
    notes.append(f"{row['num_devices']} CPU devices")
  if row.get("forward_chunks", 1) > 1:
    notes.append(f"{row['forward_chunks']} row chunks")
  return f"{row['method']} ({', '.join(notes)})" if notes else row["method"]


def _ratio(a, b):
  return a / b if a and b else None


def _f(x, spec=".2f", suffix=""):
  return "-" if x is None else f"{x:{spec}}{suffix}"


def on_device(row: dict) -> bool:
  """Whether a row's peak memory is a device allocator's (a GPU/TPU run), not the process's RSS."""
  return str(row.get("mem_source", "")).startswith("device")


def check_backend(row: dict, device: str) -> None:
  """Raises RuntimeError when jvt's row ran elsewhere than `--device` says (JAX picks the GPU
  whenever it finds one, so a CPU comparison on a GPU machine needs JAX_PLATFORMS=cpu)."""
  want = "cpu" if device == "cpu" else "gpu"
  if row.get("backend") != want:
    hint = ("set JAX_PLATFORMS=cpu to compare on the CPU" if want == "cpu" else
            "install JAX with CUDA support (JAX's installation guide)")
    raise RuntimeError(f"--device {device}: jvt's {row['method']} step ran on JAX's "
                       f"{row.get('backend')!r} backend, not {want!r}: {hint}.")


def step_mb(row: dict) -> float | None:
  """A row's peak MB less its libraries' resident MB (None if the row has no baseline, or its
  peak is a device allocator's, which holds no libraries)."""
  if row is None or row.get("base_rss_mb") is None or on_device(row):
    return None
  return row["peak_mem_mb"] - row["base_rss_mb"]


def _mem(row: dict | None) -> str:
  if row is None:
    return "-"
  step = step_mb(row)
  return f"{row['peak_mem_mb']:,.0f}" + ("" if step is None else f" ({step:,.0f})")


def steal_line(pairs: Sequence[dict]) -> str | None:
  """The hypervisor's share of CPU time during each side's timed train steps, or None where no
  row has it (off Linux, or rows from before it was recorded)."""
  if not any(side and side.get("cpu_steal_frac") is not None
             for p in pairs for side in (p["jvt"], p["torch"])):
    return None

  def pct(side: dict | None) -> str:
    value = side and side.get("cpu_steal_frac")
    return "-" if value is None else f"{100 * value:.1f}%"

  return ("CPU steal time during the timed train steps (share of all cores' time the "
          "hypervisor ran other work, `/proc/stat`; the highest of the rounds), jvt / torch: "
          + ", ".join(f"{_label(p['jvt'])} {pct(p['jvt'])} / {pct(p['torch'])}" for p in pairs)
          + ".")


def markdown(pairs: Sequence[dict], meta: dict) -> str:
  """The comparison table with its provenance lines."""
  if not pairs:
    return "No results.\n"
  r0 = pairs[0]["jvt"]
  # The run itself keeps every core busy, so the load after it is at least about the core
  # count's share it used: only the load before it says whether others were running.
  before = meta.get("load_before_1m")
  gpu = on_device(r0)
  # A GPU step needs a free host core to launch its kernels, not a quiet host: there the bar is
  # half the host's cores.
  bar = max(QUIET_LOAD, (meta.get("cpus") or 0) / 2) if gpu else QUIET_LOAD
  quiet = before is not None and before < bar
  host = (f"{meta.get('cpu', '?')}"
          f"{' (' + meta['cpu_detail'] + ')' if meta.get('cpu_detail') else ''}, "
          f"{meta.get('cpus', '?')} CPUs")
  hardware = f"{r0['device_kind']} (one device); host {host}" if gpu else host
  lines = [
      f"ViT-{r0['variant']}, {r0.get('image_size', '?')} px, batch {r0['batch']}, "
      f"{r0.get('dtype', '?')}, SGD momentum, random weights and inputs.",
      "",
      f"- date: {meta.get('date', '?')}",
      f"- command: `{meta.get('command', '?')}`",
      f"- hardware: {hardware}; jax "
      f"{meta.get('jax', '?')}, torch {meta.get('torch', '?')}",
      f"- uptime before: {meta.get('uptime_before', '?')}",
      f"- uptime after: {meta.get('uptime_after', '?')}",
  ]
  if r0.get("scratch_reuse"):
    lines.append("- jvt ran with XLA:CPU's scratch block kept between steps (jvt.scratch's "
                 "library preloaded); PyTorch as it is")
  if not quiet:
    lines.append(f"- WARNING: 1-minute load above {bar:g} before the run: the timings "
                 "are not comparable.")
  lines += ["",
            "| method | jvt img/s | torch img/s | jvt / torch | jvt peak MB (step) "
            "| torch peak MB (step) | jvt / torch peak (step) | jvt x own full "
            "| torch x own full |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  # "x own full": over the full fine-tuning row with the same remat policy (jvt's side), else
  # the one without remat.
  fulls = {p["jvt"].get("remat", "none"): p for p in pairs if p["jvt"]["method"] == "full"}
  for p in pairs:
    j, t = p["jvt"], p["torch"]
    full = fulls.get(j.get("remat", "none"), fulls.get("none"))
    j_full = _ratio(j["train_img_s"], full["jvt"]["train_img_s"]) if full else None
    t_full = (_ratio(t["train_img_s"], full["torch"]["train_img_s"])
              if full and full["torch"] and t else None)
    peak_ratio = _ratio(j["peak_mem_mb"], t and t["peak_mem_mb"])
    step_ratio = _ratio(step_mb(j), t and step_mb(t))
    lines.append(
        f"| {_label(j)} | {j['train_img_s']:.2f} | {_f(t and t['train_img_s'])} | "
        f"{_ratio_text(p)} | "
        f"{_mem(j)} | {_mem(t)} | {_f(peak_ratio, '.2f', 'x')} ({_f(step_ratio, '.2f', 'x')}) | "
        f"{_f(j_full, '.2f', 'x')} | {_f(t_full, '.2f', 'x')} |")
  with_mfu = [p["jvt"] for p in pairs if p["jvt"].get("mfu")]
  if with_mfu:
    lines += ["", f"jvt's MFU (its step's matrix FLOP/s over the device's bf16 peak, "
              f"{with_mfu[0]['peak_tflops']:.1f} TFLOP/s): "
              + ", ".join(f"{_label(r)} {100 * r['mfu']:.1f}%" for r in with_mfu) + "."]
  steal = steal_line(pairs)
  if steal:
    lines += ["", steal]
  if any(p.get("rounds") for p in pairs):
    lines += ["", "Rounds: each method's two steps were measured back to back that many times, "
              "alternating which side went first; img/s are each side's median over the rounds, "
              "jvt / torch the median of the rounds' own ratios (their range in brackets), "
              "peak MB the highest of the rounds."]
  if gpu:
    lines += ["", "Peak MB: each side's device allocator peak over its own process up to the end "
              "of the timed train steps (jvt: `peak_bytes_in_use`; torch: "
              "`torch.cuda.max_memory_allocated`): parameters, optimizer state, the batch and "
              "the step's buffers."]
  else:
    lines += ["", "Peak MB: each side's resident high-water mark during the timed steps, in its "
              "own process (compilation excluded); (step): that peak less the process's "
              "resident MB after importing the framework and before building the model "
              "(`base_rss_mb`), i.e. the memory of the model, its step and the batch."]
  return "\n".join(lines) + "\n"


def _versions() -> dict:
  out = {}
  for name in ("jax", "torch"):
    try:
      from importlib.metadata import version
      out[name] = version(name)
    except Exception:  # noqa: BLE001 (not installed)
      out[name] = "not installed"
  return out


def _meta(command: str) -> dict:
  text = uptime()
  return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              command=command, cpu=cpu_model(), cpu_detail=cpu_detail(), cpus=os.cpu_count(),
              uptime_before=text,
              load_before_1m=os.getloadavg()[0], **_versions())


def _finish(meta: dict) -> None:
  meta.update(uptime_after=uptime(), load_after_1m=os.getloadavg()[0])


def _write(out: str, pairs: list[dict], meta: dict) -> str:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "compare.json"), "w") as f:
    json.dump({"meta": meta, "pairs": pairs}, f, indent=1)
  table = markdown(pairs, meta)
  with open(os.path.join(out, "compare.md"), "w") as f:
    f.write(table)
  return table


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="S/16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--methods", default=DEFAULT_METHODS,
                 help="Comma-separated method names; METHOD:REMAT runs jvt's side with that "
                      "remat policy (e.g. full:dots), against the same PyTorch step.")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--num-prompts", type=int, default=10)
  p.add_argument("--num-classes", type=int, default=100)
  p.add_argument("--overrides", default="{}", help="JSON of ViT dims (jvt names).")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="jvt's config.cpu_devices: its step split over this many CPU devices "
                      "(0: the process's devices). PyTorch's side is its usual step either way.")
  p.add_argument("--reuse-scratch", action="store_true",
                 help="jvt's side runs with jvt.scratch's library preloaded (XLA:CPU's scratch "
                      "block kept between steps); PyTorch's side runs as it is.")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                 help="Where both steps run: cpu, or gpu (jvt on JAX's GPU backend, PyTorch on "
                      "cuda).")
  p.add_argument("--rounds", type=int, default=1,
                 help="Back-to-back pairs per method, alternating which side goes first; the "
                      "ratio is the median of the pairs' ratios (for machines whose speed "
                      "drifts between runs).")
  p.add_argument("--timeout", type=float, default=None, help="Seconds per child.")
  p.add_argument("--join", nargs=2, metavar=("JVT_JSON", "TORCH_JSON"),
                 help="Only join two existing results.json files into the table.")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if not args.methods:
    p.error("--methods is empty.")
  if args.rounds < 1:
    p.error(f"--rounds {args.rounds}: must be at least 1.")
  try:
    args.overrides = json.loads(args.overrides)
  except json.JSONDecodeError as err:
    p.error(f"--overrides is not valid JSON ({err}).")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse(argv)
  command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in argv)
  meta = _meta(command)
  if args.join:
    rows = []
    for path in args.join:
      with open(path) as f:
        rows.append(json.load(f))
    # The load of the original runs is in each row's load_avg_1m, not known here.
    meta.update(uptime_before="(joined from files)", uptime_after="(joined from files)",
                load_before_1m=None, load_after_1m=None)
    print(_write(args.out, join(*rows), meta))
    return 0
  run, torch_step = _load("run"), _load("torch_step")
  base = dict(variant=args.variant, batch=args.batch, eval_batch=args.batch,
              image_size=args.image_size, dtype=args.dtype, steps=args.steps,
              warmup=args.warmup, num_prompts=args.num_prompts, num_classes=args.num_classes,
              overrides=args.overrides, seed=0)
  pairs, failed = [], False
  for method, remat in map(parse_method, args.methods):
    jvt_spec = dict(base, method=method, remat=remat, cpu_devices=args.cpu_devices,
                    reuse_scratch=args.reuse_scratch)
    torch_spec = dict(base, method=method, device="cuda" if args.device == "gpu" else "cpu")
    sides = [("jvt", run, jvt_spec), ("torch", torch_step, torch_spec)]
    rounds = []
    for r in range(args.rounds):
      measured = {"jvt": None, "torch": None}
      for side, module, spec in (sides if r % 2 == 0 else sides[::-1]):
        try:
          measured[side] = module.run_child(spec, args.timeout)
          if side == "jvt":
            check_backend(measured[side], args.device)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
          measured[side] = None
          print(err, file=sys.stderr)
          failed = True
      if measured["jvt"] is not None:
        rounds.append(measured)
    if not rounds:
      continue
    pair = merge_rounds(rounds)
    pairs.append(pair)
    j, t = pair["jvt"], pair["torch"]
    print(f"{_label(j):>12}: jvt {j['train_img_s']:.2f} img/s, torch "
          f"{_f(t and t['train_img_s'])} img/s, {_ratio_text(pair)}", file=sys.stderr)
    _write(args.out, pairs, dict(meta, uptime_after="(run in progress)"))
  _finish(meta)
  print(_write(args.out, pairs, meta))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
