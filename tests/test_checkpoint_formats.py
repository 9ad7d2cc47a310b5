"""Tests for jvt.checkpoints: every pretrained format, posemb resizing, bad input, npz export.

Fixtures are tiny random ViTs (hidden 32, 2 layers, 2 heads, patch 8, image 32) written in each
format's exact layout by writers in this file (independent of the readers). timm/HF files are
additionally checked by a numpy forward pass that reads the torch-layout state dict the way
timm / HuggingFace do, so a transposition error shared by a writer and a reader still fails.
"""
import json
import math
import os
import pickle
import re
import struct
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import scipy.ndimage
import scipy.special
from flax import traverse_util

import jvt
from jvt.checkpoints import (CheckpointFormatError, CheckpointMismatchError, load_pretrained,
                             resize_posemb, save_npz)

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=8)
IMAGE = 32  # grid 4x4, 17 tokens
H, D = SMALL["num_heads"], SMALL["hidden_size"]

# Google's npz files (vision_transformer, big_vision) come from Flax models with tanh GELU: models
# that load them are built with it (the file implies it; see test_backbones.py).
NPZ = dict(gelu_approximate=True)

PRE_LINEN = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
             "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}


def _model(num_classes=10, **kw):
  return jvt.build_model("B/16", num_classes, **{**SMALL, **kw})


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _random_tree(model, seed, image_size=IMAGE):
  """A parameter tree of `model` with random values everywhere (heads included)."""
  rng = np.random.default_rng(seed)
  shapes = jvt.param_shapes(model, image_size)
  return jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32), shapes)


def _assert_flat_equal(actual: dict, expected: dict, keys=None):
  keys = sorted(expected) if keys is None else keys
  for k in keys:
    np.testing.assert_allclose(np.asarray(actual[k]), expected[k], rtol=0, atol=0, err_msg=k)


def _images(seed=0, batch=2, size=IMAGE):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _logits(model, params, images):
  logits, _ = model.apply({"params": params}, images)
  return np.asarray(logits)


# ----------------------------------------------------------------------------- writers
def _blocks(flat):
  return sorted({int(k.split("/")[1].split("_")[1]) for k in flat if k.startswith("Transformer/encoderblock_")})


def write_vit_npz(path, flat, prefix=""):
  """vision_transformer layout: pre-Linen block names, cls slot in the posemb."""
  out = {}
  for k, v in flat.items():
    parts = k.split("/")
    if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
      parts[2] = PRE_LINEN.get(parts[2], parts[2])
    out[prefix + "/".join(parts)] = v
  np.savez(path, **out)


def write_big_vision(path, flat, prefix="params/", scanned=False, dtype=np.float32, extra=None):
  """big_vision layout: root pos_embedding [1, N, D] without the cls slot, Linen names."""
  out = {}
  for k, v in flat.items():
    if k == "Transformer/posembed_input/pos_embedding":
      out["pos_embedding"] = v[:, 1:]
    elif not (scanned and k.startswith("Transformer/encoderblock_")):
      out[k] = v
  if scanned:
    rests = {k.split("/", 2)[2] for k in flat if k.startswith("Transformer/encoderblock_0/")}
    for rest in rests:
      out[f"Transformer/encoderblock/{rest}"] = np.stack(
          [flat[f"Transformer/encoderblock_{i}/{rest}"] for i in _blocks(flat)])
  out = {prefix + k: v.astype(dtype) for k, v in out.items()}
  out.update(extra or {})
  np.savez(path, **out)


