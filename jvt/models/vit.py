"""Vision Transformer (Linen) whose parameter names are those of the official checkpoints.

Tree (B/16): `embedding/{kernel,bias}`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}}`, `Transformer/encoder_norm`, optional `fc_norm`,
`pre_logits`, and `head`.

Hook points (see `jvt.methods.base` and docs/methods.md): the ViT's `methods` (tuning settings
objects) are called, in hook order, at the input image and the patch embedding (ViT scope),
the token sequence before each block (Transformer scope), each block's attention mask and
residual branches (block scope), keys and values (attention scope), every projection's kernel
and output (query, key, value, out, Dense_0 = "mlp_in", Dense_1 = "mlp_out") and every norm.
Parameters a hook creates belong to the calling module. The backbone knows no method by name.

Pretrained families (fields below; `jvt.models.variants` sets them per variant): no [CLS]
(`class_token=False`, SigLIP), register tokens after [CLS] without position embedding
(`reg` [1, R, D], DINOv2), layer scale on both residual branches (`LayerScale_{0,1}/scale`),
CLIP's pre-norm (`Transformer/pre_norm`) and patch embedding without bias, QuickGELU / SwiGLU
MLPs, a MAP head (`MAPHead_0`, big_vision's names), CLIP's image projection (`projection`,
aux["projection"]) and per-sample stochastic depth. The sequence is [CLS?, registers, prompts,
image tokens]: `Site.num_prefix` tells plug-ins where prompts go.

`ViT.__call__` returns `(logits, aux)`; aux holds "pre_logits" [B, D'], "cls" (final normed
[CLS], or the pooled feature) [B, D] and, for blocks asked for via `capture`, their
intermediates under aux["blocks"][i].
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jvt import barrier
from jvt import precision
from jvt.gelu import gelu
from jvt.methods.base import Site, ordered
from jvt.models.layers import LayerNorm, PatchEmbedding, Projection
from jvt.models.softmax import softmax

Dtype = Any

# The parts of a block's sequence [K prefix, P prompts, N image tokens] something may read
# ("cls" is row 0), and all of them.
SEQUENCE_PARTS = ("cls", "prefix", "prompts", "patches")
EVERY_ROW = ("prefix", "prompts", "patches")
POOLS = ("tok", "gap", "map", "tok_gap")
# The parts of the encoder's output each pooling reads.
POOL_READS = {"tok": ("cls",), "gap": ("patches",), "map": ("prefix", "patches"),
              "tok_gap": ("cls", "patches")}
ACTIVATIONS = ("gelu", "quick_gelu", "swiglu")
# Per-block jax.checkpoint policies ("none": no rematerialisation).
REMAT_POLICIES = ("none", "full", "dots", "nothing")
# What a block can be asked to capture (see `Encoder1DBlock`; "prompts" comes from the plug-in
# that inserts prompt tokens at that block), each with the parts of the block's output it reads
# (`Encoder.block_rows`): the tokens, the probabilities and the prompts' queries every row;
# "input_patch_mean" reads the block's input and "prompts" a method's parameters, no row.
CAPTURE_READS = {"tokens": EVERY_ROW, "attention": EVERY_ROW,
                 "attn_out_mean": ("patches",), "input_patch_mean": (), "cls_query": ("cls",),
                 "prompt_query": EVERY_ROW, "prompts": ()}
CAPTURE_KEYS = tuple(CAPTURE_READS)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with query/key/value/out `Projection`s ([D, H, Dh] kernels).

  The `keys_values` hooks may append tokens to keys and values (e.g. key-value prompts); a
  mask then lets every query see them.

  `fused`: the softmax(q k^T / sqrt(Dh)) v product as one `jax.nn.dot_product_attention`, cuDNN's
  fused kernel on a CUDA GPU with a 16-bit dtype (XLA's elsewhere): the [B, H, T, T'] logits
  and probabilities never reach device memory, so no probabilities are returned (None), and
  neither a mask nor attention dropout can be applied (both are refused).

  `rows`: ((start, stop), ...) token ranges whose queries are computed (all when empty); keys
  and values come from every token. The output and the returned queries have those rows only.
  """
  num_heads: int
  methods: tuple = ()
  dtype: Dtype = jnp.float32
  attention_dropout: float = 0.0
  fused: bool = False

  def _proj(self, name, features, in_axes=1):
    return Projection(features=features, in_axes=in_axes, methods=self.methods,
                      dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x, mask, deterministic, site, rows=()):
    d = x.shape[-1]
    head_dim = d // self.num_heads
    heads = (self.num_heads, head_dim)
    if rows:
      mask = None if mask is None else take_rows(mask, rows, axis=mask.ndim - 2)
    query = self._proj("query", heads)(take_rows(x, rows), site.at(name="query"))  # [B, R, H, Dh]
    k = self._proj("key", heads)(x, site.at(name="key"))
    v = self._proj("value", heads)(x, site.at(name="value"))
    for m in self.methods:
      k, v = m.on_keys_values(self, k, v, site)
    if self.fused:
      y = fused_attention(query, k, v, mask, self.attention_dropout, deterministic, self.dtype)
      out = self._proj("out", (d,), in_axes=2)(y, site.at(name="out"))  # [B, R, D]
      return out, None, query
    q = query / jnp.sqrt(head_dim).astype(query.dtype)
    # Heads first: [B, H, T, Dh]. With the heads' layout explicit, XLA:CPU multiplies the
    # probabilities by the values as [T, T'] x [T', Dh] per head; left to choose, it computed
    # the transposed [Dh, T'] x [T', T] form, 4x slower (40% of a batch-32 forward pass).
    q, k, v = (jnp.transpose(t, (0, 2, 1, 3)) for t in (q, k, v))
    # [B, H, R, T'] (fp32 accumulation in bf16 on CPU, see jvt.precision)
    logits = precision.einsum("bhqd,bhkd->bhqk", q, k, self.dtype)
    logits = logits.astype(jnp.float32)
    if mask is not None:
      extra = k.shape[2] - mask.shape[-1]  # key tokens a method added (E2VPT)
      if extra:
        mask = jnp.concatenate(
            [mask, jnp.ones((*mask.shape[:-1], extra), bool)], axis=-1)
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = softmax(logits, axis=-1)  # its VJP keeps only probs (jvt.models.softmax)
    probs_c = nn.Dropout(self.attention_dropout)(probs, deterministic=deterministic)
    y = precision.einsum("bhqk,bhkd->bhqd", probs_c, v, self.dtype)
    y = jnp.transpose(y.astype(self.dtype), (0, 2, 1, 3))  # [B, R, H, Dh]
    out = self._proj("out", (d,), in_axes=2)(y, site.at(name="out"))  # [B, R, D]
    return out, probs, query


