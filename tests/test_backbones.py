"""Tests for the pretrained families (DINOv2, CLIP / OpenCLIP, SigLIP) in every file layout.

Each family's weights are drawn at random in torch semantics ("canonical": Linear weights
(out, in), OIHW convs), written in each official layout by writers in this file (from the
layouts' documentation: timm's, transformers' and open_clip's module names, big_vision's Linen
names), loaded by jvt, and the model's outputs compared with a numpy transcription of the
family's own forward pass that reads the canonical weights. The widths are tiny (hidden 32,
2 blocks, 2 heads, patch 8, image 32: a 4 x 4 grid); the files' position grids are trained at
6 x 6 (image 48) for the families that are resized (DINOv2's 518 px case).
"""
import math

import jax
import numpy as np
import pytest
import safetensors.numpy
import scipy.special

from flax import traverse_util
from helpers_train import build_data

import jvt
from jvt.checkpoints import formats, load_pretrained
from jvt.checkpoints.pretrained import CheckpointMismatchError

D, H, F, L, P, IMAGE, C, E = 32, 2, 64, 2, 8, 32, 5, 24  # E: CLIP projection width
TINY = dict(hidden_size=D, num_heads=H, mlp_dim=F, num_layers=L, patch_size=P)
FILE_GRID = 6  # the position grid the files were "trained" at (the model runs at 4 x 4)


# ----------------------------------------------------------------------------- canonical weights
def canonical(family, seed=0, *, registers=0, swiglu=False, grid=4, layer_scale=None):
  """Random weights in torch semantics. family: dinov2 | clip | siglip."""
  rng = np.random.default_rng(seed)
  r = lambda *s, scale=0.3: rng.normal(0.0, scale, s).astype(np.float32)  # noqa: E731
  norm = lambda: (1.0 + r(D, scale=0.1), r(D, scale=0.1))  # noqa: E731
  cls = family != "siglip"
  c = {"patch_w": r(D, 3, P, P, scale=0.1), "patch_b": None if family == "clip" else r(D),
       "cls": r(D) if cls else None, "pos": r(int(cls) + grid * grid, D),
       "reg": r(registers, D) if registers else None,
       "pre_norm": norm() if family == "clip" else None, "norm": norm(), "blocks": [],
       "head_w": r(C, D), "head_b": r(C)}
  layer_scale = family == "dinov2" if layer_scale is None else layer_scale
  hidden = 2 * F if swiglu else F
  for _ in range(L):
    blk = {"n1": norm(), "n2": norm(), "fc1_w": r(hidden, D), "fc1_b": r(hidden),
           "fc2_w": r(D, F), "fc2_b": r(D)}
    for n in "qkvo":
      blk[n + "_w"], blk[n + "_b"] = r(D, D), r(D)
    blk["ls1"], blk["ls2"] = (r(D) if layer_scale else None), (r(D) if layer_scale else None)
    c["blocks"].append(blk)
  if family == "siglip":
    c["map"] = {"probe": r(1, 1, D), "norm": norm(), "fc1_w": r(F, D), "fc1_b": r(F),
                "fc2_w": r(D, F), "fc2_b": r(D)}
    for n in "qkvo":
      c["map"][n + "_w"], c["map"][n + "_b"] = r(D, D), r(D)
  c["proj"] = r(D, E) if family == "clip" else None
  return c


# ----------------------------------------------------------------------------- writers
def _save(path, sd):
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
  return str(path)


def write_timm(path, c, *, original_dinov2=False):
  """timm names (`vit_*_dinov2`, `vit_*_clip_*`, `vit_*_siglip_*`). DINOv2 with registers in
  timm's layout folds [CLS]'s position into `cls_token` and drops the slot (timm's
  `_convert_dinov2`); `original_dinov2` writes facebookresearch/dinov2's own names instead
  (`register_tokens`, `mask_token`, `mlp.w12` / `mlp.w3`)."""
  sd = {"patch_embed.proj.weight": c["patch_w"], "norm.weight": c["norm"][0],
        "norm.bias": c["norm"][1]}
  if c["patch_b"] is not None:
    sd["patch_embed.proj.bias"] = c["patch_b"]
  pos = c["pos"][None]
  if c["cls"] is not None:
    sd["cls_token"] = c["cls"].reshape(1, 1, D)
  if c["reg"] is not None:
    if original_dinov2:
      sd["register_tokens"] = c["reg"][None]
    else:
      sd["reg_token"] = c["reg"][None]
      sd["cls_token"] = sd["cls_token"] + pos[:, :1]
      pos = pos[:, 1:]
  if original_dinov2:
    sd["mask_token"] = np.zeros((1, D), np.float32)
  sd["pos_embed"] = pos
  if c["pre_norm"] is not None:
    sd["norm_pre.weight"], sd["norm_pre.bias"] = c["pre_norm"]
  swiglu = c["blocks"][0]["fc1_w"].shape[0] == 2 * F
  fc1, fc2 = ("w12", "w3") if (original_dinov2 and swiglu) else ("fc1", "fc2")
  for i, b in enumerate(c["blocks"]):
    t = f"blocks.{i}."
    sd[t + "norm1.weight"], sd[t + "norm1.bias"] = b["n1"]
    sd[t + "norm2.weight"], sd[t + "norm2.bias"] = b["n2"]
    sd[t + "attn.qkv.weight"] = np.concatenate([b["q_w"], b["k_w"], b["v_w"]])
    sd[t + "attn.qkv.bias"] = np.concatenate([b["q_b"], b["k_b"], b["v_b"]])
    sd[t + "attn.proj.weight"], sd[t + "attn.proj.bias"] = b["o_w"], b["o_b"]
    sd[t + f"mlp.{fc1}.weight"], sd[t + f"mlp.{fc1}.bias"] = b["fc1_w"], b["fc1_b"]
    sd[t + f"mlp.{fc2}.weight"], sd[t + f"mlp.{fc2}.bias"] = b["fc2_w"], b["fc2_b"]
    if b["ls1"] is not None:
      sd[t + "ls1.gamma"], sd[t + "ls2.gamma"] = b["ls1"], b["ls2"]
  if "map" in c:
    m = c["map"]
    sd["attn_pool.latent"] = m["probe"]
    sd["attn_pool.q.weight"], sd["attn_pool.q.bias"] = m["q_w"], m["q_b"]
    sd["attn_pool.kv.weight"] = np.concatenate([m["k_w"], m["v_w"]])
    sd["attn_pool.kv.bias"] = np.concatenate([m["k_b"], m["v_b"]])
    sd["attn_pool.proj.weight"], sd["attn_pool.proj.bias"] = m["o_w"], m["o_b"]
    sd["attn_pool.norm.weight"], sd["attn_pool.norm.bias"] = m["norm"]
    sd["attn_pool.mlp.fc1.weight"], sd["attn_pool.mlp.fc1.bias"] = m["fc1_w"], m["fc1_b"]
    sd["attn_pool.mlp.fc2.weight"], sd["attn_pool.mlp.fc2.bias"] = m["fc2_w"], m["fc2_b"]
  if c["proj"] is not None:  # timm keeps CLIP's projection as a zero-bias head
    sd["head.weight"], sd["head.bias"] = c["proj"].T, np.zeros(E, np.float32)
  else:
    sd["head.weight"], sd["head.bias"] = c["head_w"], c["head_b"]
  return _save(path, sd)


