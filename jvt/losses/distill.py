"""Knowledge-distillation losses: logit distillation (Hinton et al.) and feature matching.

The teacher is always under `stop_gradient`: these losses train the student only, even when the
caller computes the teacher inside the same differentiated function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jvt.losses.classification import compute_dtype
from jvt.losses.classification import masked_mean
from jvt.losses.classification import softmax_cross_entropy
from jvt.losses.proxy_anchor import l2_normalize

FEATURE_KINDS = ("cosine", "l2")


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 1.0,
    weight: float = 0.5,
    mask: jax.Array | None = None,
) -> jax.Array:
  """(1 - w) CE(y, s) + w T^2 KL(softmax(t / T) || softmax(s / T)), mean over the batch.

  Args:
    student_logits: [B, C].
    teacher_logits: [B, C]; gradients do not flow into it.
    labels: [B] int ground-truth classes.
    temperature: T > 0 (a Python number); the T^2 factor keeps the soft-target gradient scale
      independent of T.
    weight: w in [0, 1] (a Python number); w = 0 is plain cross-entropy.
    mask: optional [B] bool/float mask of real (not padded) examples.
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f"student and teacher logits must have the same shape [B, C]; got student "
        f"{student_logits.shape} and teacher {teacher_logits.shape}. Distill between models "
        "with the same label space.")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0; got {temperature}.")
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"weight must be in [0, 1]; got {weight}.")
  dtype = compute_dtype(student_logits)
  s = student_logits.astype(dtype)  # [B, C]
  t = jax.lax.stop_gradient(teacher_logits).astype(dtype)  # [B, C]
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)  # [B, C]
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)  # [B, C]
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)  # [B]
  ce = softmax_cross_entropy(s, labels, mask=mask)
  return (1.0 - weight) * ce + weight * temperature**2 * masked_mean(kl, mask)


def feature_distill_loss(
    student_feat: jax.Array,
    teacher_feat: jax.Array,
    *,
    kind: str = "cosine",
    mask: jax.Array | None = None,
) -> jax.Array:
  """Feature-matching loss between student and teacher features of the same shape.

  The student features must already be projected to the teacher's width (the learned
  projection is a model parameter, applied by the model or trainer).

  Args:
    student_feat: [B, D] or [B, N, D] projected student features.
    teacher_feat: same shape; gradients do not flow into it.
    kind: "cosine" -> mean over vectors of 1 - cos(student, teacher);
      "l2" -> mean squared error over all elements.
    mask: optional [B] bool/float mask of real examples (tokens of a masked example are
      all excluded).
  """
  if kind not in FEATURE_KINDS:
    raise ValueError(f"kind must be one of {FEATURE_KINDS}; got {kind!r}.")
  if student_feat.shape != teacher_feat.shape or student_feat.ndim not in (2, 3):
    raise ValueError(
        f"student and teacher features must both be [B, D] or [B, N, D] with equal shapes; got "
        f"student {student_feat.shape} and teacher {teacher_feat.shape}. Project the student "
        "features to the teacher's width first.")
  dtype = compute_dtype(student_feat)
  s = student_feat.astype(dtype)
  t = jax.lax.stop_gradient(teacher_feat).astype(dtype)
  if kind == "cosine":
    per_vector = 1.0 - jnp.sum(l2_normalize(s) * l2_normalize(t), axis=-1)  # [B] or [B, N]
  else:
    per_vector = jnp.mean(jnp.square(s - t), axis=-1)  # [B] or [B, N]
  per_example = per_vector if per_vector.ndim == 1 else jnp.mean(per_vector, axis=1)  # [B]
  return masked_mean(per_example, mask)
