"""Tests for jvt.models: the ViT against a numpy transcription of its equations, parameter
counts of the published variants, bf16 compute, remat, aux/capture and the prompt plug-ins."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jvt
from jvt.methods.vpt import Prompts
from jvt.models import CAPTURE_KEYS
from jvt.models.vit import Encoder1DBlock

from conftest import (IMAGE, NUM_CLASSES, SMALL, NumpyViT, flat, images, jit_apply, small_model,
                      small_params, unflat)

ATOL = 1e-5


def run(model, params, x, capture=CAPTURE_KEYS, layers=None):
  """Jitted forward capturing `capture` in every block (one compilation per model)."""
  layers = tuple(range(model.num_layers)) if layers is None else layers
  return jit_apply(model)({"params": params}, x, capture=capture, capture_layers=layers)


# ------------------------------------------------------------------ forward vs numpy reference
LORA_ALL = ("query", "key", "value", "out", "mlp_in", "mlp_out")
FORWARD_CASES = {
    "plain_tok": ("B/16", None, SMALL, {}),
    "gap_fc_norm_pre_logits": (
        "B/16", None, {**SMALL, "num_heads": 2, "pool": "gap", "fc_norm": True,
                       "representation_size": 16}, dict(pool="gap", fc_norm=True)),
    "S8_gap_eps": (  # patch size from the variant string, other dims overridden
        "S/8", None, dict(hidden_size=24, mlp_dim=48, num_heads=3, num_layers=2, pool="gap",
                          layer_norm_eps=1e-3), dict(pool="gap", eps=1e-3)),
    "vpt_deep_per_block_gap": (
        "B/16", dict(method="vpt", prompts_per_block=(2, 0, 3)), {**SMALL, "pool": "gap"},
        dict(pool="gap")),
    "vpt_shallow_proj": (
        "B/16", dict(method="vpt", num_prompts=3, deep=False, proj_dim=8), SMALL,
        dict(deep=False)),
    "lora_ssf_adapter_adaptformer": (
        "B/16", [dict(method="lora", rank=2, alpha=4.0, targets=LORA_ALL), dict(method="ssf"),
                 dict(method="adapter", dim=4), dict(method="adaptformer", dim=4, scale=0.5)],
        SMALL, dict(lora_alpha=4.0, adaptformer_scale=0.5)),
    # The composition listed in another order runs its hooks in the same order.
    "adaptformer_ln_adapter_ssf_lora": (
        "B/16", [dict(method="adaptformer", dim=4, scale=0.5, norm="ln"), dict(method="adapter"),
                 dict(method="ssf"), dict(method="lora", rank=2, alpha=4.0, targets=LORA_ALL)],
        SMALL, dict(lora_alpha=4.0, adaptformer_scale=0.5, adaptformer_norm="ln")),
    "da_vpt_mask_l2norm": (
        "B/16", dict(method="da_vpt", num_prompts=2, num_proxy_prompts=3, attention_mask=True,
                     l2norm=True), SMALL, dict(prompt_l2norm=True, prompt_mask=True)),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_matches_numpy_reference(case):
  variant, tuning, overrides, ref_kwargs = FORWARD_CASES[case]
  model = jvt.build_model(variant, NUM_CLASSES, tuning, **overrides)
  params = small_params(model)
  x = images()
  logits, aux = run(model, params, x)
  want, want_aux = NumpyViT(params, **ref_kwargs)(x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, NUM_CLASSES)
  assert np.abs(want).max() > 0.1  # a non-degenerate function
  np.testing.assert_allclose(logits, want, atol=ATOL, rtol=0)
  np.testing.assert_allclose(aux["cls"], want_aux["cls"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(aux["pre_logits"], want_aux["pre_logits"], atol=ATOL, rtol=0)
  assert sorted(aux["blocks"]) == list(range(model.num_layers))
  for i, want_block in enumerate(want_aux["blocks"]):
    assert set(aux["blocks"][i]) == set(want_block), i
    for key, value in want_block.items():
      np.testing.assert_allclose(aux["blocks"][i][key], value, atol=ATOL, rtol=0,
                                 err_msg=f"block {i} {key}")


def test_numpy_reference_uses_every_leaf():
  """Guard for the reference itself: changing any single leaf changes its logits (except the
  key's bias and SSF shift: softmax is invariant to a per-query constant, in every ViT)."""
  model = small_model([dict(method="lora", targets=LORA_ALL, rank=2), dict(method="ssf"),
                       dict(method="adapter", dim=4), dict(method="adaptformer", dim=4),
                       dict(method="vpt", num_prompts=2)], num_layers=2, pool="gap",
                      fc_norm=True, representation_size=8)
  params = small_params(model)
  x = images()
  base, _ = NumpyViT(params, pool="gap", fc_norm=True)(x)
  rng = np.random.default_rng(0)
  for path, leaf in flat(params).items():
    if path.endswith(("key/bias", "key/ssf_shift")):
      continue
    bumped = dict(flat(params))
    bumped[path] = leaf + 0.5 * rng.standard_normal(leaf.shape)  # not constant: LN removes that
    out, _ = NumpyViT(unflat(bumped), pool="gap", fc_norm=True)(x)
    assert np.abs(out - base).max() > 1e-6, path


# -------------------------------------------------------------------------- variants, counts
def vit_param_count(hidden, mlp, layers, patch, classes, image=224, representation=None):
  """Parameters of a ViT from the architecture (written out here, not read from the code)."""
  d, n = hidden, (image // patch) ** 2
  embedding = patch * patch * 3 * d + d
  block = (2 * 2 * d  # two layer norms
           + 4 * (d * d + d)  # query, key, value, out
           + (d * mlp + mlp) + (mlp * d + d))  # MLP
  total = embedding + d + (n + 1) * d + layers * block + 2 * d  # + cls, posemb, encoder_norm
  feat = d
  if representation:
    total += d * representation + representation
    feat = representation
  return total + feat * classes + classes


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_b16_golden_parameter_count():
  # ViT-B/16 ImageNet-21k checkpoint: pre-logits 768 and 21843 classes.
  model = jvt.build_model("B/16", 21843, representation_size=768)
  assert count(jvt.param_shapes(model)) == 103_186_515
  assert vit_param_count(768, 3072, 12, 16, 21843, representation=768) == 103_186_515


@pytest.mark.parametrize("variant,dims", [
    ("Ti/16", (192, 768, 3, 12)), ("S/16", (384, 1536, 6, 12)), ("B/16", (768, 3072, 12, 12)),
    ("L/16", (1024, 4096, 16, 24)), ("H/14", (1280, 5120, 16, 32)), ("B/32", (768, 3072, 12, 12)),
])
def test_variant_counts_and_shapes(variant, dims):
  hidden, mlp, heads, layers = dims
  patch = int(variant.split("/")[1])
  model = jvt.build_model(variant, 10)
  assert (model.hidden_size, model.mlp_dim, model.num_heads, model.num_layers,
          model.patch_size) == (hidden, mlp, heads, layers, patch)
  shapes = jvt.param_shapes(model)
  assert count(shapes) == vit_param_count(hidden, mlp, layers, patch, 10)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  block = shapes["Transformer"][f"encoderblock_{layers - 1}"]
  assert block["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (
      hidden, heads, hidden // heads)
  assert block["MultiHeadDotProductAttention_0"]["out"]["kernel"].shape == (
      heads, hidden // heads, hidden)
  assert block["MlpBlock_0"]["Dense_0"]["kernel"].shape == (hidden, mlp)
  if layers > 12:  # tracing the forward of L/16 and H/14 adds seconds and no coverage
    return
  apply = functools.partial(model.apply, capture=("tokens", "attention"), capture_layers=(-1,))
  logits, aux = jax.eval_shape(apply, {"params": shapes},
                               jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  tokens = 1 + (224 // patch) ** 2
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert aux["cls"].shape == aux["pre_logits"].shape == (2, hidden)
  assert aux["blocks"][layers - 1]["tokens"].shape == (2, tokens, hidden)
  assert aux["blocks"][layers - 1]["attention"].shape == (2, heads, tokens, tokens)


def test_official_parameter_names():
  shapes = flat(jvt.param_shapes(small_model(num_layers=1), IMAGE))
  block = "Transformer/encoderblock_0"
  assert set(shapes) == {
      "embedding/kernel", "embedding/bias", "cls", "Transformer/posembed_input/pos_embedding",
      *(f"{block}/LayerNorm_{i}/{p}" for i in (0, 1) for p in ("scale", "bias")),
      *(f"{block}/MultiHeadDotProductAttention_0/{m}/{p}" for m in ("query", "key", "value", "out")
        for p in ("kernel", "bias")),
      *(f"{block}/MlpBlock_0/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")),
      "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias", "head/kernel",
      "head/bias"}
  assert shapes["embedding/kernel"].shape == (8, 8, 3, 32)
  assert shapes["Transformer/posembed_input/pos_embedding"].shape == (1, 1 + 9, 32)


# ------------------------------------------------------------------------------ bf16, remat
def test_bf16_compute_fp32_params_and_logits():
  model = small_model(dtype=jnp.bfloat16)
  shapes = jvt.param_shapes(model, IMAGE)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  params = small_params(model)
  x = images()
  logits, aux = run(model, params, x, capture=("tokens",), layers=(0,))
  want, _ = NumpyViT(params)(x)
  assert logits.dtype == jnp.float32 and aux["cls"].dtype == jnp.float32
  assert aux["blocks"][0]["tokens"].dtype == jnp.bfloat16  # the blocks really run in bf16
  assert not np.allclose(logits, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits, want, atol=0.05 * np.abs(want).max(), rtol=0.05)


def test_remat_policies_same_values_and_gradients():
  # The gradient w.r.t. the images back-propagates through every (rematerialised) block.
  plain = small_model(num_layers=1)
  params = small_params(plain)

  def value_and_grad(model):
    def loss(x):
      logits, _ = model.apply({"params": params}, x)
      return jnp.sum(jnp.sin(logits))
    return jax.jit(jax.value_and_grad(loss))(images())

  want_loss, want_grad = value_and_grad(plain)
  assert np.abs(want_grad).max() > 1e-3
  for remat in ("full", "dots"):
    got_loss, got_grad = value_and_grad(small_model(num_layers=1, remat=remat))
    np.testing.assert_allclose(got_loss, want_loss, atol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-6)


@pytest.mark.parametrize("tuning", [None, dict(method="vpt", num_prompts=3)])
def test_fused_attention_matches_numpy_with_the_same_gradients(tuning):
  # The fused product against the numpy reference, and its gradients against the einsum path's
  # (a second code path: softmax, the custom VJPs and the einsums of jvt.precision).
  plain = small_model(tuning)
  fused = small_model(tuning, fused_attention=True)
  params = small_params(plain)
  x = images()
  logits, aux = jit_apply(fused)({"params": params}, x, capture=("tokens",),
                                 capture_layers=(0,))
  if tuning is None:
    want, _ = NumpyViT(params)(x)
    np.testing.assert_allclose(logits, want, atol=ATOL, rtol=0)
  else:
    want, _ = jit_apply(plain)({"params": params}, x)
    np.testing.assert_allclose(logits, want, atol=ATOL, rtol=0)
  assert aux["blocks"][0]["tokens"].shape[1] > 0

  def grads(model):
    def loss(p, images):
      out, _ = model.apply({"params": p}, images)
      return jnp.sum(jnp.sin(out))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  (want_p, want_x), (got_p, got_x) = grads(plain), grads(fused)
  assert np.abs(want_x).max() > 1e-3
  np.testing.assert_allclose(got_x, want_x, atol=1e-5, rtol=0)
  for key, value in flat(want_p).items():
    np.testing.assert_allclose(flat(got_p)[key], value, atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.parametrize("t,s", [(7, 7), (7, 10), (8, 5), (1, 7)])  # (1, 7): [CLS] alone
def test_padded_attention_is_the_attention_of_the_unpadded_sequences(t, s):
  # The even-length padding cuDNN's path takes, checked through XLA's implementation against a
  # numpy softmax attention, values and gradients (q, k, v: [B, T, H, Dh]).
  from jvt.models.vit import padded_attention
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, n, 3, 8)).astype(np.float32) for n in (t, s, s))
  y = padded_attention(q, k, v, "xla")
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhts,bshd->bthd", p, v)
  assert y.shape == (2, t, 3, 8)
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=0)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
  got = jax.grad(loss(lambda *a: padded_attention(*a, "xla")), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a, implementation="xla")),
                 argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=0)


