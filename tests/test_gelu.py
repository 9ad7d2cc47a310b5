"""jvt.models.gelu: the values of exact GELU and the derivative of x * Phi(x)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jvt.models.gelu import gelu


def _reference(x):
  """float64: GELU(x) = x * Phi(x) and its derivative Phi(x) + x * phi(x), from math.erf."""
  x = np.asarray(x, np.float64)
  cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
  pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
  return x * cdf, cdf + x * pdf


def test_values_and_gradient_against_float64():
  x = np.linspace(-6.0, 6.0, 97, dtype=np.float32)
  g = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
  y, vjp = jax.vjp(gelu, jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(g))
  want_y, want_d = _reference(x)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dx, g * want_d, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y, jax.nn.gelu(jnp.asarray(x), approximate=False))


def test_bf16_gradient_keeps_the_input_dtype():
  x = jnp.linspace(-3.0, 3.0, 16, dtype=jnp.bfloat16)
  (dx,) = jax.vjp(gelu, x)[1](jnp.ones_like(x))
  assert dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dx, np.float32), _reference(np.asarray(x, np.float32))[1],
                             rtol=1e-2, atol=1e-2)