def write_hf(path, c):
  """transformers' Dinov2Model(WithRegisters) / CLIPVisionModelWithProjection /
  SiglipVisionModel state dicts."""
  sd = {}
  if c["proj"] is None and "map" not in c:  # Dinov2Model: no prefix
    e = "embeddings."
    sd[e + "cls_token"] = c["cls"].reshape(1, 1, D)
    sd[e + "mask_token"] = np.zeros((1, D), np.float32)
    sd[e + "position_embeddings"] = c["pos"][None]
    sd[e + "patch_embeddings.projection.weight"] = c["patch_w"]
    sd[e + "patch_embeddings.projection.bias"] = c["patch_b"]
    if c["reg"] is not None:
      sd[e + "register_tokens"] = c["reg"][None]
    swiglu = c["blocks"][0]["fc1_w"].shape[0] == 2 * F
    fc1, fc2 = ("weights_in", "weights_out") if swiglu else ("fc1", "fc2")
    for i, b in enumerate(c["blocks"]):
      t = f"encoder.layer.{i}."
      sd[t + "norm1.weight"], sd[t + "norm1.bias"] = b["n1"]
      sd[t + "norm2.weight"], sd[t + "norm2.bias"] = b["n2"]
      for n, name in zip("qkv", ("query", "key", "value")):
        sd[t + f"attention.attention.{name}.weight"] = b[n + "_w"]
        sd[t + f"attention.attention.{name}.bias"] = b[n + "_b"]
      sd[t + "attention.output.dense.weight"], sd[t + "attention.output.dense.bias"] = \
          b["o_w"], b["o_b"]
      sd[t + "layer_scale1.lambda1"], sd[t + "layer_scale2.lambda1"] = b["ls1"], b["ls2"]
      sd[t + f"mlp.{fc1}.weight"], sd[t + f"mlp.{fc1}.bias"] = b["fc1_w"], b["fc1_b"]
      sd[t + f"mlp.{fc2}.weight"], sd[t + f"mlp.{fc2}.bias"] = b["fc2_w"], b["fc2_b"]
    sd["layernorm.weight"], sd["layernorm.bias"] = c["norm"]
    return _save(path, sd)
  v = "vision_model."
  e = v + "embeddings."
  sd[e + "patch_embedding.weight"] = c["patch_w"]
  if c["patch_b"] is not None:
    sd[e + "patch_embedding.bias"] = c["patch_b"]
  if c["cls"] is not None:
    sd[e + "class_embedding"] = c["cls"]
  sd[e + "position_embedding.weight"] = c["pos"]
  sd[e + "position_ids"] = np.arange(len(c["pos"]), dtype=np.int64)[None]
  if c["pre_norm"] is not None:
    sd[v + "pre_layrnorm.weight"], sd[v + "pre_layrnorm.bias"] = c["pre_norm"]
  for i, b in enumerate(c["blocks"]):
    t = v + f"encoder.layers.{i}."
    sd[t + "layer_norm1.weight"], sd[t + "layer_norm1.bias"] = b["n1"]
    sd[t + "layer_norm2.weight"], sd[t + "layer_norm2.bias"] = b["n2"]
    for n in "qkv":
      sd[t + f"self_attn.{n}_proj.weight"], sd[t + f"self_attn.{n}_proj.bias"] = \
          b[n + "_w"], b[n + "_b"]
    sd[t + "self_attn.out_proj.weight"], sd[t + "self_attn.out_proj.bias"] = b["o_w"], b["o_b"]
    sd[t + "mlp.fc1.weight"], sd[t + "mlp.fc1.bias"] = b["fc1_w"], b["fc1_b"]
    sd[t + "mlp.fc2.weight"], sd[t + "mlp.fc2.bias"] = b["fc2_w"], b["fc2_b"]
  sd[v + "post_layernorm.weight"], sd[v + "post_layernorm.bias"] = c["norm"]
  if "map" in c:
    m, h = c["map"], v + "head."
    sd[h + "probe"] = m["probe"]
    sd[h + "attention.in_proj_weight"] = np.concatenate([m["q_w"], m["k_w"], m["v_w"]])
    sd[h + "attention.in_proj_bias"] = np.concatenate([m["q_b"], m["k_b"], m["v_b"]])
    sd[h + "attention.out_proj.weight"], sd[h + "attention.out_proj.bias"] = m["o_w"], m["o_b"]
    sd[h + "layernorm.weight"], sd[h + "layernorm.bias"] = m["norm"]
    sd[h + "mlp.fc1.weight"], sd[h + "mlp.fc1.bias"] = m["fc1_w"], m["fc1_b"]
    sd[h + "mlp.fc2.weight"], sd[h + "mlp.fc2.bias"] = m["fc2_w"], m["fc2_b"]
    sd["text_model.embeddings.token_embedding.weight"] = np.zeros((7, D), np.float32)
  if c["proj"] is not None:
    sd["visual_projection.weight"] = c["proj"].T  # nn.Linear(D, E, bias=False)
  return _save(path, sd)


