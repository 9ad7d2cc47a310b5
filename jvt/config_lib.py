"""The base training config every `configs/*.py` file starts from, its argument parser, and
the one loader of config files (`load_config("path/to/config.py:arg")`).

A config file's `get_config(arg=None)` calls `base_config()`, sets what it needs and returns
it; `arg` is a short string of sweepable choices ("method=vpt_deep,seed=1") parsed by
`parse_arg`. The config is locked, so a typo'd key is an error both in files and on the
command line (`--config.optimizer.lr=0.1`). `jvt.main`, `jvt.sweep` and the tests load config
files through `load_config` / `load_config_module` only.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
import types

import ml_collections

from jvt.protocols import SELECTIONS as PROTOCOLS  # the values of `config.protocol`


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
  c.dataset.preprocess = "vtab"  # a jvt.data.preprocess.PRESETS name: "vtab", "fgvc", ...
  c.dataset.num_classes = -1  # -1 = from the data source
  c.dataset.sampler = "shuffle"  # "shuffle" | "balanced"
  c.dataset.images_per_class = 2  # balanced sampler
  c.dataset.cache = False  # keep decoded examples in memory (small sets read many times)

  c.batch_size = 128
  c.eval_batch_size = 256
  c.total_steps = -1
  c.total_epochs = 10.0
  c.grad_accum_steps = 1
  # Rows per device of each sequential chunk of the train step's forward pass (same loss and
  # gradients, other dropout draws; jvt.train.row_chunks). 0: the backend's choice (chunks of 8
  # on CPU when at most a quarter of the parameters train and images have >= 196 patches; one
  # piece elsewhere).
  c.forward_chunk_rows = 0
  # jax.clear_caches() at the end of set-up: drops the one-off functions set-up traced and
  # compiled (80-95 MB resident through a ViT-S/16 or B/16 run); jitted functions of the
  # caller's compile again on their next call (jvt.train.loop.release_setup_caches).
  c.release_setup_caches = True
  # CPU runs: split the host CPU into this many XLA devices, one data-parallel replica each
  # (jvt.train.sharding.use_cpu_devices; batch sizes must divide by it). 0: the process's
  # devices (one CPU device unless XLA_FLAGS says otherwise). No effect on GPU / TPU hosts.
  c.cpu_devices = 0
  c.label_smoothing = 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.base_batch_size = -1  # > 0: lr *= batch_size / base_batch_size (VPT's rule)
  c.optimizer.weight_decay = 0.0
  c.optimizer.momentum = 0.9
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  # "cosine" | "linear" | "constant": warm-up, then decay over the rest; "cosine_timm": timm's
  # per-update cosine over all steps with the warm-up laid over its start (DA-VPT's released
  # code). See jvt.partition.make_schedule.
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.warmup_steps = -1  # >= 0 overrides warmup_epochs
  c.optimizer.warmup_init_lr = 0.0  # the warm-up starts here (timm's warmup_lr), absolute
  c.optimizer.min_lr = 0.0  # the decay ends here (timm's min_lr), absolute
  c.optimizer.decay_cls = False  # weight decay on [CLS] when it trains (DA-VPT+'s release: True)
  c.optimizer.clip_norm = -1.0  # <= 0: off
  c.optimizer.clip_value = -1.0  # <= 0: off
  # Per-group multipliers, e.g. {"head": {"lr_mult": 1.0, "wd_mult": 5.0}}.
  c.optimizer.groups = ml_collections.ConfigDict()

  # The epoch whose metrics the run reports: "last_epoch" | "best_val_epoch" |
  # "legacy_max_test_epoch" (jvt.protocols.SELECTIONS; the former names "last", "best_val",
  # "legacy_max_test" still work). Not a benchmark protocol: those (vtab_tune, fgvc, ...) are
  # the `protocol=` arg of configs/{vtab,fgvc}/*.py, which sets this field and the splits.
  c.protocol = "last_epoch"
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


def split_spec(spec: str) -> tuple[str, str | None]:
  """"path/to/config.py:arg" -> ("path/to/config.py", "arg"); no ":" after ".py" -> (spec, None).

  Only a ":" right after ".py" starts the arg, so paths holding ":" elsewhere stay whole.
  """
  path, sep, arg = spec.partition(".py:")
  if sep:
    return path + ".py", arg
  return spec, None


def _package_of(path: str) -> tuple[str, str | None]:
  """(root folder, dotted module name) of a .py file inside a package (folders holding
  __init__.py up to root); (folder, None) for a file outside any package."""
  folder, stem = os.path.split(path)
  parts = [os.path.splitext(stem)[0]]
  while os.path.isfile(os.path.join(folder, "__init__.py")):
    folder, name = os.path.split(folder)
    parts.insert(0, name)
  return folder, (".".join(parts) if len(parts) > 1 else None)


def _import_package(name: str, directory: str) -> None:
  """Imports package `name` from `directory` (not from sys.path), unless imported already from
  there; another package of that name already imported is an error."""
  loaded = sys.modules.get(name)
  if loaded is not None:
    where = [os.path.realpath(p) for p in getattr(loaded, "__path__", [])]
    if os.path.realpath(directory) not in where:
      raise ValueError(f"cannot load configs from {directory}: a different package {name!r} "
                       f"is imported already (from {', '.join(where) or loaded!r}). Load "
                       "config files of one checkout (or installation) per process.")
    return
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(directory, "__init__.py"), submodule_search_locations=[directory])
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise


def load_config_module(path: str) -> types.ModuleType:
  """Imports the config file at `path` (the one loader of config files in jvt).

  A file inside a package (e.g. `configs/vtab/vpt_deep.py`, `configs/` holding __init__.py) is
  imported as that package's module (`configs.vtab.vpt_deep`) with the packages taken from the
  file's own folders, so `from configs import common` inside it works from any working
  directory, whether jvt is installed or not. A file outside any package is executed on its
  own. Raises FileNotFoundError for a missing file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file {path!r} (looked in {os.path.abspath(path)}).")
  path = os.path.abspath(path)
  root, dotted = _package_of(path)
  if dotted is None:
    name = "jvt_config_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  packages = dotted.split(".")[:-1]
  for i in range(len(packages)):
    _import_package(".".join(packages[:i + 1]), os.path.join(root, *packages[:i + 1]))
  return importlib.import_module(dotted)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`"path/to/config.py[:arg]"` -> the file's `get_config(arg)` (`get_config()` without arg),
  as `--config=spec` loads it in `jvt.main` and `jvt.sweep`.

  Raises FileNotFoundError for a missing file and ValueError for a file without get_config.
  """
  path, arg = split_spec(spec)
  module = load_config_module(path)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config={spec}: {path} defines no get_config(arg=None).")
  return module.get_config(arg) if arg is not None else module.get_config()
