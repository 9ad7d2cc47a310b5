"""Tests of jvt.remap: block selection, first-index narrowing, merging tuned teachers, npz export.

Expected trees are written out leaf by leaf from the teacher's arrays (numpy indexing by hand),
and logits are compared with conftest's independent numpy ViT.
"""
import json
import re

import jax
import numpy as np
import pytest
from conftest import (IMAGE, NUM_CLASSES, NumpyViT, flat, images, small_model, small_params,
                      unflat)

import jvt
from jvt import remap
from jvt.checkpoints import load_pretrained, save_npz

# A 4-block teacher (width 32, 4 heads of 8, MLP 64) with a representation-free head.
TEACHER = dict(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=4, patch_size=8)


def _teacher(seed=0):
  model = small_model(**TEACHER)
  return model, small_params(model, seed=seed)


def _logits(model, params, x):
  return np.asarray(jax.jit(model.apply)({"params": params}, x)[0])


def test_evenly_spaced_blocks_keep_first_and_last():
  assert remap.evenly_spaced_blocks(12, 6) == (0, 2, 4, 7, 9, 11)
  assert remap.evenly_spaced_blocks(12, 12) == tuple(range(12))
  assert remap.evenly_spaced_blocks(4, 2) == (0, 3)
  assert remap.evenly_spaced_blocks(12, 1) == (0,)
  with pytest.raises(ValueError, match="num_student_layers=13"):
    remap.evenly_spaced_blocks(12, 13)


def test_every_block_reproduces_the_teacher_logits_exactly(tmp_path):
  model, params = _teacher()
  student_params = remap.select_blocks(params, range(4))
  x = images(3)
  want = _logits(model, params, x)
  np.testing.assert_array_equal(_logits(model, student_params, x), want)
  # Through the vision_transformer npz and load_pretrained (head kept): still bit-exact.
  path = tmp_path / "student.npz"
  save_npz(path, student_params, model=model)
  loaded = load_pretrained(path, jvt.param_shapes(model, IMAGE), model, keep_head=True)
  np.testing.assert_array_equal(_logits(model, loaded, x), want)
  # ... and the numbers are the ViT's (independent float64 transcription).
  np.testing.assert_allclose(want, NumpyViT(params)(x)[0], rtol=1e-4, atol=1e-5)


def test_every_other_block_gives_the_expected_tree():
  _, params = _teacher()
  teacher = flat(params)
  got = flat(remap.select_blocks(params, (1, 3)))
  student = small_model(**dict(TEACHER, num_layers=2))
  shapes = flat(jvt.param_shapes(student, IMAGE))
  assert set(got) == set(shapes)
  assert all(got[k].shape == shapes[k].shape for k in got)
  for key, value in got.items():
    m = re.fullmatch(r"Transformer/encoderblock_(\d)/(.*)", key)
    source = (f"Transformer/encoderblock_{(1, 3)[int(m.group(1))]}/{m.group(2)}" if m else key)
    np.testing.assert_array_equal(value, teacher[source], err_msg=key)
  # Negative indices count from the end; a block may be repeated.
  again = flat(remap.select_blocks(params, (-3, -1, -1)))
  np.testing.assert_array_equal(again["Transformer/encoderblock_2/LayerNorm_0/scale"],
                                teacher["Transformer/encoderblock_3/LayerNorm_0/scale"])


def test_narrow_keeps_the_first_channels_heads_and_units():
  _, params = _teacher()
  t = flat(params)
  d, h, dh, m = 16, 2, 8, 24
  got = flat(remap.narrow(params, hidden_size=d, num_heads=h, mlp_dim=m))
  student = small_model(hidden_size=d, num_heads=h, mlp_dim=m, num_layers=4, patch_size=8)
  shapes = flat(jvt.param_shapes(student, IMAGE))
  assert set(got) == set(shapes)
  assert all(got[k].shape == shapes[k].shape for k in got)
  b = "Transformer/encoderblock_2/"
  att = b + "MultiHeadDotProductAttention_0/"
  expected = {
      "embedding/kernel": t["embedding/kernel"][:, :, :, :d],
      "cls": t["cls"][:, :, :d],
      "Transformer/posembed_input/pos_embedding":
          t["Transformer/posembed_input/pos_embedding"][:, :, :d],
      b + "LayerNorm_1/scale": t[b + "LayerNorm_1/scale"][:d],
      att + "key/kernel": t[att + "key/kernel"][:d, :h, :dh],
      att + "value/bias": t[att + "value/bias"][:h, :dh],
      att + "out/kernel": t[att + "out/kernel"][:h, :dh, :d],
      att + "out/bias": t[att + "out/bias"][:d],
      b + "MlpBlock_0/Dense_0/kernel": t[b + "MlpBlock_0/Dense_0/kernel"][:d, :m],
      b + "MlpBlock_0/Dense_0/bias": t[b + "MlpBlock_0/Dense_0/bias"][:m],
      b + "MlpBlock_0/Dense_1/kernel": t[b + "MlpBlock_0/Dense_1/kernel"][:m, :d],
      b + "MlpBlock_0/Dense_1/bias": t[b + "MlpBlock_0/Dense_1/bias"][:d],
      "Transformer/encoder_norm/bias": t["Transformer/encoder_norm/bias"][:d],
      "head/kernel": t["head/kernel"][:d, :],
      "head/bias": t["head/bias"],
  }
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_narrow_with_a_representation_layer_keeps_the_head():
  model = small_model(representation_size=12)
  params = small_params(model)
  got = flat(remap.narrow(params, hidden_size=16, num_heads=2, mlp_dim=32))
  np.testing.assert_array_equal(got["pre_logits/kernel"], flat(params)["pre_logits/kernel"][:16])
  np.testing.assert_array_equal(got["head/kernel"], flat(params)["head/kernel"])