def write_openclip(path, c):
  """OpenAI CLIP / OpenCLIP state dict (image tower under `visual.`, plus text-tower keys)."""
  v = "visual."
  sd = {v + "conv1.weight": c["patch_w"], v + "class_embedding": c["cls"],
        v + "positional_embedding": c["pos"], v + "proj": c["proj"],
        "transformer.resblocks.0.ln_1.weight": np.ones(D, np.float32),  # text tower
        "token_embedding.weight": np.zeros((7, D), np.float32),
        "logit_scale": np.ones((), np.float32)}
  sd[v + "ln_pre.weight"], sd[v + "ln_pre.bias"] = c["pre_norm"]
  sd[v + "ln_post.weight"], sd[v + "ln_post.bias"] = c["norm"]
  for i, b in enumerate(c["blocks"]):
    t = v + f"transformer.resblocks.{i}."
    sd[t + "ln_1.weight"], sd[t + "ln_1.bias"] = b["n1"]
    sd[t + "ln_2.weight"], sd[t + "ln_2.bias"] = b["n2"]
    sd[t + "attn.in_proj_weight"] = np.concatenate([b["q_w"], b["k_w"], b["v_w"]])
    sd[t + "attn.in_proj_bias"] = np.concatenate([b["q_b"], b["k_b"], b["v_b"]])
    sd[t + "attn.out_proj.weight"], sd[t + "attn.out_proj.bias"] = b["o_w"], b["o_b"]
    sd[t + "mlp.c_fc.weight"], sd[t + "mlp.c_fc.bias"] = b["fc1_w"], b["fc1_b"]
    sd[t + "mlp.c_proj.weight"], sd[t + "mlp.c_proj.bias"] = b["fc2_w"], b["fc2_b"]
  return _save(path, sd)


def write_big_vision_siglip(path, c):
  """big_vision two-tower npz (SigLIP): Linen names under `params/img/`, HWIO conv, DenseGeneral
  kernels [D, H, Dh] / [H, Dh, D], `MAPHead_0`; the text tower and `t`, `b` are ignored."""
  hd = D // H
  out = {"embedding/kernel": c["patch_w"].transpose(2, 3, 1, 0),
         "embedding/bias": c["patch_b"], "pos_embedding": c["pos"][None],
         "Transformer/encoder_norm/scale": c["norm"][0],
         "Transformer/encoder_norm/bias": c["norm"][1],
         "head/kernel": np.zeros((D, E), np.float32), "head/bias": np.zeros(E, np.float32)}

  def attention(prefix, b):
    for n, name in zip("qkv", ("query", "key", "value")):
      out[f"{prefix}/{name}/kernel"] = b[n + "_w"].T.reshape(D, H, hd)
      out[f"{prefix}/{name}/bias"] = b[n + "_b"].reshape(H, hd)
    out[f"{prefix}/out/kernel"] = b["o_w"].T.reshape(H, hd, D)
    out[f"{prefix}/out/bias"] = b["o_b"]

  def mlp(prefix, b):
    out[f"{prefix}/Dense_0/kernel"], out[f"{prefix}/Dense_0/bias"] = b["fc1_w"].T, b["fc1_b"]
    out[f"{prefix}/Dense_1/kernel"], out[f"{prefix}/Dense_1/bias"] = b["fc2_w"].T, b["fc2_b"]

  for i, b in enumerate(c["blocks"]):
    t = f"Transformer/encoderblock_{i}/"
    out[t + "LayerNorm_0/scale"], out[t + "LayerNorm_0/bias"] = b["n1"]
    out[t + "LayerNorm_1/scale"], out[t + "LayerNorm_1/bias"] = b["n2"]
    attention(t + "MultiHeadDotProductAttention_0", b)
    mlp(t + "MlpBlock_0", b)
  m = c["map"]
  out["MAPHead_0/probe"] = m["probe"]
  out["MAPHead_0/LayerNorm_0/scale"], out["MAPHead_0/LayerNorm_0/bias"] = m["norm"]
  attention("MAPHead_0/MultiHeadDotProductAttention_0", m)
  mlp("MAPHead_0/MlpBlock_0", m)
  arrays = {"params/img/" + k: v for k, v in out.items()}
  arrays.update({"params/txt/Embed_0/embedding": np.zeros((7, D), np.float32),
                 "params/t": np.ones(1, np.float32), "params/b": np.zeros(1, np.float32)})
  np.savez(path, **arrays)
  return str(path)


