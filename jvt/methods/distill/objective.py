"""Distillation's task loss: a frozen teacher supervises the student.

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
`<workdir>/teacher.json` once the run has started (`records`; the config in every checkpoint's
metadata names the source too).
"""
from __future__ import annotations

import json
import logging
from typing import Any

import jax
import jax.numpy as jnp

from jvt.losses.classification import accuracy
from jvt.losses.distill import FEATURE_KINDS, feature_distill_loss, kd_loss
from jvt.methods.distill.projection import DistillProj
from jvt.methods.distill.teacher import _FIELD, Teacher, load_teacher
from jvt.methods.terms import CrossEntropy, ObjectiveContext

PyTree = Any
log = logging.getLogger("jvt.distill")

FEATURE_TOKENS = ("cls", "mean", "patches")


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
    proj = next((m for m in self.student.methods if isinstance(m, DistillProj)), None)
    proj_dim, proj_num = (proj.dim, proj.num) if proj is not None else (0, 0)
    if self.feature_weight == 0:
      if proj is not None:
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
    if proj is None and ds != dt:
      raise ValueError(f"Feature distillation: the student's width {ds} differs from the "
                       f"teacher's {dt}, so it needs a learned projection: {hint}.")
    if proj is not None and (proj_dim, proj_num) != (dt, k):
      raise ValueError(f"config.tuning's distill_proj has dim={proj_dim}, "
                       f"num={proj_num}; the teacher's width is {dt} and "
                       f"{k} layer pair(s) are matched: {hint}.")

  def constants(self, ctx: ObjectiveContext) -> dict:
    """The teacher's parameters (replicated by the trainer)."""
    del ctx
    log.info("Distillation teacher: %s", json.dumps(self._source()))
    return {"teacher": self.teacher.params}

  def _source(self) -> dict:
    return dict(self.teacher.source, num_classes=self.teacher.num_classes,
                has_head=self.teacher.has_head)

  def records(self) -> dict[str, dict]:
    """`teacher.json`: where the teacher came from (written once the run has started)."""
    return {"teacher.json": self._source()}

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

  def loss(self, logits, aux, batch, constants):
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
    return total, metrics
