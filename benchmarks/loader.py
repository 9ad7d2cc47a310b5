"""Images/s of the training input pipeline alone (no model), with and without its cache.

    python benchmarks/loader.py --out DIR                    # VTAB-1k-like and FGVC-like
    python benchmarks/loader.py --kinds vtab --batch 128 --epochs 3 --out DIR

Writes a NOAH-style list folder (`train800val200.txt` + JPEG files, read through jvt's `list:`
source, so every read decodes a JPEG with PIL as on real data) and times
`jvt.data.pipeline.make_train_loader`:
  vtab  1,000 JPEGs of 500 x 375 px (a typical VTAB-1k natural image), preset "vtab"
        (resize to 224, normalise: no augmentation);
  fgvc  1,000 JPEGs of 500 x 375 px (CUB / NABirds-like), preset "fgvc" (resize 256, random
        224 crop, random flip).
For each, `cache=False` over `--epochs` epochs, and `cache=True` split into its first epoch
(decode and fill) and the later ones (crop / flip / normalise from memory). Writes
`DIR/loader.json` and `DIR/loader.md`, with `uptime` before and after.

The target (issue 16.5): >= 3x what a GPU-class train step consumes. A ViT-B/16 full
fine-tuning step is 105 GFLOP per image (docs/performance.md); at 40% MFU of an A100's 312
bf16 TFLOP/s that is about 1,200 images/s, so the loader should deliver >= 3,600 images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GPU_STEP_IMG_S = 1200.0  # ViT-B/16 full fine-tuning at 40% MFU on an A100 (see above)
KINDS = {"vtab": dict(preset="vtab"), "fgvc": dict(preset="fgvc")}


def write_list_folder(root: str, n: int, width: int, height: int, num_classes: int = 10,
                      seed: int = 0) -> str:
  """n JPEGs (smooth colour fields plus noise, like photos compress) and train800val200.txt."""
  import PIL.Image
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  lines = []
  for i in range(n):
    a, b, c = rng.uniform(0.005, 0.05, 3)
    base = np.stack([np.sin(a * xx + b * yy + k) for k in (0.0, 2.0, 4.0)], -1) * 100 + 128
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    name = f"img_{i:05d}.jpg"
    PIL.Image.fromarray(image).save(os.path.join(root, name), quality=90)
    lines.append(f"{name} {i % num_classes}")
  with open(os.path.join(root, "train800val200.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return root


def _rate(loader, steps: int, batch: int) -> float:
  t0 = time.perf_counter()
  for _ in range(steps):
    next(loader)
  return steps * batch / (time.perf_counter() - t0)


def measure(root: str, preset: str, batch: int, epochs: int, image_size: int,
            workers: int | None) -> dict:
  """Images/s without cache, and with it (first epoch, later epochs)."""
  from jvt.data import pipeline
  ds = {"name": f"list:{root}", "cache": False}
  kw = dict(global_batch_size=batch, image_size=image_size, preprocess=preset, seed=0,
            num_workers=workers)
  out = {}
  with pipeline.make_train_loader(ds, "train800val200", cache=False, **kw) as loader:
    steps = loader.steps_per_epoch
    out["uncached_img_s"] = _rate(loader, steps * epochs, batch)
  with pipeline.make_train_loader(ds, "train800val200", cache=True, **kw) as loader:
    out["cached_first_epoch_img_s"] = _rate(loader, steps, batch)
    out["cached_img_s"] = _rate(loader, steps * max(epochs - 1, 1), batch)
    out["cache_mb"] = loader.cache.nbytes / 2**20
  out["steps_per_epoch"] = steps
  return out


def _uptime() -> str:
  return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kinds", default="vtab,fgvc")
  p.add_argument("--num-images", type=int, default=1000)
  p.add_argument("--source-size", default="500x375", help="WxH of the JPEGs.")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--workers", type=int, default=None, help="Loader threads (default: cores).")
  p.add_argument("--data-dir", default="", help="Where to write the JPEGs (default: a temp dir).")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  repo = os.path.dirname(HERE)
  if repo not in sys.path:
    sys.path.insert(0, repo)
  width, height = (int(v) for v in args.source_size.split("x"))
  kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
  bad = [k for k in kinds if k not in KINDS]
  if bad:
    raise SystemExit(f"--kinds: unknown {bad}; allowed: {', '.join(KINDS)}.")
  os.makedirs(args.out, exist_ok=True)
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="jvt_loader_")
  root = os.path.join(data_dir, f"list_{args.num_images}_{width}x{height}")
  if not os.path.isfile(os.path.join(root, "train800val200.txt")):
    write_list_folder(root, args.num_images, width, height)
  before = _uptime()
  rows = []
  for kind in kinds:
    row = dict(kind=kind, preset=KINDS[kind]["preset"], num_images=args.num_images,
               source_size=args.source_size, batch=args.batch, image_size=args.image_size,
               workers=args.workers or len(os.sched_getaffinity(0)),
               **measure(root, KINDS[kind]["preset"], args.batch, args.epochs,
                         args.image_size, args.workers))
    row["cached_over_gpu_step"] = row["cached_img_s"] / GPU_STEP_IMG_S
    rows.append(row)
    print(json.dumps(row), file=sys.stderr)
  after = _uptime()
  with open(os.path.join(args.out, "loader.json"), "w") as f:
    json.dump({"uptime_before": before, "uptime_after": after, "rows": rows}, f, indent=1)
  lines = [f"uptime before: {before}", f"uptime after: {after}", "",
           "| data | preset | batch | threads | uncached img/s | cached, 1st epoch img/s | "
           "cached img/s | cache MB | cached / 1,200 img/s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['kind']}-like, {r['num_images']} x {r['source_size']} JPEG | "
                 f"{r['preset']} | {r['batch']} | {r['workers']} | {r['uncached_img_s']:,.0f} | "
                 f"{r['cached_first_epoch_img_s']:,.0f} | {r['cached_img_s']:,.0f} | "
                 f"{r['cache_mb']:,.0f} | {r['cached_over_gpu_step']:.2f}x |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "loader.md"), "w") as f:
    f.write(table)
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