def fused_attention(q, k, v, mask, dropout: float, deterministic: bool, dtype):
  """[B, T, H, Dh] queries (unscaled) over [B, T', H, Dh] keys and values -> [B, T, H, Dh] in
  `dtype`, as one `jax.nn.dot_product_attention` (scale 1 / sqrt(Dh)): cuDNN's fused kernel on
  a CUDA GPU for 16-bit dtypes (`padded_attention`), XLA's otherwise."""
  if mask is not None:
    raise ValueError("fused_attention=True cannot apply the attention mask a tuning method asks "
                     "for: set model.overrides.fused_attention=False for this method.")
  if dropout and not deterministic:
    raise ValueError(f"fused_attention=True has no attention dropout (attention_dropout="
                     f"{dropout}): set attention_dropout=0 or fused_attention=False.")
  q, k, v = (t.astype(dtype) for t in (q, k, v))  # the result keeps this dtype
  if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2:
    return padded_attention(q, k, v, "cudnn")
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def padded_attention(q, k, v, implementation: str):
  """`jax.nn.dot_product_attention` of [B, T, H, Dh] over [B, T', H, Dh] with both sequences
  padded to an even length, the padded keys masked out (sequence lengths) and the padded query
  rows dropped. cuDNN's training kernels take only even lengths, and a ViT's are odd ([CLS] +
  196 patches, + 10 prompts: 207)."""
  t, s = q.shape[1], k.shape[1]
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n % 2), (0, 0), (0, 0)))  # noqa: E731
  b = q.shape[0]
  y = jax.nn.dot_product_attention(
      pad(q, t), pad(k, s), pad(v, s), implementation=implementation,
      query_seq_lengths=jnp.full((b,), t, jnp.int32),
      key_value_seq_lengths=jnp.full((b,), s, jnp.int32))
  return y[:, :t]


