"""Vision Transformer (Linen) whose parameter names are those of the official checkpoints.

Tree (B/16): `embedding/{kernel,bias}`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}}`, `Transformer/encoder_norm`, optional `fc_norm`,
`pre_logits`, and `head`.

Extension points (read from the module's `TuningSpec`, see docs/models.md):
  * prompts: `Transformer/prompts/block_{i}` inserted right after [CLS] at block i's input;
  * every `Projection` (query, key, value, out, Dense_0, Dense_1): LoRA and SSF leaves;
  * every `LayerNorm` and the patch embedding: SSF leaves;
  * each block: a sequential adapter after attention / MLP (`adapter_attn`, `adapter_mlp`) and
    AdaptFormer's parallel branch beside the MLP (`adaptformer`).

`ViT.__call__` returns `(logits, aux)`; aux holds "pre_logits" [B, D'], "cls" (final normed
[CLS], or the pooled feature) [B, D] and, for blocks asked for via `capture`, their
intermediates under aux["blocks"][i].
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jvt.models.layers import Bottleneck, LayerNorm, Projection, apply_ssf
from jvt.models.spec import TuningSpec

Dtype = Any

POOLS = ("tok", "gap")
# Per-block jax.checkpoint policies ("none": no rematerialisation).
REMAT_POLICIES = ("none", "full", "dots", "nothing")
# What a block can be asked to capture (see `Encoder1DBlock`).
CAPTURE_KEYS = ("tokens", "attention", "attn_out_mean", "input_patch_mean", "cls_query",
                "prompt_query", "prompts")


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with query/key/value/out `Projection`s ([D, H, Dh] kernels)."""
  num_heads: int
  spec: TuningSpec
  dtype: Dtype = jnp.float32
  attention_dropout: float = 0.0

  def _proj(self, name, features, in_axes=1):
    lora = self.spec.lora_rank if name in self.spec.lora_targets else 0
    return Projection(features=features, in_axes=in_axes, lora_rank=lora,
                      lora_alpha=self.spec.lora_alpha, ssf=self.spec.ssf, dtype=self.dtype,
                      name=name)

  @nn.compact
  def __call__(self, x, mask=None, deterministic=True):
    d = x.shape[-1]
    head_dim = d // self.num_heads
    query = self._proj("query", (self.num_heads, head_dim))(x)  # [B, T, H, Dh]
    k = self._proj("key", (self.num_heads, head_dim))(x)
    v = self._proj("value", (self.num_heads, head_dim))(x)
    q = query / jnp.sqrt(head_dim).astype(query.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)  # [B, H, T, T]
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs_c = nn.Dropout(self.attention_dropout)(probs, deterministic=deterministic)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs_c.astype(self.dtype), v)  # [B, T, H, Dh]
    out = self._proj("out", (d,), in_axes=2)(y)  # [B, T, D]
    return out, probs, query


