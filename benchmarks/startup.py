"""Start-up of a training run, config -> first finished step, split into its phases.

    python benchmarks/startup.py --variant B/16 --method vpt_deep --batch 8 --out DIR

In a fresh interpreter per row (nothing cached in memory; set no persistent compilation
cache), times: `import jvt`, building the model, `init_params` (`lazy`: jvt's, through Flax's
`lazy_init`; `jit`: the previous jitted `model.init`, for comparison), the rest of
`jvt.train.setup` (split, optimizer, objective, replication), lowering + compiling the train
step, and running the first step. Writes `DIR/startup.json` and prints a table; `uptime`
before and after (the phases are CPU-bound: on a loaded machine they stretch).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(spec: dict) -> dict:
  t = {"start": time.perf_counter()}
  import jax
  import jax.numpy as jnp
  import numpy as np
  import run
  from jvt import models, train
  from jvt.train import loop, sharding
  t["import"] = time.perf_counter()
  config = run.bench_config(spec)
  model = train.model_from_config(config, spec["num_classes"])
  t["build"] = time.perf_counter()
  key = jax.random.key(0)
  if spec["init"] == "jit":
    images = jnp.zeros((1, spec["image_size"], spec["image_size"], 3), jnp.float32)
    params = jax.jit(lambda k: model.init(k, images)["params"])(key)
  else:
    params = models.init_params(model, key, spec["image_size"])
  jax.block_until_ready(params)
  t["init_params"] = time.perf_counter()
  init = loop.init_params
  loop.init_params = lambda *a, **k: params  # setup's own init: already done above
  try:
    s = train.setup(config, num_classes=spec["num_classes"], steps_per_epoch=10**9,
                    class_examples=run.random_class_examples(
                        np.random.default_rng(0), spec["num_classes"], spec["image_size"]))
  finally:
    loop.init_params = init
  t["setup_rest"] = time.perf_counter()
  b, size = spec["batch"], spec["image_size"]
  rng = np.random.default_rng(0)
  batch = sharding.shard_batch(
      {"image": rng.standard_normal((b, size, size, 3)).astype(np.float32),
       "label": rng.integers(0, spec["num_classes"], b).astype(np.int32)}, s.mesh)
  step = s.train_step.lower(s.state, s.frozen, s.constants, batch).compile()
  t["compile_step"] = time.perf_counter()
  jax.block_until_ready(step(s.state, s.frozen, s.constants, batch))
  t["first_step"] = time.perf_counter()
  names = list(t)
  row = {n: t[n] - t[p] for p, n in zip(names, names[1:])}
  row.update(total=t["first_step"] - t["start"], init=spec["init"], variant=spec["variant"],
             method=spec["method"], batch=b, load_avg_1m=os.getloadavg()[0])
  return row


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["--child"]:
    sys.path.insert(0, os.path.dirname(HERE))
    print(json.dumps(measure(json.loads(argv[1]))), flush=True)
    return 0
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="B/16")
  p.add_argument("--method", default="vpt_deep")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--inits", default="lazy,jit", help="init_params variants, in this order.")
  p.add_argument("--overrides", default="{}", help="JSON of ViT fields (e.g. a tiny model).")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  base = dict(variant=args.variant, method=args.method, batch=args.batch, eval_batch=args.batch,
              image_size=args.image_size, dtype=args.dtype, remat="none", steps=1, warmup=0,
              num_prompts=10, num_classes=100, overrides=json.loads(args.overrides), seed=0)
  uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
  before, rows = uptime(), []
  for init in [i.strip() for i in args.inits.split(",") if i.strip()]:
    spec = dict(base, init=init)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
      raise SystemExit(f"startup child ({init}) failed:\n{proc.stderr[-3000:]}")
    rows.append(json.loads(lines[-1]))
  after = uptime()
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "startup.json"), "w") as f:
    json.dump({"uptime_before": before, "uptime_after": after, "rows": rows}, f, indent=1)
  phases = ("import", "build", "init_params", "setup_rest", "compile_step", "first_step", "total")
  print(f"uptime before: {before}\nuptime after: {after}\n")
  print("| init | " + " | ".join(f"{ph} s" for ph in phases) + " |")
  print("|---|" + "---:|" * len(phases))
  for r in rows:
    print(f"| {r['init']} | " + " | ".join(f"{r[ph]:.1f}" for ph in phases) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
