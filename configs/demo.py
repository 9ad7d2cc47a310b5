"""The embedded demo: pretrain a small ViT on synthetic data, then tune it three ways.

    python -m jvt.main --config=configs/demo.py --workdir=/tmp/jvt_demo

Runs in about 3 minutes on a 2-core CPU with nothing downloaded. It builds the `jvt_synthetic`
TFDS dataset (shapes / colours / counts), pretrains a 4-block ViT on `count`, saves it as a
vision_transformer npz and tunes it on `shape` with a linear probe, VPT-Deep and DA-VPT,
printing a table of test accuracy, trainable parameters and time. Expected: the three tuned
models reach well above chance (0.25) on `shape`, the prompt methods above the linear probe.
`arg` may set `steps=<tune steps>` (default 150), `pretrain_steps` (300),
`methods=linear+vpt_deep+da_vpt` and the data set's size: `num_train` (2000),
`num_validation` (250), `num_test` (500).
"""
import ml_collections

from jvt.config_lib import base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, task="shape", steps=150, pretrain_steps=300,
                methods="linear+vpt_deep+da_vpt", num_train=2000, num_validation=250, num_test=500)
  train = base_config()
  train.model.variant = "Ti/16"
  train.model.image_size = 32
  train.model.overrides = dict(hidden_size=96, mlp_dim=192, num_heads=4, num_layers=4,
                               patch_size=8)
  train.dataset.name = "jvt_synthetic"
  train.dataset.val_split = "validation"
  train.dataset.test_split = "test"
  train.dataset.preprocess = "vit"
  train.dataset.images_per_class = 16
  train.batch_size = 64
  train.eval_batch_size = 250
  train.optimizer.name = "adamw"
  train.optimizer.weight_decay = 0.0
  train.optimizer.warmup_steps = 10
  train.log_every_steps = 25
  train.checkpoint_every_steps = 100
  train.eval_every_epochs = 0.0
  train.max_to_keep = 1
  train.progress_bar = False

  c = ml_collections.ConfigDict()
  c.job = "demo"
  c.train = train
  c.demo = ml_collections.ConfigDict()
  c.demo.num_train = a.num_train
  c.demo.num_validation = a.num_validation
  c.demo.num_test = a.num_test
  c.demo.data_seed = 0
  c.demo.pretrain_task = "shape_color"
  c.demo.pretrain_steps = a.pretrain_steps
  c.demo.pretrain_lr = 1e-3
  c.demo.task = a.task
  c.demo.tune_steps = a.steps
  c.demo.methods = tuple(a.methods.split("+"))
  c.demo.method_configs = dict(
      linear=dict(tuning=dict(method="linear"), lr=1e-2),
      vpt_deep=dict(tuning=dict(method="vpt", num_prompts=4, deep=True), lr=1e-2),
      da_vpt=dict(tuning=dict(method="da_vpt", num_prompts=4, num_proxy_prompts=4,
                              patch_weight=0.05, cls_weight=0.05), lr=1e-2,
                  sampler="balanced"),
      lora=dict(tuning=dict(method="lora", rank=4, alpha=4), lr=1e-2),
      adapter=dict(tuning=dict(method="adapter", dim=8), lr=1e-2),
  )
  return c