def to_timm(flat):
  """Linen tree -> timm torch-layout state dict (OIHW conv, (out, in) linears, fused qkv)."""
  sd = {"cls_token": flat["cls"], "pos_embed": flat["Transformer/posembed_input/pos_embedding"],
        "patch_embed.proj.weight": flat["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": flat["embedding/bias"]}
  for i in _blocks(flat):
    b = f"Transformer/encoderblock_{i}/"
    a = b + "MultiHeadDotProductAttention_0/"
    t = f"blocks.{i}."
    sd[t + "norm1.weight"], sd[t + "norm1.bias"] = flat[b + "LayerNorm_0/scale"], flat[b + "LayerNorm_0/bias"]
    sd[t + "norm2.weight"], sd[t + "norm2.bias"] = flat[b + "LayerNorm_1/scale"], flat[b + "LayerNorm_1/bias"]
    sd[t + "attn.qkv.weight"] = np.concatenate(
        [flat[a + f"{n}/kernel"].reshape(D, D).T for n in ("query", "key", "value")], axis=0)
    sd[t + "attn.qkv.bias"] = np.concatenate([flat[a + f"{n}/bias"].reshape(D) for n in ("query", "key", "value")])
    sd[t + "attn.proj.weight"] = flat[a + "out/kernel"].reshape(D, D).T
    sd[t + "attn.proj.bias"] = flat[a + "out/bias"]
    for j, fc in enumerate(("fc1", "fc2")):
      sd[t + f"mlp.{fc}.weight"] = flat[b + f"MlpBlock_0/Dense_{j}/kernel"].T
      sd[t + f"mlp.{fc}.bias"] = flat[b + f"MlpBlock_0/Dense_{j}/bias"]
  for linen, timm in (("Transformer/encoder_norm", "norm"), ("fc_norm", "fc_norm")):
    if linen + "/scale" in flat:
      sd[timm + ".weight"], sd[timm + ".bias"] = flat[linen + "/scale"], flat[linen + "/bias"]
  sd["head.weight"], sd["head.bias"] = flat["head/kernel"].T, flat["head/bias"]
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def to_hf(flat):
  """Linen tree -> HuggingFace ViTForImageClassification state dict."""
  sd = {"vit.embeddings.cls_token": flat["cls"],
        "vit.embeddings.position_embeddings": flat["Transformer/posembed_input/pos_embedding"],
        "vit.embeddings.patch_embeddings.projection.weight": flat["embedding/kernel"].transpose(3, 2, 0, 1),
        "vit.embeddings.patch_embeddings.projection.bias": flat["embedding/bias"],
        "vit.layernorm.weight": flat["Transformer/encoder_norm/scale"],
        "vit.layernorm.bias": flat["Transformer/encoder_norm/bias"],
        "classifier.weight": flat["head/kernel"].T, "classifier.bias": flat["head/bias"]}
  for i in _blocks(flat):
    b = f"Transformer/encoderblock_{i}/"
    a = b + "MultiHeadDotProductAttention_0/"
    t = f"vit.encoder.layer.{i}."
    sd[t + "layernorm_before.weight"], sd[t + "layernorm_before.bias"] = flat[b + "LayerNorm_0/scale"], flat[b + "LayerNorm_0/bias"]
    sd[t + "layernorm_after.weight"], sd[t + "layernorm_after.bias"] = flat[b + "LayerNorm_1/scale"], flat[b + "LayerNorm_1/bias"]
    for n in ("query", "key", "value"):
      sd[t + f"attention.attention.{n}.weight"] = flat[a + f"{n}/kernel"].reshape(D, D).T
      sd[t + f"attention.attention.{n}.bias"] = flat[a + f"{n}/bias"].reshape(D)
    sd[t + "attention.output.dense.weight"] = flat[a + "out/kernel"].reshape(D, D).T
    sd[t + "attention.output.dense.bias"] = flat[a + "out/bias"]
    sd[t + "intermediate.dense.weight"] = flat[b + "MlpBlock_0/Dense_0/kernel"].T
    sd[t + "intermediate.dense.bias"] = flat[b + "MlpBlock_0/Dense_0/bias"]
    sd[t + "output.dense.weight"] = flat[b + "MlpBlock_0/Dense_1/kernel"].T
    sd[t + "output.dense.bias"] = flat[b + "MlpBlock_0/Dense_1/bias"]
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# ----------------------------------------------------------------------------- torch-layout references
def _ln(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _lin(x, sd, name):
  return x @ sd[name + ".weight"].T.astype(np.float64) + sd[name + ".bias"]


def _gelu(x):
  return 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0)))


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _patchify(images, weight, bias):
  """torch Conv2d(stride=patch) with an OIHW weight on NHWC images -> [B, N, D] (row-major)."""
  b, s = images.shape[:2]
  p = weight.shape[-1]
  g = s // p
  patches = images.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4)  # [B, g, g, C, p, p]
  return (np.einsum("bijcuv,ocuv->bijo", patches, weight) + bias).reshape(b, g * g, -1)


