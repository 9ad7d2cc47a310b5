"""VPT (Jia et al., ECCV 2022): learnable prompt tokens inserted right after [CLS].

Deep: block l's input is `[x_cls, P_l, X]`, the previous block's prompt outputs replaced by
P_l. Shallow: block 0 inserts, later blocks carry the prompt outputs on. Prompts get no
position embedding. Leaves `Transformer/prompts/block_{l}` [M_l, D'] (and, with `proj_dim`,
`Transformer/prompts/proj` mapping D' -> D). Init: "vpt" uniform(+-v), v = sqrt(6 / (3 ph pw +
D')); "xavier8" (DA-VPT's released code) torch's xavier_uniform_ over the stacked [depth, M, D']
prompts of a group of blocks, then / 8. Prompt dropout draws a mask per image, as VPT drops the
expanded prompts. Not mergeable.

`Prompts` and `insert_prompts` are shared with DA-VPT.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jvt.methods.base import Method

INITS = ("vpt", "xavier8")


class Prompts(nn.Module):
  """Learnable prompt tokens per block: `block_{i}` [M_i, D'] for i in `inserting`.

  tokens: prompt count per block; groups: blocks that form one xavier8 group (the others form
  the second group).
  """
  tokens: tuple[int, ...]
  inserting: tuple[int, ...]
  hidden_size: int
  patch_size: int
  prompt_init: str = "vpt"
  groups: tuple[int, ...] = ()
  proj_dim: int | None = None
  l2norm: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    width = self.proj_dim or self.hidden_size
    group = set(self.groups)

    def bound(i):
      if self.prompt_init == "vpt":  # VPT: v = sqrt(6 / (3 * ph * pw + D)).
        return float(np.sqrt(6.0 / (3 * self.patch_size * self.patch_size + width)))
      # "xavier8": torch's fans of a group's stacked [depth, M, D] prompts are M * D and
      # depth * D.
      depth = sum((j in group) == (i in group) for j in self.inserting)
      return float(np.sqrt(6.0 / (width * (self.tokens[i] + depth)))) / 8.0

    def uniform(v):
      return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -v, v)

    self.prompt_tokens = {
        f"block_{i}": self.param(f"block_{i}", uniform(bound(i)), (self.tokens[i], width))
        for i in self.inserting}
    if self.proj_dim:
      self.proj = nn.Dense(self.hidden_size, dtype=self.dtype, name="proj")
    self.drop = nn.Dropout(self.dropout)

  def __call__(self, layer: int, batch: int, deterministic: bool):
    """Prompts of block `layer` broadcast to [batch, M, D] (dropout: a mask per image)."""
    p = self.prompt_tokens[f"block_{layer}"]
    if self.l2norm:
      p = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
    if self.proj_dim:
      p = self.proj(p)
    p = jnp.broadcast_to(p.astype(self.dtype)[None], (batch, *p.shape))
    return self.drop(p, deterministic=deterministic)


def insert_prompts(prompts: Prompts, x, count: int, site):
  """[B, K + P + N, D] -> [B, K + count + N, D]: block `site.layer`'s prompts replace the P
  prompt tokens after the K prefix tokens ([CLS], registers; none for SigLIP); captures
  "prompts" [count, D] when asked."""
  k = site.num_prefix
  parts = [x[:, :k]]
  if count:
    parts.append(prompts(site.layer, x.shape[0], not site.train))
    if "prompts" in site.capture:
      site.captured["prompts"] = prompts(site.layer, 1, True)[0].astype(jnp.float32)
  parts.append(x[:, k + site.num_prompts:])
  return jnp.concatenate(parts, axis=1)


def prompt_attention_mask(num_tokens: int, num_prompts: int, num_prefix: int = 1):
  """[1, 1, T, T] bool: prompt queries attend to image tokens only (DA-VPT's optional mask)."""
  mask = np.ones((num_tokens, num_tokens), bool)
  mask[num_prefix:num_prefix + num_prompts, :num_prefix + num_prompts] = False
  return jnp.asarray(mask)[None, None]


@dataclasses.dataclass(frozen=True)
class VPT(Method):
  """num_prompts per block (deep) or at the input (shallow, `deep=False`); prompts_per_block
  overrides it with one count per block; dropout on the prompts; proj_dim: prompts of that
  width mapped to D by a shared linear layer; init from `INITS`; l2norm: unit-norm prompts."""
  name = "vpt"
  family = "prompt"
  summary = "VPT shallow/deep prompts (+ head)"
  mergeable = False
  num_prompts: int = 50
  deep: bool = True
  dropout: float = 0.0
  proj_dim: int | None = None
  init: str = "vpt"
  prompts_per_block: tuple[int, ...] | None = None
  l2norm: bool = False

  def resolve(self, num_layers):
    if self.num_prompts < 0:
      raise ValueError(f"vpt.num_prompts={self.num_prompts}: must be >= 0.")
    if self.init not in INITS:
      raise ValueError(f"vpt.init={self.init!r}; allowed: {INITS}.")
    if self.prompts_per_block is not None and len(self.prompts_per_block) != num_layers:
      raise ValueError(f"vpt.prompts_per_block has {len(self.prompts_per_block)} entries; the "
                       f"model has {num_layers} blocks.")
    return self

  def prompt_tokens(self, num_layers: int) -> tuple[int, ...]:
    """Prompt count per block (the shallow form lists block 0's only)."""
    if self.prompts_per_block is not None:
      return tuple(int(m) for m in self.prompts_per_block)
    if self.deep:
      return (int(self.num_prompts),) * num_layers
    return (int(self.num_prompts),) + (0,) * (num_layers - 1)

  def inserts(self, layer: int) -> bool:
    return bool(self.deep) or layer == 0

  def discards_prompts(self, layer, num_layers):
    # `insert_prompts` replaces the incoming prompt tokens wherever this method inserts.
    return any(self.prompt_tokens(num_layers)) and self.inserts(layer)

  def claims(self, num_layers):
    return {"prompt_tokens": self.prompt_tokens(num_layers), "deep_prompts": bool(self.deep),
            "prompt_dropout": float(self.dropout), "prompt_init": self.init,
            "prompt_proj_dim": self.proj_dim, "prompt_l2norm": bool(self.l2norm)}

  def partition_rules(self, num_layers):
    return ((r"Transformer/prompts/.*", "prompt"),)

  def on_encoder(self, scope, site):
    tokens = self.prompt_tokens(site.num_layers)
    if not any(tokens):
      return None
    inserting = tuple(i for i, m in enumerate(tokens) if m > 0 and self.inserts(i))
    return Prompts(tokens, inserting, site.hidden_size, site.patch_size, prompt_init=self.init,
                   proj_dim=self.proj_dim,
                   l2norm=bool(self.l2norm), dropout=float(self.dropout), dtype=site.dtype,
                   name="prompts")

  def on_tokens(self, shared, x, site):
    if shared is None or not self.inserts(site.layer):
      return x
    return insert_prompts(shared, x, self.prompt_tokens(site.num_layers)[site.layer], site)
