"""The shared builder of the VTAB-1k and FGVC method configs (`configs/{vtab,fgvc}/<method>.py`).

A method file is data: a docstring (commands, recipe, the published number it should reach),
its `TUNING` dict, its `RECIPE` (one of the presets below) and `PUBLISHED`, and a one-line
`get_config(arg)` that calls `vtab_config` or `fgvc_config`. Everything else is set here once:

  model       ViT-B/16 at 224 px; `pretrained.path` = "ViT-B_16.npz" (the google-research
              vision_transformer ImageNet-21k file; pass `pretrained=PATH` or
              `--config.pretrained.path=PATH`)
  data        `vtab/<task>` with the `vtab` preprocess (224 x 224 resize, ImageNet mean/std) or
              `fgvc/<task>` with the `fgvc` preprocess (shorter side 256, crop 224, flip in
              training);
              the class count comes from the data (`dataset.num_classes = -1`)
  protocol    the benchmark protocol of `jvt.protocols`: splits and the trainer's epoch
              selection `config.protocol` (VTAB default `vtab_final`, FGVC `fgvc`)
  optimizer   the recipe: SGD / AdamW, cosine schedule with linear warm-up, epochs, batch,
              `optimizer.base_batch_size` (> 0: the trainer uses lr * batch / base_batch_size)
  method      `config.method`, the row name jvt.results prints ("vpt_deep")
  sweep       `config.sweep`, the runs of the protocol, read by `python -m jvt.sweep` when no
              --sweep is given: nested fields whose leaves are lists of values (the grid:
              lr x wd, plus the file's `tune_grid`, e.g. VPT's prompt lengths)

`arg` keys (e.g. "task=dtd,protocol=vtab_tune"): task, protocol, seed, backbone (a variant of
`jvt.models.variants`, default B/16; see `set_backbone`), pretrained, data_dir
(TFDS data directory, or the FGVC json root; "" = TFDS's default), lists (VTAB only: a folder
of NOAH-format task folders, read as `list:<lists>/<task>` instead of TFDS), lr, wd, sweep
("" = the protocol's: `grid` under vtab_tune, `seeds` otherwise; or `grid` / `seeds`), and
every scalar field of the method's tuning dict (num_prompts=10, rank=4, dim=16, ...). An
unknown key, task or protocol is a ValueError. `jvt.sweep` passes only `arg` to the config, so
everything a sweep needs besides its own overrides is an arg key.
"""

import dataclasses
from typing import Any, Mapping, Sequence

import ml_collections

from jvt.config_lib import base_config, parse_arg
from jvt.data import fgvc, vtab
from jvt.models import variants
from jvt.protocols import PROTOCOLS, get_protocol
from jvt.methods import method_defaults, registry

