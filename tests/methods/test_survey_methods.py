"""The survey's method families: Convpass, FacT, RepAdapter, E2VPT, VP, DoRA, DiffFit and the
adapter placements (Pfeiffer, Adapter+).

Each method's forward is transcribed here in float64 numpy from its paper and the authors'
code (PETL-ViT `convpass/` and `FacT/`, luogen1996/RepAdapter, ChengHan111/E2VPT,
hjbahng/visual_prompting, NVlabs/DoRA, DiffFit, visinf/adapter_plus), driven only by the
parameter leaves, and compared with jvt's block outputs and logits. Then: initialisation at
the pretrained function, exact merging, compositions and their errors, and a short training
on the synthetic set. Trainable counts on ViT-B/16 are in the golden table of test_methods.py.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special

import jvt
from jvt import partition
from jvt.data.synthetic import render_example
from jvt.methods import NotMergeableError, merge

from conftest import flat, random_like, unflat

# Tiny ViT whose MLP is 4 D wide (FacT's tensorisation needs it): 24x24 images, 8x8 patches,
# so the image tokens form a 3x3 grid.
DIMS = dict(hidden_size=32, mlp_dim=128, num_heads=4, num_layers=2, patch_size=8)
IMAGE, CLASSES = 24, 5
ATOL = 1e-5


def model_of(tuning=None, **overrides):
  return jvt.build_model("B/16", CLASSES, tuning, **{**DIMS, **overrides})


def random_params(model, seed=0, size=IMAGE):
  return random_like(jvt.param_shapes(model, size), seed=seed)


def batch(n=2, size=IMAGE, seed=1):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------ numpy transcriptions
def gelu(x):
  return 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))


def quick_gelu(x):  # PETL-ViT convpass.py QuickGELU
  return x * scipy.special.expit(1.702 * x)


def softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def convpass_bypass(p, pre, z, grid):
  """PETL-ViT `Convpass.forward` (eval): [CLS] (and every non-grid token) as a 1x1 image."""
  h, w = grid
  u = quick_gelu(z @ p[f"{pre}/down/kernel"] + p[f"{pre}/down/bias"])  # [B, T, r]
  b, t, r = u.shape
  k, kb = p[f"{pre}/conv/kernel"], p[f"{pre}/conv/bias"]  # [3, 3, r, r] (HWIO), [r]
  img = np.pad(u[:, t - h * w:].reshape(b, h, w, r), ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h, w, r))
  for dy in range(3):
    for dx in range(3):
      out += img[:, dy:dy + h, dx:dx + w] @ k[dy, dx]
  grid_out = (out + kb).reshape(b, h * w, r)
  rest = u[:, :t - h * w] @ k[1, 1] + kb  # zero padding leaves only the centre tap
  u = quick_gelu(np.concatenate([rest, grid_out], axis=1))
  return u @ p[f"{pre}/up/kernel"] + p[f"{pre}/up/bias"]


def fact_delta_of(x, name, f, layer):
  """`fact_forward_attn` / `fact_forward_mlp` of PETL-ViT FacT (eval): the increment added to
  projection `name`'s output, x its input flattened to [B, T, D] (or 4D for fc2)."""
  u, v = f["u"], f["v"]  # [D, r] (FacTu.weight.T), [r, D] (FacTv.weight.T)
  d, r = u.shape
  b, t = x.shape[:2]
  if f["variant"] == "tt":
    core = f["cores"][(layer, name)]  # [in, out], i.e. the torch Linear's weight.T
  else:  # fact_tk.py: FacTc @ FacTp[:, idx:idx + k], idx = 12 * layer (+ 4 for the MLP)
    g, pm = f["g"], f["p"]
    if name in ("query", "key", "value", "out"):
      core = (g @ pm[:, 12 * layer:12 * layer + 4])[:, :, ("query", "key", "value",
                                                           "out").index(name)]
    else:
      c = g @ pm[:, 12 * layer + 4:12 * layer + 12]
      core = c[:, :, :4].reshape(r, 4 * r) if name == "mlp_in" else c[:, :, 4:].reshape(
          r, 4 * r).T
  if name == "mlp_in":  # FacTv(dp(fc1(FacTu(x))).reshape(B, N, 4, dim)).reshape(B, N, 4C)
    return ((x @ u @ core).reshape(b, t, 4, r) @ v).reshape(b, t, 4 * d)
  if name == "mlp_out":  # FacTv(dp(fc2(FacTu(x.reshape(B, N, 4, C)).reshape(B, N, 4 dim))))
    return ((x.reshape(b, t, 4, d) @ u).reshape(b, t, 4 * r) @ core) @ v
  return x @ u @ core @ v


