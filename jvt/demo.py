"""The embedded default job: pretrain a small ViT, save it as a vision_transformer npz, tune it.

Nothing is downloaded. Steps (all in `workdir`):
  1. build the synthetic TFDS dataset (`jvt.data.synthetic`) in `workdir/data`;
  2. pretrain a small ViT (all weights, seed `demo.pretrain_seed`) on the source task
     (`demo.pretrain_task`, the 24-class `shape_color`) and export it with `jvt.checkpoints.save_npz` to
     `workdir/pretrained/vit_small.npz`, the layout of `ViT-B_16.npz`;
  3. tune that checkpoint on the target task (`demo.task`, `count`: a structured task whose
     answer the source task taught the [CLS] token to ignore) with each of `demo.methods`, each
     a full `train_and_evaluate` run loading the npz through `jvt.load_pretrained`;
  4. print a table (test accuracy, trainable parameters, time) and write
     `workdir/results.md`, `workdir/results.json` and `workdir/accuracy_vs_params.png`.
Re-running resumes: finished runs are read from their `final_metrics.json`.

The run helpers (`run_config`, `train_once`, `export_backbone`, `build_demo_data`,
`write_results`) are shared with the distillation demo (`jvt.distill_demo`).
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Sequence

import ml_collections


def run_config(base: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
  """A copy of the train config `base` with `fields` set; dotted names reach nested fields.

  E.g. `run_config(c, tuning=dict(method="full"), total_steps=300, **{"dataset.task": "count",
  "optimizer.lr": 1e-3})`. An unknown field is an error (the copy stays locked).
  """
  c = copy.deepcopy(base)
  c.unlock()
  for name, value in fields.items():
    *parents, leaf = name.split(".")
    node = c
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise KeyError(f"run_config: the train config has no field {name!r}.")
    node[leaf] = value
  c.lock()
  return c


def train_once(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, float]:
  """`train_and_evaluate` unless `workdir` holds a finished run; (final metrics, seconds).

  The wall time of the run is stored in its final_metrics.json (`wall_s`), so a demo re-run
  prints the time the run took, not zero.
  """
  from jvt.train import train_and_evaluate
  path = os.path.join(workdir, "final_metrics.json")
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    return done, float(done.get("wall_s", 0.0))
  t0 = time.perf_counter()
  train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  with open(path) as f:
    final = json.load(f)
  final["wall_s"] = wall
  with open(path, "w") as f:
    json.dump(final, f, indent=1)
  return final, wall


def export_backbone(run_workdir: str, npz_path: str) -> str:
  """Saves a fully trained run's weights, head dropped, as a vision_transformer npz backbone.

  run_workdir: the workdir of a `method="full"` run (its `export/trainable.npz` holds every
  weight). The written file loads with `jvt.load_pretrained` like `ViT-B_16.npz`.
  """
  import numpy as np
  from flax import traverse_util
  from jvt.checkpoints import save_npz
  if os.path.exists(npz_path):
    return npz_path
  from jvt.train import model_from_config
  with np.load(os.path.join(run_workdir, "export", "trainable.npz")) as exported:
    params = traverse_util.unflatten_dict(dict(exported), sep="/")
  params.pop("head")  # the pretraining task's head is not part of a backbone checkpoint
  with open(os.path.join(run_workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  # With the run's model, the file records its GELU form (exact erf), which loading implies.
  save_npz(npz_path, params, model=model_from_config(config, num_classes=1))
  return npz_path


def build_demo_data(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Builds the synthetic set in `workdir/data` and points `config.train.dataset` at it."""
  from jvt.data.synthetic import build_synthetic
  demo = config.demo
  data_dir = os.path.join(workdir, "data")
  build_synthetic(data_dir, num_train=demo.num_train, num_validation=demo.num_validation,
                  num_test=demo.num_test, image_size=config.train.model.image_size,
                  seed=demo.data_seed)
  config.train.dataset.data_dir = data_dir
  return data_dir


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
  """A markdown table of `rows`; columns are (header, row key, format spec)."""
  lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(format(r[k], f) for _, k, f in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_results(workdir: str, caption: str, table: str, rows: Sequence[dict]) -> None:
  """`workdir/results.md` (caption + table) and `workdir/results.json` (rows), on process 0."""
  import jax
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(caption + "\n\n" + table + "\n")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(list(rows), f, indent=1)


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs the demo described in the module docstring; returns the table rows."""
  import jax
  from jvt import viz
  from jvt.data import synthetic

  demo = config.demo
  workdir = os.path.abspath(workdir)
  build_demo_data(config, workdir)
  source_classes = len(synthetic.TASKS[demo.pretrain_task])
  target_classes = len(synthetic.TASKS[demo.task])

  pretrain_dir = os.path.join(workdir, "pretrain")
  npz = os.path.join(workdir, "pretrained", "vit_small.npz")
  print(f"[1/3] pretraining a small ViT on the source task {demo.pretrain_task!r} "
        f"({source_classes} classes, {demo.pretrain_steps} steps, all weights)", flush=True)
  pre_cfg = run_config(config.train, tuning=dict(method="full"), seed=demo.pretrain_seed,
                       total_steps=demo.pretrain_steps, **{
                           "dataset.task": demo.pretrain_task, "dataset.sampler": "shuffle",
                           "optimizer.lr": demo.pretrain_lr, "pretrained.path": ""})
  pre, _ = train_once(pre_cfg, pretrain_dir)
  if jax.process_index() == 0:
    export_backbone(pretrain_dir, npz)
  print(f"      source test accuracy {pre['test_accuracy']:.3f}; backbone saved to {npz}",
        flush=True)

  print(f"[2/3] tuning the checkpoint on the target task {demo.task!r} ({target_classes} "
        f"classes, chance {1 / target_classes:.2f}) with {list(demo.methods)}", flush=True)
  rows = []
  for name in demo.methods:
    spec = demo.method_configs[name].to_dict()
    run_cfg = run_config(config.train, tuning=spec["tuning"], total_steps=demo.tune_steps, **{
        "dataset.task": demo.task, "dataset.sampler": spec.get("sampler", "shuffle"),
        "optimizer.lr": spec["lr"], "pretrained.path": npz})
    final, wall = train_once(run_cfg, os.path.join(workdir, "runs", name))
    rows.append(dict(method=name, accuracy=final["test_accuracy"],
                     val_accuracy=final.get("val_accuracy"),
                     trainable_params=final["trainable_params"], wall_s=round(wall, 1)))
    print(f"      {name:10s} test accuracy {final['test_accuracy']:.3f}  "
          f"trainable {final['trainable_params']:,}  {wall:.0f} s", flush=True)

  print("[3/3] results", flush=True)
  table = markdown_table(rows, [("method", "method", ""), ("test accuracy", "accuracy", ".3f"),
                                ("trainable params", "trainable_params", ","),
                                ("time (s)", "wall_s", ".0f")])
  print(table, flush=True)
  caption = (f"Target task {demo.task!r} ({target_classes} classes, chance "
             f"{1 / target_classes:.2f}), {demo.tune_steps} steps per method, from a ViT "
             f"pretrained on {demo.pretrain_task!r} ({demo.pretrain_steps} steps); seed "
             f"{config.train.seed}.")
  write_results(workdir, caption, table, rows)
  if jax.process_index() == 0:
    viz.plot_accuracy_vs_params(
        rows, os.path.join(workdir, "accuracy_vs_params.png"), chance=1 / target_classes,
        title=f"jvt demo: {demo.task!r} from a ViT pretrained on {demo.pretrain_task!r}")
    print(f"Tables and accuracy_vs_params.png in {workdir}; each run's curves.png in "
          f"{os.path.join(workdir, 'runs')}", flush=True)
  return rows