PRETRAINED = "ViT-B_16.npz"  # vision_transformer's ImageNet-21k ViT-B/16 (FORMATS.md)
SWEEPS = ("", "grid", "seeds")
# How often each kind of protocol evaluates: every epoch where an epoch is selected on a curve
# (best val, legacy max test) or the split is tiny (val200); every 10 epochs for last-epoch
# test runs, whose test sets are large (the curve is for plots only).
_EVAL_EVERY_EPOCHS = {"tune": 1.0, "last": 10.0, "curve": 1.0}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How a method is optimised, and the lr x wd grid its tuning stage searches.

  `lr` and `tune_lr` are base rates when `base_batch_size` > 0 (VPT's rule: the rate used is
  lr * batch_size / base_batch_size). `lr` and `weight_decay` are the untuned defaults of a
  single run; the tuning stage replaces them per task.
  """
  optimizer: str  # "sgd" (momentum 0.9) | "adamw"
  lr: float
  weight_decay: float
  batch_size: int
  tune_lr: tuple[float, ...]
  tune_wd: tuple[float, ...]
  base_batch_size: int = -1
  epochs: float = 100.0
  warmup_epochs: float = 10.0


# VPT (Jia et al. 2022; KMnP/vpt `configs/base-prompt.yaml`, `tune_vtab.py`): SGD momentum 0.9,
# cosine, 10 warm-up epochs of 100, batch 128, base lr x batch / 256, with base lr and wd chosen
# per task from these grids. The released code uses the same grid for linear probing. The
# default base lr 1.0 is the middle of the grid (the released per-task configs hold
# placeholders); wd 1e-4 is `base-prompt.yaml`'s.
VPT_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
VPT_WDS = (0.01, 0.001, 0.0001, 0.0)
# VPT searched the prompt length per task too (paper, Sec. 4 and its supplement): the VPT
# files add it to their tuning grid, `tune_grid={"tuning.num_prompts": VPT_PROMPT_LENGTHS}`.
VPT_PROMPT_LENGTHS = (1, 5, 10, 50, 100, 200)
SGD_FGVC = Recipe(optimizer="sgd", lr=1.0, weight_decay=1e-4, batch_size=128,
                  tune_lr=VPT_LRS, tune_wd=VPT_WDS, base_batch_size=256)
# VTAB-1k: batch 64 (1000 training images: 16 steps per epoch instead of 8; the lr rule keeps
# the per-example step size).
SGD_VTAB = dataclasses.replace(SGD_FGVC, batch_size=64)

# Full fine-tuning in VPT (`configs/base-finetune.yaml`, `tune_fgvc.py`): AdamW, 5 warm-up epochs
# of 100, base lr x batch / 256 from {0.005, 0.001, 0.0005, 0.0001}. VPT used batch 384 on FGVC;
# 128 (FGVC) and 64 (VTAB) here fit one accelerator, and the lr rule scales the rate.
FULL_FGVC = Recipe(optimizer="adamw", lr=1e-3, weight_decay=1e-4, batch_size=128,
                   tune_lr=(0.005, 0.001, 0.0005, 0.0001), tune_wd=VPT_WDS,
                   base_batch_size=256, warmup_epochs=5.0)
FULL_VTAB = dataclasses.replace(FULL_FGVC, batch_size=64)

# Adapter / LoRA / AdaptFormer / SSF / BitFit as NOAH (Zhang et al. 2022) and later VTAB-1k
# work train them: AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with 10 warm-up epochs, cosine;
# no batch-size rule. The grid brackets that default.
ADAMW = Recipe(optimizer="adamw", lr=1e-3, weight_decay=1e-4, batch_size=64,
               tune_lr=(1e-2, 5e-3, 1e-3, 5e-4, 1e-4), tune_wd=(1e-2, 1e-3, 1e-4, 0.0))


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def arg_value(arg: str | None, key: str, default: str) -> str:
  """The value of `key` in a config arg "a=1,b=x", or `default`: read before the arg is
  parsed (and checked in full) by the config builders, to pick per-task values."""
  for item in (arg or "").split(","):
    name, sep, value = item.partition("=")
    if sep and name == key:
      return value
  return default


def set_backbone(c: ml_collections.ConfigDict, variant: str, preprocess: str) -> None:
  """`backbone=<variant>`: the model, and the resolution and input normalisation its family was
  trained with (`preprocess` keeps its resizing and augmentation; CLIP and SigLIP get their own
  mean / std, SigLIP [-1, 1]). Pass the family's file as `pretrained=PATH`."""
  family = variants.variant_family(variant)
  c.model.variant = variant
  c.model.image_size = variants.FAMILY_IMAGE_SIZE
  norm = variants.FAMILY_NORMALISATION[family]
  c.dataset.preprocess = preprocess if norm == "imagenet" else f"{preprocess}:{norm}"


def _tuning_args(tuning: Mapping[str, Any]) -> dict[str, Any]:
  """The scalar fields of the method (its registry defaults, then the file's values): arg keys."""
  name = tuning["method"]
  if name not in registry():
    raise ValueError(f"tuning method {name!r} unknown; allowed: {sorted(registry())}.")
  fields = {**method_defaults(name), **{k: v for k, v in tuning.items() if k != "method"}}
  return {k: v for k, v in fields.items() if type(v) in (bool, int, float, str)}


def _sweep_spec(kind: str, recipe: Recipe, protocol,
                tune_grid: Mapping[str, Sequence[Any]] | None) -> dict:
  """The `sweep` field: nested config fields whose leaves are lists of values. grid: lr x wd
  (an empty tuple of the recipe leaves the field out) x `tune_grid` (dotted field -> values)."""
  if kind != "grid":
    return {"seed": list(protocol.seeds)}
  grid = {}
  for dotted, values in (("optimizer.lr", recipe.tune_lr),
                         ("optimizer.weight_decay", recipe.tune_wd), *(tune_grid or {}).items()):
    if values:
      *parents, leaf = dotted.split(".")
      node = grid
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = list(values)
  return grid