class Reference:
  """A ViT forward (eval mode) in float64 with the plug-ins of one method, from the leaves."""

  def __init__(self, params, method: dict, eps=1e-6):
    self.p = {k: np.asarray(v, np.float64) for k, v in flat(params).items()}
    self.m = method
    self.eps = eps
    if method["method"] == "fact":
      f = {"variant": method.get("variant", "tt"), "u": self.p["fact/u"],
           "v": self.p["fact/v"]}
      if f["variant"] == "tk":
        f["g"], f["p"] = self.p["fact/g"], self.p["fact/p"]
      else:
        f["cores"] = {}
        for key, value in self.p.items():
          if key.endswith("/fact_core"):
            layer = int(key.split("/")[1].rsplit("_", 1)[1])
            leaf = key.split("/")[-2]
            name = {"Dense_0": "mlp_in", "Dense_1": "mlp_out"}.get(leaf, leaf)
            f["cores"][(layer, name)] = value
      self.fact = f

  def ln(self, x, name):
    return layer_norm(x, self.p[f"{name}/scale"], self.p[f"{name}/bias"], self.eps)

  def kernel(self, name, site):
    w = self.p[f"{name}/kernel"]
    if self.m["method"] == "dora" and site in self.m.get("targets", ("query", "value")):
      # DoRA: m * (W + s A B) / ||W + s A B||, norm per output feature, m = ||W|| + dm.
      s = self.m.get("alpha", 8.0) / self.m.get("rank", 8)
      a, b = self.p[f"{name}/dora_a"], self.p[f"{name}/dora_b"]
      axes = tuple(range(a.ndim - 1))
      v = w + s * np.tensordot(a, b, axes=1)
      mag = np.sqrt((w ** 2).sum(axis=axes)) + self.p[f"{name}/dora_dm"]
      w = mag / np.sqrt((v ** 2).sum(axis=axes)) * v
    return w

  def proj(self, x, name, site, layer, in_axes=1):
    y = np.tensordot(x, self.kernel(name, site), axes=in_axes) + self.p[f"{name}/bias"]
    if self.m["method"] == "fact":
      b, t = x.shape[:2]
      delta = fact_delta_of(x.reshape(b, t, -1), site, self.fact, layer)
      y = y + self.m.get("scale", 1.0) * delta.reshape(y.shape)
    return y

  def repadapter(self, z, norm):
    """RepAdapter.forward: conv_B(dropout(conv_A(x))) * scale + x, conv_B group-wise."""
    pre = f"{norm}/repadapter"
    if f"{pre}/down/kernel" not in self.p:
      return z
    h = z @ self.p[f"{pre}/down/kernel"] + self.p[f"{pre}/down/bias"]  # [B, T, r]
    kernel = self.p[f"{pre}/up/kernel"]  # [g, r/g, D/g]
    g, ri, _ = kernel.shape
    out = np.concatenate([h[..., j * ri:(j + 1) * ri] @ kernel[j] for j in range(g)], axis=-1)
    return z + self.m.get("scale", 1.0) * (out + self.p[f"{pre}/up/bias"])

  def branch(self, pre, name, x, z, y, grid):
    method = self.m["method"]
    placement = self.m.get("placement", "houlsby")
    if method == "convpass" and name in self.m.get("positions", ("attn", "mlp")):
      y = y + self.m.get("scale", 1.0) * convpass_bypass(self.p, f"{pre}/convpass_{name}", z,
                                                         grid)
    if method == "adapter" and placement == "houlsby" and name in self.m.get(
        "positions", ("attn", "mlp")):
      a = f"{pre}/adapter_{name}"
      y = y + gelu(y @ self.p[f"{a}/down/kernel"] + self.p[f"{a}/down/bias"]) @ self.p[
          f"{a}/up/kernel"] + self.p[f"{a}/up/bias"]
    if method == "adapter" and placement != "houlsby" and name == "mlp":
      # adapter_plus vit_adapter.py: forward_pfeiffer (norm_a, scaling 1) / forward_post
      # (no norm, channel scaling): h = x + mlp; out = h + adapter(h).
      a, h = f"{pre}/adapter_out", x + y
      u = layer_norm(h, self.p[f"{a}/norm/scale"], self.p[f"{a}/norm/bias"]) if (
          placement == "pfeiffer") else h
      out = gelu(u @ self.p[f"{a}/down/kernel"] + self.p[f"{a}/down/bias"]) @ self.p[
          f"{a}/up/kernel"] + self.p[f"{a}/up/bias"]
      if placement == "adapter_plus":
        out = out * self.p[f"{a}/scale"]
      y = y + out
    if method == "difffit":  # x + gamma * branch
      y = y * self.p[f"{pre}/difffit_{name}"]
    return y

  def block(self, x, i, grid):
    pre = f"Transformer/encoderblock_{i}"
    att = f"{pre}/MultiHeadDotProductAttention_0"
    z = self.repadapter(self.ln(x, f"{pre}/LayerNorm_0"), f"{pre}/LayerNorm_0")
    q = self.proj(z, f"{att}/query", "query", i)  # [B, T, H, Dh]
    k = self.proj(z, f"{att}/key", "key", i)
    v = self.proj(z, f"{att}/value", "value", i)
    if f"{att}/kv_prompts" in self.p:  # E2VPT: shared K/V prompts (SHARE_PARAM_KV)
      kv = np.broadcast_to(self.p[f"{att}/kv_prompts"], (x.shape[0],
                                                         *self.p[f"{att}/kv_prompts"].shape))
      k, v = np.concatenate([kv, k], axis=1), np.concatenate([kv, v], axis=1)
    probs = softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]))
    o = self.proj(np.einsum("bhqk,bkhd->bqhd", probs, v), f"{att}/out", "out", i, in_axes=2)
    x = x + self.branch(pre, "attn", x, z, o, grid)
    z = self.repadapter(self.ln(x, f"{pre}/LayerNorm_1"), f"{pre}/LayerNorm_1")
    hidden = gelu(self.proj(z, f"{pre}/MlpBlock_0/Dense_0", "mlp_in", i))
    m = self.proj(hidden, f"{pre}/MlpBlock_0/Dense_1", "mlp_out", i)
    return x + self.branch(pre, "mlp", x, z, m, grid)

  def prompts(self, i, d):
    """E2VPT's deep prompts of block i, times the token and (strided) segment masks."""
    prompt = self.p[f"Transformer/prompts/block_{i}"].copy()
    segments = self.m.get("num_segments", 16)
    for t in self.m.get("pruned_prompts", ()):
      prompt[t] = 0.0
    for t, s in self.m.get("pruned_segments", ()):
      prompt[t] *= np.tile(np.arange(segments) != s, d // segments)  # torch repeat tiles
    return prompt

  def __call__(self, images):
    x = np.asarray(images, np.float64)
    if self.m["method"] == "vp":  # PadPrompter.forward: x + [up; left | 0 | right; down]
      b, h, w, c = x.shape
      pad = self.m.get("pad", 30)
      middle = np.concatenate([self.p["vp/pad_left"], np.zeros((h - 2 * pad, w - 2 * pad, c)),
                               self.p["vp/pad_right"]], axis=1)
      x = x + np.concatenate([self.p["vp/pad_up"], middle, self.p["vp/pad_down"]], axis=0)
    kernel = self.p["embedding/kernel"]
    ph, pw, c, d = kernel.shape
    b, h, w, _ = x.shape
    grid = (h // ph, w // pw)
    patches = x.reshape(b, grid[0], ph, grid[1], pw, c).transpose(0, 1, 3, 2, 4, 5)
    x = patches.reshape(b, grid[0] * grid[1], -1) @ kernel.reshape(-1, d) + self.p[
        "embedding/bias"]
    n = x.shape[1]
    x = np.concatenate([np.broadcast_to(self.p["cls"], (b, 1, d)), x], axis=1)
    x = x + self.p["Transformer/posembed_input/pos_embedding"]
    tokens = []
    for i in range(DIMS["num_layers"]):
      if self.m["method"] == "e2vpt":
        prompt = self.prompts(i, d)
        x = np.concatenate([x[:, :1], np.broadcast_to(prompt, (b, *prompt.shape)),
                            x[:, x.shape[1] - n:]], axis=1)
      x = self.block(x, i, grid)
      tokens.append(x)
    feat = self.ln(x, "Transformer/encoder_norm")[:, 0]
    return feat @ self.p["head/kernel"] + self.p["head/bias"], tokens


FORWARD_CASES = [
    dict(method="convpass", dim=4, scale=0.7),
    dict(method="convpass", dim=4, positions=("attn",), conv_init="xavier"),
    dict(method="fact", variant="tt", rank=3, scale=0.5),
    dict(method="fact", variant="tk", rank=3, scale=2.0),
    dict(method="repadapter", dim=4, groups=2, scale=0.5),
    dict(method="repadapter", dim=8, groups=4, positions=("attn",)),
    dict(method="e2vpt", num_prompts=3, num_kv_prompts=2),
    dict(method="e2vpt", num_prompts=3, num_kv_prompts=2, num_segments=4, pruned_prompts=(1,),
         pruned_segments=((0, 2), (2, 3))),
    dict(method="vp", pad=5),
    dict(method="dora", rank=3, alpha=6.0),
    dict(method="dora", rank=2, targets=("key", "out", "mlp_in", "mlp_out")),
    dict(method="difffit"),
    dict(method="adapter", dim=4),
    dict(method="adapter", dim=4, placement="pfeiffer"),
    dict(method="adapter", dim=4, placement="adapter_plus"),
]


def _id(cfg):
  return "-".join(str(v) for k, v in cfg.items() if k in ("method", "variant", "placement",
                                                           "positions", "pruned_prompts"))


@pytest.mark.parametrize("cfg", FORWARD_CASES, ids=_id)
def test_forward_matches_numpy_transcription(cfg):
  model = model_of(cfg)
  params = random_params(model)
  x = batch()
  logits, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, capture=("tokens",),
                                                 capture_layers=(0, 1)))(params, x)
  want, tokens = Reference(params, cfg)(x)
  for i, expected in enumerate(tokens):
    np.testing.assert_allclose(aux["blocks"][i]["tokens"], expected, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(logits, want, atol=ATOL, rtol=ATOL)


def test_convpass_cls_and_prompts_see_only_the_centre_tap():
  """With VPT prompts in the sequence, the bypass treats each non-grid token as [CLS]."""
  cfg = dict(method="convpass", dim=4)
  model = model_of([cfg, dict(method="vpt", num_prompts=2)])
  params = random_params(model)
  p = {k: np.asarray(v, np.float64) for k, v in flat(params).items()}
  x = batch()
  _, aux = model.apply({"params": params}, x, capture=("tokens",), capture_layers=(0,))
  ref = Reference(params, cfg)
  # Block 0's input, by hand: patch embedding, [CLS], position embedding, then the prompts.
  kernel = p["embedding/kernel"]
  patches = x.reshape(2, 3, 8, 3, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 9, -1)
  tok = patches @ kernel.reshape(-1, kernel.shape[-1]) + p["embedding/bias"]
  tok = np.concatenate([np.broadcast_to(p["cls"], (2, 1, 32)), tok], axis=1)
  tok = tok + p["Transformer/posembed_input/pos_embedding"]
  prompts = np.broadcast_to(p["Transformer/prompts/block_0"], (2, 2, 32))
  tok = np.concatenate([tok[:, :1], prompts, tok[:, 1:]], axis=1)
  np.testing.assert_allclose(aux["blocks"][0]["tokens"], ref.block(tok, 0, (3, 3)),
                             atol=ATOL, rtol=ATOL)


def test_convpass_conv_starts_as_identity_and_fact_inits_as_torch():
  model = model_of([dict(method="convpass", dim=4), dict(method="fact", rank=4)])
  params = flat(jvt.init_params(model, jax.random.PRNGKey(0), IMAGE))
  conv = np.asarray(params["Transformer/encoderblock_0/convpass_attn/conv/kernel"])
  expected = np.zeros((3, 3, 4, 4))
  expected[1, 1] = np.eye(4)
  np.testing.assert_array_equal(conv, expected)
  assert not np.any(params["Transformer/encoderblock_0/convpass_attn/up/kernel"])
  # FacT: U as torch's nn.Linear(D, r) (bound 1/sqrt(D)), V zero, TT cores bound 1/sqrt(fan_in).
  u = np.asarray(params["fact/u"])
  assert u.shape == (32, 4) and 0.5 / math.sqrt(32) < np.abs(u).max() <= 1 / math.sqrt(32)
  assert not np.any(params["fact/v"])
  core = np.asarray(params["Transformer/encoderblock_1/MlpBlock_0/Dense_1/fact_core"])
  assert core.shape == (16, 4) and np.abs(core).max() <= 1 / math.sqrt(16)


def test_e2vpt_kv_prompt_init_is_the_authors_kaiming_uniform():
  # B/16's head dim (64) with 2 heads and a narrow MLP: the bound depends on M and Dh only, and
  # the prompts' shape not on the image size (32 px).
  model = jvt.build_model("B/16", CLASSES, dict(method="e2vpt", num_kv_prompts=5),
                          hidden_size=128, num_heads=2, mlp_dim=256, num_layers=4)
  params = flat(jvt.init_params(model, jax.random.PRNGKey(0), 32))
  kv = np.asarray(params["Transformer/encoderblock_3/MultiHeadDotProductAttention_0/kv_prompts"])
  bound = math.sqrt(6.0 / (5 * 64))  # torch kaiming_uniform_ of [H, M, Dh]: fan_in = M * Dh
  assert kv.shape == (5, 2, 64)
  assert np.abs(kv).max() <= bound and np.abs(kv).max() > 0.9 * bound


def test_e2vpt_pruning_scores_are_the_mask_gradients():
  """prompt_scores: the batch-mean gradient of the loss with respect to each token's (and each
  segment's) mask, checked by central differences of the pruned-field forward; `lowest` picks
  the smallest scores; the rewind run's fields mask what the scores chose."""
  from jvt.methods.e2vpt import lowest, prompt_scores
  cfg = dict(method="e2vpt", num_prompts=3, num_kv_prompts=2, num_segments=4, dropout=0.0)
  model = model_of(cfg)
  params = random_params(model)
  rng = np.random.default_rng(0)
  batches = [(batch(seed=s), rng.integers(0, CLASSES, 2)) for s in (1, 2)]
  tokens, segments = prompt_scores(model, params, batches)
  assert tokens.shape == (3,) and segments.shape == (3, 4)

  def mean_loss(scale_token=None, scale_segment=None, eps=0.0):
    """The batch-mean loss with one token (or segment) of every block's prompts scaled."""
    out = []
    for x, y in batches:
      ref = Reference(params, cfg)
      p = dict(ref.p)
      for i in range(DIMS["num_layers"]):
        key = f"Transformer/prompts/block_{i}"
        prompt = p[key].copy()
        if scale_token is not None:
          prompt[scale_token] *= 1.0 + eps
        if scale_segment is not None:
          t, j = scale_segment
          prompt[t, np.arange(prompt.shape[1]) % 4 == j] *= 1.0 + eps
        p[key] = prompt
      ref.p = p
      logits, _ = ref(x)
      logp = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
      out.append(-logp[np.arange(len(y)), y].mean())
    return np.mean(out)

  eps = 1e-4
  for t in range(3):
    fd = (mean_loss(scale_token=t, eps=eps) - mean_loss(scale_token=t, eps=-eps)) / (2 * eps)
    np.testing.assert_allclose(tokens[t], fd, rtol=1e-3, atol=1e-5)
  for t, j in ((0, 1), (2, 3)):
    fd = (mean_loss(scale_segment=(t, j), eps=eps)
          - mean_loss(scale_segment=(t, j), eps=-eps)) / (2 * eps)
    np.testing.assert_allclose(segments[t, j], fd, rtol=1e-3, atol=1e-5)

  pruned, pieces = lowest([0.3, -0.2, 0.1], np.array([[4, 3, 2, 1]] * 3, float), 2, 1,
                          keep_segments=2)
  assert pruned == (1, 2) and pieces == ((0, 3), (1, 3), (2, 3))
  assert lowest([0.3, -0.2, 0.1], np.zeros((3, 4)), 5, 0)[0] == (1, 2)  # one token kept


# ------------------------------------------------------------------ start, merge, compose
ZERO_INIT = [dict(method="convpass"), dict(method="convpass", conv_init="xavier"),
             dict(method="fact"), dict(method="fact", variant="tk", rank=4),
             dict(method="repadapter"), dict(method="dora", rank=4),
             dict(method="dora", targets=("query", "key", "value", "out", "mlp_in", "mlp_out")),
             dict(method="difffit"), dict(method="adapter"),
             dict(method="adapter", placement="pfeiffer")]


@pytest.mark.parametrize("cfg", ZERO_INIT, ids=_id)
def test_zero_initialised_methods_start_at_the_backbone(cfg):
  model, plain = model_of(cfg), model_of()
  params = flat(jax.jit(lambda k: jvt.init_params(model, k, IMAGE))(jax.random.PRNGKey(3)))
  rng = np.random.default_rng(0)
  params["head/kernel"] = rng.standard_normal(params["head/kernel"].shape).astype(np.float32)
  backbone = {k: params[k] for k in flat(jvt.param_shapes(plain, IMAGE))}
  x = batch()
  got, _ = model.apply({"params": unflat(params)}, x)
  want, _ = plain.apply({"params": unflat(backbone)}, x)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)
  assert np.abs(np.asarray(want)).max() > 0.1  # the check is not trivially on zeros


