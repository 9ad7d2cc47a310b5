"""Tests for jvt.methods: golden trainable-parameter counts of every registered method (B/16,
100 classes), the config vocabulary and its errors, and exact LoRA / SSF merging."""
import math

import jax
import ml_collections
import numpy as np
import pytest

import jvt
from jvt import partition
from jvt.methods import registry, resolve_tuning
from jvt.methods.da_vpt import DAVPT
from jvt.methods.lora import LoRA, merge_lora, unmerge_lora
from jvt.methods.ssf import merge_ssf

from conftest import NumpyViT, flat, images, jit_apply, small_model, small_params

# ViT-B/16 at 224x224 with a 100-class head. Every expected number below is computed from the
# method's definition with these dims, never read back from the code.
D, MLP, L, HEADS, CLASSES = 768, 3072, 12, 12, 100
HEAD = D * CLASSES + CLASSES  # 76,900
PER_BLOCK = 2 * 2 * D + 4 * (D * D + D) + (D * MLP + MLP) + (MLP * D + D)
BACKBONE = (16 * 16 * 3 * D + D) + D + 197 * D + L * PER_BLOCK + 2 * D
BLOCK_BIASES = 4 * D + MLP + D + 2 * D  # q, k, v, out; Dense_0; Dense_1; two norms' biases
ADAPTER = (D * 8 + 8) + (8 * D + D)  # down + up, bottleneck 8
SSF_PER_BLOCK = 2 * (2 * D + 3 * D + D + MLP + D)  # norms; q, k, v; out; Dense_0; Dense_1


def lora_params(rank, in_dim, out_dim):
  return in_dim * rank + rank * out_dim  # A [in, r] + B [r, out]


GOLDEN = {
    "linear": [(dict(method="linear"), HEAD)],
    "vpt": [(dict(method="vpt", num_prompts=50), L * 50 * D + HEAD),  # 537,700
            (dict(method="vpt", num_prompts=50, deep=False), 50 * D + HEAD),  # 115,300
            (dict(method="vpt", num_prompts=10, proj_dim=64),
             L * 10 * 64 + (64 * D + D) + HEAD)],
    "lora": [(dict(method="lora", rank=8), L * 2 * lora_params(8, D, D) + HEAD),  # 371,812
             (dict(method="lora", rank=4, targets=("query", "key", "value", "out", "mlp_in",
                                                   "mlp_out")),
              L * (4 * lora_params(4, D, D) + lora_params(4, D, MLP) + lora_params(4, MLP, D))
              + HEAD)],
    "bitfit": [(dict(method="bitfit"), L * BLOCK_BIASES + D + D + HEAD),  # 179,812
               (dict(method="bitfit", subset=("key", "value")), L * 2 * D + HEAD)],
    "adapter": [(dict(method="adapter", dim=8), L * 2 * ADAPTER + HEAD),
                (dict(method="adapter", dim=8, positions=("mlp",)), L * ADAPTER + HEAD)],
    "adaptformer": [(dict(method="adaptformer", dim=8), L * ADAPTER + HEAD)],
    "ssf": [(dict(method="ssf"), L * SSF_PER_BLOCK + 2 * D + 2 * D + HEAD)],
    "layernorm": [(dict(method="layernorm"), L * 2 * 2 * D + 2 * D + HEAD)],
    "partial": [(dict(method="partial", k=2), 2 * PER_BLOCK + 2 * D + HEAD)],
    "full": [(dict(method="full"), BACKBONE + HEAD)],
    "da_vpt": [(dict(method="da_vpt", num_prompts=10, num_proxy_prompts=10, proxy_layers=(11,)),
                L * 10 * D + HEAD),
               (dict(method="da_vpt", num_prompts=10, num_proxy_prompts=20),
                (L - 1) * 10 * D + 20 * D + HEAD)],
    "da_vpt_plus": [
        (dict(method="da_vpt_plus", preset="paper"),
         L * 10 * D + L * 2 * D + D + HEAD),  # + K, V biases + [CLS]
        # + K, V, out, fc2, norm2 biases, all of norm1, [CLS] and the patch-embedding bias
        (dict(method="da_vpt_plus", preset="code"),
         L * 10 * D + L * (5 * D + 2 * D) + D + D + HEAD)],
    "distill_proj": [(dict(method="distill_proj", dim=384, num=2), 2 * (D * 384 + 384) + HEAD)],
}
HAND_NUMBERS = {  # the numbers quoted in the issue, as a check of the formulas above
    "linear": 76_900, "vpt": 537_700, "lora": 371_812, "bitfit": 179_812}


