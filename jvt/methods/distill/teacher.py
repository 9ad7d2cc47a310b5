"""Teachers for knowledge distillation: any model jvt builds, loaded once on the host.

`load_teacher` reads a finished run's workdir (its config.json builds the model with its own
variant and tuning, its `pretrained.path` gives the frozen backbone, its
`export/trainable.npz` the trained leaves) or one checkpoint file. The teacher's parameters
become the distillation task loss's `constants` (`jvt.methods.distill.objective`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PyTree = Any
log = logging.getLogger("jvt.distill")

_FIELD = "config.distill.teacher"


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded teacher: its model, host parameters and where they came from.

  `params` are laid out for images of the student's size (position embedding resized when the
  teacher was trained at another size). `has_head` is False when the source holds no trained
  classifier (a backbone file, or a run whose head stayed frozen): such a teacher can only
  supervise features.
  """
  model: Any
  params: PyTree
  num_classes: int
  has_head: bool
  source: dict


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _resize_posemb(params: dict, model, image_size: int, method: str) -> dict:
  """Resizes the position embedding of a flat tree to `image_size` images of `model`."""
  from jvt.checkpoints import formats, posemb
  if image_size % model.patch_size:
    raise ValueError(f"image size {image_size} is not a multiple of the teacher's patch size "
                     f"{model.patch_size}: the teacher cannot read the student's images.")
  prefix = 1 if model.class_token else 0  # [CLS]'s slot; registers have none, SigLIP no [CLS]
  tokens = prefix + (image_size // model.patch_size) ** 2
  value = params[formats.POSEMB]
  if value.shape[1] != tokens:
    params[formats.POSEMB] = posemb.resize_posemb(value, tokens, prefix, method)
  return params


def _build(variant: str, num_classes: int, tuning, dtype, overrides: dict, checkpoint=None):
  from jvt.models import build_model
  overrides = {k: v for k, v in overrides.items() if k not in ("dtype", "remat")}
  return build_model(variant, num_classes, tuning=tuning, checkpoint=checkpoint or None,
                     dtype=dtype, remat="none", **overrides)


def _initial(model, key: jax.Array, image_size: int, covered: set[str]) -> PyTree:
  """The model's initial parameters, or zeros of their shapes when every leaf is in `covered`
  (about to be replaced by file values): XLA compiles `model.init` in seconds, not for free."""
  from jvt.models import init_params, param_shapes
  shapes = traverse_util.flatten_dict(param_shapes(model, image_size), sep="/")
  if set(shapes) <= covered:
    return traverse_util.unflatten_dict(
        {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}, sep="/")
  return init_params(model, key, image_size)


def _from_workdir(workdir: str, image_size: int, dtype) -> Teacher:
  """The model a finished jvt run trained: its config.json, backbone file and trained leaves."""
  from jvt.checkpoints import formats, load_pretrained
  from jvt.models import param_shapes
  workdir = os.path.abspath(workdir)
  config_path = os.path.join(workdir, "config.json")
  export = os.path.join(workdir, "export", "trainable.npz")
  if not os.path.exists(config_path):
    raise FileNotFoundError(
        f"{_FIELD}.workdir={workdir!r} holds no config.json: point it to the --workdir of a "
        f"finished jvt run (or use {_FIELD}.path for a checkpoint file).")
  if not os.path.exists(export):
    raise FileNotFoundError(
        f"{_FIELD}.workdir={workdir!r} holds no export/trainable.npz: the teacher run has not "
        "finished. Run it to the end first (the same command resumes it).")
  with open(config_path) as f:
    cfg = json.load(f)
  model_cfg, pre = cfg["model"], cfg.get("pretrained", {})
  with np.load(export) as f:
    trained = {k: np.asarray(f[k]) for k in f.files}
  has_head = "head/kernel" in trained
  if has_head:
    num_classes = int(trained["head/kernel"].shape[-1])
  else:
    final_path = os.path.join(workdir, "final_metrics.json")
    num_classes = -1
    if os.path.exists(final_path):
      with open(final_path) as f:
        num_classes = int(json.load(f).get("num_classes") or -1)
    num_classes = num_classes if num_classes > 0 else int(cfg["dataset"]["num_classes"])
    if num_classes <= 0:
      raise ValueError(f"{_FIELD}.workdir={workdir!r}: cannot tell the teacher's number of "
                       "classes (no trained head, no num_classes in final_metrics.json).")
  model = _build(model_cfg["variant"], num_classes, cfg.get("tuning"), dtype,
                 dict(model_cfg.get("overrides") or {}),
                 pre.get("path") if os.path.isfile(pre.get("path") or "") else None)
  own_size = int(model_cfg["image_size"])
  backbone = pre.get("path") or ""
  shapes = traverse_util.flatten_dict(param_shapes(model, own_size), sep="/")
  from_file = {k for k in shapes if backbone and formats.is_backbone_leaf(k)
               and not k.startswith(("head/", "pre_logits/", "fc_norm/"))}
  params = _initial(model, jax.random.key(int(cfg.get("seed", 0))), own_size,
                    from_file | set(trained))
  if backbone:
    if not os.path.exists(backbone):
      raise FileNotFoundError(
          f"{_FIELD}.workdir={workdir!r}: its config.json names the backbone checkpoint "
          f"pretrained.path={backbone!r}, which does not exist (moved or deleted?). Restore the "
          "file there, or export the teacher as one file and use "
          f"{_FIELD}.path instead.")
    params = load_pretrained(backbone, params, model, format=pre.get("format") or None,
                             posemb_interpolation=pre.get("posemb_interpolation") or "linear",
                             log=log.debug)
  flat = {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}
  wrong = [f"{k} {list(v.shape)} (model: {list(flat[k].shape) if k in flat else 'absent'})"
           for k, v in trained.items() if k not in flat or flat[k].shape != v.shape]
  if wrong:
    raise ValueError(f"{_FIELD}.workdir={workdir!r}: export/trainable.npz does not fit the model "
                     f"its config.json builds: {wrong}.")
  flat.update(trained)
  method = pre.get("posemb_interpolation") or "linear"
  flat = _resize_posemb(flat, model, image_size, method)
  source = dict(kind="workdir", workdir=workdir, variant=model_cfg["variant"],
                overrides=dict(model_cfg.get("overrides") or {}), tuning=cfg.get("tuning"),
                image_size=own_size, backbone=backbone,
                backbone_sha256=_sha256(backbone) if backbone else "",
                trainable=export, trainable_sha256=_sha256(export),
                preprocess=cfg.get("dataset", {}).get("preprocess", ""))
  return Teacher(model=model, params=traverse_util.unflatten_dict(flat, sep="/"),
                 num_classes=num_classes, has_head=has_head, source=source)


def _from_path(path: str, fmt: str, variant: str, overrides: dict, image_size: int,
               default_num_classes: int, dtype, posemb_interpolation: str) -> Teacher:
  """A plain ViT from one checkpoint file; its head (when present) gives the logits."""
  from jvt.checkpoints import formats, load_pretrained
  if not os.path.exists(path):
    raise FileNotFoundError(f"{_FIELD}.path={path!r}: no such file. Give an existing checkpoint "
                            f"(.npz / .safetensors) or a finished run with {_FIELD}.workdir.")
  probe = _build(variant, 1, None, dtype, overrides, path)
  _, arrays, _ = formats.read_checkpoint(path, num_heads=probe.num_heads, format=fmt or None)
  head = arrays.get("head/kernel")
  has_head = head is not None
  num_classes = int(np.shape(head)[-1]) if has_head else default_num_classes
  model = probe.clone(num_classes=num_classes)
  params = _initial(model, jax.random.key(0), image_size, set(arrays))
  params = load_pretrained(path, params, model, format=fmt or None,
                           posemb_interpolation=posemb_interpolation, keep_head=has_head,
                           log=log.debug)
  source = dict(kind="path", path=os.path.abspath(path), sha256=_sha256(path), format=fmt,
                variant=variant, overrides=overrides)
  return Teacher(model=model, params=jax.device_get(params), num_classes=num_classes,
                 has_head=has_head, source=source)


def load_teacher(teacher_cfg, *, image_size: int, default_variant: str,
                 default_num_classes: int, dtype: Any = jnp.float32,
                 posemb_interpolation: str = "linear") -> Teacher:
  """Loads the teacher of `config.distill.teacher` for images of `image_size`.

  Exactly one source: `workdir` (a finished jvt run: its config.json builds the model with its
  own variant and tuning, its `pretrained.path` gives the frozen backbone, its
  `export/trainable.npz` the trained leaves) or `path` (one checkpoint file read as `format`,
  a plain ViT of `variant` (default: `default_variant`) with `overrides`; its head, when the
  file has one, sets the number of classes, otherwise `default_num_classes`).

  Raises FileNotFoundError for a missing source and ValueError for an ambiguous one, naming
  the field.
  """
  workdir, path = teacher_cfg.get("workdir", ""), teacher_cfg.get("path", "")
  if bool(workdir) == bool(path):
    raise ValueError(f"Set exactly one of {_FIELD}.workdir (a finished jvt run) and "
                     f"{_FIELD}.path (a checkpoint file); got workdir={workdir!r}, "
                     f"path={path!r}.")
  if workdir:
    return _from_workdir(workdir, image_size, dtype)
  overrides = teacher_cfg.get("overrides") or {}
  overrides = dict(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)
  return _from_path(path, teacher_cfg.get("format", ""), teacher_cfg.get("variant", "")
                    or default_variant, overrides, image_size, default_num_classes, dtype,
                    posemb_interpolation)