def take_rows(x, rows, axis: int = 1):
  """The token rows of x named by `rows`, ((start, stop), ...) ranges in order, along `axis`
  (all of x when `rows` is empty)."""
  if not rows:
    return x
  parts = [jax.lax.slice_in_dim(x, a, b, axis=axis) for a, b in rows]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def read_rows(read, num_prefix: int, num_prompts: int, num_patches: int):
  """The ((start, stop), ...) token ranges covering the parts in `read` (`SEQUENCE_PARTS`; "cls"
  is row 0), merged and in order; () when they cover the whole sequence."""
  k, p, t = num_prefix, num_prompts, num_prefix + num_prompts + num_patches
  spans = {"cls": (0, 1), "prefix": (0, k), "prompts": (k, k + p), "patches": (k + p, t)}
  merged = []
  for a, b in sorted(spans[part] for part in read):
    if a == b:
      continue
    if merged and a <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(merged[-1][1], b))
    else:
      merged.append((a, b))
  return () if merged == [(0, t)] else tuple(merged)


def activate(h, activation: str, gelu_approximate: bool):
  """The MLP nonlinearity: GELU (exact erf, or tanh when `gelu_approximate`), QuickGELU
  (OpenAI CLIP: h * sigmoid(1.702 h)) or SwiGLU (DINOv2-g: silu(h1) * h2 over the two halves of
  the fused first layer)."""
  if activation == "quick_gelu":
    return h * jax.nn.sigmoid(1.702 * h)
  if activation == "swiglu":
    h1, h2 = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(h1) * h2
  # The exact form's VJP keeps only h (jvt.gelu); the tanh form is flax's.
  return nn.gelu(h, approximate=True) if gelu_approximate else gelu(h)