def test_every_registered_method_has_a_golden_count():
  assert set(GOLDEN) == set(registry())


def test_formulas_reproduce_the_quoted_numbers():
  for name, number in HAND_NUMBERS.items():
    assert GOLDEN[name][0][1] == number, name
  assert GOLDEN["vpt"][1][1] == 115_300
  assert BACKBONE == 85_798_656


def _trainable_count(model):
  shapes = jvt.param_shapes(model)
  trainable, _ = partition.split_params(shapes, partition.trainable_mask(shapes, model))
  return partition.count_params(trainable)


@pytest.mark.parametrize("cfg,expected", [c for cases in GOLDEN.values() for c in cases],
                         ids=lambda v: v["method"] if isinstance(v, dict) else str(v))
def test_golden_trainable_counts_b16(cfg, expected):
  assert _trainable_count(jvt.build_model("B/16", CLASSES, cfg)) == expected


def test_labels_of_da_vpt_plus_code_preset():
  model = jvt.build_model("B/16", CLASSES, dict(method="da_vpt_plus"))
  labels = flat(partition.label_params(jvt.param_shapes(model), model))
  block = "Transformer/encoderblock_3"
  trained = {k: v for k, v in labels.items() if v != "frozen" and k.startswith(block + "/")}
  assert trained == {
      f"{block}/MultiHeadDotProductAttention_0/key/bias": "bias",
      f"{block}/MultiHeadDotProductAttention_0/value/bias": "bias",
      f"{block}/MultiHeadDotProductAttention_0/out/bias": "bias",
      f"{block}/MlpBlock_0/Dense_1/bias": "bias",
      f"{block}/LayerNorm_1/bias": "bias",
      f"{block}/LayerNorm_0/bias": "bias",
      f"{block}/LayerNorm_0/scale": "bias"}
  assert labels["cls"] == "cls" and labels["head/kernel"] == "head"
  assert labels["embedding/bias"] == "bias" and labels["embedding/kernel"] == "frozen"
  assert labels["Transformer/prompts/block_11"] == "prompt"
  assert labels["Transformer/encoder_norm/bias"] == "frozen"


def test_train_head_false_freezes_the_head():
  model = jvt.build_model("B/16", CLASSES, dict(method="vpt", num_prompts=5, train_head=False))
  assert _trainable_count(model) == L * 5 * D


def test_composition_sums_the_methods():
  cfg = [dict(method="vpt", num_prompts=5), dict(method="lora", rank=8),
         dict(method="bitfit", subset=("key",))]
  expected = L * 5 * D + L * 2 * lora_params(8, D, D) + L * D + HEAD
  assert _trainable_count(jvt.build_model("B/16", CLASSES, cfg)) == expected


# --------------------------------------------------------------------- config vocabulary
def test_da_vpt_presets():
  (code,) = resolve_tuning(dict(method="da_vpt"), 12).methods
  (paper,) = resolve_tuning(dict(method="da_vpt", preset="paper"), 12).methods
  assert isinstance(code, DAVPT) and code.proxy_layers == (11,)  # default: the last block
  assert code.prompt_tokens(12) == (10,) * 12 and code.claims(12)["deep_prompts"]
  assert (code.patch_feature, code.cls_query, code.prompt_query, code.normalize_positives,
          code.init, code.kmeans_layer_norm) == (
              "input_patch_mean", True, False, "all", "xavier8", True)
  assert (paper.patch_feature, paper.cls_query, paper.prompt_query, paper.normalize_positives,
          paper.init, paper.kmeans_layer_norm) == (
              "attn_out_mean", False, True, "with_positives", "vpt", False)
  (custom,) = resolve_tuning(dict(method="da_vpt", preset="paper", cls_query=True,
                                  num_prompts=4, num_proxy_prompts=7, proxy_layers=(2, -1)),
                             6).methods
  assert custom.cls_query and custom.proxy_layers == (2, 5)
  assert custom.prompt_tokens(6) == (4, 4, 7, 4, 4, 7)
  assert custom.resolve(6) == custom  # resolved settings resolve to themselves