def test_fused_attention_refuses_what_it_cannot_compute():
  fused = small_model(fused_attention=True)
  params = small_params(fused)
  with pytest.raises(ValueError, match="capturing 'attention' needs the attention probabilities"):
    fused.apply({"params": params}, images(), capture=("attention",), capture_layers=(0,))
  masked = small_model(dict(method="da_vpt", num_prompts=2, num_proxy_prompts=3,
                            attention_mask=True), fused_attention=True)
  with pytest.raises(ValueError, match="cannot apply the attention mask"):
    masked.apply({"params": small_params(masked)}, images())
  dropped = small_model(fused_attention=True, attention_dropout=0.1)
  with pytest.raises(ValueError, match="has no attention dropout"):
    dropped.apply({"params": params}, images(), train=True,
                  rngs={"dropout": jax.random.key(0)})


# ------------------------------------------------------------------------------ aux, capture
def test_aux_attention_rows_and_final_tokens():
  model = small_model()
  params = small_params(model)
  logits, aux = run(model, params, images())
  last = aux["blocks"][model.num_layers - 1]
  probs = np.asarray(last["attention"], np.float64)  # [B, H, T, T]
  assert probs.shape == (2, SMALL["num_heads"], 10, 10)
  assert probs.min() >= 0
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  # encoder_norm(tokens of the last block)[:, 0] is aux["cls"]; head(cls) is the logits.
  tokens = np.asarray(last["tokens"], np.float64)
  norm = flat(params)
  mu = tokens.mean(-1, keepdims=True)
  var = tokens.var(-1, keepdims=True)
  cls = ((tokens - mu) / np.sqrt(var + 1e-6) * norm["Transformer/encoder_norm/scale"]
         + norm["Transformer/encoder_norm/bias"])[:, 0]
  np.testing.assert_allclose(aux["cls"], cls, atol=ATOL)
  np.testing.assert_allclose(aux["pre_logits"], cls, atol=ATOL)  # no representation layer
  np.testing.assert_allclose(logits, cls @ norm["head/kernel"] + norm["head/bias"], atol=ATOL)