def _make(arg: str | None, *, benchmark: str, tasks: Mapping[str, Any], default_task: str,
          default_protocol: str, name: str, tuning: Mapping[str, Any], recipe: Recipe,
          tune_grid: Mapping[str, Sequence[Any]] | None = None) -> ml_collections.ConfigDict:
  tuning_args = _tuning_args(tuning)
  common = dict(task=default_task, protocol=default_protocol, seed=0, backbone="B/16",
                pretrained=PRETRAINED,
                data_dir="", lr=float(recipe.lr), wd=float(recipe.weight_decay), sweep="")
  if benchmark == "vtab":
    common["lists"] = ""
  clash = sorted(set(common) & set(tuning_args))
  if clash:
    raise ValueError(f"{name}: tuning fields {clash} clash with the config arg keys.")
  a = parse_arg(arg, **common, **tuning_args)
  if a.task not in tasks:
    raise ValueError(f"task={a.task!r} is not a {benchmark} task; tasks: {', '.join(tasks)}.")
  allowed = [p for p, spec in PROTOCOLS.items() if spec.benchmark == benchmark]
  if a.protocol not in allowed:
    raise ValueError(f"protocol={a.protocol!r} is not a {benchmark} protocol; allowed: "
                     f"{', '.join(allowed)}.")
  if a.sweep not in SWEEPS:
    raise ValueError(f"sweep={a.sweep!r}; allowed: grid (lr x wd), seeds, or '' (grid for a "
                     "tuning protocol, seeds otherwise).")
  protocol = get_protocol(a.protocol)
  tuning_stage = protocol.test_split is None

  c = base_config()
  c.method = name
  c.seed = a.seed
  c.pretrained.path = a.pretrained
  c.tuning = {**tuning, **{k: a[k] for k in tuning_args
                           if k in tuning or a[k] != tuning_args[k]}}
  lists = a.get("lists", "")
  c.dataset.name = f"list:{lists.rstrip('/')}/{a.task}" if lists else f"{benchmark}/{a.task}"
  c.dataset.data_dir = a.data_dir
  set_backbone(c, a.backbone, benchmark)
  c.dataset.num_classes = -1
  for key, value in protocol.config_overrides().items():
    _set(c, key, value)
  c.eval_every_epochs = _EVAL_EVERY_EPOCHS[
      "tune" if tuning_stage else "last" if protocol.selection == "last_epoch" else "curve"]

  c.batch_size = recipe.batch_size
  c.total_epochs = float(recipe.epochs)
  c.optimizer.name = recipe.optimizer
  c.optimizer.lr = float(a.lr)
  c.optimizer.weight_decay = float(a.wd)
  c.optimizer.base_batch_size = recipe.base_batch_size
  c.optimizer.momentum = 0.9
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_epochs = float(recipe.warmup_epochs)

  kind = a.sweep or ("grid" if tuning_stage else "seeds")
  c.sweep = _sweep_spec(kind, recipe, protocol, tune_grid)
  c.lock()
  return c


def vtab_config(arg: str | None, *, name: str, tuning: Mapping[str, Any], recipe: Recipe,
                tune_grid: Mapping[str, Sequence[Any]] | None = None
                ) -> ml_collections.ConfigDict:
  """The locked trainer config of method `name` on one VTAB-1k task (default cifar100,
  protocol vtab_final: train800val200 -> test at the last epoch). `tune_grid` adds fields to
  the tuning grid (e.g. {"tuning.num_prompts": (1, 5, 10)})."""
  c = _make(arg, benchmark="vtab", tasks=vtab.VTAB_TASKS, default_task="cifar100",
            default_protocol="vtab_final", name=name, tuning=tuning, recipe=recipe,
            tune_grid=tune_grid)
  # VTAB-1k's 1,000 training images fit in memory once decoded and resized (143 MB at 224 px):
  # the loader keeps them and only crops, flips and normalises per draw (same batches).
  c.dataset.cache = True
  return c


def fgvc_config(arg: str | None, *, name: str, tuning: Mapping[str, Any], recipe: Recipe,
                tune_grid: Mapping[str, Sequence[Any]] | None = None
                ) -> ml_collections.ConfigDict:
  """The locked trainer config of method `name` on one FGVC task (default cub, protocol fgvc:
  train -> test at the best-val epoch). `tune_grid` as in `vtab_config`."""
  return _make(arg, benchmark="fgvc", tasks=fgvc.FGVC_TASKS, default_task="cub",
               default_protocol="fgvc", name=name, tuning=tuning, recipe=recipe,
               tune_grid=tune_grid)