class MlpBlock(nn.Module):
  """Dense_0 -> activation -> Dense_1, both `Projection`s (sites "mlp_in" / "mlp_out").

  With SwiGLU, Dense_0 has 2 * mlp_dim outputs (the two halves) and Dense_1 mlp_dim inputs.
  """
  mlp_dim: int
  methods: tuple = ()
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  gelu_approximate: bool = False
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x, deterministic, site):
    d = x.shape[-1]
    width = 2 * self.mlp_dim if self.activation == "swiglu" else self.mlp_dim
    h = Projection((width,), methods=self.methods, dtype=self.dtype,
                   name="Dense_0")(x, site.at(name="mlp_in"))
    h = activate(h, self.activation, self.gelu_approximate)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    y = Projection((d,), methods=self.methods, dtype=self.dtype,
                   name="Dense_1")(h, site.at(name="mlp_out"))
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class LayerScale(nn.Module):
  """DINOv2's per-channel scale of a residual branch: `scale` [D] (init 1e-5, as DINOv2)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y):
    scale = self.param("scale", nn.initializers.constant(1e-5), (y.shape[-1],))
    return y * scale.astype(self.dtype)


def drop_path_rates(rate: float, depth: int) -> tuple[float, ...]:
  """Per-block stochastic-depth rates: linear from 0 at the first block to `rate` at the last
  (timm's `torch.linspace(0, drop_path_rate, depth)`)."""
  if depth == 1:
    return (0.0,)
  return tuple(float(rate) * i / (depth - 1) for i in range(depth))


def drop_path(y, rate: float, key):
  """Stochastic depth: each sample's branch output is kept with probability 1 - rate and then
  scaled by 1 / (1 - rate), else zeroed (one Bernoulli draw per sample, all tokens alike)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, (y.shape[0],) + (1,) * (y.ndim - 1))
  return jnp.where(keep, y / (1.0 - rate), jnp.zeros_like(y))


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block.

  Input x: [B, K + P + N, D] (K prefix tokens: [CLS] and registers, P prompts, N image
  tokens). Returns (x, captured) where `captured` holds the intermediates named in `capture`
  (see CAPTURE_KEYS). The `branch` hooks see each residual branch ("attn", "mlp") with the
  stream x it adds to, the normed input z of the branch and its output y.

  `rows`: ((start, stop), ...) token ranges the block computes (all when empty): their queries,
  attention output, residual branches and MLP; keys and values still come from every token.
  The output x is [B, R, D], those rows in order (`Encoder` picks the rows read later).
  """
  num_heads: int
  mlp_dim: int
  methods: tuple = ()
  layer: int = 0
  num_layers: int = 1
  num_prompts: int = 0
  grid: tuple[int, int] = (0, 0)
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  capture: tuple[str, ...] = ()
  num_prefix: int = 1  # [CLS] and registers before the prompts (0 for SigLIP)
  layer_scale: bool = False
  activation: str = "gelu"
  drop_path: float = 0.0  # this block's stochastic-depth rate
  fused_attention: bool = False  # see MultiHeadDotProductAttention.fused
  rows: tuple[tuple[int, int], ...] = ()

  @nn.compact
  def __call__(self, x, mask=None, deterministic=True, shared=None):
    p = self.num_prompts
    k = self.num_prefix
    ms = self.methods
    captured = {}
    site = Site(layer=self.layer, num_layers=self.num_layers, num_prompts=p, num_prefix=k,
                num_tokens=x.shape[1], grid=tuple(self.grid), train=not deterministic,
                hidden_size=x.shape[-1], dtype=self.dtype, capture=self.capture,
                captured=captured, shared=shared or {})
    z = LayerNorm(self.layer_norm_eps, methods=ms, dtype=self.dtype, name="LayerNorm_0")(x, site)
    y, probs, q = MultiHeadDotProductAttention(
        self.num_heads, ms, dtype=self.dtype, attention_dropout=self.attention_dropout,
        fused=self.fused_attention,
        name="MultiHeadDotProductAttention_0")(z, mask, deterministic, site, self.rows)
    n = self.grid[0] * self.grid[1]  # image tokens: the last n rows, kept or not
    if "input_patch_mean" in self.capture:
      captured["input_patch_mean"] = jnp.mean(x[:, k + p:].astype(jnp.float32), axis=1)
    x = take_rows(x, self.rows)  # [B, R, D]
    site = site.at(rows=self.rows)  # every hook from here on sees these rows only
    if "attn_out_mean" in self.capture:  # `Encoder` keeps the image rows for it
      captured["attn_out_mean"] = jnp.mean(y[:, y.shape[1] - n:].astype(jnp.float32), axis=1)
    if "cls_query" in self.capture:
      captured["cls_query"] = q[:, 0].reshape(q.shape[0], -1).astype(jnp.float32)  # [B, H*Dh]
    if "prompt_query" in self.capture:
      width = q.shape[2] * q.shape[3]  # H * Dh (explicit: p may be 0)
      captured["prompt_query"] = q[0, k:k + p].reshape(p, width).astype(jnp.float32)  # [P, H*Dh]
    if "attention" in self.capture:
      if probs is None:
        raise ValueError("capturing 'attention' needs the attention probabilities, which "
                         "fused_attention=True never forms: set fused_attention=False.")
      captured["attention"] = probs  # [B, H, T, T]
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    if self.layer_scale:  # DINOv2: the pretrained branch's scale, before any plug-in
      y = LayerScale(dtype=self.dtype, name="LayerScale_0")(y)
    z = take_rows(z, self.rows)  # the branch's normed input, of the rows it computes
    for m in ms:
      y = m.on_branch(self, x, z, y, site.at(name="attn"))
    if self.drop_path and not deterministic:
      y = drop_path(y, self.drop_path, self.make_rng("dropout"))
    x = barrier.materialize_cotangent(x + y)
    z = LayerNorm(self.layer_norm_eps, methods=ms, dtype=self.dtype, name="LayerNorm_1")(x, site)
    y = MlpBlock(self.mlp_dim, ms, dtype=self.dtype, dropout_rate=self.dropout_rate,
                 gelu_approximate=self.gelu_approximate, activation=self.activation,
                 name="MlpBlock_0")(z, deterministic, site)
    if self.layer_scale:
      y = LayerScale(dtype=self.dtype, name="LayerScale_1")(y)
    for m in ms:
      y = m.on_branch(self, x, z, y, site.at(name="mlp"))
    if self.drop_path and not deterministic:
      y = drop_path(y, self.drop_path, self.make_rng("dropout"))
    x = x + y
    if "tokens" in self.capture:
      captured["tokens"] = x
    return x, captured


class Encoder(nn.Module):
  """Position embedding, the token hooks before each block, the blocks and the final norm.

  `skip_unread_tokens`: each block computes only the token rows read after it (`block_rows`):
  the output holds the parts of the last block's sequence named in `read` (`SEQUENCE_PARTS`),
  in order, [CLS] first and the image tokens last when read.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  methods: tuple = ()
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  final_norm: bool = True
  remat: str = "none"
  capture: tuple[str, ...] = ()
  capture_layers: tuple[int, ...] = ()
  pre_norm: bool = False  # CLIP's ln_pre after the position embedding
  layer_scale: bool = False
  activation: str = "gelu"
  drop_path_rate: float = 0.0
  fused_attention: bool = False
  skip_unread_tokens: bool = True
  read: tuple[str, ...] = EVERY_ROW

  def block_rows(self, layer: int, capture, num_prefix: int, num_prompts: int,
                 num_patches: int):
    """The token rows block `layer` computes (`Encoder1DBlock.rows`; () for all): those the
    next block reads (its `on_tokens` may replace the prompts) or, after the last block, the
    `read` parts; plus those its captures read (`CAPTURE_READS`). Every row when a method's
    block hooks mix rows (`Method.rowwise`) beyond the image rows (`Method.grid_local`): the
    parts read are whole, so the rows computed hold every image row or none."""
    ms = self.methods
    if not self.skip_unread_tokens or not all(m.rowwise or m.grid_local for m in ms):
      return ()
    if layer == self.num_layers - 1:
      read = set(self.read)
    else:
      read = {"prefix", "patches"}
      if not any(m.discards_prompts(layer + 1, self.num_layers) for m in ms):
        read.add("prompts")
    for key in capture:
      read.update(CAPTURE_READS[key])
    return read_rows(read, num_prefix, num_prompts, num_patches)

  @nn.compact
  def __call__(self, x, grid, deterministic=True, shared=None, registers=None):
    b, _, d = x.shape
    n = grid[0] * grid[1]  # image tokens, always the last n of the sequence
    ms = self.methods
    posemb = PositionEmbedding(name="posembed_input")(x)
    x = x + posemb.astype(x.dtype)
    if registers is not None:  # DINOv2: after [CLS], without position embedding
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(registers.astype(x.dtype),
                                                      (b, *registers.shape[1:])), x[:, 1:]], 1)
    k = x.shape[1] - n  # prefix tokens: [CLS] and registers
    shared = shared or {}
    site = Site(num_layers=self.num_layers, grid=tuple(grid), train=not deterministic,
                hidden_size=d, patch_size=self.patch_size, dtype=self.dtype, shared=shared,
                num_prefix=k)
    if self.pre_norm:
      x = LayerNorm(self.layer_norm_eps, methods=ms, dtype=self.dtype,
                    name="pre_norm")(x, site.at(name="pre_norm"))
    rates = drop_path_rates(self.drop_path_rate, self.num_layers)
    encoder_state = [m.on_encoder(self, site) for m in ms]
    block_cls = Encoder1DBlock
    if self.remat != "none":
      cp = jax.checkpoint_policies
      policy = {"full": None,
                # Also the projections' mixed-precision products (custom VJPs, not dots).
                "dots": cp.save_from_both_policies(
                    cp.dots_with_no_batch_dims_saveable,
                    cp.save_only_these_names(precision.SAVEABLE_NAME)),
                "nothing": jax.checkpoint_policies.nothing_saveable}[self.remat]
      block_cls = nn.remat(Encoder1DBlock, policy=policy, static_argnums=(3,))
    blocks = {}
    for i in range(self.num_layers):
      want = self.capture if i in self.capture_layers else ()
      captured = {}
      for m, own in zip(ms, encoder_state):
        x = m.on_tokens(own, x, site.at(layer=i, num_prompts=x.shape[1] - k - n,
                                     num_tokens=x.shape[1], capture=want, captured=captured))
      p = x.shape[1] - k - n
      mask = None
      for m in ms:
        mask = m.on_attention_mask(mask, site.at(layer=i, num_prompts=p, num_tokens=x.shape[1]))
      x = barrier.materialize_cotangent(x)
      x, own_captured = block_cls(
          self.num_heads, self.mlp_dim, ms, layer=i, num_layers=self.num_layers, num_prompts=p,
          grid=tuple(grid), dtype=self.dtype, dropout_rate=self.dropout_rate,
          attention_dropout=self.attention_dropout, layer_norm_eps=self.layer_norm_eps,
          gelu_approximate=self.gelu_approximate, capture=want, num_prefix=k,
          layer_scale=self.layer_scale, activation=self.activation, drop_path=rates[i],
          fused_attention=self.fused_attention, rows=self.block_rows(i, want, k, p, n),
          name=f"encoderblock_{i}")(x, mask, deterministic, shared)
      if want:
        blocks[i] = {**own_captured, **captured}
    if self.final_norm:
      x = LayerNorm(self.layer_norm_eps, methods=ms, dtype=self.dtype,
                    name="encoder_norm")(x, site)
    return x, blocks


class PositionEmbedding(nn.Module):
  """Learned additive position embedding `pos_embedding` [1, T, D] (cls slot first)."""

  @nn.compact
  def __call__(self, x):
    return self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]))


class MAPHead(nn.Module):
  """Multi-head attention pooling as big_vision's `MAPHead` (SigLIP): a learned `probe` [1, 1, D]
  attends to the tokens (no residual around the attention), then `y + MLP(LN(y))`.
  Parameters: `probe`, `MultiHeadDotProductAttention_0/{query,key,value,out}`, `LayerNorm_0`,
  `MlpBlock_0/Dense_{0,1}`; the projections and norm are hook sites like the blocks' (layer -1)."""
  num_heads: int
  mlp_dim: int
  methods: tuple = ()
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x, site):  # x: [B, T, D] -> [B, D]
    b, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d))
    probe = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
    y = _AttentionPool(self.num_heads, self.methods, dtype=self.dtype,
                       name="MultiHeadDotProductAttention_0")(probe, x, site)  # [B, 1, D]
    z = LayerNorm(self.layer_norm_eps, methods=self.methods, dtype=self.dtype,
                  name="LayerNorm_0")(y, site.at(name="map_norm"))
    y = y + MlpBlock(self.mlp_dim, self.methods, dtype=self.dtype,
                     gelu_approximate=self.gelu_approximate, name="MlpBlock_0")(z, True, site)
    return y[:, 0]


