"""jvt.methods.dense.Dense: flax nn.Dense's leaves and fp32 arithmetic, bf16 close to float64."""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvt.methods.dense import Dense


@pytest.mark.parametrize("use_bias", [True, False])
def test_fp32_dense_matches_flax_dense(use_bias):
  x = jax.random.normal(jax.random.key(0), (2, 5, 12))
  kw = dict(use_bias=use_bias, kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(0.5))
  ours, flax_dense = Dense(7, **kw), nn.Dense(7, **kw)
  params = ours.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(params, flax_dense.init(jax.random.key(1), x))  # leaves, init
  y = ours.apply(params, x)
  chex.assert_shape(y, (2, 5, 7))
  chex.assert_trees_all_close(y, flax_dense.apply(params, x), atol=1e-6, rtol=1e-6)


def test_bf16_dense_against_float64():
  """bf16 operands (rounded once), fp32 accumulation and bias, bf16 result: within one bf16
  rounding of the float64 product of the rounded operands."""
  x = jax.random.normal(jax.random.key(0), (4, 64))
  dense = Dense(16, dtype=jnp.bfloat16, bias_init=nn.initializers.normal(1.0))
  params = dense.init(jax.random.key(1), x)
  y = dense.apply(params, x)
  assert y.dtype == jnp.bfloat16
  r = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # noqa: E731
  want = r(x) @ r(params["params"]["kernel"]) + np.asarray(params["params"]["bias"], np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2 ** -7, atol=1e-2)
