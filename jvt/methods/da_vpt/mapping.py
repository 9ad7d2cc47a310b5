"""DA-VPT's class -> prompt mapping: per-class feature means and their clustering.

Flow: features of the frozen model (or of the training run, accumulated over an epoch with
`accumulate_class_sums` inside the jitted step) -> `finalize_class_means` -> `compute_mapping`
on the host -> `mapping` [C] int32, fed back into the jitted step as an array (never retraced).

Edge-case policies (also in docs/losses.md):
  * C <= M: identity, class c -> prompt c, whatever the counts; prompts C..M-1 stay unused and
    their centroid rows are zero.
  * C > M: cosine k-means of the means of the *seen* classes (count > 0) into M clusters,
    warm-started from `init_centroids` when given.
  * Unseen classes (count 0) when C > M: class c -> prompt c mod M.
  * C > M but fewer than M seen classes: no clustering; the i-th seen class (in class order)
    -> prompt i, unseen classes -> c mod M, centroid rows of unused prompts are zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jvt.methods.da_vpt.kmeans import cosine_kmeans
from jvt.losses.classification import compute_dtype
from jvt.losses.proxy_anchor import l2_normalize

_LN_EPS = 1e-6


def accumulate_class_sums(
    sums: jax.Array,
    counts: jax.Array,
    features: jax.Array,
    labels: jax.Array,
    valid: jax.Array | None = None,
    *,
    normalize: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Adds a batch of features to running per-class sums (jit-friendly, segment sums).

  Args:
    sums: [C, D] running per-class feature sums.
    counts: [C] running per-class example counts (int).
    features: [B, D] features of the batch (e.g. the frozen model's [CLS] output).
    labels: [B] int class labels; labels outside [0, C) are ignored.
    valid: optional [B] bool mask; False rows (padding) are ignored.
    normalize: l2-normalise each feature before adding it (DA-VPT averages unit features).

  Returns:
    The updated (sums [C, D], counts [C]), with the dtypes of the inputs.
  """
  num_classes = sums.shape[0]
  if sums.ndim != 2 or counts.shape != (num_classes,):
    raise ValueError(f"expected sums [C, D] and counts [C]; got {sums.shape} and {counts.shape}.")
  if features.ndim != 2 or features.shape[1] != sums.shape[1] or labels.shape != features.shape[:1]:
    raise ValueError(
        f"expected features [B, D={sums.shape[1]}] and labels [B]; got {features.shape} and "
        f"{labels.shape}.")
  f = jnp.asarray(features, compute_dtype(features))
  if normalize:
    f = l2_normalize(f)
  keep = (labels >= 0) & (labels < num_classes)  # [B]
  if valid is not None:
    keep = keep & jnp.asarray(valid, jnp.bool_)
  ids = jnp.where(keep, labels, 0)  # [B]
  f = jnp.where(keep[:, None], f, 0.0)  # [B, D]
  batch_sums = jax.ops.segment_sum(f, ids, num_segments=num_classes)  # [C, D]
  batch_counts = jax.ops.segment_sum(keep.astype(counts.dtype), ids, num_segments=num_classes)
  return sums + batch_sums.astype(sums.dtype), counts + batch_counts


def finalize_class_means(sums: jax.Array, counts: jax.Array) -> jax.Array:
  """Per-class means [C, D] from sums [C, D] and counts [C]; rows of unseen classes are 0."""
  denom = jnp.maximum(counts, 1).astype(sums.dtype)[:, None]  # [C, 1]
  return sums / denom


def class_means(
    features: jax.Array, labels: jax.Array, num_classes: int, *, normalize: bool = True
) -> tuple[jax.Array, jax.Array]:
  """Mean (l2-normalised, by default) feature of each class.

  Args:
    features: [N, D].
    labels: [N] int in [0, num_classes).
    num_classes: C.
    normalize: l2-normalise each feature before averaging, as DA-VPT does.

  Returns:
    means [C, D] (zero rows for classes with no example) and counts [C] int32.
  """
  if features.ndim != 2:
    raise ValueError(f"features must be [N, D]; got shape {features.shape}.")
  dtype = compute_dtype(features)
  sums = jnp.zeros((num_classes, features.shape[1]), dtype)
  counts = jnp.zeros((num_classes,), jnp.int32)
  sums, counts = accumulate_class_sums(sums, counts, features, labels, normalize=normalize)
  return finalize_class_means(sums, counts), counts


def _layer_norm_rows(x: np.ndarray) -> np.ndarray:
  """Row-wise layer norm without affine parameters."""
  mean = x.mean(axis=1, keepdims=True)
  var = x.var(axis=1, keepdims=True)
  return (x - mean) / np.sqrt(var + _LN_EPS)


def _unit_rows(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return np.where(norms > 0, x / np.where(norms > 0, norms, 1.0), 0.0)


def compute_mapping(
    class_means: np.ndarray,
    class_counts: np.ndarray,
    num_prompts: int,
    *,
    seed: int,
    init_centroids: np.ndarray | None = None,
    layer_norm: bool = False,
    max_iters: int = 20,
    tol: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
  """Maps each of C classes to one of M prompts (host-side, numpy).

  Args:
    class_means: [C, D] per-class mean features (e.g. from `class_means`).
    class_counts: [C] number of examples behind each mean; 0 marks an unseen class.
    num_prompts: M, the number of proxy prompts.
    seed: seeds the k-means initialisation when `init_centroids` is None.
    init_centroids: optional [M, D] warm start (the centroids this function returned last time).
    layer_norm: layer-norm (no affine) each class mean before clustering.
    max_iters, tol: k-means stopping rule (see `cosine_kmeans`).

  Returns:
    mapping: [C] int32, class c -> prompt mapping[c] in [0, M).
    centroids: [M, D] float32, unit rows in the clustering space (after the optional layer
      norm); zero rows for prompts that no clustered class uses. See the module docstring for
      the edge-case policies.
  """
  means = np.asarray(class_means, np.float64)
  counts = np.asarray(class_counts)
  if means.ndim != 2 or counts.shape != means.shape[:1]:
    raise ValueError(
        f"expected class_means [C, D] and class_counts [C]; got {means.shape} and {counts.shape}.")
  if num_prompts < 1:
    raise ValueError(f"num_prompts must be >= 1; got {num_prompts}.")
  num_classes, dim = means.shape
  if layer_norm:
    means = _layer_norm_rows(means)
  means = _unit_rows(means)
  seen = counts > 0  # [C]
  centroids = np.zeros((num_prompts, dim), np.float64)

  if num_classes <= num_prompts:
    centroids[:num_classes] = np.where(seen[:, None], means, 0.0)
    return np.arange(num_classes, dtype=np.int32), centroids.astype(np.float32)

  mapping = np.arange(num_classes, dtype=np.int32) % num_prompts
  seen_ids = np.flatnonzero(seen)
  if seen_ids.size < num_prompts:
    mapping[seen_ids] = np.arange(seen_ids.size, dtype=np.int32)
    centroids[: seen_ids.size] = means[seen_ids]
    return mapping, centroids.astype(np.float32)

  centroids, assignments = cosine_kmeans(
      means[seen_ids], num_prompts, seed=seed, init_centroids=init_centroids,
      max_iters=max_iters, tol=tol)
  mapping[seen_ids] = assignments
  return mapping, centroids
