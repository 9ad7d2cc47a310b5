"""Frozen kernels held in bf16 for the steps (`jvt.precision.cast_frozen_kernels`,
`jvt.train.loop.frozen_for_steps`): the same bf16 steps as with the fp32 frozen tree, bit for
bit, for every method; fp32 kept where a method reads a kernel itself (DoRA) and for exports.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jvt
from jvt import partition, precision
from jvt.checkpoints import save_npz
from jvt.methods import registry
from jvt.train import loop as train
from jvt.train import sharding
from helpers_train import (DATA, TINY_VIT, small_method_setup, tiny_config,  # noqa: F401
                           train_data_dir)

NUM_CLASSES = 4


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def backbone_npz(tmp_path_factory):
  """(path, flat fp32 backbone) of a random tiny checkpoint (vision_transformer npz layout),
  with values that bf16 cannot hold exactly."""
  model = jvt.build_model("Ti/16", NUM_CLASSES, **TINY_VIT)
  shapes = _flat(jvt.param_shapes(model, DATA["image_size"]))
  rng = np.random.default_rng(7)
  flat = {k: ((1.0 if k.endswith("/scale") else 0.0)
              + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in shapes.items() if not k.startswith("head/")}
  path = tmp_path_factory.mktemp("pretrained") / "ViT-tiny.npz"
  save_npz(path, traverse_util.unflatten_dict(flat, sep="/"))
  return str(path), flat


def test_cast_frozen_kernels_casts_only_kernels_and_only_on_the_mixed_path():
  tree = {"Dense_0": {"kernel": jnp.full((3, 2), 1 / 3), "bias": jnp.full((2,), 1 / 3)},
          "query": {"kernel": jnp.full((4, 2, 2), 1 / 3)},
          "odd": {"kernel": jnp.full((5,), 1 / 3), "scale": jnp.full((3, 2), 1 / 3)},
          "count": {"kernel": jnp.ones((2, 2), jnp.int32)}}
  cast = precision.cast_frozen_kernels(tree, jnp.bfloat16)  # the tests run on the CPU
  assert cast["Dense_0"]["kernel"].dtype == jnp.bfloat16
  assert cast["query"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(cast["query"]["kernel"], np.float32),
                                np.float32(jnp.bfloat16(1 / 3)))
  # Biases, scales, rank-1 and integer leaves keep their dtype.
  for path in ("Dense_0/bias", "odd/kernel", "odd/scale", "count/kernel"):
    assert _flat(cast)[path].dtype == _flat(tree)[path].dtype, path
  assert precision.cast_frozen_kernels(tree, jnp.float32) is tree


def test_bf16_setup_holds_bf16_kernels_and_gives_the_loaded_fp32_back(backbone_npz):
  path, backbone = backbone_npz
  s = small_method_setup("lora", dtype="bfloat16", pretrained=path)
  assert s.frozen_cast
  frozen = _flat(jax.device_get(s.frozen))
  assert set(frozen) == set(backbone)  # the head and LoRA's factors train
  for k, v in frozen.items():
    is_kernel = k.endswith("/kernel") and v.ndim >= 2
    want = backbone[k].astype(jnp.bfloat16) if is_kernel else backbone[k]
    assert v.dtype == want.dtype, k
    np.testing.assert_array_equal(v, want, err_msg=k)
  loaded = _flat(train.frozen_as_loaded(s))
  assert set(loaded) == set(frozen)
  for k, v in loaded.items():
    assert v.dtype == np.float32, k
    np.testing.assert_array_equal(v, backbone[k], err_msg=k)


@pytest.mark.parametrize("method,dtype", [("dora", "bfloat16"), ("lora", "float32")])
def test_kernels_stay_fp32_where_a_method_reads_them_or_the_run_is_fp32(method, dtype):
  s = small_method_setup(method, dtype=dtype)
  assert not s.frozen_cast
  kernels = {k: v for k, v in _flat(s.frozen).items() if k.endswith("/kernel")}
  assert kernels and all(v.dtype == jnp.float32 for v in kernels.values())


# One method of each way a method meets the backbone in the default run (prompt tokens, an
# objective with a class mapping, a projection plug-in, a kernel hook, a dense plug-in, an
# affine in fp32, a convolution); every other registered method under `-m slow`.
DEFAULT_RUN = ("vpt", "da_vpt", "lora", "dora", "adapter", "ssf", "convpass")


@pytest.mark.parametrize("method", [
    m if m in DEFAULT_RUN else pytest.param(m, marks=pytest.mark.slow) for m in sorted(registry())])
def test_every_method_takes_the_same_bf16_step_with_bf16_frozen_kernels(method):
  """Two steps on the cast frozen tree and on the fp32 one: bitwise the same trainable leaves
  and metrics (the head starts at zero, so the second step is the one the backbone shapes)."""
  s = small_method_setup(method, dtype="bfloat16")
  assert s.frozen_cast == (method != "dora")
  fp32 = sharding.replicate_tree(train.frozen_as_loaded(s), s.mesh)
  rng = np.random.default_rng(1)
  batch = {"image": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
           "label": np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)}
  results = []
  for frozen in (s.frozen, fp32):
    state = jax.tree.map(jnp.copy, s.state)
    for _ in range(2):
      state, metrics = s.train_step(state, frozen, s.constants, batch)
    results.append(jax.device_get((state.trainable, metrics)))
  (cast_params, cast_metrics), (fp32_params, fp32_metrics) = results
  for key in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_array_equal(cast_metrics[key], fp32_metrics[key], err_msg=key)
  jax.tree.map(np.testing.assert_array_equal, cast_params, fp32_params)
  # The eval forward too: the same logits from the trained leaves over either frozen tree.
  forward = jax.jit(lambda p: s.model.apply({"params": p}, batch["image"], train=False)[0])
  np.testing.assert_array_equal(forward(partition.merge_params(cast_params, s.frozen)),
                                forward(partition.merge_params(cast_params, fp32)))


def test_export_of_a_bf16_run_merges_into_the_fp32_backbone(train_data_dir, backbone_npz,
                                                           tmp_path):
  """LoRA in bf16, two steps: merged_vit.npz holds the file's fp32 kernels (the un-targeted
  ones bit for bit, the targeted ones changed by the merge), not bf16-rounded ones."""
  path, backbone = backbone_npz
  config = tiny_config(train_data_dir, method="lora", pretrained=path, steps=2, lr=0.5)
  config.unlock()
  config.model.dtype = "bfloat16"
  config.lock()
  train.train_and_evaluate(config, str(tmp_path))
  merged = dict(np.load(tmp_path / "export" / "merged_vit.npz"))
  # merged_vit.npz is in the official layout (MlpBlock_3, MultiHeadDotProductAttention_1),
  # the model's own tree numbers them 0.
  official = lambda k: k.replace("MlpBlock_0", "MlpBlock_3").replace(
      "MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
  for block in ("encoderblock_0", "encoderblock_1"):
    for leaf in ("MlpBlock_0/Dense_0/kernel", "MultiHeadDotProductAttention_0/key/kernel"):
      k = f"Transformer/{block}/{leaf}"  # not a LoRA target: the file's values, bit for bit
      assert merged[official(k)].dtype == np.float32, k
      np.testing.assert_array_equal(merged[official(k)], backbone[k], err_msg=k)
  query = "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"
  assert np.any(merged[official(query)] != backbone[query])  # LoRA trained, merged into it
