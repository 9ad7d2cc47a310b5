"""The embedded default job: pretrain a small ViT, save it as a vision_transformer npz, tune it.

Nothing is downloaded. Steps (all in `workdir`):
  1. build the synthetic TFDS dataset (`jvt.data.synthetic`) in `workdir/data`;
  2. pretrain a small ViT (all weights) on one task (`demo.pretrain_task`) and export it with
     `jvt.checkpoints.save_npz` to `workdir/pretrained/vit_small.npz`, the layout of
     `ViT-B_16.npz`;
  3. tune that checkpoint on another task (`demo.task`) with each of `demo.methods`, each a
     full `train_and_evaluate` run loading the npz through `jvt.load_pretrained`;
  4. print a table (test accuracy, trainable parameters, time) and write
     `workdir/results.md`, `workdir/results.json` and `workdir/accuracy_vs_params.png`.
Re-running resumes: finished runs are read from their `final_metrics.json`.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time

import ml_collections

log = logging.getLogger("jvt.demo")


def _run_config(config, *, tuning, task, total_steps, lr, pretrained, optimizer="adamw",
                sampler="shuffle"):
  c = copy.deepcopy(config.train)
  c.unlock()
  c.tuning = tuning
  c.dataset.task = task
  c.total_steps = total_steps
  c.optimizer.name = optimizer
  c.optimizer.lr = lr
  c.pretrained.path = pretrained
  c.dataset.sampler = sampler
  c.lock()
  return c


def _finished(workdir: str):
  path = os.path.join(workdir, "final_metrics.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _train(config, workdir: str) -> tuple[dict, float]:
  from jvt.train import train_and_evaluate
  done = _finished(workdir)
  if done is not None:
    return done, float(done.get("wall_s", 0.0))
  t0 = time.perf_counter()
  _, final = train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  final["wall_s"] = wall
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    stored = json.load(f)
  stored["wall_s"] = wall
  with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump(stored, f, indent=1)
  return final, wall


def export_backbone(run_workdir: str, npz_path: str) -> str:
  """Saves a fully trained run's weights, head dropped, as a vision_transformer npz backbone.

  run_workdir: the workdir of a `method="full"` run (its `export/trainable.npz` holds every
  weight). The written file loads with `jvt.load_pretrained` like `ViT-B_16.npz`.
  """
  import numpy as np
  from flax import traverse_util
  from jvt.checkpoints import save_npz
  from jvt.train import model_from_config
  with np.load(os.path.join(run_workdir, "export", "trainable.npz")) as exported:
    params = traverse_util.unflatten_dict(dict(exported), sep="/")
  params.pop("head")  # the pretraining task's head is not part of a backbone checkpoint
  with open(os.path.join(run_workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  # With the run's model, the file records its GELU form (exact erf), which loading implies.
  save_npz(npz_path, params, model=model_from_config(config, num_classes=1))
  return npz_path


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs the demo described in the module docstring; returns the table rows."""
  import jax
  from jvt import viz
  from jvt.data.synthetic import build_synthetic

  demo = config.demo
  workdir = os.path.abspath(workdir)
  data_dir = os.path.join(workdir, "data")
  build_synthetic(data_dir, num_train=demo.num_train, num_validation=demo.num_validation,
                  num_test=demo.num_test, image_size=config.train.model.image_size,
                  seed=demo.data_seed)
  config.train.unlock()
  config.train.dataset.data_dir = data_dir
  config.train.lock()

  pretrain_dir = os.path.join(workdir, "pretrain")
  npz = os.path.join(workdir, "pretrained", "vit_small.npz")
  print(f"[1/3] pretraining a small ViT on task {demo.pretrain_task!r} "
        f"({demo.pretrain_steps} steps, all weights)", flush=True)
  pre_cfg = _run_config(config, tuning=dict(method="full"), task=demo.pretrain_task,
                        total_steps=demo.pretrain_steps, lr=demo.pretrain_lr, pretrained="")
  pre, _ = _train(pre_cfg, pretrain_dir)
  if not os.path.exists(npz) and jax.process_index() == 0:
    export_backbone(pretrain_dir, npz)
  print(f"      pretrained: test accuracy {pre['test_accuracy']:.3f} on "
        f"{demo.pretrain_task!r}; saved {npz}", flush=True)

  print(f"[2/3] tuning the checkpoint on task {demo.task!r} with {list(demo.methods)}",
        flush=True)
  rows = []
  for name in demo.methods:
    spec = demo.method_configs[name].to_dict()
    tuning, lr = spec["tuning"], spec["lr"]
    sampler = spec.get("sampler", "shuffle")
    run_cfg = _run_config(config, tuning=tuning, task=demo.task, total_steps=demo.tune_steps,
                          lr=lr, pretrained=npz, sampler=sampler)
    final, wall = _train(run_cfg, os.path.join(workdir, "runs", name))
    rows.append(dict(method=name, accuracy=final["test_accuracy"],
                     val_accuracy=final.get("val_accuracy"),
                     trainable_params=final["trainable_params"], wall_s=round(wall, 1)))
    print(f"      {name:10s} test accuracy {final['test_accuracy']:.3f}  "
          f"trainable {final['trainable_params']:,}  {wall:.0f} s", flush=True)

  print("[3/3] results", flush=True)
  table = ["| method | test accuracy | trainable params | time (s) |",
           "|---|---|---|---|"]
  table += [f"| {r['method']} | {r['accuracy']:.3f} | {r['trainable_params']:,} | "
            f"{r['wall_s']:.0f} |" for r in rows]
  text = "\n".join(table)
  print(text, flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(f"Tuned on task {demo.task!r} from a ViT pretrained on {demo.pretrain_task!r}.\n\n"
              + text + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(rows, f, indent=1)
    viz.plot_accuracy_vs_params(rows, os.path.join(workdir, "accuracy_vs_params.png"))
    print(f"Plots and tables in {workdir}", flush=True)
  return rows
