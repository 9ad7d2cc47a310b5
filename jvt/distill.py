"""Knowledge distillation (remapping tuning): a frozen teacher supervises the student.

    L = (1 - w) CE(y, s) + w T^2 KL(softmax(t / T) || softmax(s / T))
        + beta * mean_l F(P_l f_s(l), f_t(l'))

`s`, `t`: student and teacher logits; `f_s(l)`, `f_t(l')`: the [CLS] (or mean image) token of
the outputs of matched blocks (`distill.student_layers[k]` <-> `distill.teacher_layers[k]`);
`P_l`: a learned linear map to the teacher's width (the `distill_proj` tuning method), needed
when the widths differ; `F`: 1 - cosine or mean squared error (`jvt.losses.distill`).

The teacher is any model jvt builds, loaded once on the host by `load_teacher` from a finished
run's workdir or from a checkpoint file. Its parameters are the objective's `constants`: they
enter the jitted train step as an argument (replicated over the mesh), its forward pass runs
there on the same batch under `stop_gradient`, no gradient is taken with respect to them and
they are never part of the student's checkpoints. Where the teacher came from is written to
`<workdir>/teacher.json` (the config in every checkpoint's metadata names the source too).
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

from jvt.losses.classification import accuracy
from jvt.losses.distill import FEATURE_KINDS, feature_distill_loss, kd_loss
from jvt.objectives import CrossEntropy, ObjectiveContext

PyTree = Any
log = logging.getLogger("jvt.distill")

FEATURE_TOKENS = ("cls", "mean", "patches")
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
  tokens = 1 + (image_size // model.patch_size) ** 2
  value = params[formats.POSEMB]
  if value.shape[1] != tokens:
    params[formats.POSEMB] = posemb.resize_posemb(value, tokens, 1, method)
  return params


def _build(variant: str, num_classes: int, tuning, dtype, overrides: dict):
  from jvt.models import build_model
  overrides = {k: v for k, v in overrides.items() if k not in ("dtype", "remat")}
  return build_model(variant, num_classes, tuning=tuning, dtype=dtype, remat="none", **overrides)


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
                 dict(model_cfg.get("overrides") or {}))
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
  probe = _build(variant, 1, None, dtype, overrides)
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


def _layers(values, num_layers: int, field: str, who: str) -> tuple[int, ...]:
  bad = [l for l in values if not -num_layers <= int(l) < num_layers]
  if bad:
    raise ValueError(f"config.distill.{field} contains {bad}: the {who} has {num_layers} blocks "
                     f"(valid: 0..{num_layers - 1}, or negative from the end).")
  return tuple(int(l) % num_layers for l in values)


def _token(tokens: jax.Array, which: str, num_patches: int) -> jax.Array:
  """[B, T, D] block output -> the [CLS] token [B, D], the mean of the image tokens [B, D] or
  the image tokens [B, N, D] (prompts excluded: the image tokens are the last N)."""
  if which == "cls":
    return tokens[:, 0].astype(jnp.float32)
  patches = tokens[:, -num_patches:].astype(jnp.float32)  # [B, N, D]
  return patches if which == "patches" else jnp.mean(patches, axis=1)


class DistillationObjective(CrossEntropy):
  """Cross-entropy softened by a frozen teacher's logits, plus optional feature matching."""

  def __init__(self, model, config, label_smoothing: float = 0.0,
               teacher: Teacher | None = None):
    super().__init__(label_smoothing)
    d = config.distill
    self.weight = float(d.get("weight", 0.5))
    self.temperature = float(d.get("temperature", 1.0))
    self.feature_weight = float(d.get("feature_weight", 0.0))
    self.feature_kind = d.get("feature_kind", "cosine")
    self.feature_token = d.get("feature_token", "cls")
    if not 0.0 <= self.weight <= 1.0:
      raise ValueError(f"config.distill.weight={self.weight}: must be in [0, 1].")
    if self.temperature <= 0:
      raise ValueError(f"config.distill.temperature={self.temperature}: must be > 0.")
    if self.feature_weight < 0:
      raise ValueError(f"config.distill.feature_weight={self.feature_weight}: must be >= 0.")
    if self.weight == 0 and self.feature_weight == 0:
      raise ValueError("config.distill.enabled=True but weight=0 and feature_weight=0: nothing "
                       "to distil. Set weight > 0 (logits) and/or feature_weight > 0 (features).")
    if self.feature_kind not in FEATURE_KINDS:
      raise ValueError(f"config.distill.feature_kind={self.feature_kind!r}; allowed: "
                       f"{FEATURE_KINDS}.")
    if self.feature_token not in FEATURE_TOKENS:
      raise ValueError(f"config.distill.feature_token={self.feature_token!r}; allowed: "
                       f"{FEATURE_TOKENS}.")
    self.student = model
    if teacher is None:
      teacher = load_teacher(d.teacher, image_size=int(config.model.image_size),
                             default_variant=config.model.variant,
                             default_num_classes=model.num_classes,
                             dtype=jnp.dtype(config.model.dtype),
                             posemb_interpolation=config.pretrained.posemb_interpolation)
    self.teacher = teacher
    preprocess = teacher.source.get("preprocess")
    if preprocess and preprocess != config.dataset.preprocess:
      log.warning("The teacher was trained with dataset.preprocess=%r, the student uses %r: the "
                  "teacher sees differently normalised images.", preprocess,
                  config.dataset.preprocess)
    if self.weight > 0:
      self._check_logits()
    self.student_layers: tuple[int, ...] = ()
    self.teacher_layers: tuple[int, ...] = ()
    self._check_features(d)
    self.capture = ("tokens",) if self.feature_weight > 0 else ()
    self.capture_layers = tuple(sorted(set(self.student_layers)))

  def _check_logits(self) -> None:
    t = self.teacher
    if not t.has_head:
      raise ValueError(
          f"config.distill.weight={self.weight} (logit distillation) needs a teacher with a "
          f"trained head, but the teacher of {_FIELD} has none ({t.source.get('kind')} source). "
          "Use a run's workdir or a file with its head, or set config.distill.weight=0 and "
          "distil features only.")
    if t.num_classes != self.student.num_classes:
      raise ValueError(
          f"config.distill.weight={self.weight} (logit distillation) needs the teacher and the "
          f"student to share their classes: the teacher ({_FIELD}) has {t.num_classes} classes, "
          f"the student (config.dataset) {self.student.num_classes}. Use a teacher trained on "
          "this dataset, or set config.distill.weight=0 and distil features only.")

  def _check_features(self, d) -> None:
    tuning = self.student.tuning
    if self.feature_weight == 0:
      if tuning.distill_proj_dim:
        raise ValueError("config.tuning has the distill_proj method but "
                         "config.distill.feature_weight=0: the projection would never train. "
                         "Remove it or set feature_weight > 0.")
      return
    s_layers, t_layers = tuple(d.get("student_layers", ())), tuple(d.get("teacher_layers", ()))
    if not s_layers or len(s_layers) != len(t_layers):
      raise ValueError(
          f"config.distill.feature_weight={self.feature_weight} needs matched blocks: "
          f"config.distill.student_layers={s_layers} and teacher_layers={t_layers} must be "
          "non-empty and of equal length.")
    self.student_layers = _layers(s_layers, self.student.num_layers, "student_layers",
                                  "student")
    self.teacher_layers = _layers(t_layers, self.teacher.model.num_layers, "teacher_layers",
                                  "teacher")
    if self.feature_token == "patches" and self.student.patch_size != self.teacher.model.patch_size:
      raise ValueError(
          f"config.distill.feature_token='patches' matches image tokens one to one, but the "
          f"student's patch size is {self.student.patch_size} and the teacher's "
          f"{self.teacher.model.patch_size}: use feature_token='cls' or 'mean'.")
    ds, dt, k = self.student.hidden_size, self.teacher.model.hidden_size, len(s_layers)
    hint = f"add dict(method='distill_proj', dim={dt}, num={k}) to config.tuning"
    if tuning.distill_proj_dim == 0 and ds != dt:
      raise ValueError(f"Feature distillation: the student's width {ds} differs from the "
                       f"teacher's {dt}, so it needs a learned projection: {hint}.")
    if tuning.distill_proj_dim and (tuning.distill_proj_dim, tuning.distill_proj_num) != (dt, k):
      raise ValueError(f"config.tuning's distill_proj has dim={tuning.distill_proj_dim}, "
                       f"num={tuning.distill_proj_num}; the teacher's width is {dt} and "
                       f"{k} layer pair(s) are matched: {hint}.")

  def constants(self, ctx: ObjectiveContext) -> dict:
    """The teacher's parameters (replicated by the trainer); records the teacher's source."""
    src = dict(self.teacher.source, num_classes=self.teacher.num_classes,
               has_head=self.teacher.has_head)
    log.info("Distillation teacher: %s", json.dumps(src))
    if ctx.workdir and jax.process_index() == 0:
      os.makedirs(ctx.workdir, exist_ok=True)
      tmp = os.path.join(ctx.workdir, ".teacher.json.tmp")
      with open(tmp, "w") as f:
        json.dump(src, f, indent=1)
      os.replace(tmp, os.path.join(ctx.workdir, "teacher.json"))
    return {"teacher": self.teacher.params}

  def _num_patches(self, model, images: jax.Array) -> int:
    return (images.shape[1] // model.patch_size) * (images.shape[2] // model.patch_size)

  def teacher_forward(self, teacher_params: PyTree, images: jax.Array):
    """(logits [B, C_t], aux) of the frozen teacher: deterministic, under stop_gradient."""
    params = jax.lax.stop_gradient(teacher_params)
    logits, aux = self.teacher.model.apply(
        {"params": params}, images, train=False,
        capture=self.capture, capture_layers=tuple(sorted(set(self.teacher_layers))))
    return jax.lax.stop_gradient((logits, aux))

  def feature_loss(self, aux: dict, teacher_aux: dict, images: jax.Array) -> jax.Array:
    """Mean over the matched pairs of F(P_k f_s, f_t), each [B, D_t]."""
    n_s = self._num_patches(self.student, images)
    n_t = self._num_patches(self.teacher.model, images)
    proj = aux.get("distill_proj")
    losses = []
    for k, (ls, lt) in enumerate(zip(self.student_layers, self.teacher_layers)):
      fs = _token(aux["blocks"][ls]["tokens"], self.feature_token, n_s)  # [B, (N,) D_s]
      ft = _token(teacher_aux["blocks"][lt]["tokens"], self.feature_token, n_t)  # [B, (N,) D_t]
      if proj is not None:
        fs = fs @ proj["kernel"][k].astype(jnp.float32) + proj["bias"][k].astype(jnp.float32)
      losses.append(feature_distill_loss(fs, ft, kind=self.feature_kind))
    return sum(losses) / len(losses)

  def loss(self, logits, aux, batch, state, constants):
    t_logits, t_aux = self.teacher_forward(constants["teacher"], batch["image"])
    ce = self.classification_loss(logits, batch)
    total, metrics = ce, {"ce_loss": ce}
    if self.weight > 0:
      # kd_loss with weight 1 is the soft-target term alone, w T^2 KL comes in here so that
      # the hard term keeps the objective's label smoothing.
      soft = kd_loss(logits, t_logits, batch["label"], temperature=self.temperature, weight=1.0)
      total = (1.0 - self.weight) * ce + self.weight * soft
      metrics.update(kd_loss=soft, teacher_accuracy=accuracy(t_logits, batch["label"]))
    if self.feature_weight > 0:
      feat = self.feature_loss(aux, t_aux, batch["image"])
      total = total + self.feature_weight * feat
      metrics["feature_loss"] = feat
    return total, metrics, state