MERGEABLE = [dict(method="fact", rank=3, scale=0.5), dict(method="fact", variant="tk", rank=3),
             dict(method="repadapter", dim=4, scale=0.5), dict(method="dora", rank=3),
             dict(method="dora", targets=("key", "out", "mlp_out")), dict(method="difffit"),
             # compositions: each merge folds into the kernels the earlier ones left
             [dict(method="lora", rank=2, targets=("query", "mlp_in")),
              dict(method="repadapter", dim=4)],
             [dict(method="repadapter", dim=4), dict(method="ssf"), dict(method="fact", rank=2)],
             [dict(method="difffit"), dict(method="dora", targets=("out", "mlp_out")),
              dict(method="ssf")]]


@pytest.mark.parametrize("cfg", MERGEABLE, ids=lambda c: "+".join(
    d["method"] for d in (c if isinstance(c, list) else [c])))
def test_merge_gives_a_plain_vit_with_equal_logits(cfg):
  model = model_of(cfg)
  params = random_params(model, seed=4)
  x = batch()
  want, _ = model.apply({"params": params}, x)
  plain, merged = merge(model, params)
  assert set(flat(merged)) == set(flat(jvt.param_shapes(model_of(), IMAGE)))
  got, _ = plain.apply({"params": merged}, x)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("cfg", [dict(method="convpass"), dict(method="e2vpt"),
                                 dict(method="vp", pad=3), dict(method="adapter",
                                                                placement="adapter_plus")],
                         ids=_id)
