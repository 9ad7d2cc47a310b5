"""The base training config every `configs/*.py` file starts from, and its argument parser.

A config file's `get_config(arg=None)` calls `base_config()`, sets what it needs and returns
it; `arg` is a short string of sweepable choices ("method=vpt_deep,seed=1") parsed by
`parse_arg`. The config is locked, so a typo'd key is an error both in files and on the
command line (`--config.optimizer.lr=0.1`).
"""
from __future__ import annotations

import difflib
import importlib.util
import os

import ml_collections

PROTOCOLS = ("last", "best_val", "legacy_max_test")


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults. Durations: total_steps OR total_epochs."""
  c = ml_collections.ConfigDict()
  c.job = "train"  # "train" | "demo" | "distill_demo"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16"
  c.model.image_size = 224
  c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16"; parameters stay fp32
  c.model.remat = "none"  # "none" | "full" | "dots" | "nothing"
  c.model.drop_path_rate = 0.0  # stochastic depth of the last block (linear over depth from 0)
  # Other ViT fields (e.g. hidden_size, num_layers, pool, layer_norm_eps), as a dict.
  c.model.overrides = ml_collections.ConfigDict()

  c.pretrained = ml_collections.ConfigDict()
  c.pretrained.path = ""  # "" = random init (a warning is logged)
  c.pretrained.format = ""  # "" = detect from the file
  c.pretrained.posemb_interpolation = ""  # "" = the file's family's; "linear" | "bicubic" | "dinov2"

  # A method dict, or a list of them for a composition (see docs/methods.md).
  c.tuning = None  # None = dict(method="linear")

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "jvt_synthetic"  # see docs/data.md
  c.dataset.data_dir = ""
  c.dataset.task = ""  # label for multi-label sets (synthetic: shape|color|count|position)
  c.dataset.label_key = "label"
  c.dataset.train_split = "train"
  c.dataset.val_split = ""  # "" = no validation
  c.dataset.test_split = "test"  # "" = no test
  c.dataset.preprocess = "vtab"  # "vtab" | "fgvc" | "vit" | "vit_aug"
  c.dataset.num_classes = -1  # -1 = from the data source
  c.dataset.sampler = "shuffle"  # "shuffle" | "balanced"
  c.dataset.images_per_class = 2  # balanced sampler
  c.dataset.cache = False  # keep decoded examples in memory (small sets read many times)

  c.batch_size = 128
  c.eval_batch_size = 256
  c.total_steps = -1
  c.total_epochs = 10.0
  c.grad_accum_steps = 1
  c.label_smoothing = 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.base_batch_size = -1  # > 0: lr *= batch_size / base_batch_size (VPT's rule)
  c.optimizer.weight_decay = 0.0
  c.optimizer.momentum = 0.9
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.warmup_steps = -1  # >= 0 overrides warmup_epochs
  c.optimizer.clip_norm = -1.0  # <= 0: off
  c.optimizer.clip_value = -1.0  # <= 0: off
  # Per-group multipliers, e.g. {"head": {"lr_mult": 1.0, "wd_mult": 5.0}}.
  c.optimizer.groups = ml_collections.ConfigDict()

  c.protocol = "last"  # "last" | "best_val" | "legacy_max_test"
  c.eval_every_epochs = 1.0  # <= 0: only at the end
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.max_to_keep = 2
  c.keep_checkpoints = True  # False: delete checkpoints/ once the run has finished
  c.write_plots = True
  c.progress_bar = True
  c.overwrite = False  # allow a workdir that holds a run of a different config

  # Knowledge distillation (remapping tuning); see docs/distill.md.
  c.distill = ml_collections.ConfigDict()
  c.distill.enabled = False
  # L = (1 - weight) CE + weight T^2 KL(teacher/T || student/T) + feature_weight * feature loss
  c.distill.weight = 0.5  # 0: no logit distillation (feature matching only)
  c.distill.temperature = 1.0
  c.distill.feature_weight = 0.0  # 0: no feature distillation
  c.distill.feature_kind = "cosine"  # "cosine" | "l2"
  c.distill.feature_token = "cls"  # block output token matched: "cls" | "mean" (image tokens)
  c.distill.student_layers = ()  # student blocks matched (negative: from the end) ...
  c.distill.teacher_layers = ()  # ... to these teacher blocks, pairwise
  # The teacher: a finished jvt run's workdir, or a checkpoint file (with its head for logits).
  c.distill.teacher = ml_collections.ConfigDict()
  c.distill.teacher.workdir = ""
  c.distill.teacher.path = ""
  c.distill.teacher.format = ""  # path: "" = detect from the file
  c.distill.teacher.variant = ""  # path: "" = the student's variant
  c.distill.teacher.overrides = ml_collections.ConfigDict()  # path: other ViT fields
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"a=1,b=x" -> ConfigDict(a=1, b="x") over `defaults`; unknown keys are an error."""
  out = dict(defaults)
  if arg:
    for item in arg.split(","):
      if "=" not in item:
        raise ValueError(f"config arg {item!r}: expected key=value (known keys: {sorted(out)}).")
      key, value = item.split("=", 1)
      if key not in out:
        raise ValueError(f"config arg key {key!r} unknown; known keys: {sorted(out)}.")
      default = out[key]
      out[key] = type(default)(value) if default is not None and not isinstance(
          default, bool) else (value.lower() in ("1", "true", "yes") if isinstance(
              default, bool) else value)
  return ml_collections.ConfigDict(out)


def check_override_path(config: ml_collections.ConfigDict, path: str) -> None:
  """Raises ValueError naming the first unknown field of a dotted override path ("a.b.c").

  The message suggests the closest existing names, so `--config.optimzer.lr=1` reads
  "config has no field 'optimzer'; did you mean 'optimizer'?". Fields below a value that is
  not a ConfigDict (e.g. a None tuning) are left to ml_collections to judge.
  """
  node, seen = config, "config"
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return
    keys = list(node.keys())
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=3)
      hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
      raise ValueError(f"--config.{path}: {seen} has no field {part!r}{hint} "
                       f"Fields of {seen}: {', '.join(sorted(keys))}.")
    node, seen = node[part], f"{seen}.{part}"


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`"path/to/config.py[:arg]"` -> the file's `get_config(arg)`, as `--config=spec` loads it.

  Raises FileNotFoundError for a missing file and ValueError for a file without get_config.
  """
  path, sep, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={spec}: no config file {path!r} (looked in "
                            f"{os.path.abspath(path)}).")
  module_spec = importlib.util.spec_from_file_location("jvt_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config={spec}: {path} defines no get_config(arg=None).")
  return module.get_config(arg) if sep else module.get_config()
