"""What a run's set-up leaves behind (`jvt.train.loop.setup`): DA-VPT's class-mapping forward
runs as many images at a time as one forward of the train step, and JAX's staging caches are
released once the run is set up (docs/performance.md: larger set-up forwards and kept caches
left ViT-S/16 runs 80-130 MB more resident)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvt.methods import terms
from jvt.methods.da_vpt.objective import initial_mapping
from jvt.train import loop
from helpers_train import SMALL_TUNING, tiny_config

NUM_CLASSES = 4
BATCH = 4


def _class_examples(num_images: int, image_size: int):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((num_images, image_size, image_size, 3)).astype(np.float32)
  return images, np.arange(num_images, dtype=np.int32) % NUM_CLASSES


@pytest.mark.parametrize("accum,chunk_rows", [(1, 0), (2, 0), (1, 1)])
def test_da_vpt_mapping_forward_runs_in_train_step_forwards_with_the_same_mapping(
    monkeypatch, accum, chunk_rows):
  seen = []  # the leading dimension of every forward the set-up runs
  real = terms._jitted_apply

  def recording(model):
    fwd = real(model)

    def run(params, images):
      seen.append(np.shape(images)[0])
      return fwd(params, images)
    return run

  monkeypatch.setattr(terms, "_jitted_apply", recording)
  config = tiny_config(method="da_vpt", batch=BATCH, accum=accum)  # eval batch 32
  config.unlock()
  config.tuning = dict(method="da_vpt", **SMALL_TUNING["da_vpt"])
  config.forward_chunk_rows = chunk_rows
  config.lock()
  images, labels = _class_examples(10, config.model.image_size)
  s = loop.setup(config, num_classes=NUM_CLASSES, steps_per_epoch=10,
                 class_examples=lambda k: (images, labels))
  # One forward of the train step: a device's (micro)batch, or one of its row chunks.
  rows = BATCH // jax.device_count() // accum
  if chunk_rows:
    rows = min(rows, chunk_rows)
  assert s.forward_chunks == BATCH // jax.device_count() // accum // rows
  assert seen == [rows] * -(-10 // rows)  # the last chunk zero-padded

  # The mapping is that of one forward over all ten images (another chunking, an independent
  # path through the same equations).
  seen.clear()
  params = loop._load_backbone(config, s.model, jax.random.key(config.seed))
  spec = s.objective.terms["da_vpt"].spec
  mapping, centroids = initial_mapping(
      s.model, params, images, labels, NUM_CLASSES, spec, seed=config.seed,
      apply_fn=functools.partial(terms.chunked_apply, chunk=16))
  assert seen == [16]
  state = jax.device_get(s.state.method_state["da_vpt"])
  np.testing.assert_array_equal(state["mapping"], mapping)
  np.testing.assert_allclose(state["centroids"], centroids, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("release", [True, False])
def test_setup_releases_jax_caches_unless_told_not_to(release):
  f = jax.jit(lambda x: x + 1)
  f(jnp.ones(3))
  assert f._cache_size() == 1  # noqa: SLF001
  config = tiny_config()
  config.unlock()
  config.release_setup_caches = release
  config.lock()
  loop.setup(config, num_classes=NUM_CLASSES, steps_per_epoch=10)
  # Released: jax.clear_caches ran (f compiles again on its next call); kept: f's executable.
  assert f._cache_size() == (0 if release else 1)  # noqa: SLF001
