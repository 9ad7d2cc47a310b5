"""Distillation on a VTAB-1k task: a tuned ViT-B/16 run teaches a ViT-S/16 student.

First tune the teacher (any method; here LoRA) with the usual config, then distil it:

    python -m jvt.main --config=configs/vtab/lora.py:task=cifar100 --workdir=runs/teacher/cifar100
    python -m jvt.main \
        --config=configs/distill/vtab.py:task=cifar100,teacher=runs/teacher/cifar100 \
        --workdir=runs/distill/cifar100

The teacher is read from its workdir (config.json, its backbone `pretrained.path`,
export/trainable.npz) and runs frozen inside the student's train step. The student is an
S/16 fully fine-tuned from `student_pretrained` (vision_transformer's ImageNet-21k S/16 file)
with the FULL_VTAB recipe and the teacher's protocol, split and preprocessing;
`student_method=lora|linear|vpt_deep` tunes it with that method instead. The loss is
`(1 - weight) CE + weight T^2 KL` (weight 0.5, temperature 4); `features=True` adds
`feature_weight` x (1 - cos) between the last blocks' [CLS] tokens through a learned 384 -> 768
projection (the `distill_proj` method). A student initialised by `python -m jvt.remap` from the
teacher instead: `student_pretrained=<remapped.npz>,student_variant=` with the
`model.overrides` the remap printed (`--config.model.overrides=...`).

`arg` keys: those of configs/vtab (task, protocol, seed, data_dir, lr, wd, sweep, ...) plus
teacher, student_variant, student_pretrained, student_method, weight, temperature, features,
feature_weight.
"""
from configs import common
from jvt.config_lib import parse_arg

STUDENT_METHODS = {
    "full": (dict(method="full"), common.FULL_VTAB),
    "lora": (dict(method="lora", rank=8, alpha=8.0, targets=("query", "value")), common.ADAMW),
    "linear": (dict(method="linear"), common.SGD_VTAB),
    "vpt_deep": (dict(method="vpt", num_prompts=50, deep=True), common.SGD_VTAB),
}
OWN_KEYS = dict(teacher="", student_variant="S/16", student_pretrained="S_16.npz",
                student_method="full", weight=0.5, temperature=4.0, features=False,
                feature_weight=1.0)


def get_config(arg=None):
  own, rest = [], []
  for item in (arg.split(",") if arg else []):
    if item.split("=", 1)[0] in OWN_KEYS:
      own.append(item)
    else:
      rest.append(item)
  a = parse_arg(",".join(own) or None, **OWN_KEYS)
  if not a.teacher:
    raise ValueError("configs/distill/vtab.py needs teacher=<workdir of a finished tuned run>.")
  if a.student_method not in STUDENT_METHODS:
    raise ValueError(f"student_method={a.student_method!r}; allowed: {sorted(STUDENT_METHODS)}.")
  tuning, recipe = STUDENT_METHODS[a.student_method]
  c = common.vtab_config(",".join(rest) or None, name=f"distill_{a.student_method}",
                         tuning=tuning, recipe=recipe)
  c.unlock()
  if a.student_variant:
    c.model.variant = a.student_variant
  c.pretrained.path = a.student_pretrained
  c.distill.enabled = True
  c.distill.weight = float(a.weight)
  c.distill.temperature = float(a.temperature)
  c.distill.teacher.workdir = a.teacher
  if a.features:
    with c.ignore_type():
      c.tuning = [c.tuning.to_dict(), dict(method="distill_proj", dim=768, num=1)]
    c.distill.feature_weight = float(a.feature_weight)
    c.distill.feature_token = "cls"
    c.distill.student_layers = (-1,)
    c.distill.teacher_layers = (-1,)
  c.lock()
  return c