def test_capture_only_requested_blocks_and_keys():
  model = small_model()
  params = small_params(model)
  _, aux = jit_apply(model)({"params": params}, images(), capture=("attention",),
                            capture_layers=(-1,))
  assert list(aux["blocks"]) == [model.num_layers - 1]
  assert list(aux["blocks"][model.num_layers - 1]) == ["attention"]
  _, aux = jit_apply(model)({"params": params}, images())
  assert aux["blocks"] == {}


# ---------------------------------------------------------------------------- prompt tuning
def _blocks_by_hand(params, x0, prompts, deep, num_heads, mlp_dim):
  """Runs the blocks one at a time with `Encoder1DBlock`, inserting prompts explicitly.

  x0: [B, 1 + N, D] embedded tokens (posemb added). Deep: block l's input is
  [cls_{l-1}, P_l, image_{l-1}] (block l-1's prompt outputs dropped); shallow: block 0 inserts.
  """
  n = x0.shape[1] - 1
  x, outs = x0, []
  for i, p in enumerate(prompts):
    if deep or i == 0:
      p = jnp.broadcast_to(p, (x.shape[0], *p.shape))
      x = jnp.concatenate([x[:, :1], p, x[:, -n:]], axis=1)
    block = Encoder1DBlock(num_heads, mlp_dim, (), num_prompts=x.shape[1] - 1 - n)
    x, _ = jit_apply(block)({"params": params["Transformer"][f"encoderblock_{i}"]}, x)
    outs.append(x)
  return outs


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_replaces_or_carries_prompts(deep):
  num_prompts = 2
  model = small_model(dict(method="vpt", num_prompts=num_prompts, deep=deep))
  params = small_params(model)
  x = images()
  _, aux = run(model, params, x, capture=("tokens",))
  n = (IMAGE // SMALL["patch_size"]) ** 2
  for i in range(model.num_layers):  # replaced, never extended: always 1 + P + N tokens
    assert aux["blocks"][i]["tokens"].shape == (2, 1 + num_prompts + n, SMALL["hidden_size"])
  # The embedded tokens [cls, image] + posemb, written out in numpy.
  f = flat(params)
  patches = x.reshape(2, 3, 8, 3, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, n, -1)
  emb = patches @ f["embedding/kernel"].reshape(-1, 32) + f["embedding/bias"]
  x0 = np.concatenate([np.broadcast_to(f["cls"], (2, 1, 32)), emb], 1)
  x0 = x0 + f["Transformer/posembed_input/pos_embedding"]
  prompts = [f.get(f"Transformer/prompts/block_{i}") for i in range(model.num_layers)]
  if deep:
    assert all(p is not None for p in prompts)
  else:
    assert prompts[1:] == [None] * (model.num_layers - 1)
  outs = _blocks_by_hand(params, jnp.asarray(x0, jnp.float32), prompts, deep,
                         SMALL["num_heads"], SMALL["mlp_dim"])
  for i, want in enumerate(outs):
    np.testing.assert_allclose(aux["blocks"][i]["tokens"], want, atol=ATOL)


def test_vpt_deep_zero_prompts_is_the_plain_backbone():
  vpt = small_model(dict(method="vpt", num_prompts=0))
  plain = small_model()
  shapes = jvt.param_shapes(vpt, IMAGE)
  assert jax.tree.structure(shapes) == jax.tree.structure(jvt.param_shapes(plain, IMAGE))
  params = small_params(plain)
  x = images()
  np.testing.assert_array_equal(run(vpt, params, x, capture=())[0],
                                run(plain, params, x, capture=())[0])


def test_prompt_dropout_per_image_and_deterministic_backbone():
  x = np.repeat(images(1), 2, axis=0)  # two identical images
  rngs = {"dropout": jax.random.key(1)}
  drop = small_model(dict(method="vpt", num_prompts=4, dropout=0.5), num_layers=1)
  params = small_params(drop)
  train, _ = jit_apply(drop)({"params": params}, x, train=True, rngs=rngs)
  assert not np.allclose(train[0], train[1], atol=1e-4)  # a dropout mask per image
  # Without prompt dropout, train mode changes nothing: the backbone runs deterministically.
  keep = small_model(dict(method="vpt", num_prompts=4), num_layers=1)
  train, _ = jit_apply(keep)({"params": params}, x, train=True, rngs=rngs)
  np.testing.assert_allclose(train, NumpyViT(params)(x)[0], atol=ATOL, rtol=0)


def _uniform_bound_checks(tokens, bound):
  tokens = np.asarray(tokens)
  assert np.abs(tokens).max() <= bound
  assert np.abs(tokens).max() > 0.9 * bound  # uniform over the whole range
  assert abs(tokens.mean()) < 0.05 * bound
  np.testing.assert_allclose(tokens.std(), bound / math.sqrt(3), rtol=0.1)


@pytest.mark.parametrize("hidden,patch,num", [(768, 16, 50), (32, 8, 400)])
def test_vpt_prompt_init_range(hidden, patch, num):
  prompts = Prompts(tokens=(num, num), inserting=(0, 1), hidden_size=hidden, patch_size=patch,
                    prompt_init="vpt")
  params = prompts.init(jax.random.key(0), 0, 1, True)["params"]
  bound = math.sqrt(6.0 / (3 * patch * patch + hidden))
  if hidden == 768:
    assert bound == 0.0625  # VPT's value for 16x16 patches, D = 768
  assert sorted(params) == ["block_0", "block_1"]
  for tokens in params.values():
    assert tokens.shape == (num, hidden)
    _uniform_bound_checks(tokens, bound)
  assert not np.array_equal(params["block_0"], params["block_1"])


def test_xavier8_prompt_init_range():
  # DA-VPT's released code: torch xavier_uniform_ over the stacked [depth, M, D] prompts of a
  # group (proxy blocks / other blocks), fan_in = M * D, fan_out = depth * D, then / 8.
  d = 256
  prompts = Prompts(tokens=(60, 60, 60, 90), inserting=(0, 1, 2, 3), hidden_size=d,
                    patch_size=16, prompt_init="xavier8", groups=(3,))
  params = prompts.init(jax.random.key(0), 0, 1, True)["params"]
  for i in range(3):
    _uniform_bound_checks(params[f"block_{i}"], math.sqrt(6.0 / (60 * d + 3 * d)) / 8)
  _uniform_bound_checks(params["block_3"], math.sqrt(6.0 / (90 * d + 1 * d)) / 8)


# ------------------------------------------------------------------- zero-initialised plug-ins
def test_zero_initialised_plugins_keep_the_pretrained_function():
  # SSF's default init is random (official SSF: N(1, 0.02) / N(0, 0.02), tested in
  # tests/methods/test_ssf.py); its "identity" init starts at the pretrained function.
  tuning = [dict(method="lora", rank=2, targets=LORA_ALL), dict(method="ssf", init="identity"),
            dict(method="adapter", dim=4), dict(method="adaptformer", dim=4)]
  model = small_model(tuning, num_layers=1)
  plain = small_model(num_layers=1)
  # An "rbg" key: the same initialisers, a cheaper compilation than threefry's on CPU.
  init = flat(jvt.init_params(model, jax.random.key(0, impl="rbg"), IMAGE))
  backbone = flat(small_params(plain, seed=3))  # "pretrained" weights, head included
  plugin_leaves = sorted(set(init) - set(backbone))
  for path in plugin_leaves:
    value = np.asarray(init[path])
    if path.endswith(("lora_b", "ssf_shift", "up/kernel", "up/bias")):
      np.testing.assert_array_equal(value, 0.0, err_msg=path)
    elif path.endswith("ssf_scale"):
      np.testing.assert_array_equal(value, 1.0, err_msg=path)
    else:  # lora_a and the down-projections are random, so B / up get gradients
      assert path.endswith(("lora_a", "down/kernel", "down/bias")), path
      if not path.endswith("bias"):
        assert np.std(value) > 0.01, path
  assert any(p.endswith("lora_b") for p in plugin_leaves)
  assert any(p.endswith("adaptformer/up/kernel") for p in plugin_leaves)
  np.testing.assert_array_equal(init["head/kernel"], 0.0)
  x = images()
  params = unflat({**{p: init[p] for p in plugin_leaves}, **backbone})
  got, _ = run(model, params, x, capture=())
  want, _ = run(plain, unflat(backbone), x, capture=())
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="X/16"), r"Unknown ViT variant 'X/16'.*Ti.*B/16"),
    (dict(variant="B16"), r"Unknown ViT variant"),
    (dict(hidden_dim=32), r"unknown ViT field\(s\) \['hidden_dim'\].*hidden_size"),
    (dict(partition_rules=()), r"unknown ViT field\(s\) \['partition_rules'\]"),
    (dict(hidden_size=30, num_heads=4), r"hidden_size=30 is not divisible by num_heads=4"),
])
def test_build_model_bad_input(kwargs, match):
  kwargs = dict(kwargs)
  variant = kwargs.pop("variant", "B/16")
  with pytest.raises(ValueError, match=match):
    jvt.build_model(variant, 10, **kwargs)