def test_methods_that_add_computation_refuse_to_merge(cfg):
  model = model_of(cfg)
  with pytest.raises(NotMergeableError, match=cfg["method"]):
    merge(model, random_params(model))


def _labels(cfg):
  model = model_of(cfg)
  return flat(partition.label_params(jvt.param_shapes(model, IMAGE), model))


def test_compositions_train_both_methods():
  labels = _labels([dict(method="convpass"), dict(method="bitfit")])
  assert labels["Transformer/encoderblock_1/convpass_mlp/conv/kernel"] == "adapter"
  assert labels["Transformer/encoderblock_1/MultiHeadDotProductAttention_0/key/bias"] == "bias"
  labels = _labels([dict(method="vp", pad=3), dict(method="vpt", num_prompts=2)])
  assert labels["vp/pad_left"] == "prompt" and labels["Transformer/prompts/block_1"] == "prompt"
  labels = _labels([dict(method="difffit"), dict(method="lora")])
  assert labels["Transformer/encoderblock_0/difffit_attn"] == "difffit"
  assert labels["Transformer/encoderblock_0/LayerNorm_1/scale"] == "norm"
  assert labels["Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias"] == "bias"
  assert labels["Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel"] == "frozen"
  labels = _labels(dict(method="fact", variant="tk"))
  assert {labels[f"fact/{k}"] for k in "uvgp"} == {"fact"}


