"""jvt.models.softmax: the values of jax.nn.softmax and the gradient of its Jacobian."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jvt.models.softmax import softmax


def _numpy_softmax_vjp(x, g):
  """float64 reference: y = softmax(x); dx = J(x)^T g with J = diag(y) - y y^T per row."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  y = e / e.sum(-1, keepdims=True)
  jac = y[..., :, None] * (np.eye(x.shape[-1]) - y[..., None, :])  # [..., i, j] = dy_i/dx_j
  return y, np.einsum("...i,...ij->...j", g, jac)


def test_values_and_gradient_match_the_jacobian():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32) * 3
  x[0, 0, 0, :3] = np.finfo(np.float32).min  # masked keys, as attention masks them
  g = rng.standard_normal(x.shape).astype(np.float32)
  y, vjp = jax.vjp(softmax, jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(g))
  want_y, want_dx = _numpy_softmax_vjp(x, g)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(y, jax.nn.softmax(jnp.asarray(x), axis=-1))