@pytest.mark.parametrize("overrides,apply_kwargs,match", [
    (dict(pool="cls"), {}, r"pool='cls'; allowed: \('tok', 'gap', 'map', 'tok_gap'\)"),
    (dict(fc_norm=True), {}, r"fc_norm=True .* pool='gap'"),
    (dict(remat="some"), {}, r"remat='some'; allowed: .*'dots'"),
    ({}, dict(capture=("tokenz",)), r"capture: unknown keys \['tokenz'\]; allowed"),
    ({}, dict(capture=("tokens",), capture_layers=(3,)), r"capture_layers \[3\] out of range"),
])
def test_forward_bad_input(overrides, apply_kwargs, match):
  model = small_model(**overrides)
  x = jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), jnp.float32)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), **apply_kwargs))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_init_params_of_a_remat_model_match_the_plain_model_and_leave_nothing_alive(remat):
  """Remat changes neither the parameter tree nor its values, and once the caller drops the
  parameters no array of the initialisation stays alive (under lazy_init, jax.checkpoint's
  trace cache kept a whole fp32 copy of them until jax.clear_caches)."""
  import gc
  tuning = [dict(method="vpt", num_prompts=2, deep=True)]
  gc.collect()
  before = {id(a) for a in jax.live_arrays()}
  params = jvt.init_params(small_model(tuning, remat=remat), jax.random.key(3), IMAGE)
  plain = jvt.init_params(small_model(tuning), jax.random.key(3), IMAGE)
  assert jax.tree.structure(params) == jax.tree.structure(plain)
  jax.tree.map(np.testing.assert_array_equal, params, plain)
  del params, plain
  gc.collect()
  left = [a.shape for a in jax.live_arrays() if id(a) not in before]
  assert not left, f"{len(left)} arrays of the initialisation still alive: {left[:5]}"
