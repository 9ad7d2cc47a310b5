"""The distillation demo (`job="distill_demo"`): a tuned teacher distilled into a smaller student.

Nothing is downloaded. Steps (all in `workdir`):
  1. build the synthetic TFDS dataset (`jvt.data.synthetic`) in `workdir/data`;
  2. pretrain the teacher's backbone (all weights) on `demo.pretrain_task` and save it as a
     vision_transformer npz, `workdir/pretrained/teacher_backbone.npz`;
  3. tune it on `demo.task` with `demo.teacher_tuning`: the teacher, `workdir/runs/teacher`;
  4. remap the tuned teacher (merged, evenly spaced blocks, first channels / heads / units) into
     the student's shape: `workdir/pretrained/student_remapped.npz` (`jvt.remap`);
  5. train the student four ways for the same steps: from scratch or from the remapped
     weights, each without and with the teacher (`config.distill` pointing at its workdir);
  6. print the table (test accuracy, parameters, time) and write `workdir/results.md` and
     `workdir/results.json`.
Re-running resumes: finished runs are read from their `final_metrics.json`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time

import ml_collections


def _run_config(base, *, task, steps, lr, tuning, pretrained="", overrides=None,
                 distill_teacher="", distill=None):
  c = copy.deepcopy(base)
  c.unlock()
  c.dataset.task = task
  c.total_steps = steps
  c.optimizer.lr = lr
  c.tuning = tuning
  c.pretrained.path = pretrained
  if overrides is not None:
    c.model.overrides = overrides
  if distill_teacher:
    c.distill.enabled = True
    c.distill.teacher.workdir = distill_teacher
    c.distill.weight = distill.weight
    c.distill.temperature = distill.temperature
  c.lock()
  return c


def _train(config, workdir: str) -> tuple[dict, float]:
  """train_and_evaluate once: a finished run is read back from its final_metrics.json."""
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


def _param_count(variant: str, num_classes: int, overrides: dict) -> int:
  import jax
  from jvt.models import build_model, param_shapes
  shapes = param_shapes(build_model(variant, num_classes, **overrides))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def run_distill_demo(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs the demo described in the module docstring; returns the table rows."""
  import jax
  from jvt.data.synthetic import build_synthetic
  from jvt.demo import export_backbone
  from jvt.distill import load_teacher
  from jvt.remap import remap_teacher

  demo, base = config.demo, config.train
  workdir = os.path.abspath(workdir)
  data_dir = os.path.join(workdir, "data")
  build_synthetic(data_dir, num_train=demo.num_train, num_validation=demo.num_validation,
                  num_test=demo.num_test, image_size=base.model.image_size, seed=demo.data_seed)
  base.unlock()
  base.dataset.data_dir = data_dir
  base.lock()
  teacher_overrides = base.model.overrides.to_dict()
  student_overrides = demo.student_overrides.to_dict()

  print(f"[1/4] pretraining the teacher's backbone on {demo.pretrain_task!r} "
        f"({demo.pretrain_steps} steps, all weights)", flush=True)
  backbone = os.path.join(workdir, "pretrained", "teacher_backbone.npz")
  pre_cfg = _run_config(base, task=demo.pretrain_task, steps=demo.pretrain_steps,
                        lr=demo.pretrain_lr, tuning=dict(method="full"))
  pre_dir = os.path.join(workdir, "runs", "pretrain")
  _train(pre_cfg, pre_dir)
  if not os.path.exists(backbone) and jax.process_index() == 0:
    export_backbone(pre_dir, backbone)

  print(f"[2/4] tuning the teacher on {demo.task!r} with {demo.teacher_tuning.to_dict()}",
        flush=True)
  teacher_dir = os.path.join(workdir, "runs", "teacher")
  teacher_cfg = _run_config(base, task=demo.task, steps=demo.teacher_steps, lr=demo.teacher_lr,
                            tuning=demo.teacher_tuning.to_dict(), pretrained=backbone)
  teacher_final, teacher_wall = _train(teacher_cfg, teacher_dir)

  print("[3/4] remapping the tuned teacher into the student's shape", flush=True)
  remapped = os.path.join(workdir, "pretrained", "student_remapped.npz")
  if not os.path.exists(remapped) and jax.process_index() == 0:
    teacher = load_teacher(ml_collections.ConfigDict(dict(workdir=teacher_dir)),
                           image_size=base.model.image_size, default_variant="",
                           default_num_classes=-1)
    fields = remap_teacher(teacher, remapped, num_layers=student_overrides["num_layers"],
                           hidden_size=student_overrides["hidden_size"],
                           num_heads=student_overrides["num_heads"],
                           mlp_dim=student_overrides["mlp_dim"])
    print(f"      {remapped}: student {fields}", flush=True)

  print(f"[4/4] training the student ({demo.student_steps} steps each)", flush=True)
  num_classes = int(teacher_final["num_classes"])
  rows = [dict(model="teacher", init=f"tuned: {demo.teacher_tuning.method}", teacher="-",
               accuracy=teacher_final["test_accuracy"],
               params=_param_count(base.model.variant, num_classes, teacher_overrides),
               trainable_params=teacher_final["trainable_params"], wall_s=teacher_wall)]
  student_params = _param_count(base.model.variant, num_classes, student_overrides)
  for init, pretrained in (("scratch", ""), ("remapped", remapped)):
    for distilled in (False, True):
      name = f"student_{init}" + ("_distilled" if distilled else "")
      cfg = _run_config(base, task=demo.task, steps=demo.student_steps, lr=demo.student_lr,
                        tuning=dict(method="full"), pretrained=pretrained,
                        overrides=student_overrides,
                        distill_teacher=teacher_dir if distilled else "", distill=demo.distill)
      final, wall = _train(cfg, os.path.join(workdir, "runs", name))
      rows.append(dict(model="student", init=init,
                       teacher=(f"T={demo.distill.temperature:g}, w={demo.distill.weight:g}"
                                if distilled else "-"),
                       accuracy=final["test_accuracy"], params=student_params,
                       trainable_params=final["trainable_params"], wall_s=wall))
      print(f"      {name:28s} test accuracy {final['test_accuracy']:.3f}  {wall:.0f} s",
            flush=True)

  table = ["| model | init | distillation | test accuracy | params | time (s) |",
           "|---|---|---|---|---|---|"]
  table += [f"| {r['model']} | {r['init']} | {r['teacher']} | {r['accuracy']:.3f} | "
            f"{r['params']:,} | {r['wall_s']:.0f} |" for r in rows]
  text = "\n".join(table)
  print(text, flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(f"Task {demo.task!r}; teacher backbone pretrained on {demo.pretrain_task!r}.\n\n"
              + text + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(rows, f, indent=1)
    print(f"Tables in {workdir}", flush=True)
  return rows
