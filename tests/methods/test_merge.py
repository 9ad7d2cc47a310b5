"""`jvt.merge`: every mergeable method folds into the backbone's weights, the result is a plain
ViT with the same logits; a method that adds computation is refused by name."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import jvt
from jvt.methods import NotMergeableError, mergeable

from conftest import NumpyViT, flat, images, jit_apply, small_model, small_params

LORA_ALL = ("query", "key", "value", "out", "mlp_in", "mlp_out")


@pytest.mark.parametrize("tuning,ref", [
    (dict(method="lora", rank=3, alpha=6.0, targets=LORA_ALL), dict(lora_alpha=6.0)),
    (dict(method="ssf"), {}),
    ([dict(method="ssf"), dict(method="lora", rank=2, targets=LORA_ALL)], {}),
    ([dict(method="full"), dict(method="distill_proj", dim=8, num=2)], {}),
    ([dict(method="bitfit"), dict(method="layernorm"), dict(method="lora", rank=2)], {}),
], ids=["lora", "ssf", "ssf_lora", "full_distill_proj", "bitfit_layernorm_lora"])
def test_merge_gives_a_plain_vit_with_the_same_logits(tuning, ref):
  model = small_model(tuning, num_layers=2)
  assert mergeable(model)
  params = small_params(model, seed=11)  # every plug-in leaf random, lora_b included
  plain, merged = jvt.merge(model, params)
  assert plain == small_model(num_layers=2)  # what build_model gives without tuning
  assert jax.tree.structure(merged) == jax.tree.structure(jvt.param_shapes(plain, 24))
  x = images()
  tuned, _ = jit_apply(model)({"params": params}, x)
  merged_logits, _ = jit_apply(plain)({"params": merged}, x)
  want, _ = NumpyViT({k: v for k, v in flat(params).items() if "distill_proj" not in k}, **ref)(x)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(tuned, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(merged_logits, tuned, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tuning,name", [
    (dict(method="vpt", num_prompts=2), "vpt"), (dict(method="adapter"), "adapter"),
    ([dict(method="lora"), dict(method="adaptformer")], "adaptformer"),
    (dict(method="da_vpt_plus", num_proxy_prompts=2), "da_vpt_plus")])
def test_merge_refuses_methods_that_add_computation(tuning, name):
  model = small_model(tuning, num_layers=2)
  assert not mergeable(model)
  with pytest.raises(NotMergeableError, match=rf"method\(s\) \['{name}'\] cannot be merged"):
    jvt.merge(model, small_params(model))


def test_export_writes_the_merged_vit(tmp_path):
  """The run directory's export goes through jvt.merge (merged_vit.npz loads as a plain ViT)."""
  from jvt import partition
  from jvt.config_lib import base_config
  from jvt.run_io import RunDirectory
  model = small_model([dict(method="lora", rank=2), dict(method="ssf")], num_layers=2)
  params = small_params(model, seed=3)
  trainable, frozen = partition.split_params(params, partition.trainable_mask(params, model))
  RunDirectory(str(tmp_path), base_config()).export(model, trainable, frozen)
  plain = small_model(num_layers=2)
  loaded = jvt.load_pretrained(str(tmp_path / "export" / "merged_vit.npz"),
                               jvt.init_params(plain, jax.random.key(0), 24), plain,
                               keep_head=True)
  x = images()
  np.testing.assert_allclose(jit_apply(plain)({"params": loaded}, x)[0],
                             jit_apply(model)({"params": params}, x)[0], atol=1e-5, rtol=0)
