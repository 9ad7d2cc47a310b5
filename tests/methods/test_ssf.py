"""SSF's initialisation follows the official code (scale ~ N(1, 0.02), shift ~ N(0, 0.02));
`init="identity"` keeps jvt's earlier ones / zeros, which start at the pretrained function."""
from __future__ import annotations

import jax
import numpy as np

import jvt

from conftest import flat, images, jit_apply

DIMS = dict(hidden_size=128, mlp_dim=256, num_heads=2, num_layers=2, patch_size=8)


def _ssf_leaves(init):
  model = jvt.build_model("B/16", 3, dict(method="ssf", init=init), **DIMS)
  params = flat(jvt.init_params(model, jax.random.key(0, impl="rbg"), 16))
  scale = np.concatenate([np.ravel(v) for k, v in params.items() if k.endswith("ssf_scale")])
  shift = np.concatenate([np.ravel(v) for k, v in params.items() if k.endswith("ssf_shift")])
  return model, params, scale, shift


def test_default_init_is_the_official_normal_draw():
  _, params, scale, shift = _ssf_leaves("normal")
  assert scale.size == 2560  # 2 * (2 norms, q, k, v, out, mlp_out: 128; mlp_in: 256) + 2 * 128
  np.testing.assert_allclose([scale.mean(), shift.mean()], [1.0, 0.0], atol=0.002)
  np.testing.assert_allclose([scale.std(), shift.std()], [0.02, 0.02], rtol=0.05)
  # Each leaf is its own draw (the official code initialises every SSF pair separately).
  a = params["Transformer/encoderblock_0/LayerNorm_0/ssf_scale"]
  b = params["Transformer/encoderblock_1/LayerNorm_0/ssf_scale"]
  assert not np.allclose(a, b)


def test_identity_init_starts_at_the_pretrained_function():
  model, params, scale, shift = _ssf_leaves("identity")
  np.testing.assert_array_equal(scale, 1.0)
  np.testing.assert_array_equal(shift, 0.0)
  plain = jvt.build_model("B/16", 3, **DIMS)
  backbone = {k: v for k, v in params.items() if "ssf" not in k}
  backbone["head/kernel"] = np.ones_like(backbone["head/kernel"])  # a non-zero head
  tree = lambda d: __import__("conftest").unflat(d)  # noqa: E731
  x = images(2, size=16)
  want = jit_apply(plain)({"params": tree(backbone)}, x)[0]
  got = jit_apply(model)({"params": tree({**params, "head/kernel": backbone["head/kernel"]})},
                         x)[0]
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  # The official draw does not start there (which is why tests of the pretrained function
  # at init use init="identity").
  normal, nparams, _, _ = _ssf_leaves("normal")
  nparams = {**nparams, **{k: v for k, v in backbone.items()}}
  moved = jit_apply(normal)({"params": tree(nparams)}, x)[0]
  assert np.abs(np.asarray(moved) - np.asarray(want)).max() > 1e-4


def test_bf16_scale_and_shift_gradients_are_summed_in_fp32():
  # The parameter gradients sum over every row: in bf16 (8 mantissa bits) a sum of 4096 rows
  # of ~1 is off by percents; in fp32 it is exact to ~1e-6 of the float64 sum.
  import flax.linen as nn
  import jax.numpy as jnp
  from jvt.methods.ssf import SSF

  class Affine(nn.Module):
    @nn.compact
    def __call__(self, y):
      return SSF(init="identity")._apply(self, y, (y.shape[-1],))

  y = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, (4096, 8)), jnp.bfloat16)
  module = Affine()
  params = module.init(jax.random.key(0), y)["params"]
  out = module.apply({"params": params}, y)
  assert out.dtype == jnp.bfloat16
  grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, y).astype(jnp.float32)))(params)
  y64 = np.asarray(y.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(grads["ssf_scale"], y64.sum(0), rtol=1e-5)
  np.testing.assert_allclose(grads["ssf_shift"], np.full(8, 4096.0), rtol=1e-6)