class _AttentionPool(nn.Module):
  """Cross-attention of the probe over the tokens, with Linen's query/key/value/out names."""
  num_heads: int
  methods: tuple = ()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_in, kv_in, site):
    d = q_in.shape[-1]
    heads = (self.num_heads, d // self.num_heads)
    proj = lambda name, feats, axes=1: Projection(  # noqa: E731
        feats, in_axes=axes, methods=self.methods, dtype=self.dtype, name=name)
    q = proj("query", heads)(q_in, site.at(name="query")) / jnp.sqrt(heads[1]).astype(self.dtype)
    k = proj("key", heads)(kv_in, site.at(name="key"))
    v = proj("value", heads)(kv_in, site.at(name="value"))
    probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32), axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)  # [B, 1, H, Dh]
    return proj("out", (d,), 2)(y, site.at(name="out"))


class ViT(nn.Module):
  """ViT classifier. Fields match vision_transformer's config names where they exist."""
  num_classes: int
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  representation_size: int | None = None
  pool: str = "tok"  # "tok": [CLS]; "gap": mean of image tokens
  fc_norm: bool = False  # MAE-style: norm after global pooling instead of encoder_norm
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  dropout_rate: float = 0.0
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = "none"  # "none" | "full" | "dots" | "nothing": per-block jax.checkpoint policy
  head_zero_init: bool = True
  # Pretrained-family options (jvt.models.variants sets them per variant; docs/models.md).
  class_token: bool = True  # False: no [CLS] (SigLIP; pool "gap" or "map")
  num_registers: int = 0  # DINOv2's register tokens after [CLS], without position embedding
  layer_scale: bool = False  # DINOv2's LayerScale_{0,1} on both residual branches
  pre_norm: bool = False  # CLIP's ln_pre after the position embedding
  patch_bias: bool = True  # False: patch embedding without bias (CLIP)
  activation: str = "gelu"  # "gelu" | "quick_gelu" (OpenAI CLIP) | "swiglu" (DINOv2-g)
  projection_dim: int | None = None  # CLIP's image projection, returned as aux["projection"]
  drop_path_rate: float = 0.0  # stochastic depth of the last block (0 at the first, linear)
  # Attention as one fused kernel (cuDNN's on a CUDA GPU in bf16): no [B, H, T, T] logits in
  # memory; no attention mask, attention dropout or captured probabilities
  # (MultiHeadDotProductAttention.fused).
  fused_attention: bool = False
  # Blocks compute only the token rows read after them (`Encoder.block_rows`): the last block
  # only [CLS] for pool "tok", and no prompt rows a deep-prompt method replaces next. Exact;
  # False computes every row (for comparison).
  skip_unread_tokens: bool = True
  # Options `build_model` was given explicitly: `load_pretrained` does not check them against
  # the file (the user chose them, e.g. exact GELU on Google's weights).
  explicit_options: tuple[str, ...] = ()
  # The tuning methods' settings (`jvt.methods`), called at the hook points; () is the plain
  # backbone.
  methods: tuple = ()
  # First-match (regex, label) rules of the tuning methods this model was built with; read by
  # `jvt.partition`, not by the forward pass.
  partition_rules: tuple[tuple[str, str, bool], ...] = ()

  @nn.compact
  def __call__(self, images, train: bool = False, capture: tuple[str, ...] = (),
               capture_layers: tuple[int, ...] = ()):
    """images: [B, H, W, 3] float. Returns (logits [B, C] float32, aux dict)."""
    deterministic = not train
    if self.pool not in POOLS:
      raise ValueError(f"pool={self.pool!r}; allowed: {POOLS}.")
    if self.fc_norm and self.pool != "gap":
      raise ValueError("fc_norm=True norms the pooled image tokens: it needs pool='gap' "
                       f"(got pool={self.pool!r}).")
    if self.pool in ("tok", "tok_gap") and not self.class_token:
      raise ValueError(f"pool={self.pool!r} reads [CLS], but class_token=False: use pool='gap' "
                       "or 'map'.")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}; allowed: {ACTIVATIONS}.")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate={self.drop_path_rate}: must be in [0, 1).")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; allowed: {REMAT_POLICIES}.")
    unknown = set(capture) - set(CAPTURE_KEYS)
    if unknown:
      raise ValueError(f"capture: unknown keys {sorted(unknown)}; allowed {CAPTURE_KEYS}.")
    bad = [l for l in capture_layers if not -self.num_layers <= l < self.num_layers]
    if bad:
      raise ValueError(f"capture_layers {bad} out of range: the model has {self.num_layers} "
                       f"blocks (valid: 0..{self.num_layers - 1} or negative from the end).")
    layers = tuple(l % self.num_layers for l in capture_layers)
    ms = ordered(self.methods)
    site = Site(num_layers=self.num_layers, train=train, hidden_size=self.hidden_size,
                patch_size=self.patch_size, dtype=self.dtype)
    # Arrays a method shares between hook points (e.g. factors common to every block).
    shared = {}
    for m in ms:
      value = m.on_model(self, site)
      if value is not None:
        shared[m.name] = value
    site = site.at(shared=shared)
    for m in ms:
      images = m.on_image(self, images, site)
    x = PatchEmbedding(self.hidden_size, self.patch_size, use_bias=self.patch_bias,
                       dtype=self.dtype, name="embedding")(images)  # [B, h, w, D]
    b, h, w, d = x.shape
    site = site.at(grid=(h, w))
    for m in ms:
      x = m.on_patch_embedding(self, x, site)
    n = h * w
    x = x.reshape(b, n, d)  # [B, N, D]
    if self.class_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    registers = self.param("reg", nn.initializers.normal(1e-6), (1, self.num_registers, d)) \
        if self.num_registers else None
    num_prefix = int(self.class_token) + self.num_registers
    site = site.at(num_prefix=num_prefix)
    use_encoder_norm = not self.fc_norm
    x, blocks = Encoder(
        self.num_layers, self.num_heads, self.mlp_dim, self.patch_size, ms, dtype=self.dtype,
        dropout_rate=self.dropout_rate, attention_dropout=self.attention_dropout,
        layer_norm_eps=self.layer_norm_eps, gelu_approximate=self.gelu_approximate,
        final_norm=use_encoder_norm, remat=self.remat, capture=tuple(capture),
        capture_layers=layers, pre_norm=self.pre_norm, layer_scale=self.layer_scale,
        activation=self.activation, drop_path_rate=self.drop_path_rate,
        fused_attention=self.fused_attention, skip_unread_tokens=self.skip_unread_tokens,
        read=POOL_READS[self.pool],
        name="Transformer")(x, (h, w), deterministic, shared, registers)
    # [B, N, D]: pooling never reads prompt tokens (nor the image tokens for "tok", which the
    # last block then does not compute)
    patches = x[:, x.shape[1] - n:] if "patches" in POOL_READS[self.pool] else None
    if self.pool == "tok":
      feat = x[:, 0]
    elif self.pool == "tok_gap":  # DINOv2's linear evaluation: [CLS] ++ mean patch token
      feat = jnp.concatenate([x[:, 0], jnp.mean(patches, axis=1)], axis=-1)
    elif self.pool == "map":  # SigLIP: attention pooling over [CLS] / registers and patches
      tokens = jnp.concatenate([x[:, :num_prefix], patches], axis=1)
      feat = MAPHead(self.num_heads, self.mlp_dim, ms, dtype=self.dtype,
                     layer_norm_eps=self.layer_norm_eps, gelu_approximate=self.gelu_approximate,
                     name="MAPHead_0")(tokens, site)
    else:  # "gap": mean of the image tokens (prompts excluded)
      feat = jnp.mean(patches, axis=1)
      if self.fc_norm:
        feat = LayerNorm(self.layer_norm_eps, methods=ms, dtype=self.dtype,
                         name="fc_norm")(feat, site)
    if not self.class_token:  # DA-VPT's [CLS]-side feature: the family's pooled feature
      for block in blocks.values():
        if "cls_query" in block:
          block["cls_query"] = feat.astype(jnp.float32)
    aux = {"cls": feat.astype(jnp.float32), "blocks": blocks}
    if self.projection_dim:  # CLIP's image embedding (`proj`, no bias)
      aux["projection"] = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                   name="projection")(feat).astype(jnp.float32)
    if self.representation_size is not None:
      feat = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")(feat))
    aux["pre_logits"] = feat.astype(jnp.float32)
    for m in ms:
      aux = m.on_outputs(self, aux, site)
    head_init = nn.initializers.zeros if self.head_zero_init else nn.initializers.xavier_uniform()
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=head_init, name="head")(feat)
    return logits.astype(jnp.float32), aux
