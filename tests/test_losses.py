"""Tests for jvt.losses against plain numpy transcriptions of the formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvt import losses


# Jitted entry points: one compilation per test instead of one per primitive (faster on CPU),
# and they check that the losses trace.
_proxy_anchor = jax.jit(losses.proxy_anchor_loss, static_argnames=("normalize_positives",))
_kd = jax.jit(losses.kd_loss, static_argnames=("temperature", "weight"))


# ----------------------------------------------------------------------------- references
def _np_log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_proxy_anchor(features, proxies, proxy_ids, alpha=32.0, delta_pos=0.1, delta_neg=-0.1,
                     normalize_positives="with_positives", scale_ratio=1.0, valid=None):
  """Proxy-Anchor written with python loops over proxies and samples."""
  features = np.asarray(features, np.float64)
  proxies = np.asarray(proxies, np.float64)
  num_samples, num_proxies = features.shape[0], proxies.shape[0]
  if valid is None:
    valid = [True] * num_samples
  pos_total, neg_total, num_with_pos = 0.0, 0.0, 0
  for p in range(num_proxies):
    pv = proxies[p] / math.sqrt(float(proxies[p] @ proxies[p]))
    pos_sum, neg_sum, has_pos = 0.0, 0.0, False
    for i in range(num_samples):
      if not valid[i]:
        continue
      fv = features[i] / math.sqrt(float(features[i] @ features[i]))
      s = scale_ratio * float(pv @ fv)
      if proxy_ids[i] == p:
        has_pos = True
        pos_sum += math.exp(-alpha * (s - delta_pos))
      else:
        neg_sum += math.exp(alpha * (s - delta_neg))
    pos_total += math.log(1.0 + pos_sum)
    neg_total += math.log(1.0 + neg_sum)
    num_with_pos += has_pos
  pos_norm = max(num_with_pos, 1) if normalize_positives == "with_positives" else num_proxies
  return pos_total / pos_norm + neg_total / num_proxies


def _random_case(seed, batch=12, num_proxies=5, dim=8):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(batch, dim)).astype(np.float32)
  proxies = rng.normal(size=(num_proxies, dim)).astype(np.float32)
  return rng, features, proxies


# ----------------------------------------------------------------------------- proxy anchor
@pytest.mark.parametrize("normalize_positives", ["with_positives", "all"])
@pytest.mark.parametrize("scale_ratio", [1.0, 5.0])
def test_proxy_anchor_matches_loop_reference(normalize_positives, scale_ratio):
  rng, features, proxies = _random_case(0)
  # Only proxies 0, 1, 3 get positives; 2 and 4 have none.
  proxy_ids = rng.choice([0, 1, 3], size=features.shape[0])
  # alpha 8 keeps the exponentials in float32 range at scale_ratio 5 for a tight comparison.
  got = _proxy_anchor(
      jnp.asarray(features), jnp.asarray(proxies), jnp.asarray(proxy_ids), alpha=8.0,
      normalize_positives=normalize_positives, scale_ratio=scale_ratio)
  want = _np_proxy_anchor(features, proxies, proxy_ids, alpha=8.0,
                          normalize_positives=normalize_positives, scale_ratio=scale_ratio)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_proxy_anchor_default_hyperparameters_and_shared_proxies():
  rng, features, proxies = _random_case(1, batch=16, num_proxies=4)
  # Ten classes mapped onto four proxies, several classes per proxy.
  mapping = np.array([0, 0, 1, 2, 2, 2, 3, 1, 0, 3])
  labels = rng.integers(0, 10, size=16)
  proxy_ids = mapping[labels]
  got = _proxy_anchor(jnp.asarray(features), jnp.asarray(proxies),
                                 jnp.asarray(proxy_ids))
  want = _np_proxy_anchor(features, proxies, proxy_ids)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_proxy_anchor_normalisers_differ_by_positive_proxy_count():
  _, features, proxies = _random_case(2, batch=6, num_proxies=6)
  proxy_ids = np.array([0, 0, 1, 1, 1, 0])  # 2 of 6 proxies have positives
  paper = _proxy_anchor(features, proxies, proxy_ids, alpha=4.0,
                                   normalize_positives="with_positives")
  code = _proxy_anchor(features, proxies, proxy_ids, alpha=4.0,
                                  normalize_positives="all")
  # Same negative part; the positive sum is divided by 2 (paper) vs 6 (code).
  pos_sum = 0.0
  for p in (0, 1):
    pv = proxies[p] / np.linalg.norm(proxies[p])
    sims = [pv @ (f / np.linalg.norm(f)) for f, q in zip(features, proxy_ids) if q == p]
    pos_sum += math.log(1.0 + sum(math.exp(-4.0 * (s - 0.1)) for s in sims))
  np.testing.assert_allclose(float(paper) - float(code), pos_sum / 2 - pos_sum / 6, rtol=1e-4)


def test_proxy_anchor_valid_mask_ignores_padding():
  rng, features, proxies = _random_case(3, batch=10)
  proxy_ids = rng.integers(0, 5, size=10)
  valid = np.arange(10) < 7
  padded = features.copy()
  padded[7:] = 0.0  # padded rows: zero features, would be NaN-prone without the mask
  got = _proxy_anchor(padded, proxies, proxy_ids, valid=jnp.asarray(valid))
  want = _np_proxy_anchor(features[:7], proxies, proxy_ids[:7])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  grads = jax.grad(lambda f: _proxy_anchor(f, proxies, proxy_ids, valid=valid))(
      jnp.asarray(padded))
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(np.asarray(grads[7:]), 0.0)


@pytest.mark.parametrize("normalize_positives", ["with_positives", "all"])
def test_proxy_anchor_single_shared_proxy_has_finite_gradients(normalize_positives):
  _, features, proxies = _random_case(4, batch=8, num_proxies=3)
  proxy_ids = np.zeros(8, np.int32)  # every sample shares proxy 0; proxies 1, 2 have none
  fn = jax.jit(lambda f, p: _proxy_anchor(
      f, p, proxy_ids, normalize_positives=normalize_positives))
  value = fn(features, proxies)
  gf, gp = jax.grad(fn, argnums=(0, 1))(features, proxies)
  want = _np_proxy_anchor(features, proxies, proxy_ids, normalize_positives=normalize_positives)
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  assert np.all(np.isfinite(gf)) and np.all(np.isfinite(gp))


def test_proxy_anchor_large_similarities_are_stable():
  # Features equal to their proxies with alpha large: exp(alpha * 1.1) overflows float32 naively.
  _, _, proxies = _random_case(5, num_proxies=4)
  features = np.concatenate([proxies, -proxies])
  proxy_ids = np.array([1, 2, 3, 0, 0, 1, 2, 3])
  fn = lambda f, p: _proxy_anchor(f, p, proxy_ids, alpha=200.0)
  value = fn(features, proxies)
  gf, gp = jax.grad(fn, argnums=(0, 1))(features, proxies)
  assert np.isfinite(value) and np.all(np.isfinite(gf)) and np.all(np.isfinite(gp))


def test_proxy_anchor_gradients_match_finite_differences_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    features = rng.normal(size=(6, 4))
    proxies = rng.normal(size=(4, 4))
    proxy_ids = np.array([0, 0, 1, 3, 3, 3])  # proxy 2 has no positive
    valid = np.array([True, True, True, True, True, False])

    def loss(f, p):
      return _proxy_anchor(f, p, proxy_ids, alpha=4.0, scale_ratio=2.0, valid=valid)

    gf, gp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(features), jnp.asarray(proxies))
    assert gf.dtype == jnp.float64

    def numeric(which, eps=1e-6):
      base = [features, proxies]
      grad = np.zeros_like(base[which])
      for idx in np.ndindex(grad.shape):
        plus = [b.copy() for b in base]
        minus = [b.copy() for b in base]
        plus[which][idx] += eps
        minus[which][idx] -= eps
        f_plus = _np_proxy_anchor(plus[0], plus[1], proxy_ids, alpha=4.0, scale_ratio=2.0,
                                  valid=valid)
        f_minus = _np_proxy_anchor(minus[0], minus[1], proxy_ids, alpha=4.0, scale_ratio=2.0,
                                   valid=valid)
        grad[idx] = (f_plus - f_minus) / (2 * eps)
      return grad

    np.testing.assert_allclose(np.asarray(gf), numeric(0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(gp), numeric(1), rtol=1e-6, atol=1e-8)
  assert jnp.zeros(()).dtype == jnp.float32  # x64 restored


def test_proxy_anchor_rejects_bad_arguments():
  _, features, proxies = _random_case(7)
  ids = np.zeros(12, np.int32)
  with pytest.raises(ValueError, match="normalize_positives.*with_positives.*all"):
    losses.proxy_anchor_loss(features, proxies, ids, normalize_positives="paper")
  with pytest.raises(ValueError, match=r"\(12, 8\).*\(5, 3\)"):
    losses.proxy_anchor_loss(features, proxies[:, :3], ids)
  with pytest.raises(ValueError, match="proxy_ids"):
    losses.proxy_anchor_loss(features, proxies, ids[:5])


# ----------------------------------------------------------------------------- classification
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_numpy(label_smoothing):
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(7, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, size=7)
  mask = np.array([1, 1, 0, 1, 1, 0, 1], bool)
  log_p = _np_log_softmax(logits.astype(np.float64))
  per = []
  for i in range(7):
    target = np.full(5, label_smoothing / 5)
    target[labels[i]] += 1.0 - label_smoothing
    per.append(-(target * log_p[i]).sum())
  per = np.array(per)
  got = losses.softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing)
  np.testing.assert_allclose(float(got), per.mean(), rtol=1e-5)
  got_masked = losses.softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing,
                                            mask=mask)
  np.testing.assert_allclose(float(got_masked), per[mask].mean(), rtol=1e-5)


def test_cross_entropy_empty_mask_is_zero_with_finite_gradient():
  logits = jnp.ones((3, 4))
  labels = jnp.array([0, 1, 2])
  mask = jnp.zeros(3, bool)
  value, grad = jax.value_and_grad(
      lambda z: losses.softmax_cross_entropy(z, labels, mask=mask))(logits)
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_cross_entropy_rejects_bad_shapes_and_smoothing():
  with pytest.raises(ValueError, match=r"\(3, 4\).*\(4,\)"):
    losses.softmax_cross_entropy(jnp.zeros((3, 4)), jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.softmax_cross_entropy(jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32), label_smoothing=1.0)


def test_accuracy_and_correct_predictions():
  logits = np.array([[0.1, 0.9], [2.0, 1.0], [0.3, 0.2], [0.0, 5.0]])
  labels = np.array([1, 1, 0, 0])  # correct, wrong, correct, wrong
  np.testing.assert_array_equal(losses.correct_predictions(logits, labels), [1, 0, 1, 0])
  np.testing.assert_array_equal(
      losses.correct_predictions(logits, labels, mask=np.array([1, 1, 0, 1], bool)), [1, 0, 0, 0])
  np.testing.assert_allclose(float(losses.accuracy(logits, labels)), 0.5)
  np.testing.assert_allclose(
      float(losses.accuracy(logits, labels, mask=np.array([1, 0, 1, 1], bool))), 2 / 3, rtol=1e-6)


# ----------------------------------------------------------------------------- distillation
def _np_kd(s, t, y, temperature, weight):
  log_ps1 = _np_log_softmax(s)
  ce = -log_ps1[np.arange(len(y)), y]
  log_ps = _np_log_softmax(s / temperature)
  log_pt = _np_log_softmax(t / temperature)
  kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
  return ((1 - weight) * ce + weight * temperature**2 * kl).mean()


def _np_kd_grad(s, t, y, temperature, weight):
  """Analytic d/ds: (1-w)(softmax(s) - onehot) / B + w T (softmax(s/T) - softmax(t/T)) / B."""
  batch, num_classes = s.shape
  onehot = np.eye(num_classes)[y]
  ps1 = np.exp(_np_log_softmax(s))
  ps = np.exp(_np_log_softmax(s / temperature))
  pt = np.exp(_np_log_softmax(t / temperature))
  return ((1 - weight) * (ps1 - onehot) + weight * temperature * (ps - pt)) / batch


@pytest.mark.parametrize("temperature,weight", [(1.0, 0.5), (4.0, 0.7), (2.0, 1.0)])
def test_kd_loss_value_and_gradient_match_numpy(temperature, weight):
  rng = np.random.default_rng(20)
  s = rng.normal(size=(6, 5)) * 2
  t = rng.normal(size=(6, 5)) * 2
  y = rng.integers(0, 5, size=6)

  def fn(s_, t_):
    return _kd(s_, t_, y, temperature=temperature, weight=weight)

  value = fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(float(value), _np_kd(s, t, y, temperature, weight), rtol=1e-5)
  gs, gt = jax.grad(fn, argnums=(0, 1))(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(np.asarray(gs), _np_kd_grad(s, t, y, temperature, weight),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(gt), 0.0)  # teacher under stop_gradient


def test_kd_loss_limits():
  rng = np.random.default_rng(21)
  s = rng.normal(size=(5, 4)).astype(np.float32)
  t = rng.normal(size=(5, 4)).astype(np.float32)
  y = rng.integers(0, 4, size=5)
  # w = 0: plain cross-entropy, whatever the teacher and temperature.
  np.testing.assert_allclose(float(losses.kd_loss(s, t, y, temperature=3.0, weight=0.0)),
                             float(losses.softmax_cross_entropy(s, y)), rtol=1e-6)
  np.testing.assert_allclose(float(losses.kd_loss(s, t, y, weight=0.0)),
                             -_np_log_softmax(s.astype(np.float64))[np.arange(5), y].mean(),
                             rtol=1e-5)
  # T -> 1 approaches the T = 1 value (= (1-w) CE + w KL with no scaling).
  at_one = float(losses.kd_loss(s, t, y, temperature=1.0, weight=0.3))
  near_one = float(losses.kd_loss(s, t, y, temperature=1.0 + 1e-4, weight=0.3))
  np.testing.assert_allclose(near_one, at_one, rtol=1e-3)
  np.testing.assert_allclose(at_one, _np_kd(s.astype(np.float64), t.astype(np.float64), y, 1.0, 0.3),
                             rtol=1e-5)
  # The teacher itself as student: KL vanishes, w=1 loss is 0.
  np.testing.assert_allclose(float(losses.kd_loss(t, t, y, temperature=2.0, weight=1.0)), 0.0,
                             atol=1e-6)


def test_kd_loss_mask_and_errors():
  rng = np.random.default_rng(22)
  s = rng.normal(size=(4, 3))
  t = rng.normal(size=(4, 3))
  y = np.array([0, 1, 2, 0])
  mask = np.array([True, False, True, True])
  np.testing.assert_allclose(
      float(losses.kd_loss(s, t, y, temperature=2.0, weight=0.4, mask=mask)),
      _np_kd(s[mask], t[mask], y[mask], 2.0, 0.4), rtol=1e-5)
  with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 5\)"):
    losses.kd_loss(s, np.zeros((4, 5)), y)
  with pytest.raises(ValueError, match="temperature"):
    losses.kd_loss(s, t, y, temperature=0.0)
  with pytest.raises(ValueError, match="weight"):
    losses.kd_loss(s, t, y, weight=1.5)


@pytest.mark.parametrize("shape", [(4, 6), (4, 3, 6)])
def test_feature_distill_loss_matches_numpy(shape):
  rng = np.random.default_rng(30)
  s = rng.normal(size=shape)
  t = rng.normal(size=shape)
  cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
  np.testing.assert_allclose(float(losses.feature_distill_loss(s, t, kind="cosine")),
                             (1 - cos).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(losses.feature_distill_loss(s, t, kind="l2")),
                             ((s - t) ** 2).mean(), rtol=1e-5)
  mask = np.array([True, True, False, True])
  np.testing.assert_allclose(float(losses.feature_distill_loss(s, t, kind="l2", mask=mask)),
                             ((s[mask] - t[mask]) ** 2).mean(), rtol=1e-5)
  gt = jax.grad(lambda t_: losses.feature_distill_loss(jnp.asarray(s), t_))(jnp.asarray(t))
  np.testing.assert_array_equal(np.asarray(gt), 0.0)


def test_feature_distill_loss_errors():
  with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 8\)"):
    losses.feature_distill_loss(np.zeros((2, 4)), np.zeros((2, 8)))
  with pytest.raises(ValueError, match="kind"):
    losses.feature_distill_loss(np.ones((2, 4)), np.ones((2, 4)), kind="kl")
