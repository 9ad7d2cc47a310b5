"""Cosine (spherical) k-means on the host, deterministic for a given seed.

Used by DA-VPT to group the C class means into M prompt clusters once per epoch; C is at most
a few thousand, so plain numpy in float64 is fast and exactly reproducible.

Algorithm:
  1. Rows of `x` are l2-normalised.
  2. Initial centroids: `init_centroids` (normalised) when given (warm start), else cosine
     k-means++ seeded by `np.random.default_rng(seed)`: the first centre is a uniformly drawn
     row, each next one is drawn with probability proportional to (1 - max cos to the chosen
     centres)^2 (uniformly among unchosen rows if every such distance is 0).
  3. Repeat up to `max_iters` times: assign each row to the centroid of highest cosine (ties to
     the lowest cluster index); repair empty clusters (below); set each centroid to the
     normalised mean of its rows; stop once no centroid moved by more than `tol` (l2).
  Empty clusters: taken in increasing cluster index, each empty cluster receives the row that is
  farthest (lowest cosine) from its current centroid among rows whose cluster has more than one
  member (ties to the lowest row index). Every returned cluster is therefore non-empty.
  A cluster whose members' mean is (numerically) the zero vector keeps its previous centroid.

The returned assignments are the ones the returned centroids were computed from.
"""
from __future__ import annotations

import numpy as np

_EPS = 1e-12


def _normalize_rows(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norms, _EPS)


def _kmeans_pp_init(x: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
  """Cosine k-means++ initial centroids [K, D] from unit rows `x` [N, D]."""
  rng = np.random.default_rng(seed)
  n = x.shape[0]
  chosen = [int(rng.integers(n))]
  max_cos = x @ x[chosen[0]]  # [N]
  for _ in range(1, num_clusters):
    dist = np.clip(1.0 - max_cos, 0.0, None)
    dist[chosen] = 0.0
    weights = dist**2
    total = weights.sum()
    if total > 0:
      idx = int(rng.choice(n, p=weights / total))
    else:
      idx = int(rng.choice(np.setdiff1d(np.arange(n), chosen)))
    chosen.append(idx)
    max_cos = np.maximum(max_cos, x @ x[idx])
  return x[chosen].copy()


def _fill_empty_clusters(
    x: np.ndarray, centroids: np.ndarray, assignments: np.ndarray
) -> np.ndarray:
  """Moves rows into empty clusters (see the module docstring); returns new assignments."""
  num_clusters = centroids.shape[0]
  assignments = assignments.copy()
  counts = np.bincount(assignments, minlength=num_clusters)
  for k in np.flatnonzero(counts == 0):
    own_cos = np.sum(x * centroids[assignments], axis=1)  # [N]
    donors = counts[assignments] > 1
    i = int(np.argmin(np.where(donors, own_cos, np.inf)))
    counts[assignments[i]] -= 1
    assignments[i] = k
    counts[k] = 1
  return assignments


def cosine_kmeans(
    x: np.ndarray,
    num_clusters: int,
    *,
    seed: int = 0,
    init_centroids: np.ndarray | None = None,
    max_iters: int = 20,
    tol: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
  """Clusters the rows of `x` [N, D] by cosine similarity into `num_clusters` groups.

  Args:
    x: [N, D] points (any norm; rows are normalised).
    num_clusters: K, with 1 <= K <= N.
    seed: seeds the k-means++ initialisation (unused when `init_centroids` is given).
    init_centroids: optional [K, D] warm start (e.g. the previous epoch's centroids).
    max_iters: maximum number of assign/update rounds (>= 1).
    tol: stop when every centroid moved by less than this (l2 distance of unit vectors).

  Returns:
    centroids: [K, D] float32, unit norm.
    assignments: [N] int32 in [0, K); every cluster has at least one member.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"x must be [N, D]; got shape {x.shape}.")
  if not 1 <= num_clusters <= x.shape[0]:
    raise ValueError(
        f"num_clusters must be in [1, N={x.shape[0]}]; got {num_clusters}.")
  if max_iters < 1:
    raise ValueError(f"max_iters must be >= 1; got {max_iters}.")
  x = _normalize_rows(x)
  if init_centroids is None:
    centroids = _kmeans_pp_init(x, num_clusters, seed)
  else:
    init_centroids = np.asarray(init_centroids, np.float64)
    if init_centroids.shape != (num_clusters, x.shape[1]):
      raise ValueError(
          f"init_centroids must be [num_clusters, D] = {(num_clusters, x.shape[1])}; got "
          f"{init_centroids.shape}.")
    centroids = _normalize_rows(init_centroids)

  for _ in range(max_iters):
    assignments = np.argmax(x @ centroids.T, axis=1)  # [N]
    assignments = _fill_empty_clusters(x, centroids, assignments)
    sums = np.zeros_like(centroids)
    np.add.at(sums, assignments, x)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    new_centroids = np.where(norms > _EPS, sums / np.maximum(norms, _EPS), centroids)
    shift = np.max(np.linalg.norm(new_centroids - centroids, axis=1))
    centroids = new_centroids
    if shift < tol:
      break
  return centroids.astype(np.float32), assignments.astype(np.int32)