def test_config_dict_and_list_inputs_match_dicts():
  cfg = ml_collections.ConfigDict(dict(method="lora", rank=4, targets=("query", "mlp_in")))
  assert resolve_tuning(cfg, 12) == resolve_tuning(dict(method="lora", rank=4,
                                                        targets=("query", "mlp_in")), 12)
  listed = resolve_tuning(dict(method="lora", rank=4, targets=["query", "mlp_in"]), 12)
  assert listed == resolve_tuning(cfg, 12)


def test_same_method_twice_with_equal_settings_is_allowed():
  both = resolve_tuning([dict(method="lora", rank=4), dict(method="lora", rank=4)], 12)
  assert both.methods == (LoRA(rank=4),)


@pytest.mark.parametrize("cfg,match", [
    (dict(method="prefix"), r"method='prefix': unknown method; allowed values are .*'vpt'"),
    (dict(method="no_such_module:Method"), r"method='no_such_module:Method': cannot import"),
    (dict(method="jvt.methods.leaves:FROZEN"), r"is no jvt.methods.Method subclass"),
    (dict(method="adaptformer", norm="post"), r"adaptformer.norm='post'; allowed: \('none', 'ln'\)"),
    (dict(method="adaptformer", init="zeros"), r"adaptformer.init='zeros'; allowed"),
    (dict(method="adaptformer", dropout=1.0), r"adaptformer.dropout=1.0: must be in \[0, 1\)"),
    (dict(method="ssf", init="ones"), r"ssf.init='ones'; allowed: \('normal', 'identity'\)"),
    (dict(method="lora", init="xavier"), r"lora.init='xavier'; allowed"),
    (dict(method="da_vpt", refresh_from_epoch=-1), r"da_vpt.refresh_from_epoch=-1: must be >= 0"),
    (dict(rank=8), r"method=None: unknown method"),
    (dict(method="lora", targets=("query", "qkv")),
     r"lora.targets=.*unknown \['qkv'\]; allowed values are .*'mlp_in'"),
    (dict(method="lora", rank=0), r"lora.rank=0: must be a positive integer"),
    (dict(method="lora", rank=-2), r"lora.rank=-2"),
    (dict(method="vpt", num_tokens=5), r"unknown field\(s\) \['num_tokens'\]; allowed fields "
                                       r"are .*'num_prompts'"),
    ([dict(method="lora", rank=4), dict(method="lora", rank=8)],
     r"sets lora_rank=8 but lora already set it to 4"),
    ([dict(method="vpt"), dict(method="da_vpt")], r"prompt_tokens"),
    (dict(method="da_vpt", proxy_layers=(12,)), r"proxy_layers contains 12.*valid: 0..11"),
    (dict(method="da_vpt_plus", proxy_layers=(-13,)), r"proxy_layers contains -13"),
    (dict(method="da_vpt", proxy_layers=()), r"proxy_layers is empty"),
    (dict(method="da_vpt", patch_weight=-0.1), r"da_vpt.patch_weight=-0.1: must be >= 0"),
    (dict(method="da_vpt_plus", cls_weight=-1), r"da_vpt_plus.cls_weight=-1: must be >= 0"),
    (dict(method="da_vpt", preset="mine"), r"preset='mine'; allowed: \('code', 'paper'\)"),
    (dict(method="da_vpt", num_prompts=-1), r"da_vpt.num_prompts=-1: must be >= 0"),
    (dict(method="da_vpt", num_proxy_prompts=0), r"num_proxy_prompts=0: must be > 0"),
    (dict(method="da_vpt", patch_feature="cls"), r"patch_feature='cls'; allowed"),
    (dict(method="vpt", num_prompts=-1), r"vpt.num_prompts=-1"),
    (dict(method="vpt", init="normal"), r"vpt.init='normal'; allowed: \('vpt', 'xavier8'\)"),
    (dict(method="vpt", prompts_per_block=(1, 2)), r"prompts_per_block has 2 entries.*12"),
    ([dict(method="vpt", deep=False, num_prompts=10), dict(method="da_vpt")],
     r"da_vpt\) sets prompt_tokens=.* but vpt already set it"),
    (dict(method="adapter", dim=0), r"adapter.dim=0: must be > 0"),
    (dict(method="distill_proj"), r"distill_proj.dim=0 and num=1: both must be > 0"),
    (dict(method="da_vpt", surplus_prompts="spare"), r"surplus_prompts='spare'; allowed"),
    (dict(method="adapter", positions=("ffn",)), r"adapter.positions=.*allowed values are "
                                                r"\('attn', 'mlp'\)"),
    (dict(method="adaptformer", dim=-8), r"adaptformer.dim=-8"),
    (dict(method="bitfit", subset=("kv",)), r"bitfit.subset=.*unknown \['kv'\]; allowed .*'key'"),
    (dict(method="partial", k=0), r"partial.k=0: must be in 1..12"),
    (dict(method="partial", k=13), r"partial.k=13"),
    (dict(method="linear", rules=(("cls",),)), r"rules: each rule is \(regex, label\)"),
    ("vpt", r"tuning config must be a dict"),
])
def test_bad_tuning_config(cfg, match):
  with pytest.raises(ValueError, match=match):
    resolve_tuning(cfg, 12)
  with pytest.raises(ValueError, match=match):
    jvt.build_model("B/16", 10, cfg)