def test_fact_runs_under_rematerialisation():
  cfg = dict(method="fact", rank=3)
  model, remat = model_of(cfg), model_of(cfg, remat="full")
  params = random_params(model)
  x = batch()

  def loss(m):
    return lambda p: jnp.sum(m.apply({"params": p}, x)[0] ** 2)

  v1, g1 = jax.value_and_grad(loss(model))(params)
  v2, g2 = jax.value_and_grad(loss(remat))(params)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g1, g2)


@pytest.mark.parametrize("cfg,match", [
    ([dict(method="dora"), dict(method="lora")], "lora_targets"),
    ([dict(method="e2vpt"), dict(method="vpt")], "prompt_tokens"),
    (dict(method="fact", variant="cp"), "fact.variant"),
    (dict(method="fact", rank=0), "fact.rank"),
    (dict(method="repadapter", dim=8, groups=3), "groups must divide dim"),
    (dict(method="convpass", conv_init="zeros"), "convpass.conv_init"),
    (dict(method="convpass", positions=("ffn",)), "convpass.positions"),
    (dict(method="e2vpt", num_prompts=4, pruned_prompts=(4,)), "out of range"),
    (dict(method="dora", targets=("qkv",)), "dora.targets"),
    (dict(method="vp", pad=0), "vp.pad"),
    (dict(method="adapter", placement="parallel"), "adapter.placement"),
    (dict(method="adapter", placement="pfeiffer", positions=("attn",)), "placement='houlsby'"),
])
def test_bad_configs_and_compositions(cfg, match):
  with pytest.raises(ValueError, match=match):
    model_of(cfg)


