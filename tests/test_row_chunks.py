"""The train step's forward in row chunks (jvt.train.row_chunks): when it is chosen, that the
merged outputs are the whole batch's, and that the chunked step of every registered method
takes the same step as the step in one piece (the second code path)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvt import train
from jvt.methods import registry
from jvt.train import row_chunks

from helpers_train import small_method_setup, tiny_config


@pytest.mark.parametrize("rows, per_device, share, patches, backend, expected", [
    (0, 32, 0.01, 196, "cpu", 4),  # auto on CPU, frozen backbone, 224 px: chunks of 8
    (0, 16, 0.25, 576, "cpu", 2),
    (0, 32, 0.26, 196, "cpu", 1),  # most weights train: one piece
    (0, 64, 0.01, 16, "cpu", 1),  # small images (the demo's 32 px): one piece
    (0, 8, 0.01, 196, "cpu", 1),  # already 8 rows
    (0, 20, 0.01, 196, "cpu", 1),  # 8 does not divide 20: one piece
    (0, 32, 0.01, 196, "gpu", 1),  # not measured off CPU: one piece
    (0, 32, 0.01, 196, "tpu", 1),
    (4, 32, 1.0, 16, "gpu", 8),  # explicit: any backend, share and image size
    (32, 32, 0.01, 196, "cpu", 1),
    (64, 32, 0.01, 196, "cpu", 1),
])
def test_num_chunks(rows, per_device, share, patches, backend, expected):
  assert row_chunks.num_chunks(rows, per_device, trainable_share=share, patches=patches,
                               backend=backend) == expected


def test_num_chunks_rejects_bad_settings():
  with pytest.raises(ValueError, match=r"forward_chunk_rows=3 does not divide the 16 rows"):
    row_chunks.num_chunks(3, 16, trainable_share=0.0, patches=196, backend="cpu")
  with pytest.raises(ValueError, match=r"forward_chunk_rows=-1: use 0"):
    row_chunks.num_chunks(-1, 16, trainable_share=0.0, patches=196, backend="cpu")


def test_split_rows_takes_strided_rows():
  x = np.arange(12).reshape(6, 2)
  parts = np.asarray(row_chunks.split_rows(jnp.asarray(x), 3))
  chex.assert_shape(parts, (3, 2, 2))
  for i in range(3):
    np.testing.assert_array_equal(parts[i], x[i::3])


def test_chunked_forward_merges_per_example_and_batch_independent_outputs():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 3)), jnp.float32)

  def forward(images, rng):
    del rng
    return {"logits": images @ w, "blocks": {0: {"tokens": jnp.tanh(images)[:, None, :]}},
            "proj": w * 2.0}

  out = jax.jit(lambda x: row_chunks.chunked_forward(forward, x, jax.random.key(0), 4))(x)
  # atol: an fp32 sum that cancels to near 0 differs from numpy's by more than rtol alone.
  np.testing.assert_allclose(out["logits"], np.asarray(x) @ np.asarray(w), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["blocks"][0]["tokens"], np.tanh(np.asarray(x))[:, None, :],
                             rtol=1e-6)
  np.testing.assert_allclose(out["proj"], 2.0 * np.asarray(w))
  # Gradients through the chunks: d/dw sum(x @ w) = column sums of x, for every column.
  grad = jax.grad(lambda w: jnp.sum(row_chunks.chunked_forward(
      lambda i, r: i @ w, x, jax.random.key(0), 2)))(w)
  np.testing.assert_allclose(grad, np.repeat(np.asarray(x).sum(0)[:, None], 5, 1), rtol=1e-5)


def test_chunked_forward_draws_per_chunk_randomness():
  x = jnp.zeros((8, 1))
  out = row_chunks.chunked_forward(lambda i, r: i + jax.random.uniform(r, i.shape), x,
                                   jax.random.key(0), 2)
  # Chunk 1 (rows 1, 3, 5, 7) draws from fold_in(rng, 1), not chunk 0's numbers.
  expected = jax.random.uniform(jax.random.fold_in(jax.random.key(0), 1), (4, 1))
  np.testing.assert_allclose(out[1::2], expected)
  assert not np.allclose(out[0::2], out[1::2])


def test_chunked_forward_rejects_a_batch_the_chunks_do_not_divide():
  with pytest.raises(ValueError, match=r"a batch of 6 rows does not split into 4 forward chunks"):
    row_chunks.chunked_forward(lambda i, r: i, jnp.ones((6, 3)), jax.random.key(0), 4)


def test_chunked_forward_rejects_an_output_batched_on_another_axis():
  def forward(images, rng):
    return {"stacked": jnp.stack([images, images])}  # [2, B, ...]: batch second

  with pytest.raises(ValueError, match=r"forward output \['stacked'\] has shape \(2, 8, 3\)"):
    row_chunks.chunked_forward(forward, jnp.ones((8, 3)), jax.random.key(0), 2)


def _two_steps(s, step, batch):
  """Two steps from a copy of the set-up's state (the step donates it). The head starts at
  zero, so only the second step's loss depends on the features."""
  state = jax.tree.map(jnp.copy, s.state)
  for _ in range(2):
    state, metrics = step(state, s.frozen, s.constants, batch)
  return jax.device_get(state.trainable), jax.device_get(metrics)


# One method of each way a method meets the backbone in the default run; every other
# registered method under `-m slow`.
DEFAULT_RUN = ("full", "vpt", "da_vpt", "lora", "dora", "adapter", "ssf", "convpass", "fact")


@pytest.mark.parametrize("method", [
    m if m in DEFAULT_RUN else pytest.param(m, marks=pytest.mark.slow) for m in sorted(registry())])
def test_every_method_takes_the_same_step_in_chunks(method):
  rng = np.random.default_rng(1)
  batch = {"image": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
           "label": np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)}
  s = small_method_setup(method, chunk_rows=8)
  assert s.forward_chunks == 1
  chunked_step = train.make_train_step(s.model, s.tx, s.objective, seed=s.config.seed,
                                       mesh=s.mesh, forward_chunks=4)
  whole, m_whole = _two_steps(s, s.train_step, batch)
  chunked, m_chunked = _two_steps(s, chunked_step, batch)
  for key in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_allclose(m_chunked[key], m_whole[key], rtol=2e-5, atol=1e-6, err_msg=key)
  chex.assert_trees_all_close(chunked, whole, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("method, chunk_rows, image_size, expected", [
    ("vpt", 0, 112, 2),  # auto on CPU: 16 rows of 196 patches in chunks of 8 (frozen backbone)
    ("vpt", 0, 16, 1),  # auto: 4 patches per image, one piece
    ("full", 0, 112, 1),  # auto: every weight trains
    ("full", 4, 16, 4),  # the config's rows win
])
def test_setup_chooses_the_chunks(method, chunk_rows, image_size, expected):
  if jax.default_backend() != "cpu" and chunk_rows == 0:
    pytest.skip("auto chunks only on CPU")
  s = small_method_setup(method, chunk_rows=chunk_rows, batch=16, image_size=image_size)
  assert s.forward_chunks == expected


def test_setup_rejects_bad_chunk_rows_before_loading_the_backbone(tmp_path):
  # The missing checkpoint would fail too, later: the config's mistake is named first.
  config = tiny_config(batch=16, pretrained=str(tmp_path / "missing.npz"))
  config.unlock()
  config.forward_chunk_rows = 3
  config.lock()
  with pytest.raises(ValueError, match=r"forward_chunk_rows=3 does not divide the 16 rows"):
    train.setup(config, num_classes=4, steps_per_epoch=10)
