"""E2VPT (Han et al., ICCV 2023, ChengHan111/E2VPT): deep visual prompts plus learnable
key-value prompts in every attention, with optional token-wise and segment-wise prompt pruning.

  * Visual prompts: as VPT-Deep, block l's input is `[x_cls, P_l, X]` (leaves
    `Transformer/prompts/block_{l}` [M, D], VPT's uniform init, dropout `dropout` on them, 0.1
    in the authors' runs).
  * Key-value prompts: `Transformer/encoderblock_{l}/MultiHeadDotProductAttention_0/kv_prompts`
    [M_kv, H, Dh]; the same tokens are appended to the keys and to the values (the authors'
    `SHARE_PARAM_KV=True`), so every query also attends to M_kv learned entries. Drawn as the
    authors' `ORIGIN_INIT=2`: torch's kaiming_uniform_ (fan_in mode, gain sqrt 2) of their
    [H, M_kv, Dh] tensor, uniform(+-sqrt(6 / (M_kv Dh))). The authors prepend them; the order
    of keys does not change attention's output, jvt appends.
  * Pruning (the paper's second stage): a visual prompt token listed in `pruned_prompts` and a
    segment (token, s) listed in `pruned_segments` are multiplied by 0 in every block, as the
    authors' masks do. A token of D values has `num_segments` segments; value d belongs to
    segment d mod num_segments (the authors tile the [M, 16] mask with torch `repeat`).

The second stage as the authors' code runs it (`calculate_importance`, `what_tokens_to_mask`):
after training (stage 1), score each prompt token and each segment by the loss's gradient with
respect to its mask (1 everywhere), averaged over the training batches (`prompt_scores`);
prune the lowest scores first (`lowest`); then *rewind*: train again from the same initial
values with the pruned masks fixed. In jvt the rewind is a second run with the same seed (so
the same initial prompts) and the pruning fields set. Labels: visual and key-value prompts
`prompt`. Not mergeable.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jvt.methods.base import Method
from jvt.methods.vpt import Prompts

# The collection that holds the soft masks while `prompt_scores` differentiates through them.
MASKS = "e2vpt_masks"


def prompt_mask(num_prompts: int, width: int, pruned_prompts, pruned_segments,
                num_segments: int) -> np.ndarray:
  """[M, D] float mask: 0 for pruned tokens and for the values of pruned segments."""
  mask = np.ones((num_prompts, width), np.float32)
  for t in pruned_prompts:
    mask[t] = 0.0
  for t, s in pruned_segments:
    mask[t, np.arange(width) % num_segments == s] = 0.0
  return mask


@dataclasses.dataclass(frozen=True)
class E2VPT(Method):
  """num_prompts: visual prompts per block (10 in most of the authors' VTAB runs);
  num_kv_prompts: key-value prompts per attention (5); dropout: on the visual prompts (0.1);
  kv_dropout: on the key-value prompts (0.0); pruned_prompts: visual prompt indices masked to
  0; pruned_segments: (token, segment) pairs masked to 0; num_segments: segments per token
  (16, must divide D)."""
  name = "e2vpt"
  family = "prompt"
  summary = "E2VPT: deep visual prompts + key-value prompts, with prompt pruning"
  mergeable = False
  num_prompts: int = 10
  num_kv_prompts: int = 5
  dropout: float = 0.1
  kv_dropout: float = 0.0
  pruned_prompts: tuple[int, ...] = ()
  pruned_segments: tuple[tuple[int, int], ...] = ()
  num_segments: int = 16

  def resolve(self, num_layers):
    if self.num_prompts < 0 or self.num_kv_prompts < 0:
      raise ValueError(f"e2vpt.num_prompts={self.num_prompts}, num_kv_prompts="
                       f"{self.num_kv_prompts}: both must be >= 0.")
    if self.num_segments <= 0:
      raise ValueError(f"e2vpt.num_segments={self.num_segments}: must be > 0.")
    for name in ("dropout", "kv_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"e2vpt.{name}={getattr(self, name)}: must be in [0, 1).")
    bad = [t for t in self.pruned_prompts if not 0 <= t < self.num_prompts]
    bad += [s for s in self.pruned_segments
            if len(s) != 2 or not 0 <= s[0] < self.num_prompts
            or not 0 <= s[1] < self.num_segments]
    if bad:
      raise ValueError(f"e2vpt pruning: {bad} out of range; pruned_prompts are token indices "
                       f"in 0..{self.num_prompts - 1}, pruned_segments (token, segment) pairs "
                       f"with segment in 0..{self.num_segments - 1}.")
    return dataclasses.replace(
        self, pruned_prompts=tuple(int(t) for t in self.pruned_prompts),
        pruned_segments=tuple((int(t), int(s)) for t, s in self.pruned_segments))

  def claims(self, num_layers):
    return {"prompt_tokens": (int(self.num_prompts),) * num_layers, "deep_prompts": True}

  def partition_rules(self, num_layers):
    return ((r"Transformer/prompts/block_\d+", "prompt"),
            (r".*/MultiHeadDotProductAttention_0/kv_prompts", "prompt"))

  def on_encoder(self, scope, site):
    if not self.num_prompts:
      return None
    if site.hidden_size % self.num_segments:
      raise ValueError(f"e2vpt.num_segments={self.num_segments} must divide the model width "
                       f"{site.hidden_size}.")
    tokens = (int(self.num_prompts),) * site.num_layers
    prompts = Prompts(tokens, tuple(range(site.num_layers)), site.hidden_size, site.patch_size,
                      dropout=float(self.dropout), dtype=site.dtype, name="prompts")
    soft = None  # [M] and [M, num_segments] masks given in the MASKS collection (scoring)
    if scope.has_variable(MASKS, "token"):
      soft = (scope.get_variable(MASKS, "token"), scope.get_variable(MASKS, "segment"))
    return prompts, soft

  def discards_prompts(self, layer, num_layers):
    return bool(self.num_prompts)  # `on_tokens` replaces them before every block

  def on_tokens(self, shared, x, site):
    if shared is None:
      return x
    prompts, soft = shared
    p = prompts(site.layer, x.shape[0], not site.train)  # [B, M, D]
    if self.pruned_prompts or self.pruned_segments:
      mask = prompt_mask(self.num_prompts, x.shape[-1], self.pruned_prompts,
                         self.pruned_segments, self.num_segments)
      p = p * jnp.asarray(mask, p.dtype)
    if soft is not None:
      token, segment = soft
      reps = x.shape[-1] // self.num_segments  # value d is in segment d mod num_segments
      p = p * token[:, None].astype(p.dtype) * jnp.tile(segment, (1, reps)).astype(p.dtype)
    if "prompts" in site.capture:
      site.captured["prompts"] = p[0].astype(jnp.float32)
    return jnp.concatenate([x[:, :1], p, x[:, 1 + site.num_prompts:]], axis=1)

  def on_keys_values(self, scope, k, v, site):
    if not self.num_kv_prompts:
      return k, v
    _, _, heads, head_dim = k.shape
    bound = float(np.sqrt(6.0 / (self.num_kv_prompts * head_dim)))
    kv = scope.param("kv_prompts", lambda key, shape: jax.random.uniform(
        key, shape, jnp.float32, -bound, bound), (self.num_kv_prompts, heads, head_dim))
    kv = jnp.broadcast_to(kv.astype(k.dtype)[None], (k.shape[0], *kv.shape))
    kv = nn.Dropout(self.kv_dropout)(kv, deterministic=not site.train)
    return jnp.concatenate([k, kv], axis=1), jnp.concatenate([v, kv], axis=1)


def prompt_scores(model, params, batches):
  """The authors' importance scores of a trained E2VPT model: the gradient of the mean
  cross-entropy with respect to a mask of ones on each prompt token [M] and on each segment
  [M, num_segments], averaged over `batches` (an iterable of (images, integer labels)), in
  evaluation mode. Lower scores are pruned first (`lowest`)."""
  method = next((m for m in model.methods if isinstance(m, E2VPT)), None)
  if method is None or not method.num_prompts:
    raise ValueError("prompt_scores needs a model with e2vpt visual prompts (num_prompts > 0).")

  @jax.jit
  def grads(masks, images, labels):
    def loss(masks):
      logits, _ = model.apply({"params": params, MASKS: {"Transformer": masks}}, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return jax.grad(loss)(masks)

  masks = {"token": jnp.ones((method.num_prompts,)),
           "segment": jnp.ones((method.num_prompts, method.num_segments))}
  total, n = jax.tree.map(jnp.zeros_like, masks), 0
  for images, labels in batches:
    total = jax.tree.map(jnp.add, total, grads(masks, images, labels))
    n += 1
  if not n:
    raise ValueError("prompt_scores: `batches` is empty.")
  return np.asarray(total["token"]) / n, np.asarray(total["segment"]) / n


def lowest(token_scores, segment_scores, num_tokens: int, num_segments: int,
           keep_tokens: int = 1, keep_segments: int = 4):
  """`pruned_prompts` and `pruned_segments` for a rewind run: the `num_tokens` lowest-scoring
  tokens (at least `keep_tokens` kept, the authors' MIN_NUMBER_CLS_TOKEN) and, in every token,
  the `num_segments` lowest-scoring segments (at least `keep_segments` kept,
  MIN_NUMBER_CLS_TOKEN_PIECE), ties broken by index as the authors' stable sort."""
  token_scores, segment_scores = np.asarray(token_scores), np.asarray(segment_scores)
  m, s = segment_scores.shape
  num_tokens = min(num_tokens, m - keep_tokens)
  num_segments = min(num_segments, s - keep_segments)
  tokens = tuple(sorted(int(t) for t in np.argsort(token_scores, kind="stable")[:num_tokens]))
  segments = tuple((t, int(j)) for t in range(m)
                   for j in sorted(np.argsort(segment_scores[t], kind="stable")[:num_segments]))
  return tokens, segments