# ----------------------------------------------------------------------------- numpy references
def _ln(x, wb, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * wb[0] + wb[1]


ACTIVATIONS = {
    "erf": lambda x: 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0))),
    "tanh": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3))),
    "quick": lambda x: x / (1.0 + np.exp(-1.702 * x)),
}


def _attend(q_in, kv_in, b):
  """torch MultiheadAttention / timm Attention: q from q_in, k and v from kv_in."""
  lin = lambda x, n: x @ b[n + "_w"].T + b[n + "_b"]  # noqa: E731
  split = lambda z: z.reshape(z.shape[0], z.shape[1], H, D // H).transpose(0, 2, 1, 3)  # noqa
  q, k, v = split(lin(q_in, "q")), split(lin(kv_in, "k")), split(lin(kv_in, "v"))
  logits = q @ k.swapaxes(-1, -2) / math.sqrt(D // H)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y = (probs @ v).transpose(0, 2, 1, 3).reshape(q_in.shape[0], q_in.shape[1], D)
  return lin(y, "o")


def torch_bicubic(grid, out, scale):
  """torch `interpolate(mode='bicubic', align_corners=False, antialias=False, scale_factor=
  scale)` on a [g, g, D] grid, one output sample at a time (a = -0.75, clamped borders)."""
  a = -0.75

  def kernel(x):
    x = abs(x)
    if x <= 1:
      return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0

  g = grid.shape[0]
  res = np.zeros((out, out, grid.shape[2]))
  for oy in range(out):
    sy = (oy + 0.5) / scale - 0.5
    for ox in range(out):
      sx = (ox + 0.5) / scale - 0.5
      for iy in range(math.floor(sy) - 1, math.floor(sy) + 3):
        for ix in range(math.floor(sx) - 1, math.floor(sx) + 3):
          w = kernel(sy - iy) * kernel(sx - ix)
          res[oy, ox] += w * grid[min(max(iy, 0), g - 1), min(max(ix, 0), g - 1)]
  return res


def reference(c, images, *, act, eps, pos=None, prompts=None):
  """The family's forward pass in float64: returns (pooled feature, projection or None).

  DINOv2 (facebookresearch/dinov2 `DinoVisionTransformer`): patches, [CLS] + position, then the
  registers; blocks with layer scale; final norm; [CLS]. CLIP (`VisionTransformer` of openai/
  CLIP): [CLS] + position, ln_pre, blocks, ln_post on [CLS], `@ proj`. SigLIP (big_vision):
  patches + position, blocks, encoder_norm, MAP head (probe attends to every token, then
  `x + MLP(LN(x))`). `pos`: the position table to use (resized), default the file's.
  `prompts`: VPT-Deep prompts per block ([M, D] each), written after [CLS] and the registers
  (first without [CLS]), replacing the previous block's; pooling skips them.
  """
  c = jax.tree.map(lambda v: None if v is None else np.asarray(v, np.float64), c,
                   is_leaf=lambda v: v is None)
  images = np.asarray(images, np.float64)
  bsz, g = images.shape[0], IMAGE // P
  patches = images.reshape(bsz, g, P, g, P, 3).transpose(0, 1, 3, 5, 2, 4)  # [B, g, g, 3, p, p]
  x = np.einsum("bijcuv,ocuv->bijo", patches, c["patch_w"]).reshape(bsz, g * g, D)
  if c["patch_b"] is not None:
    x = x + c["patch_b"]
  pos = c["pos"] if pos is None else pos
  if c["cls"] is not None:
    x = np.concatenate([np.broadcast_to(c["cls"], (bsz, 1, D)), x], axis=1)
  x = x + pos
  if c["reg"] is not None:
    x = np.concatenate([x[:, :1], np.broadcast_to(c["reg"], (bsz, *c["reg"].shape)), x[:, 1:]],
                       axis=1)
  if c["pre_norm"] is not None:
    x = _ln(x, c["pre_norm"], eps)
  k = int(c["cls"] is not None) + (0 if c["reg"] is None else len(c["reg"]))
  carried = 0
  for i, b in enumerate(c["blocks"]):
    if prompts is not None:
      new = np.broadcast_to(np.asarray(prompts[i], np.float64), (bsz, *prompts[i].shape))
      x = np.concatenate([x[:, :k], new, x[:, k + carried:]], axis=1)
      carried = len(prompts[i])
    y = _attend(_ln(x, b["n1"], eps), _ln(x, b["n1"], eps), b)
    x = x + (y * b["ls1"] if b["ls1"] is not None else y)
    h = _ln(x, b["n2"], eps) @ b["fc1_w"].T + b["fc1_b"]
    if h.shape[-1] == 2 * F:  # SwiGLU: silu(x1) * x2
      x1, x2 = h[..., :F], h[..., F:]
      h = x1 / (1.0 + np.exp(-x1)) * x2
    else:
      h = ACTIVATIONS[act](h)
    y = h @ b["fc2_w"].T + b["fc2_b"]
    x = x + (y * b["ls2"] if b["ls2"] is not None else y)
  x = _ln(x, c["norm"], eps)
  x = np.concatenate([x[:, :k], x[:, k + carried:]], axis=1)  # pooling never reads prompts
  if "map" in c:
    m = c["map"]
    y = _attend(np.broadcast_to(m["probe"], (bsz, 1, D)), x, m)
    h = ACTIVATIONS[act](_ln(y, m["norm"], eps) @ m["fc1_w"].T + m["fc1_b"])
    pooled = (y + h @ m["fc2_w"].T + m["fc2_b"])[:, 0]
  else:
    pooled = x[:, 0]
  proj = pooled @ c["proj"] if c["proj"] is not None else None
  return pooled, proj


def _images(seed=1, batch=2):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, IMAGE, IMAGE, 3)).astype(np.float32)


