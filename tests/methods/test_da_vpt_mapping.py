"""Tests for jvt.methods.da_vpt: cosine k-means and the class -> prompt mapping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvt.methods import da_vpt as davpt


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _planted(rng, num_groups, per_group, dim, noise=0.05):
  """Points around `num_groups` orthogonal directions, shuffled; returns (x, group ids, dirs)."""
  dirs = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:num_groups]  # [K, D] orthonormal
  groups = np.repeat(np.arange(num_groups), per_group)
  x = dirs[groups] + noise * rng.normal(size=(groups.size, dim))
  perm = rng.permutation(groups.size)
  return x[perm], groups[perm], dirs


def _same_partition(a, b):
  """True when the labelings `a` and `b` induce the same partition (up to renaming)."""
  pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist()))
  return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _check_fixed_point(x, centroids, assignments):
  """Independent k-means invariants: centroids are normalised member means, rows pick the best."""
  x = _unit(np.asarray(x, np.float64))
  for k in range(centroids.shape[0]):
    members = x[assignments == k]
    assert len(members) > 0
    np.testing.assert_allclose(centroids[k], _unit(members.mean(0)), atol=1e-5)
  np.testing.assert_array_equal(np.argmax(x @ centroids.T, axis=1), assignments)


# ----------------------------------------------------------------------------- k-means
def test_kmeans_recovers_planted_clusters():
  rng = np.random.default_rng(0)
  x, groups, dirs = _planted(rng, num_groups=4, per_group=10, dim=8)
  x = x * rng.uniform(0.5, 3.0, size=(40, 1))  # norms must not matter
  centroids, assignments = davpt.cosine_kmeans(x, 4, seed=3)
  assert centroids.shape == (4, 8) and centroids.dtype == np.float32
  assert assignments.shape == (40,) and assignments.dtype == np.int32
  assert _same_partition(assignments, groups)
  np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-6)
  for k in range(4):
    true_dir = dirs[groups[assignments == k][0]]
    assert centroids[k] @ true_dir > 0.99
  _check_fixed_point(x, centroids, assignments)


def test_kmeans_is_deterministic_for_a_seed():
  x = np.random.default_rng(1).normal(size=(30, 5))
  c1, a1 = davpt.cosine_kmeans(x, 4, seed=7)
  c2, a2 = davpt.cosine_kmeans(x, 4, seed=7)
  np.testing.assert_array_equal(c1, c2)
  np.testing.assert_array_equal(a1, a2)


def test_kmeans_warm_start_at_converged_solution_stays():
  x = np.random.default_rng(2).normal(size=(50, 6))  # no clear clusters
  centroids, assignments = davpt.cosine_kmeans(x, 5, seed=0, max_iters=200, tol=0.0)
  _check_fixed_point(x, centroids, assignments)
  c2, a2 = davpt.cosine_kmeans(x, 5, seed=123, init_centroids=centroids, max_iters=3)
  np.testing.assert_array_equal(a2, assignments)
  np.testing.assert_allclose(c2, centroids, atol=1e-6)


def test_kmeans_empty_cluster_takes_the_farthest_point():
  angles = np.deg2rad([0.0, 5.0, -5.0, 10.0, 60.0])
  x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
  init = np.array([[1.0, 0.0], [-1.0, 0.0]])  # cluster 1 starts with no member
  _, first = davpt.cosine_kmeans(x, 2, init_centroids=init, max_iters=1)
  np.testing.assert_array_equal(first, [0, 0, 0, 0, 1])  # the 60-degree point is the farthest
  centroids, assignments = davpt.cosine_kmeans(x, 2, init_centroids=init)
  np.testing.assert_array_equal(assignments, [0, 0, 0, 0, 1])
  np.testing.assert_allclose(centroids[1], x[4], atol=1e-6)
  np.testing.assert_allclose(centroids[0], _unit(x[:4].mean(0)), atol=1e-6)


def test_kmeans_duplicate_points_fill_every_cluster():
  x = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]])
  _, assignments = davpt.cosine_kmeans(x, 3, seed=0)
  assert sorted(set(assignments.tolist())) == [0, 1, 2]
  _, again = davpt.cosine_kmeans(x, 3, seed=0)
  np.testing.assert_array_equal(assignments, again)


def test_kmeans_rejects_bad_arguments():
  x = np.ones((3, 2))
  with pytest.raises(ValueError, match="num_clusters"):
    davpt.cosine_kmeans(x, 4)
  with pytest.raises(ValueError, match="init_centroids"):
    davpt.cosine_kmeans(x, 2, init_centroids=np.ones((3, 2)))


# ----------------------------------------------------------------------------- class means
def test_class_means_normalise_before_averaging():
  rng = np.random.default_rng(3)
  features = rng.normal(size=(9, 4)).astype(np.float32)
  labels = np.array([0, 2, 2, 0, 0, 2, 3, 3, 0])  # class 1 unseen
  means, counts = davpt.class_means(features, labels, 4)
  np.testing.assert_array_equal(counts, [4, 0, 3, 2])
  for c in range(4):
    want = _unit(features[labels == c]).mean(0) if counts[c] else np.zeros(4)
    np.testing.assert_allclose(means[c], want, rtol=1e-5, atol=1e-7)
  raw, _ = davpt.class_means(features, labels, 4, normalize=False)
  np.testing.assert_allclose(raw[2], features[labels == 2].mean(0), rtol=1e-5)


def test_accumulate_class_sums_matches_numpy_under_jit():
  rng = np.random.default_rng(4)
  num_classes, dim = 5, 3
  step = jax.jit(davpt.accumulate_class_sums)
  sums = jnp.zeros((num_classes, dim))
  counts = jnp.zeros((num_classes,), jnp.int32)
  want_sums = np.zeros((num_classes, dim))
  want_counts = np.zeros(num_classes, np.int64)
  for _ in range(3):
    features = rng.normal(size=(6, dim)).astype(np.float32)
    labels = rng.integers(-1, num_classes, size=6)  # -1: a padded label
    valid = rng.random(6) < 0.8
    sums, counts = step(sums, counts, features, labels, valid)
    for i in range(6):
      if valid[i] and labels[i] >= 0:
        want_sums[labels[i]] += features[i] / np.linalg.norm(features[i])
        want_counts[labels[i]] += 1
  np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(counts, want_counts)
  means = davpt.finalize_class_means(sums, counts)
  for c in range(num_classes):
    want = want_sums[c] / want_counts[c] if want_counts[c] else np.zeros(dim)
    np.testing.assert_allclose(means[c], want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- mapping
def test_mapping_is_identity_when_classes_fit():
  rng = np.random.default_rng(5)
  means = rng.normal(size=(3, 4))
  counts = np.array([2, 0, 5])  # class 1 unseen: still prompt 1
  mapping, centroids = davpt.compute_mapping(means, counts, 5, seed=0)
  np.testing.assert_array_equal(mapping, [0, 1, 2])
  assert mapping.dtype == np.int32 and centroids.shape == (5, 4)
  np.testing.assert_allclose(centroids[[0, 2]], _unit(means[[0, 2]]), rtol=1e-6)
  np.testing.assert_array_equal(centroids[[1, 3, 4]], 0.0)


def _planted_class_means(seed, num_groups=3, per_group=4, dim=8):
  rng = np.random.default_rng(seed)
  dirs = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:num_groups]
  groups = rng.permutation(np.repeat(np.arange(num_groups), per_group))  # group of each class
  means = dirs[groups] + 0.05 * rng.normal(size=(groups.size, dim))
  return means, groups, rng


def test_mapping_groups_planted_classes_and_is_deterministic():
  means, groups, _ = _planted_class_means(6)
  counts = np.full(12, 10)
  mapping, centroids = davpt.compute_mapping(means, counts, 3, seed=1)
  assert _same_partition(mapping, groups)
  np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-6)
  again, _ = davpt.compute_mapping(means, counts, 3, seed=1)
  np.testing.assert_array_equal(mapping, again)
  warm, warm_centroids = davpt.compute_mapping(means, counts, 3, seed=99, init_centroids=centroids)
  np.testing.assert_array_equal(warm, mapping)
  np.testing.assert_allclose(warm_centroids, centroids, atol=1e-6)


def test_mapping_unseen_classes_use_index_mod_prompts():
  means, groups, rng = _planted_class_means(7)
  counts = np.full(12, 3)
  unseen = np.array([5, 10])
  counts[unseen] = 0
  means[unseen] = rng.normal(size=(2, 8)) * 100  # garbage must not influence anything
  mapping, _ = davpt.compute_mapping(means, counts, 3, seed=0)
  np.testing.assert_array_equal(mapping[unseen], unseen % 3)
  seen = np.setdiff1d(np.arange(12), unseen)
  assert _same_partition(mapping[seen], groups[seen])


def test_mapping_with_fewer_seen_classes_than_prompts():
  means = np.random.default_rng(8).normal(size=(6, 3))
  counts = np.array([0, 4, 0, 0, 1, 0])
  mapping, centroids = davpt.compute_mapping(means, counts, 4, seed=0)
  # seen classes 1 and 4 take prompts 0 and 1; the others c mod 4.
  np.testing.assert_array_equal(mapping, [0, 0, 2, 3, 1, 1])
  np.testing.assert_allclose(centroids[:2], _unit(means[[1, 4]]), rtol=1e-6)
  np.testing.assert_array_equal(centroids[2:], 0.0)


def test_mapping_layer_norm_removes_per_class_offsets():
  rng = np.random.default_rng(9)
  dim = 16
  dirs = rng.normal(size=(3, dim))
  dirs -= dirs.mean(axis=1, keepdims=True)  # zero-mean directions survive layer norm
  groups = np.repeat(np.arange(3), 5)
  # Large per-class constant offsets dominate raw cosines; layer norm subtracts them.
  offsets = rng.uniform(-20.0, 20.0, size=(15, 1))
  means = offsets + dirs[groups] + 0.05 * rng.normal(size=(15, dim))
  raw, _ = davpt.compute_mapping(means, np.ones(15), 3, seed=0)
  assert not _same_partition(raw, groups)
  mapping, centroids = davpt.compute_mapping(means, np.ones(15), 3, seed=0, layer_norm=True)
  assert _same_partition(mapping, groups)
  ln = means - means.mean(1, keepdims=True)
  ln /= np.sqrt(ln.var(1, keepdims=True) + 1e-6)
  for k in range(3):
    np.testing.assert_allclose(centroids[k], _unit(_unit(ln[mapping == k]).mean(0)), atol=1e-5)


def test_mapping_rejects_bad_arguments():
  with pytest.raises(ValueError, match="class_counts"):
    davpt.compute_mapping(np.ones((4, 2)), np.ones(3), 2, seed=0)
  with pytest.raises(ValueError, match="init_centroids"):
    davpt.compute_mapping(np.eye(4), np.ones(4), 2, seed=0, init_centroids=np.ones((3, 4)))