class MlpBlock(nn.Module):
  """Dense_0 -> GELU -> Dense_1, both `Projection`s (LoRA targets mlp_in / mlp_out)."""
  mlp_dim: int
  spec: TuningSpec
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x, deterministic=True):
    d = x.shape[-1]
    s = self.spec
    h = Projection((self.mlp_dim,), lora_rank=s.lora_rank if "mlp_in" in s.lora_targets else 0,
                   lora_alpha=s.lora_alpha, ssf=s.ssf, dtype=self.dtype, name="Dense_0")(x)
    h = nn.gelu(h, approximate=self.gelu_approximate)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    y = Projection((d,), lora_rank=s.lora_rank if "mlp_out" in s.lora_targets else 0,
                   lora_alpha=s.lora_alpha, ssf=s.ssf, dtype=self.dtype, name="Dense_1")(h)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block with adapter plug-ins.

  Input x: [B, 1 + P + N, D] ([CLS], P prompts, N image tokens). Returns (x, captured) where
  `captured` holds the intermediates named in `capture` (see CAPTURE_KEYS).
  """
  num_heads: int
  mlp_dim: int
  spec: TuningSpec
  num_prompts: int = 0
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  capture: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x, mask=None, deterministic=True):
    s = self.spec
    p = self.num_prompts
    captured = {}
    y = LayerNorm(self.layer_norm_eps, ssf=s.ssf, dtype=self.dtype, name="LayerNorm_0")(x)
    y, probs, q = MultiHeadDotProductAttention(
        self.num_heads, s, dtype=self.dtype, attention_dropout=self.attention_dropout,
        name="MultiHeadDotProductAttention_0")(y, mask, deterministic)
    if "input_patch_mean" in self.capture:
      captured["input_patch_mean"] = jnp.mean(x[:, 1 + p:].astype(jnp.float32), axis=1)
    if "attn_out_mean" in self.capture:
      captured["attn_out_mean"] = jnp.mean(y[:, 1 + p:].astype(jnp.float32), axis=1)
    if "cls_query" in self.capture:
      captured["cls_query"] = q[:, 0].reshape(q.shape[0], -1).astype(jnp.float32)  # [B, H*Dh]
    if "prompt_query" in self.capture:
      width = q.shape[2] * q.shape[3]  # H * Dh (explicit: p may be 0)
      captured["prompt_query"] = q[0, 1:1 + p].reshape(p, width).astype(jnp.float32)  # [P, H*Dh]
    if "attention" in self.capture:
      captured["attention"] = probs  # [B, H, T, T]
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    if s.adapter_dim and "attn" in s.adapter_positions:
      y = y + Bottleneck(s.adapter_dim, dtype=self.dtype, name="adapter_attn")(y)
    x = x + y
    z = LayerNorm(self.layer_norm_eps, ssf=s.ssf, dtype=self.dtype, name="LayerNorm_1")(x)
    y = MlpBlock(self.mlp_dim, s, dtype=self.dtype, dropout_rate=self.dropout_rate,
                 gelu_approximate=self.gelu_approximate, name="MlpBlock_0")(z, deterministic)
    if s.adapter_dim and "mlp" in s.adapter_positions:
      y = y + Bottleneck(s.adapter_dim, dtype=self.dtype, name="adapter_mlp")(y)
    if s.adaptformer_dim:
      y = y + s.adaptformer_scale * Bottleneck(
          s.adaptformer_dim, activation="relu", dtype=self.dtype, name="adaptformer")(z)
    x = x + y
    if "tokens" in self.capture:
      captured["tokens"] = x
    return x, captured


class Prompts(nn.Module):
  """Learnable prompt tokens per block: `block_{i}` [M_i, D_p], optional shared projection."""
  spec: TuningSpec
  hidden_size: int
  patch_size: int
  dtype: Dtype = jnp.float32

  def setup(self):
    s = self.spec
    width = s.prompt_proj_dim or self.hidden_size
    inserting = [i for i, m in enumerate(s.prompt_tokens) if m > 0 and s.inserts_prompts(i)]
    proxy = set(s.davpt.proxy_layers) if s.davpt is not None else set()

    def bound(i):
      if s.prompt_init == "vpt":  # VPT: v = sqrt(6 / (3 * ph * pw + D)).
        return float(np.sqrt(6.0 / (3 * self.patch_size * self.patch_size + width)))
      # "xavier8" (DA-VPT's released code): torch's xavier_uniform_ over the stacked
      # [depth, M, D] prompts of a group (the proxy blocks, or the other blocks), then / 8;
      # torch's fans of that tensor are M * D and depth * D.
      depth = sum((j in proxy) == (i in proxy) for j in inserting)
      return float(np.sqrt(6.0 / (width * (s.prompt_tokens[i] + depth)))) / 8.0

    def uniform(v):
      return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -v, v)

    self.tokens = {f"block_{i}": self.param(f"block_{i}", uniform(bound(i)),
                                            (s.prompt_tokens[i], width)) for i in inserting}
    if s.prompt_proj_dim:
      self.proj = nn.Dense(self.hidden_size, dtype=self.dtype, name="proj")
    self.dropout = nn.Dropout(s.prompt_dropout)

  def __call__(self, layer: int, batch: int, deterministic: bool):
    """Prompts for block `layer`, broadcast to [batch, M, D]; dropout draws a mask per image
    (as VPT drops out the expanded prompts)."""
    p = self.tokens[f"block_{layer}"]
    if self.spec.prompt_l2norm:
      p = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
    if self.spec.prompt_proj_dim:
      p = self.proj(p)
    p = jnp.broadcast_to(p.astype(self.dtype)[None], (batch, *p.shape))
    return self.dropout(p, deterministic=deterministic)


def prompt_attention_mask(num_tokens: int, num_prompts: int):
  """[1, 1, T, T] bool: prompt queries attend to image tokens only (DA-VPT's optional mask)."""
  mask = np.ones((num_tokens, num_tokens), bool)
  mask[1:1 + num_prompts, :1 + num_prompts] = False
  return jnp.asarray(mask)[None, None]


class Encoder(nn.Module):
  """Position embedding, prompt insertion, the blocks and the final norm."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  spec: TuningSpec
  patch_size: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  final_norm: bool = True
  remat: str = "none"
  capture: tuple[str, ...] = ()
  capture_layers: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x, deterministic=True):
    b, t, d = x.shape
    s = self.spec
    posemb = PositionEmbedding(name="posembed_input")(x)
    x = x + posemb.astype(x.dtype)
    prompts = Prompts(s, d, self.patch_size, dtype=self.dtype, name="prompts") \
        if any(s.prompt_tokens) else None
    block_cls = Encoder1DBlock
    if self.remat != "none":
      policy = {"full": None,
                "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                "nothing": jax.checkpoint_policies.nothing_saveable}[self.remat]
      block_cls = nn.remat(Encoder1DBlock, policy=policy, static_argnums=(3,))
    blocks = {}
    carried = 0  # prompt tokens currently in the sequence
    for i in range(self.num_layers):
      if s.inserts_prompts(i):
        new = s.prompt_tokens[i]
        parts = [x[:, :1]]
        if new:
          parts.append(prompts(i, b, deterministic))
        parts.append(x[:, 1 + carried:])
        x = jnp.concatenate(parts, axis=1)  # [B, 1 + P_i + N, D]
        carried = new
      mask = None
      if s.prompt_attention_mask and carried:
        mask = prompt_attention_mask(x.shape[1], carried)
      want = self.capture if i in self.capture_layers else ()
      x, captured = block_cls(
          self.num_heads, self.mlp_dim, s, num_prompts=carried, dtype=self.dtype,
          dropout_rate=self.dropout_rate, attention_dropout=self.attention_dropout,
          layer_norm_eps=self.layer_norm_eps, gelu_approximate=self.gelu_approximate,
          capture=want, name=f"encoderblock_{i}")(x, mask, deterministic)
      if want:
        if "prompts" in want and s.inserts_prompts(i) and carried:
          captured["prompts"] = prompts(i, 1, True)[0].astype(jnp.float32)  # [P_i, D]
        blocks[i] = captured
    if self.final_norm:
      x = LayerNorm(self.layer_norm_eps, ssf=s.ssf, dtype=self.dtype, name="encoder_norm")(x)
    return x, blocks, carried


class PositionEmbedding(nn.Module):
  """Learned additive position embedding `pos_embedding` [1, T, D] (cls slot first)."""

  @nn.compact
  def __call__(self, x):
    return self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]))


class DistillProjection(nn.Module):
  """`kernel` [K, D, D'] and `bias` [K, D'] of K linear maps, returned rather than applied:
  the distillation objective chooses the block features they project (jvt.distill)."""
  features: int
  num: int

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param("kernel", nn.initializers.lecun_normal(batch_axis=(0,)),
                        (self.num, in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.num, self.features))
    return {"kernel": kernel, "bias": bias}


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
  tuning: TuningSpec = TuningSpec()
  # First-match (regex, label) rules of the tuning methods this model was built with; read by
  # `jvt.partition`, not by the forward pass.
  partition_rules: tuple[tuple[str, str, bool], ...] = ()

  @nn.compact
  def __call__(self, images, train: bool = False, capture: tuple[str, ...] = (),
               capture_layers: tuple[int, ...] = ()):
    """images: [B, H, W, 3] float. Returns (logits [B, C] float32, aux dict)."""
    deterministic = not train
    s = self.tuning
    if s.prompt_tokens and len(s.prompt_tokens) != self.num_layers:
      raise ValueError(f"tuning.prompt_tokens has {len(s.prompt_tokens)} entries; the model has "
                       f"{self.num_layers} blocks.")
    if self.pool not in POOLS:
      raise ValueError(f"pool={self.pool!r}; allowed: {POOLS}.")
    if self.fc_norm and self.pool != "gap":
      raise ValueError("fc_norm=True norms the pooled image tokens: it needs pool='gap' "
                       f"(got pool={self.pool!r}).")
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
    x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID", dtype=self.dtype,
                name="embedding")(images.astype(self.dtype))
    if s.ssf:
      x = apply_ssf(self, x, (self.hidden_size,))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)  # [B, N, D]
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    use_encoder_norm = not self.fc_norm
    x, blocks, carried = Encoder(
        self.num_layers, self.num_heads, self.mlp_dim, s, self.patch_size, dtype=self.dtype,
        dropout_rate=self.dropout_rate, attention_dropout=self.attention_dropout,
        layer_norm_eps=self.layer_norm_eps, gelu_approximate=self.gelu_approximate,
        final_norm=use_encoder_norm, remat=self.remat, capture=tuple(capture),
        capture_layers=layers, name="Transformer")(x, deterministic)
    if self.pool == "tok":
      feat = x[:, 0]
    else:  # "gap": mean of the image tokens (prompts excluded)
      feat = jnp.mean(x[:, 1 + carried:], axis=1)
      if self.fc_norm:
        feat = LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="fc_norm")(feat)
    aux = {"cls": feat.astype(jnp.float32), "blocks": blocks}
    if self.representation_size is not None:
      feat = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")(feat))
    aux["pre_logits"] = feat.astype(jnp.float32)
    if s.distill_proj_dim:
      aux["distill_proj"] = DistillProjection(s.distill_proj_dim, s.distill_proj_num,
                                              name="distill_proj")(d)
    head_init = nn.initializers.zeros if self.head_zero_init else nn.initializers.xavier_uniform()
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=head_init, name="head")(feat)
    return logits.astype(jnp.float32), aux
