"""Classification losses and metrics over (possibly padded) batches.

Every function takes an optional per-example ``mask`` so that padded examples (the last,
incomplete batch of an evaluation split, or batches padded to a multiple of the device count)
contribute nothing. Means are taken over the masked-in examples only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(*arrays) -> jnp.dtype:
  """The dtype losses are computed in: the inputs' (canonical) type, at least float32."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of `values` [B] weighted by `mask` [B] (bool or float); 0 when the mask is empty."""
  if mask is None:
    return jnp.mean(values)
  weights = jnp.asarray(mask, values.dtype)
  if weights.shape != values.shape:
    raise ValueError(
        f"mask has shape {weights.shape} but the per-example values have shape {values.shape}; "
        "pass one mask entry per example.")
  total = jnp.sum(weights)
  # Padded entries may hold garbage; `where` keeps them out of the sum and its gradient.
  num = jnp.sum(jnp.where(weights > 0, values * weights, 0.0))
  return num / jnp.where(total > 0, total, 1.0)


def _check_logits_labels(logits: jax.Array, labels: jax.Array) -> None:
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
        f"expected logits [B, C] and integer labels [B]; got logits {logits.shape} and "
        f"labels {labels.shape}.")


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Mean softmax cross-entropy of integer `labels` [B] under `logits` [B, C].

  With label smoothing `e` the target distribution is `(1 - e) * onehot(y) + e / C`.
  Computed in at least float32 whatever the logits' dtype.
  """
  _check_logits_labels(logits, labels)
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}.")
  num_classes = logits.shape[-1]
  dtype = compute_dtype(logits)
  log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)  # [B, C]
  targets = jax.nn.one_hot(labels, num_classes, dtype=dtype)  # [B, C]
  targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  per_example = -jnp.sum(targets * log_probs, axis=-1)  # [B]
  return masked_mean(per_example, mask)


def correct_predictions(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """[B] float32: 1 where argmax(logits) == label (and the mask is on), else 0.

  Ties in the logits go to the lowest class index (argmax semantics).
  """
  _check_logits_labels(logits, labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)  # [B]
  if mask is not None:
    correct = correct * jnp.asarray(mask, jnp.float32)
  return correct


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Top-1 accuracy over the masked-in examples (0 when none are)."""
  return masked_mean(correct_predictions(logits, labels), mask)