def timm_forward(sd, images, num_heads, *, pool="tok", eps=1e-6, posemb_before_cls=False,
                 gelu=_gelu):
  """timm VisionTransformer.forward transcribed to numpy (float64)."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  x = _patchify(images.astype(np.float64), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"])
  cls = np.broadcast_to(sd["cls_token"], (x.shape[0], 1, x.shape[2]))
  if posemb_before_cls:  # timm no_embed_class / big_vision
    x = np.concatenate([cls, x + sd["pos_embed"]], axis=1)
  else:
    x = np.concatenate([cls, x], axis=1) + sd["pos_embed"]
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  for i in range(depth):
    t = f"blocks.{i}."
    y = _ln(x, sd[t + "norm1.weight"], sd[t + "norm1.bias"], eps)
    bsz, n, c = y.shape
    qkv = _lin(y, sd, t + "attn.qkv").reshape(bsz, n, 3, num_heads, c // num_heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, Dh]
    attn = _softmax(q @ k.swapaxes(-1, -2) * (c // num_heads) ** -0.5)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(bsz, n, c)
    x = x + _lin(y, sd, t + "attn.proj")
    y = _ln(x, sd[t + "norm2.weight"], sd[t + "norm2.bias"], eps)
    x = x + _lin(gelu(_lin(y, sd, t + "mlp.fc1")), sd, t + "mlp.fc2")
  if pool == "tok":
    feat = _ln(x, sd["norm.weight"], sd["norm.bias"], eps)[:, 0]
  else:  # MAE global pool
    feat = _ln(x[:, 1:].mean(1), sd["fc_norm.weight"], sd["fc_norm.bias"], eps)
  return _lin(feat, sd, "head")


def hf_forward(sd, images, num_heads, eps=1e-12):
  """HuggingFace ViTForImageClassification.forward transcribed to numpy (float64)."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  e = "vit.embeddings."
  x = _patchify(images.astype(np.float64), sd[e + "patch_embeddings.projection.weight"],
                sd[e + "patch_embeddings.projection.bias"])
  cls = np.broadcast_to(sd[e + "cls_token"], (x.shape[0], 1, x.shape[2]))
  x = np.concatenate([cls, x], axis=1) + sd[e + "position_embeddings"]
  depth = len({k.split(".")[3] for k in sd if k.startswith("vit.encoder.layer.")})
  for i in range(depth):
    t = f"vit.encoder.layer.{i}."
    y = _ln(x, sd[t + "layernorm_before.weight"], sd[t + "layernorm_before.bias"], eps)
    bsz, n, c = y.shape
    heads = lambda z: z.reshape(bsz, n, num_heads, c // num_heads).transpose(0, 2, 1, 3)
    q, k, v = (heads(_lin(y, sd, t + f"attention.attention.{m}")) for m in ("query", "key", "value"))
    attn = _softmax(q @ k.swapaxes(-1, -2) / math.sqrt(c // num_heads))
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(bsz, n, c)
    x = x + _lin(y, sd, t + "attention.output.dense")
    y = _ln(x, sd[t + "layernorm_after.weight"], sd[t + "layernorm_after.bias"], eps)
    x = x + _lin(_gelu(_lin(y, sd, t + "intermediate.dense")), sd, t + "output.dense")
  x = _ln(x, sd["vit.layernorm.weight"], sd["vit.layernorm.bias"], eps)
  return _lin(x[:, 0], sd, "classifier")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok_model():
  return _model()


@pytest.fixture(scope="module")
def npz_model():
  return _model(**NPZ)


@pytest.fixture(scope="module")
def original(tok_model):
  """A random tok-pool tree (the 'pretrained' weights) and a second one as the init."""
  return _flat(_random_tree(tok_model, 1)), _random_tree(tok_model, 2)


def _backbone_keys(flat):
  return sorted(k for k in flat if not k.startswith("head/"))


# ----------------------------------------------------------------------------- vision_transformer npz
@pytest.mark.parametrize("prefix", ["", "opt/target/", "params/"])
def test_vit_npz_loads_exactly(tmp_path, npz_model, original, prefix):
  flat, init = original
  file_flat = {**flat, "pre_logits/kernel": np.ones((D, D), np.float32),
               "pre_logits/bias": np.ones((D,), np.float32),
               "head/kernel": np.zeros((D, 21), np.float32), "head/bias": np.zeros((21,), np.float32)}
  path = tmp_path / "ViT.npz"
  write_vit_npz(path, file_flat, prefix)
  if prefix == "opt/target/":  # old Flax optimizer files also hold optimizer state
    with np.load(path) as f:
      arrays = dict(f)
    np.savez(path, **arrays, **{"opt/state/step": np.zeros((), np.int32)})
  messages = []
  loaded = _flat(load_pretrained(path, init, npz_model, log=messages.append))
  _assert_flat_equal(loaded, flat, _backbone_keys(flat))
  _assert_flat_equal(loaded, _flat(init), ["head/kernel", "head/bias"])  # fresh head
  assert "pre_logits/kernel" not in loaded
  assert any("from init by design: ['head/bias', 'head/kernel']" in m for m in messages)
  tree = load_pretrained(path, init, npz_model, log=lambda m: None)
  assert all(isinstance(v, jax.Array) and v.dtype == np.float32
             for v in jax.tree.leaves({k: v for k, v in tree.items() if k != "head"}))


def test_vit_npz_keeps_pre_logits_for_representation_models(tmp_path):
  model = _model(representation_size=16, **NPZ)
  flat = _flat(_random_tree(model, 3))
  write_vit_npz(tmp_path / "rep.npz", flat)
  loaded = _flat(load_pretrained(tmp_path / "rep.npz", _random_tree(model, 4), model, keep_head=True))
  _assert_flat_equal(loaded, flat)  # pre_logits and (kept) head included


def test_golden_parameter_count_b16_with_pre_logits():
  model = jvt.build_model("B/16", 21843, representation_size=768)
  shapes = jvt.param_shapes(model, 224)
  assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == 103_186_515


# ----------------------------------------------------------------------------- big_vision npz
@pytest.mark.parametrize("prefix,scanned,dtype", [
    ("params/", False, np.float32),
    ("params/", True, np.float32),
    ("params/img/", False, np.float32),
    ("params/", True, ml_dtypes.bfloat16),
])
def test_big_vision_npz(tmp_path, npz_model, original, prefix, scanned, dtype):
  flat, init = original
  flat = dict(flat)
  extra = {"opt/mu/cls": np.ones((1, 1, D), np.float32)}
  if prefix == "params/img/":  # a two-tower model: text tower and temperature beside the image tower
    extra.update({"params/txt/Embed_0/embedding": np.ones((7, D), np.float32), "params/t": np.ones((1,))})
  path = tmp_path / "bv.npz"
  write_big_vision(path, flat, prefix=prefix, scanned=scanned, dtype=dtype, extra=extra)
  if dtype is ml_dtypes.bfloat16:
    with np.load(path) as f:
      assert f[prefix + "cls"].dtype.kind == "V"  # how numpy stores bfloat16
  loaded = _flat(load_pretrained(path, init, npz_model, keep_head=True))
  expected = {k: v.astype(dtype).astype(np.float32) for k, v in flat.items()}
  posemb = expected.pop("Transformer/posembed_input/pos_embedding")
  _assert_flat_equal(loaded, expected)
  np.testing.assert_array_equal(loaded["Transformer/posembed_input/pos_embedding"][:, 0], 0.0)
  np.testing.assert_array_equal(loaded["Transformer/posembed_input/pos_embedding"][:, 1:], posemb[:, 1:])
  assert loaded["cls"].dtype == np.float32


def test_big_vision_zero_cls_slot_reproduces_big_vision_logits(tmp_path, npz_model, original):
  flat, init = original
  path = tmp_path / "bv.npz"
  write_big_vision(path, flat)
  loaded = load_pretrained(path, init, npz_model, keep_head=True)
  images = _images()
  sd = to_timm(flat)
  sd["pos_embed"] = sd["pos_embed"][:, 1:]  # big_vision: position added before the cls concat
  expected = timm_forward(sd, images, H, posemb_before_cls=True, gelu=_gelu_tanh)
  np.testing.assert_allclose(_logits(npz_model, loaded, images), expected, rtol=1e-4, atol=1e-4)


def test_big_vision_map_head_into_a_tok_model_names_the_pool(tmp_path, npz_model, original):
  flat, init = original
  path = tmp_path / "siglip.npz"
  write_big_vision(path, flat, extra={"params/MAPHead_0/probe": np.zeros((1, 1, D), np.float32)})
  with pytest.raises(CheckpointMismatchError, match=r"(?s)(?=.*checkpoint=).*pool='tok' in the "
                     r"model.*MAP head"):
    load_pretrained(path, init, npz_model)


def test_big_vision_gap_model_without_cls_is_explained(tmp_path, npz_model, original):
  flat, init = original
  write_big_vision(tmp_path / "gap.npz", {k: v for k, v in flat.items() if k != "cls"})
  with pytest.raises(CheckpointMismatchError, match=r"class_token=False"):
    load_pretrained(tmp_path / "gap.npz", init, npz_model)


# ----------------------------------------------------------------------------- timm
@pytest.mark.parametrize("variant", ["plain", "module.", "model.", "moco"])
def test_timm_safetensors(tmp_path, tok_model, original, variant):
  flat, init = original
  sd = to_timm(flat)
  file_sd = dict(sd)
  if variant in ("module.", "model."):
    file_sd = {variant + k: v for k, v in sd.items()}
  elif variant == "moco":  # the whole MoCo-v3 state_dict: both encoders and the predictor
    file_sd = {f"module.base_encoder.{k}": v for k, v in sd.items() if not k.startswith("head.")}
    file_sd.update({f"module.momentum_encoder.{k}": v for k, v in sd.items()})
    file_sd["module.base_encoder.head.0.weight"] = np.ones((8, D), np.float32)
    file_sd["module.predictor.0.weight"] = np.ones((8, 8), np.float32)
  path = tmp_path / "timm.safetensors"
  safetensors.numpy.save_file(file_sd, path)
  loaded = load_pretrained(path, init, tok_model, keep_head=variant != "moco")
  flat_loaded = _flat(loaded)
  _assert_flat_equal(flat_loaded, flat, _backbone_keys(flat))
  if variant != "moco":
    images = _images()
    np.testing.assert_allclose(_logits(tok_model, loaded, images), timm_forward(sd, images, H),
                               rtol=1e-4, atol=1e-4)


def test_timm_mae_global_pool_with_fc_norm(tmp_path):
  model = _model(pool="gap", fc_norm=True)
  flat = _flat(_random_tree(model, 5))
  assert "fc_norm/scale" in flat and "Transformer/encoder_norm/scale" not in flat
  sd = to_timm(flat)
  safetensors.numpy.save_file(sd, tmp_path / "mae_finetuned.safetensors")
  loaded = load_pretrained(tmp_path / "mae_finetuned.safetensors", _random_tree(model, 6), model, keep_head=True)
  _assert_flat_equal(_flat(loaded), flat)
  images = _images()
  np.testing.assert_allclose(_logits(model, loaded, images), timm_forward(sd, images, H, pool="gap"),
                             rtol=1e-4, atol=1e-4)


def test_timm_mae_pretrain_drops_norm_and_decoder(tmp_path, original):
  """MAE pre-training weights (final norm, decoder) into a global-pool model with fresh fc_norm."""
  flat, _ = original
  model = _model(pool="gap", fc_norm=True)
  init = _random_tree(model, 7)
  sd = {k: v for k, v in to_timm(flat).items() if not k.startswith("head.")}
  sd.update({"mask_token": np.zeros((1, 1, D), np.float32),
             "decoder_embed.weight": np.ones((16, D), np.float32),
             "decoder_blocks.0.norm1.weight": np.ones((16,), np.float32)})
  safetensors.numpy.save_file(sd, tmp_path / "mae_pretrain.safetensors")
  messages = []
  loaded = _flat(load_pretrained(tmp_path / "mae_pretrain.safetensors", init, model, log=messages.append))
  keys = [k for k in _backbone_keys(flat) if not k.startswith("Transformer/encoder_norm")]
  _assert_flat_equal(loaded, flat, keys)
  _assert_flat_equal(loaded, _flat(init), ["fc_norm/scale", "fc_norm/bias", "head/kernel"])
  text = "\n".join(messages)
  assert "fc_norm/scale" in text and "Transformer/encoder_norm/scale" in text and "decoder" in text


def test_timm_no_embed_class_posemb_gets_zero_cls_slot(tmp_path, tok_model, original):
  flat, init = original
  sd = to_timm(flat)
  sd["pos_embed"] = np.ascontiguousarray(sd["pos_embed"][:, 1:])
  safetensors.numpy.save_file(sd, tmp_path / "deit3.safetensors")
  loaded = load_pretrained(tmp_path / "deit3.safetensors", init, tok_model, keep_head=True)
  images = _images()
  np.testing.assert_allclose(_logits(tok_model, loaded, images),
                             timm_forward(sd, images, H, posemb_before_cls=True), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- HuggingFace
def test_hf_safetensors(tmp_path, original):
  flat, _ = original
  model = _model(layer_norm_eps=1e-12)
  sd = to_hf(flat)
  sd["vit.pooler.dense.weight"] = np.ones((D, D), np.float32)  # ViTModel's pooler = pre_logits
  sd["vit.pooler.dense.bias"] = np.ones((D,), np.float32)
  safetensors.numpy.save_file(sd, tmp_path / "model.safetensors")
  loaded = load_pretrained(tmp_path / "model.safetensors", _random_tree(model, 8), model, keep_head=True)
  _assert_flat_equal(_flat(loaded), flat)
  images = _images()
  np.testing.assert_allclose(_logits(model, loaded, images), hf_forward(sd, images, H), rtol=1e-4, atol=1e-4)


def test_hf_pooler_becomes_pre_logits_and_no_prefix(tmp_path):
  model = _model(representation_size=D, layer_norm_eps=1e-12)
  flat = _flat(_random_tree(model, 9))
  sd = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in to_hf(flat).items()}
  sd["pooler.dense.weight"] = np.ascontiguousarray(flat["pre_logits/kernel"].T)
  sd["pooler.dense.bias"] = flat["pre_logits/bias"]
  safetensors.numpy.save_file(sd, tmp_path / "vitmodel.safetensors")
  loaded = load_pretrained(tmp_path / "vitmodel.safetensors", _random_tree(model, 10), model, keep_head=True)
  _assert_flat_equal(_flat(loaded), flat)


def test_hf_layer_norm_eps_is_checked(tmp_path, tok_model, original):
  flat, init = original
  safetensors.numpy.save_file(to_hf(flat), tmp_path / "hf.safetensors")
  with pytest.raises(CheckpointMismatchError, match=r"(?s)(?=.*checkpoint=).*layer_norm_eps=1e-06 in the model, the "
                     r"file implies layer_norm_eps=1e-12"):
    load_pretrained(tmp_path / "hf.safetensors", init, tok_model)


# ----------------------------------------------------------------------------- detection and format=
def test_format_override_and_unknown_format(tmp_path, npz_model, original):
  flat, init = original
  write_vit_npz(tmp_path / "a.npz", flat)
  load_pretrained(tmp_path / "a.npz", init, npz_model, format="vit_npz")
  with pytest.raises(ValueError, match=r"unknown checkpoint format 'pytorch'.*vit_npz"):
    load_pretrained(tmp_path / "a.npz", init, npz_model, format="pytorch")
  with pytest.raises(CheckpointFormatError, match="format 'timm' is stored as safetensors"):
    load_pretrained(tmp_path / "a.npz", init, npz_model, format="timm")
  with pytest.raises(CheckpointMismatchError) as err:
    load_pretrained(tmp_path / "a.npz", init, npz_model, format="big_vision_npz")
  assert re.search(r"(?s)MultiHeadDotProductAttention_1.*wrong format\?", err.value.details)


def test_unrecognised_keys_ask_for_format(tmp_path, tok_model, original):
  _, init = original
  np.savez(tmp_path / "weird.npz", **{"foo/bar": np.zeros(3)})
  with pytest.raises(CheckpointFormatError, match=r"cannot tell which ViT layout.*foo/bar.*format="):
    load_pretrained(tmp_path / "weird.npz", init, tok_model)


# ----------------------------------------------------------------------------- position embeddings
def _bilinear_align_corners(grid, new):
  """Per-output-pixel bilinear interpolation with corners aligned (python loops)."""
  g = grid.shape[0]
  out = np.zeros((new, new, grid.shape[2]))
  for i in range(new):
    for j in range(new):
      y = i * (g - 1) / (new - 1)
      x = j * (g - 1) / (new - 1)
      y0, x0 = int(math.floor(y)), int(math.floor(x))
      y1, x1 = min(y0 + 1, g - 1), min(x0 + 1, g - 1)
      wy, wx = y - y0, x - x0
      out[i, j] = ((1 - wy) * (1 - wx) * grid[y0, x0] + (1 - wy) * wx * grid[y0, x1]
                   + wy * (1 - wx) * grid[y1, x0] + wy * wx * grid[y1, x1])
  return out


@pytest.mark.parametrize("old,new", [(14, 24), (3, 5), (5, 3), (4, 4)])
def test_resize_posemb_linear(old, new):
  rng = np.random.default_rng(old * 100 + new)
  posemb = rng.normal(size=(1, 1 + old * old, 6)).astype(np.float32)
  out = resize_posemb(posemb, 1 + new * new, 1)
  assert out.shape == (1, 1 + new * new, 6)
  np.testing.assert_array_equal(out[:, 0], posemb[:, 0])
  grid = posemb[0, 1:].reshape(old, old, 6).astype(np.float64)
  expected = _bilinear_align_corners(grid, new)
  np.testing.assert_allclose(out[0, 1:].reshape(new, new, 6), expected, atol=1e-5)
  # vision_transformer's own call
  zoomed = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  np.testing.assert_allclose(out[0, 1:].reshape(new, new, 6), zoomed, atol=1e-5)


def test_resize_posemb_prefix_slots():
  grid = np.arange(4 * 2, dtype=np.float32).reshape(1, 4, 2)
  with_cls = np.concatenate([np.full((1, 1, 2), 7.0, np.float32), grid], axis=1)
  np.testing.assert_array_equal(resize_posemb(grid, 5, 1), np.concatenate([np.zeros((1, 1, 2)), grid], 1))
  np.testing.assert_array_equal(resize_posemb(with_cls, 4, 0), grid)
  with pytest.raises(ValueError, match="square"):
    resize_posemb(np.zeros((1, 7, 2), np.float32), 5, 1)


def test_resize_posemb_bicubic_preserves_constants():
  posemb = np.full((1, 1 + 16, 3), 0.25, np.float32)
  out = resize_posemb(posemb, 1 + 49, 1, method="bicubic")
  np.testing.assert_allclose(out, 0.25, atol=1e-6)
  with pytest.raises(ValueError, match="posemb_interpolation"):
    resize_posemb(posemb, 50, 1, method="area")


def test_load_pretrained_resizes_posemb(tmp_path, original):
  flat, _ = original
  write_vit_npz(tmp_path / "a.npz", flat)
  model = _model(**NPZ)
  init = _random_tree(model, 11, image_size=48)  # grid 6x6
  loaded = _flat(load_pretrained(tmp_path / "a.npz", init, model))
  posemb = flat["Transformer/posembed_input/pos_embedding"]
  got = loaded["Transformer/posembed_input/pos_embedding"]
  assert got.shape == (1, 37, D)
  np.testing.assert_array_equal(got[:, 0], posemb[:, 0])
  expected = _bilinear_align_corners(posemb[0, 1:].reshape(4, 4, D).astype(np.float64), 6)
  np.testing.assert_allclose(got[0, 1:].reshape(6, 6, D), expected, atol=1e-5)
  bicubic = _flat(load_pretrained(tmp_path / "a.npz", init, model, posemb_interpolation="bicubic"))
  assert bicubic["Transformer/posembed_input/pos_embedding"].shape == (1, 37, D)
  assert not np.allclose(bicubic["Transformer/posembed_input/pos_embedding"], got)


# ----------------------------------------------------------------------------- tuning leaves come from init
def test_tuning_leaves_come_from_init(tmp_path, original):
  flat, _ = original
  write_vit_npz(tmp_path / "a.npz", flat)
  model = _model(tuning=[dict(method="vpt", num_prompts=3), dict(method="lora", rank=2)], **NPZ)
  init = _flat(_random_tree(model, 12))
  messages = []
  loaded = _flat(load_pretrained(tmp_path / "a.npz", traverse_util.unflatten_dict(init, sep="/"),
                                 model, log=messages.append))
  tuning = [k for k in init if "lora_" in k or "prompts" in k]
  assert tuning and any("lora_a" in k for k in tuning) and any("prompts" in k for k in tuning)
  _assert_flat_equal(loaded, init, tuning)
  _assert_flat_equal(loaded, flat, _backbone_keys(flat))
  line = [m for m in messages if "from init by design" in m]
  assert len(line) == 1 and all(k in line[0] for k in tuning)


# ----------------------------------------------------------------------------- mismatches
def test_missing_unexpected_and_mismatched_keys_in_one_error(tmp_path, npz_model, original):
  flat, init = original
  broken = dict(flat)
  del broken["Transformer/encoderblock_1/LayerNorm_1/scale"]
  broken["Transformer/encoderblock_0/extra/kernel"] = np.zeros((2, 2), np.float32)
  broken["Transformer/encoder_norm/bias"] = np.zeros((D + 1,), np.float32)
  write_vit_npz(tmp_path / "broken.npz", broken)
  with pytest.raises(CheckpointMismatchError) as err:
    load_pretrained(tmp_path / "broken.npz", init, npz_model)
  text = err.value.details
  assert isinstance(err.value, ValueError)
  assert "missing from the file (1)" in text and "Transformer/encoderblock_1/LayerNorm_1/scale: model [32]" in text
  assert "unexpected in the file (1)" in text and "Transformer/encoderblock_0/extra/kernel: file [2, 2]" in text
  assert "Transformer/encoder_norm/bias: file [33] vs model [32]" in text
  assert "wrong format" not in text  # nearly all names are right


def test_wrong_variant_is_named(tmp_path, npz_model, original):
  """A file with S/16 geometry loaded into the small model: the hint names the variant."""
  _, init = original
  arrays = {"cls": np.zeros((1, 1, 384), np.float32),
            "embedding/kernel": np.zeros((16, 16, 3, 384), np.float32),
            "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel": np.zeros((384, 1536), np.float16)}
  arrays.update({f"Transformer/encoderblock_{i}/LayerNorm_0/scale": np.zeros((384,), np.float32)
                 for i in range(12)})
  arrays["Transformer/posembed_input/pos_embedding"] = np.zeros((1, 197, 384), np.float32)
  np.savez(tmp_path / "s16.npz", **arrays)
  with pytest.raises(CheckpointMismatchError) as err:
    load_pretrained(tmp_path / "s16.npz", init, npz_model)
  text = err.value.details
  assert "embedding/kernel: file [16, 16, 3, 384] vs model [8, 8, 3, 32]" in text
  assert "Transformer/posembed_input/pos_embedding: file [1, 197, 384] vs model [1, 17, 32]" in text
  assert "hidden size 384 in file vs 32 in model" in text and "12 in file vs 2 in model" in text
  assert "the file looks like S/16: wrong variant?" in text
  assert "Transformer/encoderblock_11/LayerNorm_0/scale: file [384]" in text  # unexpected block


def test_fc_norm_file_into_tok_model_says_why(tmp_path, tok_model, original):
  _, init = original
  model = _model(pool="gap", fc_norm=True)
  safetensors.numpy.save_file(to_timm(_flat(_random_tree(model, 13))), tmp_path / "mae.safetensors")
  with pytest.raises(CheckpointMismatchError) as err:
    load_pretrained(tmp_path / "mae.safetensors", init, tok_model)
  assert re.search(r"(?s)missing from the file.*encoder_norm.*unexpected in the file.*"
                   r"fc_norm/scale.*pool='gap' and fc_norm=True", err.value.details)


def test_variables_dict_is_refused(tmp_path, tok_model, original):
  flat, init = original
  write_vit_npz(tmp_path / "a.npz", flat)
  with pytest.raises(ValueError, match=r"variables\['params'\]"):
    load_pretrained(tmp_path / "a.npz", {"params": init}, tok_model)


# ----------------------------------------------------------------------------- unsafe / broken files
class _Boom:
  """Unpickling this creates a marker file: proof that a loader unpickled."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _torch_zip(path, marker):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps(_Boom(marker), protocol=2))
    zf.writestr("archive/version", "3\n")


@pytest.mark.parametrize("name", ["mae_pretrain_vit_base.pth", "moco.pth.tar", "model.bin", "w.pt"])
def test_torch_zip_pickles_are_refused_unread(tmp_path, tok_model, original, name):
  _, init = original
  marker = tmp_path / "unpickled"
  _torch_zip(tmp_path / name, str(marker))
  with pytest.raises(CheckpointFormatError, match=r"(?s)torch\.save zip.*never unpickles.*st\.save_file"):
    load_pretrained(tmp_path / name, init, tok_model)
  assert not marker.exists()


def test_plain_pickle_is_refused_unread(tmp_path, tok_model, original):
  _, init = original
  marker = tmp_path / "unpickled"
  (tmp_path / "w.pkl").write_bytes(pickle.dumps({"w": _Boom(str(marker))}, protocol=4))
  with pytest.raises(CheckpointFormatError, match=r"(?s)Python pickle.*safetensors"):
    load_pretrained(tmp_path / "w.pkl", init, tok_model)
  assert not marker.exists()


def test_npz_with_object_arrays_is_refused_unread(tmp_path, tok_model, original):
  _, init = original
  marker = tmp_path / "unpickled"
  obj = np.empty((1,), object)
  obj[0] = _Boom(str(marker))
  np.savez(tmp_path / "obj.npz", cls=obj)
  with pytest.raises(CheckpointFormatError, match="allow_pickle=False"):
    load_pretrained(tmp_path / "obj.npz", init, tok_model)
  assert not marker.exists()


def test_truncated_and_corrupt_files(tmp_path, tok_model, original):
  flat, init = original
  write_vit_npz(tmp_path / "a.npz", flat)
  data = (tmp_path / "a.npz").read_bytes()
  (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
    load_pretrained(tmp_path / "trunc.npz", init, tok_model)
  local = data.index(b"PK\x03\x04", 4)  # the second member's payload: flip bytes -> bad CRC
  (tmp_path / "crc.npz").write_bytes(data[:local - 64] + bytes(64) + data[local:])
  with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
    load_pretrained(tmp_path / "crc.npz", init, tok_model)
  safetensors.numpy.save_file(to_timm(flat), tmp_path / "t.safetensors")
  data = (tmp_path / "t.safetensors").read_bytes()
  (tmp_path / "trunc.safetensors").write_bytes(data[:-100])
  with pytest.raises(CheckpointFormatError, match="safetensors file is truncated or corrupt"):
    load_pretrained(tmp_path / "trunc.safetensors", init, tok_model)
  (tmp_path / "empty.npz").write_bytes(b"")
  with pytest.raises(CheckpointFormatError, match="unknown file format.*empty"):
    load_pretrained(tmp_path / "empty.npz", init, tok_model)
  (tmp_path / "junk.ckpt").write_bytes(b"hello world, not weights")
  with pytest.raises(CheckpointFormatError, match=r"unknown file format.*\.npz.*\.safetensors"):
    load_pretrained(tmp_path / "junk.ckpt", init, tok_model)
  np.save(tmp_path / "one.npy", np.zeros(3))
  with pytest.raises(CheckpointFormatError, match="single .npy array"):
    load_pretrained(tmp_path / "one.npy", init, tok_model)


def test_missing_path_and_directory(tmp_path, tok_model, original):
  _, init = original
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    load_pretrained(tmp_path / "nope.npz", init, tok_model)
  with pytest.raises(CheckpointFormatError, match="is a directory"):
    load_pretrained(tmp_path, init, tok_model)


def test_safetensors_header_is_detected_by_content(tmp_path, tok_model, original):
  """A safetensors file under a .bin name still loads (content, not extension, decides)."""
  flat, init = original
  header = json.dumps({"cls_token": {"dtype": "F32", "shape": [1, 1, D], "data_offsets": [0, 4 * D]}}).encode()
  (tmp_path / "w.bin").write_bytes(struct.pack("<Q", len(header)) + header + flat["cls"].tobytes())
  with pytest.raises(CheckpointMismatchError, match="missing from the file"):
    load_pretrained(tmp_path / "w.bin", init, tok_model, format="timm")


# ----------------------------------------------------------------------------- export
def test_save_npz_round_trip_in_vision_transformer_layout(tmp_path):
  model = _model(representation_size=16)
  params = _random_tree(model, 14)
  save_npz(tmp_path / "out.npz", params, model=model)
  assert os.listdir(tmp_path) == ["out.npz"]  # no temporary file left behind
  with np.load(tmp_path / "out.npz", allow_pickle=False) as f:
    keys = set(f.files) - {"jvt/gelu"}
    assert all(f[k].dtype == np.float32 for k in keys)
    assert str(f["jvt/gelu"]) == "erf"  # the model's GELU form, read back by the loader
  assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in keys
  assert "Transformer/encoderblock_0/LayerNorm_2/scale" in keys
  assert "Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias" in keys
  assert not any("MultiHeadDotProductAttention_0" in k or "MlpBlock_0" in k or "LayerNorm_1" in k for k in keys)
  loaded = load_pretrained(tmp_path / "out.npz", _random_tree(model, 15), model, keep_head=True)
  _assert_flat_equal(_flat(loaded), _flat(params))


def test_save_npz_refuses_tuning_leaves_and_wrong_model(tmp_path):
  model = _model(tuning=dict(method="lora", rank=2))
  params = _random_tree(model, 16)
  with pytest.raises(ValueError, match=r"(?s)lora_a.*[Mm]erge the tuning methods"):
    save_npz(tmp_path / "x.npz", params)
  plain = _random_tree(_model(), 17)
  with pytest.raises(ValueError, match="hidden size 32 in params vs 48 in model"):
    save_npz(tmp_path / "x.npz", plain, model=_model(hidden_size=48))
  assert not os.listdir(tmp_path)


def test_save_npz_is_atomic(tmp_path, monkeypatch):
  params = _random_tree(_model(), 18)
  target = tmp_path / "w.npz"
  target.write_bytes(b"previous good file")

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", fail)
  with pytest.raises(OSError, match="disk full"):
    save_npz(target, params)
  assert target.read_bytes() == b"previous good file"
  assert os.listdir(tmp_path) == ["w.npz"]