def test_dropping_silent_mlp_units_keeps_the_function():
  """MLP units whose Dense_1 rows are zero add nothing: narrowing them away (width and heads
  kept) leaves the logits unchanged, which checks the unit axis of every MLP leaf."""
  model, params = _teacher()
  p = flat(params)
  for i in range(4):
    p[f"Transformer/encoderblock_{i}/MlpBlock_0/Dense_1/kernel"][40:] = 0.0  # units 40.. silent
  params = unflat(p)
  narrowed = remap.narrow(params, hidden_size=32, num_heads=4, mlp_dim=40)
  x = images(2)
  np.testing.assert_allclose(_logits(small_model(**dict(TEACHER, mlp_dim=40)), narrowed, x),
                             _logits(model, params, x), rtol=1e-5, atol=1e-6)


def test_plain_params_merges_lora_and_ssf_exactly():
  model = small_model([dict(method="lora", rank=2, alpha=4.0), dict(method="ssf")])
  params = small_params(model)
  plain = remap.plain_params(params, model)
  assert all("lora" not in k and "ssf" not in k for k in flat(plain))
  x = images(2)
  np.testing.assert_allclose(_logits(small_model(), plain, x), _logits(model, params, x),
                             rtol=1e-4, atol=1e-5)


def test_plain_params_drops_the_distillation_projection():
  model = small_model([dict(method="full"), dict(method="distill_proj", dim=8, num=1)])
  plain = remap.plain_params(small_params(model), model)
  assert "distill_proj" not in plain


def test_prompts_cannot_be_remapped():
  model = small_model(dict(method="vpt", num_prompts=2))
  with pytest.raises(ValueError, match=r"method\(s\) \['vpt'\] cannot be merged"):
    remap.plain_params(small_params(model), model)
  adapters = small_model([dict(method="lora"), dict(method="adapter")])
  with pytest.raises(ValueError, match=r"method\(s\) \['adapter'\] cannot be merged"):
    remap.plain_params(small_params(adapters), adapters)
  with pytest.raises(ValueError, match="plain_params"):
    remap.select_blocks(small_params(model), (0,))


def test_bad_remap_arguments():
  _, params = _teacher()
  with pytest.raises(ValueError, match="out of range: \\[4\\]"):
    remap.select_blocks(params, (0, 4))
  with pytest.raises(ValueError, match="hidden_size 48 > teacher's 32"):
    remap.narrow(params, hidden_size=48, num_heads=4, mlp_dim=64)
  with pytest.raises(ValueError, match="head dim 16 > teacher's 8"):
    remap.narrow(params, hidden_size=32, num_heads=2, mlp_dim=64)
  with pytest.raises(ValueError, match="not divisible"):
    remap.narrow(params, hidden_size=30, num_heads=4, mlp_dim=64)


def test_cli_remaps_a_checkpoint_into_a_loadable_student(tmp_path):
  model, params = _teacher()
  teacher_file = tmp_path / "teacher.npz"
  save_npz(teacher_file, params, model=model)
  out = tmp_path / "student.npz"
  fields = remap.main([f"--teacher={teacher_file}", "--variant=B/16",
                       "--overrides=" + json.dumps(TEACHER),
                       f"--image_size={IMAGE}", "--num_layers=2", "--hidden_size=16",
                       "--num_heads=2", "--mlp_dim=32", f"--out={out}"])
  assert fields["num_layers"] == 2 and fields["hidden_size"] == 16
  student = jvt.build_model("B/16", NUM_CLASSES, **fields)
  loaded = flat(load_pretrained(out, jvt.param_shapes(student, IMAGE), student,
                                keep_head=True))
  t = flat(params)
  # Blocks 0 and 3 (evenly spaced), first 16 channels, 2 heads of 8, 32 MLP units.
  np.testing.assert_array_equal(
      loaded["Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"],
      t["Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel"][:16, :32])
  np.testing.assert_array_equal(
      loaded["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"],
      t["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"][:16, :2, :8])
  np.testing.assert_array_equal(loaded["head/kernel"], t["head/kernel"][:16])