@pytest.mark.parametrize("cfg,kwargs,match", [
    (dict(method="vp", pad=12), {}, "2 \\* pad < 24"),
    (dict(method="fact"), dict(mlp_dim=64), "mlp_dim = 4"),
    (dict(method="e2vpt", num_segments=5), {}, "num_segments=5 must divide"),
])
def test_shape_errors_name_the_field(cfg, kwargs, match):
  with pytest.raises(ValueError, match=match):
    jvt.param_shapes(model_of(cfg, **kwargs), IMAGE)


# ------------------------------------------------------------------ short training
TRAINED = [dict(method="convpass", dim=4), dict(method="fact", rank=4),
           dict(method="fact", variant="tk", rank=4), dict(method="repadapter", dim=4),
           dict(method="e2vpt", num_prompts=2, num_kv_prompts=2), dict(method="vp", pad=3),
           dict(method="dora", rank=4), dict(method="difffit"),
           dict(method="adapter", dim=4, placement="pfeiffer"),
           dict(method="adapter", dim=4, placement="adapter_plus", drop_path=0.1)]


def _synthetic(n=64, size=16, seed=0):
  rng = np.random.default_rng(seed)
  examples = [render_example(rng, size) for _ in range(n)]
  x = np.stack([im for im, _ in examples]).astype(np.float32) / 127.5 - 1.0
  y = np.array([labels["shape"] for _, labels in examples])
  return x, y


