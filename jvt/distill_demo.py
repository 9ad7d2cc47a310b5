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
  6. print the table (test accuracy, parameters, time) and write `workdir/results.md`,
     `workdir/results.json` and `workdir/distill.png`.
Re-running resumes: finished runs are read from their `final_metrics.json`. The run helpers are
`jvt.demo`'s.
"""
from __future__ import annotations

import math
import os

import ml_collections

from jvt.demo import build_demo_data
from jvt.demo import export_backbone
from jvt.demo import markdown_table
from jvt.demo import run_config
from jvt.demo import train_once
from jvt.demo import write_results


def param_count(variant: str, num_classes: int, overrides: dict, image_size: int) -> int:
  """Parameters of the plain ViT (no tuning modules) at `image_size` (its position embeddings)."""
  import jax
  from jvt.models import build_model, param_shapes
  shapes = param_shapes(build_model(variant, num_classes, **overrides), image_size=image_size)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def run_distill_demo(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs the demo described in the module docstring; returns the table rows."""
  import jax
  from jvt import viz
  from jvt.distill import load_teacher
  from jvt.remap import remap_teacher

  demo, base = config.demo, config.train
  workdir = os.path.abspath(workdir)
  build_demo_data(config, workdir)
  image_size = base.model.image_size
  teacher_overrides = base.model.overrides.to_dict()
  student_overrides = demo.student_overrides.to_dict()

  print(f"[1/4] pretraining the teacher's backbone on {demo.pretrain_task!r} "
        f"({demo.pretrain_steps} steps, all weights)", flush=True)
  backbone = os.path.join(workdir, "pretrained", "teacher_backbone.npz")
  pre_dir = os.path.join(workdir, "runs", "pretrain")
  train_once(run_config(base, tuning=dict(method="full"), total_steps=demo.pretrain_steps, **{
      "dataset.task": demo.pretrain_task, "optimizer.lr": demo.pretrain_lr}), pre_dir)
  if jax.process_index() == 0:
    export_backbone(pre_dir, backbone)

  print(f"[2/4] tuning the teacher on {demo.task!r} with {demo.teacher_tuning.to_dict()}",
        flush=True)
  teacher_dir = os.path.join(workdir, "runs", "teacher")
  teacher_final, teacher_wall = train_once(run_config(
      base, tuning=demo.teacher_tuning.to_dict(), total_steps=demo.teacher_steps, **{
          "dataset.task": demo.task, "optimizer.lr": demo.teacher_lr,
          "pretrained.path": backbone}), teacher_dir)

  print("[3/4] remapping the tuned teacher into the student's shape", flush=True)
  remapped = os.path.join(workdir, "pretrained", "student_remapped.npz")
  if not os.path.exists(remapped) and jax.process_index() == 0:
    teacher = load_teacher(ml_collections.ConfigDict(dict(workdir=teacher_dir)),
                           image_size=image_size, default_variant="", default_num_classes=-1)
    fields = remap_teacher(teacher, remapped, num_layers=student_overrides["num_layers"],
                           hidden_size=student_overrides["hidden_size"],
                           num_heads=student_overrides["num_heads"],
                           mlp_dim=student_overrides["mlp_dim"])
    print(f"      {remapped}: student {fields}", flush=True)

  print(f"[4/4] training the student ({demo.student_steps} steps each)", flush=True)
  num_classes = int(teacher_final["num_classes"])
  rows = [dict(model="teacher", init=f"tuned: {demo.teacher_tuning.method}", teacher="-",
               accuracy=teacher_final["test_accuracy"],
               params=param_count(base.model.variant, num_classes, teacher_overrides,
                                  image_size),
               trainable_params=teacher_final["trainable_params"], wall_s=teacher_wall)]
  student_params = param_count(base.model.variant, num_classes, student_overrides, image_size)
  kd = demo.distill
  for init, pretrained in (("scratch", ""), ("remapped", remapped)):
    for distilled in (False, True):
      name = f"student_{init}" + ("_distilled" if distilled else "")
      fields = {"dataset.task": demo.task, "optimizer.lr": demo.student_lr,
                "pretrained.path": pretrained, "model.overrides": student_overrides}
      if distilled:
        fields.update({"distill.enabled": True, "distill.teacher.workdir": teacher_dir,
                       "distill.weight": kd.weight, "distill.temperature": kd.temperature})
      final, wall = train_once(run_config(base, tuning=dict(method="full"),
                                          total_steps=demo.student_steps, **fields),
                               os.path.join(workdir, "runs", name))
      rows.append(dict(model="student", init=init,
                       teacher=f"T={kd.temperature:g}, w={kd.weight:g}" if distilled else "-",
                       accuracy=final["test_accuracy"], params=student_params,
                       trainable_params=final["trainable_params"], wall_s=wall))
      print(f"      {name:28s} test accuracy {final['test_accuracy']:.3f}  {wall:.0f} s",
            flush=True)

  table = markdown_table(rows, [("model", "model", ""), ("init", "init", ""),
                                ("distillation", "teacher", ""),
                                ("test accuracy", "accuracy", ".3f"), ("params", "params", ","),
                                ("time (s)", "wall_s", ".0f")])
  print(table, flush=True)
  write_results(workdir, f"Task {demo.task!r}; teacher backbone pretrained on "
                f"{demo.pretrain_task!r}; seed {base.seed}.", table, rows)
  if jax.process_index() == 0:
    labelled = [dict(r, label=f"teacher ({r['params']:,} params)" if r["model"] == "teacher"
                     else f"student, {r['init']}" + (" + KD" if r["teacher"] != "-" else ""))
                for r in rows]
    viz.plot_accuracy_bars(
        labelled, os.path.join(workdir, "distill.png"), chance=1 / num_classes,
        title=f"jvt distillation demo: {demo.task!r}, students of {student_params:,} params",
        figsize=(6, 3))
    print(f"Tables and distill.png in {workdir}", flush=True)
  return rows