# ---------------------------------------------------------------------------- merge / unmerge
LORA_ALL = ("query", "key", "value", "out", "mlp_in", "mlp_out")


def _plain_logits(params, x):
  plain = small_model(num_layers=2)
  return np.asarray(jit_apply(plain)({"params": params}, x)[0])


def test_merge_lora_matches_the_unmerged_function_and_unmerge_restores():
  model = small_model(dict(method="lora", rank=3, alpha=6.0, targets=LORA_ALL), num_layers=2)
  params = small_params(model, seed=5)  # lora_b random, non-zero
  x = images()
  want, _ = NumpyViT(params, lora_alpha=6.0)(x)
  merged = merge_lora(params, alpha=6.0, rank=3)
  assert not any("lora" in k for k in flat(merged))
  assert jax.tree.structure(merged) == jax.tree.structure(
      jvt.param_shapes(small_model(num_layers=2), 24))
  np.testing.assert_allclose(_plain_logits(merged, x), want, atol=1e-5, rtol=0)
  # Kernel changed by exactly (alpha / r) A B.
  f, m = flat(params), flat(merged)
  q = "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/out"
  delta = 2.0 * np.tensordot(f[f"{q}/lora_a"].astype(np.float64), f[f"{q}/lora_b"], axes=1)
  np.testing.assert_allclose(m[f"{q}/kernel"], f[f"{q}/kernel"] + delta, atol=1e-6)
  restored = unmerge_lora(merged, params, alpha=6.0, rank=3)
  assert set(flat(restored)) == set(f)
  for k, v in flat(restored).items():
    np.testing.assert_allclose(v, f[k], atol=1e-6, err_msg=k)


def test_merge_ssf_matches_the_unmerged_function():
  model = small_model(dict(method="ssf"), num_layers=2)
  params = small_params(model, seed=6)
  x = images()
  want, _ = NumpyViT(params)(x)
  merged = merge_ssf(params)
  assert not any("ssf" in k for k in flat(merged))
  np.testing.assert_allclose(_plain_logits(merged, x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", ["lora_first", "ssf_first"])
def test_merge_lora_and_ssf_commute(order):
  model = small_model([dict(method="lora", rank=2, targets=LORA_ALL), dict(method="ssf")],
                      num_layers=2)
  params = small_params(model, seed=7)
  x = images()
  want, _ = NumpyViT(params)(x)
  if order == "lora_first":
    merged = merge_ssf(merge_lora(params, alpha=8.0, rank=2))
  else:
    merged = merge_lora(merge_ssf(params), alpha=8.0, rank=2)
  np.testing.assert_allclose(_plain_logits(merged, x), want, atol=1e-5, rtol=0)


def test_merge_keeps_dtypes_and_other_leaves():
  model = small_model(dict(method="lora", rank=2), num_layers=2)
  params = small_params(model, seed=8)
  merged = flat(merge_lora(params, alpha=8.0, rank=2))
  for k, v in flat(params).items():
    if "lora" in k:
      continue
    assert np.asarray(merged[k]).dtype == np.float32
    if "query/kernel" not in k and "value/kernel" not in k:
      np.testing.assert_array_equal(merged[k], v, err_msg=k)
    else:
      assert not np.array_equal(merged[k], v), k
  assert math.prod(np.shape(merged["head/kernel"])) == 32 * 5
