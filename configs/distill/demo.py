"""The distillation demo: a tuned teacher ViT passed on to a smaller student, on synthetic data.

    python -m jvt.main --config=configs/distill/demo.py --workdir=/tmp/jvt_distill_demo

Nothing is downloaded. Builds the `jvt_synthetic` set, pretrains a 4-block width-96 ViT on the
24-class `shape_color` task, fine-tunes it on `count` (600 steps, all weights: the teacher),
remaps the tuned teacher into a 2-block width-48 student (blocks 0 and 3, first 48 channels,
first 2 heads, first 96 MLP units; 6.6 times fewer parameters) and trains that student on
`count` for 300 steps four ways: from scratch or from the remapped weights, each with plain
cross-entropy or distilled from the teacher's logits (w=0.7, T=2). Prints the table and draws it
(`distill.png`); docs/distill.md has the table it printed. The student that inherits the
teacher (remapped, with or without the logit loss) matches the teacher and is clearly above
the student from scratch; the logit loss alone, from scratch, adds little at this budget.
`arg` may set `task`, `pretrain_task`, `steps=<student steps>`, `lr`, `teacher` (`full` or
`lora`), `teacher_steps`, `teacher_lr`, `pretrain_steps`, `weight`, `temperature`.
"""
import ml_collections

from jvt.config_lib import base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, task="count", pretrain_task="shape_color", steps=300, lr=3e-3,
                teacher="full", teacher_steps=600, teacher_lr=1e-3, pretrain_steps=300,
                weight=0.7, temperature=2.0)
  train = base_config()
  train.model.variant = "Ti/16"
  train.model.image_size = 32
  train.model.overrides = dict(hidden_size=96, mlp_dim=192, num_heads=4, num_layers=4,
                               patch_size=8)
  train.dataset.name = "jvt_synthetic"
  train.dataset.val_split = "validation"
  train.dataset.test_split = "test"
  train.dataset.preprocess = "vit"
  train.batch_size = 64
  train.eval_batch_size = 250
  train.optimizer.name = "adamw"
  train.optimizer.weight_decay = 0.0
  train.optimizer.warmup_steps = 10
  train.log_every_steps = 50
  train.checkpoint_every_steps = 100
  train.eval_every_epochs = 0.0
  train.max_to_keep = 1
  train.progress_bar = False
  train.write_plots = False

  c = ml_collections.ConfigDict()
  c.job = "distill_demo"
  c.train = train
  c.demo = ml_collections.ConfigDict()
  c.demo.num_train = 2000
  c.demo.num_validation = 250
  c.demo.num_test = 500
  c.demo.data_seed = 0
  c.demo.pretrain_task = a.pretrain_task
  c.demo.pretrain_steps = a.pretrain_steps
  c.demo.pretrain_lr = 1e-3
  c.demo.task = a.task
  c.demo.teacher_tuning = dict(
      full=dict(method="full"),
      lora=dict(method="lora", rank=4, alpha=4.0, targets=("query", "value", "mlp_in", "mlp_out")),
  )[a.teacher]
  c.demo.teacher_steps = a.teacher_steps
  c.demo.teacher_lr = a.teacher_lr
  c.demo.student_overrides = dict(hidden_size=48, mlp_dim=96, num_heads=2, num_layers=2,
                                  patch_size=8)
  c.demo.student_steps = a.steps
  c.demo.student_lr = a.lr
  c.demo.distill = dict(weight=a.weight, temperature=a.temperature)
  return c
