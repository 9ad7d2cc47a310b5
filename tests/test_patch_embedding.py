"""The patch embedding: the official stride-p convolution, computed on CPU as one product."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvt.models import layers
from jvt.models import build_model, init_params


def _numpy_patch_conv(images, kernel, bias):
  """Reference: each output pixel is the sum over its p x p x C input patch, in float64."""
  images, kernel = np.asarray(images, np.float64), np.asarray(kernel, np.float64)
  b, h, w, _ = images.shape
  p, d = kernel.shape[0], kernel.shape[-1]
  out = np.zeros((b, h // p, w // p, d))
  for i in range(h // p):
    for j in range(w // p):
      patch = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :]  # [B, p, p, C]
      out[:, i, j] = np.tensordot(patch, kernel, axes=3)
  return out + np.asarray(bias, np.float64)


def _case():
  images = jax.random.normal(jax.random.key(0), (2, 24, 40, 3))
  kernel = jax.random.normal(jax.random.key(1), (8, 8, 3, 16)) * 0.1
  bias = jax.random.normal(jax.random.key(2), (16,))
  return images, kernel, bias


@pytest.mark.parametrize("form", [layers.patch_product, layers.patch_convolution])
def test_both_forms_are_the_strided_convolution(form):
  images, kernel, bias = _case()
  y = form(images, kernel, bias, jnp.float32)
  chex.assert_shape(y, (2, 3, 5, 16))
  np.testing.assert_allclose(y, _numpy_patch_conv(images, kernel, bias), atol=1e-4, rtol=1e-5)


def test_product_and_convolution_have_the_same_gradients():
  """The images' gradient (VP's pixel prompt needs it) and the kernel's (full fine-tuning)."""
  images, kernel, bias = _case()
  target = jax.random.normal(jax.random.key(3), (2, 3, 5, 16))

  def loss(form):
    return lambda x, k, b: jnp.sum((form(x, k, b, jnp.float32) - target) ** 2)

  got = jax.grad(loss(layers.patch_product), argnums=(0, 1, 2))(images, kernel, bias)
  want = jax.grad(loss(layers.patch_convolution), argnums=(0, 1, 2))(images, kernel, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_parameters_are_those_of_flax_conv():
  """Same names, shapes and initial values as `nn.Conv`, so checkpoints and seeds carry over."""
  images = jnp.zeros((1, 32, 32, 3))
  key = jax.random.key(4)
  ours = layers.PatchEmbedding(24, 16).init(key, images)["params"]
  flax_conv = nn.Conv(24, (16, 16), strides=(16, 16), padding="VALID").init(key, images)["params"]
  chex.assert_trees_all_equal(ours, flax_conv)
  no_bias = layers.PatchEmbedding(24, 16, use_bias=False).init(key, images)["params"]
  assert set(no_bias) == {"kernel"}


def test_images_not_a_multiple_of_the_patch_size_are_refused():
  with pytest.raises(ValueError, match=r"30x32 are not a multiple of the patch size 16"):
    layers.PatchEmbedding(8, 16).init(jax.random.key(0), jnp.zeros((1, 30, 32, 3)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the product form is CPU-only")
def test_cpu_vp_step_runs_no_convolution():
  """On CPU the embedding is a product: a pixel prompt's image gradient runs no convolution
  (XLA:CPU's convolution input gradient took a tenth of a ViT-S/16 VP step)."""
  model = build_model("S/16", 5, tuning=dict(method="vp", pad=2), hidden_size=32,
                      mlp_dim=64, num_heads=2, num_layers=1, patch_size=8)
  params = init_params(model, jax.random.key(0), image_size=16)
  images = jnp.ones((2, 16, 16, 3))

  def loss(p):
    logits, _ = model.apply({"params": p}, images, train=False)
    return jnp.sum(logits ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  assert "convolution(" not in hlo
  assert np.all(np.isfinite(jax.jit(jax.grad(loss))(params)["vp"]["pad_up"]))