@pytest.mark.slow
@pytest.mark.parametrize("cfg", TRAINED, ids=_id)
def test_short_training_lowers_the_loss(cfg):
  """The method's leaves and the head train on the synthetic shapes (frozen random backbone,
  16 px images): the loss of the last steps is below that of the first."""
  x, y = _synthetic()
  model = model_of(cfg, num_layers=2, patch_size=4)
  params = jvt.init_params(model, jax.random.PRNGKey(0), 16)
  mask = partition.trainable_mask(params, model)
  tx = partition.make_optimizer(dict(name="adamw", lr=3e-3, weight_decay=0.0,
                                     schedule="constant"), model.partition_rules, total_steps=40)
  trainable, frozen = partition.split_params(params, mask)
  state = tx.init(trainable)

  @jax.jit
  def step(trainable, state, key):
    def loss_fn(t):
      logits, _ = model.apply({"params": partition.merge_params(t, frozen)}, x, train=True,
                              rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, loss

  losses = []
  for i in range(40):
    trainable, state, loss = step(trainable, state, jax.random.PRNGKey(i))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses


# ------------------------------------------------------------------ benchmark configs
def test_configs_take_the_authors_per_task_values():
  from jvt.config_lib import load_config

  def tuning(path, arg):
    return load_config(f"configs/{path}.py:{arg}").tuning.to_dict()

  assert tuning("vtab/convpass", "task=dtd") | {} == dict(
      method="convpass", dim=8, scale=0.01, conv_init="xavier")
  assert tuning("vtab/convpass", "task=dtd,scale=3.0")["scale"] == 3.0  # an arg wins
  assert (tuning("vtab/fact", "task=dtd")["rank"], tuning("vtab/fact", "task=dtd")["scale"]) == (
      16, 0.01)
  t = tuning("vtab/fact", "task=resisc45,variant=tt")
  assert (t["variant"], t["rank"], t["scale"]) == ("tt", 8, 0.1)
  assert tuning("vtab/repadapter", "task=svhn")["scale"] == 10.0
  t = tuning("vtab/e2vpt", "task=caltech101")
  assert (t["num_prompts"], t["num_kv_prompts"]) == (32, 5)
  assert tuning("vtab/adapter_plus", "task=resisc45")["dim"] == 32
  assert tuning("fgvc/adapter_plus", "task=cars")["dim"] == 32


def test_difffit_bf16_gamma_gradient_is_summed_in_fp32():
  # As SSF's: gamma's gradient sums every row; in bf16 a sum of 4096 rows of ~1 is off by
  # percents, in fp32 it matches the float64 sum to ~1e-6.
  import types
  import flax.linen as nn
  from jvt.methods.difffit import DiffFit

  class Branch(nn.Module):
    @nn.compact
    def __call__(self, y):
      return DiffFit().on_branch(self, None, None, y, types.SimpleNamespace(name="attn"))

  y = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, (4096, 8)), jnp.bfloat16)
  module = Branch()
  params = module.init(jax.random.key(0), y)["params"]
  assert module.apply({"params": params}, y).dtype == jnp.bfloat16
  grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, y).astype(jnp.float32)))(params)
  np.testing.assert_allclose(grads["difffit_attn"],
                             np.asarray(y.astype(jnp.float32), np.float64).sum(0), rtol=1e-5)


def test_adapter_plus_bf16_scale_gradient_is_summed_in_fp32():
  # Adapter+'s channel scale c multiplies the bottleneck's output y; dL/dc sums g * y over
  # every row. With the up bias at 1, y ~ 1 and the sum of 4096 rows is ~4096: summed in bf16
  # (spacing 32 at 4096) it is off by percents, in fp32 it matches float64 to ~1e-6.
  from jvt.methods.adapter import _OutputAdapter

  module = _OutputAdapter(dim=4, placement="adapter_plus", dtype=jnp.bfloat16)
  h = jnp.asarray(np.random.default_rng(0).standard_normal((4096, 8)), jnp.bfloat16)
  params = module.init(jax.random.key(0), h)["params"]
  params = dict(params, up=dict(params["up"], bias=jnp.ones_like(params["up"]["bias"])))
  # With c = 1 (its init) the output is y itself: (y in fp32 * 1) cast back to bf16 is exact.
  y = module.apply({"params": params}, h)
  assert y.dtype == jnp.bfloat16
  grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, h).astype(jnp.float32)))(params)
  np.testing.assert_allclose(grads["scale"],
                             np.asarray(y.astype(jnp.float32), np.float64).sum(0), rtol=1e-5)
