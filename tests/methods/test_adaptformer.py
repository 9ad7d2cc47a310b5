"""AdaptFormer as its authors run it (ShoufaChen/AdaptFormer): the branch reads the
un-normalised residual stream, drops out 10% of the bottleneck in training, Down is torch's
nn.Linear default init (kaiming_uniform(a=sqrt 5): uniform(+-1/sqrt(fan_in))), Up is zero; jvt's
earlier behaviour (normed input, xavier Down, no dropout) stays as options."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import jvt
from jvt.methods.adaptformer import AdaptFormer, ParallelBottleneck

from conftest import NumpyViT, flat, images, jit_apply, small_model, small_params


def test_defaults_are_the_authors():
  a = AdaptFormer()
  assert (a.dim, a.scale, a.norm, a.dropout, a.init) == (8, 0.1, "none", 0.1, "lora")


def _uniform_checks(value, bound):
  value = np.asarray(value)
  assert np.abs(value).max() <= bound
  assert np.abs(value).max() > 0.95 * bound
  np.testing.assert_allclose(value.std(), bound / math.sqrt(3), rtol=0.05)


@pytest.mark.parametrize("init", ["lora", "xavier"])
def test_init_matches_the_reference(init):
  d, dim = 128, 64
  model = jvt.build_model("B/16", 3, dict(method="adaptformer", dim=dim, init=init),
                          hidden_size=d, mlp_dim=8, num_heads=2, num_layers=2, patch_size=8)
  params = flat(jvt.init_params(model, jax.random.key(0, impl="rbg"), 16))
  for i in range(2):
    pre = f"Transformer/encoderblock_{i}/adaptformer"
    # torch: kaiming_uniform_(weight, a=sqrt(5)) -> gain sqrt(2 / 6), bound gain*sqrt(3/fan_in).
    bound = (math.sqrt(2.0 / (1 + 5)) * math.sqrt(3.0 / d) if init == "lora"
             else math.sqrt(6.0 / (d + dim)))
    _uniform_checks(params[f"{pre}/down/kernel"], bound)
    for leaf in ("down/bias", "up/kernel", "up/bias"):
      np.testing.assert_array_equal(params[f"{pre}/{leaf}"], 0.0)


def test_dropout_inside_the_bottleneck_in_training_only():
  """Up = identity: the output is dropout(relu(Down x)), compared with numpy."""
  d = 64
  branch = ParallelBottleneck(d, dropout=0.1)
  x = np.random.default_rng(0).standard_normal((16, 8, d)).astype(np.float32)
  rng = np.random.default_rng(1)
  params = {"down": {"kernel": rng.standard_normal((d, d)).astype(np.float32) / 8,
                     "bias": np.zeros(d, np.float32)},
            "up": {"kernel": np.eye(d, dtype=np.float32), "bias": np.zeros(d, np.float32)}}
  h = np.maximum(x @ params["down"]["kernel"], 0.0)
  evaluated = branch.apply({"params": params}, x, False)
  np.testing.assert_allclose(evaluated, h, atol=1e-5)
  trained = np.asarray(branch.apply({"params": params}, x, True,
                                    rngs={"dropout": jax.random.key(2)}))
  active = h > 1e-3
  dropped = active & (trained == 0.0)
  np.testing.assert_allclose(dropped.sum() / active.sum(), 0.1, atol=0.02)
  kept = active & ~dropped
  np.testing.assert_allclose(trained[kept], h[kept] / 0.9, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["none", "ln"])
def test_forward_reads_the_stream_or_the_normed_input(norm):
  """Against the numpy ViT: the branch adds s * Up(relu(Down(u))), u = x ("none") or
  LayerNorm_1(x) ("ln"); the two differ on the same weights."""
  tuning = dict(method="adaptformer", dim=4, scale=0.5, norm=norm)
  model = small_model(tuning, num_layers=2)
  params = small_params(model, seed=5)
  x = images()
  got, _ = jit_apply(model)({"params": params}, x)
  want, _ = NumpyViT(params, adaptformer_scale=0.5, adaptformer_norm=norm)(x)
  other, _ = NumpyViT(params, adaptformer_scale=0.5,
                      adaptformer_norm="ln" if norm == "none" else "none")(x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(other - want).max() > 1e-3
  # Dropout makes training stochastic; evaluation is not.
  train = jit_apply(model)({"params": params}, x, train=True,
                           rngs={"dropout": jax.random.key(0)})[0]
  assert np.abs(np.asarray(train) - np.asarray(got)).max() > 1e-4