def _dinov2_pos(c, method):
  """The 6 x 6 file grid resized to 4 x 4 by DINOv2's own code (cls slot kept)."""
  grid = c["pos"][1:].reshape(FILE_GRID, FILE_GRID, D).astype(np.float64)
  if method == "offset":  # interpolate_offset 0.1, no antialias (models without registers)
    new = torch_bicubic(grid, IMAGE // P, (IMAGE // P + 0.1) / FILE_GRID)
  else:  # antialiased bicubic (register models): jax's antialiased cubic, the same formula
    new = np.asarray(jax.image.resize(grid, (IMAGE // P, IMAGE // P, D), "cubic"), np.float64)
  return np.concatenate([c["pos"][:1], new.reshape(-1, D)])


# ----------------------------------------------------------------------------- loading helpers
def _zeros_for_shapes(params):
  """Leaves load_pretrained left as ShapeDtypeStructs (head, tuning) -> zeros."""
  return jax.tree.map(lambda v: jax.numpy.zeros(v.shape, v.dtype)
                      if isinstance(v, jax.ShapeDtypeStruct) else v, params)


def _load(variant, path, keep_head=False, **kw):
  """The model `checkpoint=path` builds, and the file's weights (abstract init: no compile)."""
  model = jvt.build_model(variant, C, checkpoint=path, **{**TINY, **kw})
  params = load_pretrained(path, jvt.param_shapes(model, IMAGE), model, keep_head=keep_head,
                           log=lambda _: None)
  return model, _zeros_for_shapes(params)


def _run(model, params, images):
  logits, aux = jax.jit(model.apply)({"params": params}, images)
  return np.asarray(logits), aux


# ----------------------------------------------------------------------------- options read off files
CASES = {
    # name: (family, canonical kwargs, writer, variant, expected options)
    "dinov2_timm": ("dinov2", {}, write_timm, "dinov2-B/14",
                    dict(family="dinov2", format="timm", gelu_approximate=False, layer_scale=True,
                         num_registers=0, layer_norm_eps=1e-6, class_token=True)),
    "dinov2_reg4_timm": ("dinov2", dict(registers=4), write_timm, "dinov2-reg4-B/14",
                         dict(family="dinov2", num_registers=4, layer_scale=True)),
    "dinov2_g_original": ("dinov2", dict(swiglu=True), "original", "dinov2-g/14",
                          dict(family="dinov2", activation="swiglu")),
    "dinov2_hf": ("dinov2", dict(registers=4), write_hf, "dinov2-reg4-B/14",
                  dict(family="dinov2", format="hf", num_registers=4, gelu_approximate=False)),
    "dinov2_g_hf": ("dinov2", dict(swiglu=True), write_hf, "dinov2-g/14",
                    dict(family="dinov2", format="hf", activation="swiglu")),
    "clip_timm": ("clip", {}, write_timm, "clip-B/16",
                  dict(family="clip", format="timm", pre_norm=True, patch_bias=False,
                       layer_norm_eps=1e-5, gelu_approximate=False)),
    "clip_hf": ("clip", {}, write_hf, "clip-B/16", dict(family="clip", format="hf")),
    "openclip": ("clip", {}, write_openclip, "openclip-B/16",
                 dict(family="clip", format="openclip", pre_norm=True, patch_bias=False)),
    "siglip_timm": ("siglip", {}, write_timm, "siglip-B/16",
                    dict(family="siglip", format="timm", pool="map", class_token=False,
                         gelu_approximate=False)),
    "siglip_hf": ("siglip", {}, write_hf, "siglip-B/16",
                  dict(family="siglip", format="hf", pool="map", gelu_approximate=True)),
    "siglip_big_vision": ("siglip", {}, write_big_vision_siglip, "siglip-B/16",
                          dict(family="siglip", format="big_vision_npz", pool="map",
                               class_token=False, gelu_approximate=True, layer_norm_eps=1e-6)),
}


def _write(case, tmp_path, grid=4):
  family, kw, writer, variant, _ = CASES[case]
  c = canonical(family, **kw, grid=grid)
  suffix = ".npz" if writer is write_big_vision_siglip else ".safetensors"
  path = tmp_path / (case + suffix)
  if writer == "original":
    write_timm(path, c, original_dinov2=True)
  else:
    writer(path, c)
  return c, str(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_options_read_off_each_layout(tmp_path, case):
  _, path = _write(case, tmp_path)
  options = formats.checkpoint_options(path)
  expected = CASES[case][4]
  assert {k: options.get(k) for k in expected} == expected


def test_google_npz_implies_tanh_and_timm_erf(tmp_path):
  """Issue 15.1: vision_transformer / big_vision npz -> tanh GELU, safetensors -> erf."""
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "vit.npz", **{
      "cls": rng.normal(size=(1, 1, D)).astype(np.float32),
      "Transformer/posembed_input/pos_embedding": rng.normal(size=(1, 17, D)).astype(np.float32),
      "embedding/kernel": rng.normal(size=(P, P, 3, D)).astype(np.float32)})
  assert formats.checkpoint_options(tmp_path / "vit.npz")["gelu_approximate"] is True
  safetensors.numpy.save_file({"cls_token": np.zeros((1, 1, D), np.float32),
                               "pos_embed": np.zeros((1, 17, D), np.float32)},
                              str(tmp_path / "vit.safetensors"))
  opts = formats.checkpoint_options(tmp_path / "vit.safetensors")
  assert opts["gelu_approximate"] is False and opts["family"] == "vit"


@pytest.mark.parametrize("old,new", [(6, 4), (37, 16), (4, 7)])
def test_dinov2_posemb_resize_is_torch_bicubic_with_offset(old, new):
  """posemb "dinov2" = DINOv2's interpolate_pos_encoding (scale (new + 0.1) / old, a=-0.75)."""
  from jvt.checkpoints import posemb
  grid = np.random.default_rng(0).normal(size=(old, old, 3))
  got = posemb.resize_grid(grid, (new, new), "dinov2")
  np.testing.assert_allclose(got, torch_bicubic(grid, new, (new + 0.1) / old), atol=1e-5)
  table = np.concatenate([np.ones((1, 3)), grid.reshape(-1, 3)])[None]  # cls slot kept
  out = posemb.resize_posemb(table, 1 + new * new, 1, "dinov2")
  np.testing.assert_allclose(out[0, 0], 1.0)
  np.testing.assert_allclose(out[0, 1:].reshape(new, new, 3), got, atol=1e-6)


def test_read_checkpoint_names_every_leaf_in_jvt_layout(tmp_path):
  """Each family's layouts convert to the same jvt names and values."""
  want = None
  for case in ("siglip_timm", "siglip_hf", "siglip_big_vision"):
    _, path = _write(case, tmp_path)
    _, arrays, _ = formats.read_checkpoint(path, num_heads=H)
    arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items() if not k.startswith("head/")}
    if want is None:
      want = arrays
    assert sorted(arrays) == sorted(want), case
    for k in want:
      np.testing.assert_allclose(arrays[k], want[k], atol=1e-6, err_msg=f"{case}: {k}")
  assert "MAPHead_0/MultiHeadDotProductAttention_0/key/kernel" in want and "cls" not in want


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("variant,preprocess", [
    ("B/16", "vtab"), ("dinov2-reg4-B/14", "vtab"), ("clip-B/16", "vtab:clip"),
    ("openclip-H/14", "vtab:clip"), ("siglip-So400m/14", "vtab:minus_one_one")])
def test_configs_take_a_backbone_with_its_normalisation(variant, preprocess):
  from jvt.config_lib import load_config
  c = load_config(f"configs/vtab/vpt_deep.py:task=dtd,backbone={variant},pretrained=x")
  assert (c.model.variant, c.model.image_size, c.dataset.preprocess) == (variant, 224, preprocess)
  fgvc = load_config(f"configs/fgvc/lora.py:backbone={variant},pretrained=x")
  assert fgvc.dataset.preprocess == preprocess.replace("vtab", "fgvc")


@pytest.mark.parametrize("norm,mean,std", [
    ("clip", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ("minus_one_one", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
def test_preprocess_normalisation_suffix(norm, mean, std):
  from jvt.data import preprocess
  image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
  out = preprocess.get_preprocess(f"vtab:{norm}", 224, train=False)(image, None)
  np.testing.assert_allclose(out, (image / 255.0 - np.array(mean)) / np.array(std), atol=1e-5)
  with pytest.raises(ValueError, match="normalisation 'lab'"):
    preprocess.get_preprocess("vtab:lab", 224, train=False)


# ----------------------------------------------------------------------------- parameter counts
def _expected_count(variant, image=224):
  """The architecture formula: patch embedding, [CLS], registers, position table, pre-norm,
  blocks (norms, attention, MLP or SwiGLU, layer scale), final norm, MAP head, projection."""
  from jvt.models.variants import variant_config
  v = variant_config(variant)
  d, f, depth, p = v["hidden_size"], v["mlp_dim"], v["num_layers"], v["patch_size"]
  cls, reg = int(v.get("class_token", True)), v.get("num_registers", 0)
  n = (image // p) ** 2
  mlp_in = 2 * f if v.get("activation") == "swiglu" else f
  block = 4 * d + 4 * (d * d + d) + d * mlp_in + mlp_in + f * d + d
  block += 2 * d if v.get("layer_scale") else 0
  total = p * p * 3 * d + (d if v.get("patch_bias", True) else 0) + (cls + reg) * d
  total += (cls + n) * d + (2 * d if v.get("pre_norm") else 0) + depth * block + 2 * d
  if v.get("pool") == "map":
    total += d + 4 * (d * d + d) + 2 * d + d * f + f + f * d + d
  return total + d * v.get("projection_dim", 0)


# variant -> published size of the image tower (DINOv2 paper Table; SigLIP "So400m"; CLIP
# ViT-B/16 image tower 86M), and how far a 224 px count may be from it.
PUBLISHED_SIZES = {"dinov2-S/14": (21e6, 0.05), "dinov2-B/14": (86e6, 0.05),
                   "dinov2-L/14": (300e6, 0.05), "dinov2-g/14": (1.1e9, 0.05),
                   "siglip-So400m/14": (400e6, 0.1), "clip-B/16": (86e6, 0.05)}


@pytest.mark.parametrize("variant", sorted(__import__("jvt.models.variants", fromlist=["x"])
                                           .FAMILY_VARIANTS))
def test_golden_parameter_counts(variant):
  model = jvt.build_model(variant, 1000)
  shapes = jvt.param_shapes(model, 224)  # jax.eval_shape: nothing is allocated
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  backbone = sum(math.prod(s.shape) for path, s in flat
                 if getattr(path[0], "key", None) != "head")
  assert backbone == _expected_count(variant)
  if variant in PUBLISHED_SIZES:
    size, tolerance = PUBLISHED_SIZES[variant]
    assert abs(backbone - size) <= tolerance * size, (variant, backbone)


# ----------------------------------------------------------------------------- stochastic depth
def test_drop_path_rates_are_linear_over_depth_as_timm():
  from jvt.models.vit import drop_path_rates
  # timm / DA-VPT: [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
  np.testing.assert_allclose(drop_path_rates(0.1, 12), np.linspace(0.0, 0.1, 12), atol=1e-12)
  assert drop_path_rates(0.3, 1) == (0.0,) and drop_path_rates(0.0, 4) == (0.0,) * 4


def test_drop_path_is_per_sample_bernoulli_scaled_by_survival():
  from jvt.models.vit import drop_path
  p, batch = 0.3, 4000
  x = np.random.default_rng(0).normal(size=(batch, 5, 3)).astype(np.float32)
  y = np.asarray(drop_path(x, p, jax.random.key(0)))
  kept = np.all(y != 0, axis=(1, 2))
  dropped = np.all(y == 0, axis=(1, 2))
  assert np.all(kept | dropped)  # one draw per sample: all of its tokens kept or dropped
  np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)
  # survival 1 - p: binomial standard deviation sqrt(p (1 - p) / n) ~ 0.007
  assert abs(kept.mean() - (1 - p)) < 0.03
  np.testing.assert_array_equal(np.asarray(drop_path(x, 0.0, jax.random.key(0))), x)


def test_stochastic_depth_is_off_in_evaluation_and_on_in_training():
  images = _images(batch=8)
  base = jvt.build_model("dinov2-S/14", C, **TINY)
  model = jvt.build_model("dinov2-S/14", C, drop_path_rate=0.5, **TINY)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda v: rng.normal(0.0, 0.3, v.shape).astype(np.float32),
                        jvt.param_shapes(model, IMAGE))  # layer scale far from zero
  run = lambda m, train: jax.jit(lambda p, x, k: m.apply(  # noqa: E731
      {"params": p}, x, train=train, rngs={"dropout": k}))(params, images, jax.random.key(1))[1]
  aux0, aux1 = run(base, False), run(model, False)
  np.testing.assert_array_equal(np.asarray(aux0["pre_logits"]), np.asarray(aux1["pre_logits"]))
  train = run(model, True)
  assert not np.allclose(np.asarray(train["pre_logits"]), np.asarray(aux0["pre_logits"]))
  train0 = run(base, True)
  np.testing.assert_allclose(np.asarray(train0["pre_logits"]), np.asarray(aux0["pre_logits"]),
                             atol=1e-6)  # rate 0: training changes nothing


# ----------------------------------------------------------------------------- parity
# case -> the activation that family's code runs for that file's origin
CASE_ACT = {"dinov2_timm": "erf", "dinov2_reg4_timm": "erf", "dinov2_g_original": "erf",
            "dinov2_hf": "erf", "dinov2_g_hf": "erf", "clip_timm": "quick", "clip_hf": "quick",
            "openclip": "erf", "siglip_timm": "erf", "siglip_hf": "tanh",
            "siglip_big_vision": "tanh"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pre_logit_and_logit_parity_with_the_family_reference(tmp_path, case):
  family, kw, writer, variant, _ = CASES[case]
  resized = family == "dinov2"
  c, path = _write(case, tmp_path, grid=FILE_GRID if resized else 4)
  has_head = writer is write_timm and c["proj"] is None  # timm files with a classifier head
  model, params = _load(variant, path, keep_head=has_head)
  images = _images()
  logits, aux = _run(model, params, images)
  eps = {"dinov2": 1e-6, "clip": 1e-5, "siglip": 1e-6}[family]
  pos = _dinov2_pos(c, "aa" if c["reg"] is not None else "offset") if resized else None
  pooled, proj = reference(c, images, act=CASE_ACT[case], eps=eps, pos=pos)
  np.testing.assert_allclose(np.asarray(aux["pre_logits"]), pooled, rtol=2e-4, atol=2e-4)
  if proj is not None:
    np.testing.assert_allclose(np.asarray(aux["projection"]), proj, rtol=2e-4, atol=2e-4)
  if has_head:
    np.testing.assert_allclose(logits, pooled @ c["head_w"].T.astype(np.float64) + c["head_b"],
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("case,variant", [("dinov2_reg4_timm", "dinov2-reg4-B/14"),
                                          ("siglip_big_vision", "siglip-B/16"),
                                          ("clip_hf", "clip-B/16")])
def test_prompts_go_after_cls_and_registers_and_first_without_cls(tmp_path, case, variant):
  """VPT-Deep on each family against the reference with prompts placed by hand."""
  c, path = _write(case, tmp_path)
  model = jvt.build_model(variant, C, tuning=dict(method="vpt", num_prompts=3, deep=True),
                          checkpoint=path, **TINY)
  params = load_pretrained(path, jvt.param_shapes(model, IMAGE), model, log=lambda _: None)
  rng = np.random.default_rng(5)
  prompts = [rng.normal(size=(3, D)).astype(np.float32) for _ in range(L)]
  params = _zeros_for_shapes(params)
  params["Transformer"]["prompts"] = {f"block_{i}": p for i, p in enumerate(prompts)}
  _, aux = _run(model, params, _images())
  act = {"dinov2": "erf", "clip": "quick", "siglip": "tanh"}[CASES[case][0]]
  eps = {"dinov2": 1e-6, "clip": 1e-5, "siglip": 1e-6}[CASES[case][0]]
  pooled, _ = reference(c, _images(), act=act, eps=eps, prompts=prompts)
  np.testing.assert_allclose(np.asarray(aux["pre_logits"]), pooled, rtol=2e-4, atol=2e-4)


def test_dinov2_linear_eval_pool_concatenates_cls_and_mean_patch(tmp_path):
  """pool="tok_gap": [CLS] after the norm ++ mean of the normed patch tokens (registers and
  prompts excluded), DINOv2's linear-evaluation feature."""
  c, path = _write("dinov2_reg4_timm", tmp_path)
  model, params = _load("dinov2-reg4-B/14", path, pool="tok_gap")
  _, aux = _run(model, params, _images())
  cls_only, _ = reference(c, _images(), act="erf", eps=1e-6)
  feat = np.asarray(aux["pre_logits"])
  assert feat.shape == (2, 2 * D)
  np.testing.assert_allclose(feat[:, :D], cls_only, rtol=2e-4, atol=2e-4)
  _, aux_t = jax.jit(lambda p, x: model.apply({"params": p}, x, capture=("tokens",),
                                              capture_layers=(-1,)))(params, _images())
  last = np.asarray(aux_t["blocks"][L - 1]["tokens"], np.float64)
  normed = _ln(last, (np.asarray(params["Transformer"]["encoder_norm"]["scale"]),
                      np.asarray(params["Transformer"]["encoder_norm"]["bias"])), 1e-6)
  np.testing.assert_allclose(feat[:, D:], normed[:, 1 + 4:].mean(1), rtol=2e-4, atol=2e-4)


def test_explicit_override_wins_and_contradicting_load_is_an_error(tmp_path):
  _, path = _write("siglip_big_vision", tmp_path)
  assert jvt.build_model("siglip-B/16", C, checkpoint=path, **TINY).gelu_approximate is True
  exact = jvt.build_model("siglip-B/16", C, checkpoint=path, gelu_approximate=False, **TINY)
  assert exact.gelu_approximate is False  # the explicit choice wins ...
  load_pretrained(path, jvt.param_shapes(exact, IMAGE), exact,
                  log=lambda _: None)  # ... and loads: the user asked for it
  _, timm_path = _write("siglip_timm", tmp_path)
  tanh = jvt.build_model("siglip-B/16", C, **TINY)  # the variant's tanh, a timm (erf) file
  with pytest.raises(CheckpointMismatchError, match=r"(?s)(?=.*checkpoint=).*gelu_approximate=True in the model, the "
                     r"file implies gelu_approximate=False"):
    load_pretrained(timm_path, jvt.param_shapes(tanh, IMAGE), tanh)
  _, dino = _write("dinov2_timm", tmp_path)
  plain = jvt.build_model("B/16", C, **TINY)
  with pytest.raises(CheckpointMismatchError, match=r"layer_scale=False in the model, the file "
                     r"implies layer_scale=True"):
    load_pretrained(dino, jvt.param_shapes(plain, IMAGE), plain)


def test_google_npz_builds_a_tanh_model(tmp_path):
  model = jvt.build_model("B/16", C, **TINY)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda v: rng.normal(size=v.shape).astype(np.float32),
                        jvt.param_shapes(model, IMAGE))
  from jvt.checkpoints import save_npz
  flat = traverse_util.flatten_dict(params, sep="/")
  np.savez(tmp_path / "google.npz", **flat)  # Linen names: also read as vision_transformer npz
  assert jvt.build_model("B/16", C, checkpoint=tmp_path / "google.npz", **TINY).gelu_approximate
  save_npz(tmp_path / "jvt.npz", params, model=model)  # jvt's own export records erf
  assert not jvt.build_model("B/16", C, checkpoint=tmp_path / "jvt.npz", **TINY).gelu_approximate


# ----------------------------------------------------------------------------- tuning runs
TUNINGS = {"vpt": dict(method="vpt", num_prompts=2, deep=True),
           "lora": dict(method="lora", rank=2),
           "da_vpt": dict(method="da_vpt", num_prompts=2, num_proxy_prompts=2, proxy_layers=(1,))}
FAMILY_FILES = {"dinov2-reg4-S/14": "dinov2_reg4_timm", "clip-B/16": "openclip",
                "siglip-B/16": "siglip_big_vision", "dinov2-S/14": "dinov2_hf"}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(TUNINGS))
@pytest.mark.parametrize("variant", sorted(FAMILY_FILES))
def test_short_tuning_run_on_each_family(tmp_path_factory, variant, method):
  """A few steps of VPT, LoRA and DA-VPT on each family through the trainer, the backbone loaded
  from a file in the family's layout (the trainer builds the model with checkpoint=)."""
  from jvt import config_lib, train
  root = tmp_path_factory.getbasetemp()
  data_dir = build_data(root)
  case = FAMILY_FILES[variant]
  _, path = _write(case, tmp_path_factory.mktemp("ckpt"))
  c = config_lib.base_config()
  c.model.variant = variant
  c.model.image_size = 16
  c.model.overrides = dict(TINY)
  c.model.drop_path_rate = 0.1
  c.pretrained.path = path
  c.tuning = TUNINGS[method]
  c.dataset.data_dir = data_dir
  c.dataset.task = "shape"
  c.dataset.preprocess = "vit"
  c.batch_size = 16
  c.total_steps = 4
  c.optimizer.warmup_steps = 0
  c.eval_every_epochs = 0.0
  c.progress_bar = False
  c.write_plots = False
  workdir = str(tmp_path_factory.mktemp("run"))
  _, final = train.train_and_evaluate(c, workdir)  # raises on a non-finite loss
  assert final["total_steps"] == 4 and 0.0 <= final["test_accuracy"] <= 1.0
  with np.load(f"{workdir}/export/trainable.npz") as f:
    trained = " ".join(f.files)
  assert {"vpt": "prompts", "lora": "lora_b", "da_vpt": "prompts"}[method] in trained
