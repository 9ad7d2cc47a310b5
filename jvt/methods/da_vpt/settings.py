"""DA-VPT / DA-VPT+ settings: the config vocabulary, its validation and the prompt plug-in.

DA-VPT (Ren et al., CVPR 2025) is VPT-Deep (`num_proxy_prompts` prompts in the proxy blocks,
`num_prompts` elsewhere) plus metric losses where the prompts of the proxy blocks act as class
proxies (`jvt.methods.da_vpt.objective`). The paper and the authors' released code differ;
`preset` ("code" default, "paper") picks each choice left at None:

| field | paper | code |
|---|---|---|
| patch_feature | "attn_out_mean" | "input_patch_mean" |
| prompt_query / cls_query | True / False | False / True |
| normalize_positives | "with_positives" | "all" |
| init | "vpt" | "xavier8" (groups: proxy blocks, other blocks) |
| kmeans_layer_norm | False | True |
| l2norm, attention_mask | False | False |

Resolved settings hold no None and absolute, sorted `proxy_layers`; resolving them again
changes nothing, so they rebuild the same model. DA-VPT+ also tunes biases and [CLS]
(`PLUS_RULES`).
"""
from __future__ import annotations

import dataclasses

from jvt.methods.base import Method
from jvt.methods.leaves import BIAS_SUBSETS, BLOCK
from jvt.methods.vpt import Prompts, insert_prompts, prompt_attention_mask

PRESETS = ("code", "paper")
PATCH_FEATURES = ("attn_out_mean", "input_patch_mean")
NORMALIZE_POSITIVES = ("with_positives", "all")
# DA-VPT+ bias sets. paper: K and V biases and [CLS]; released code: K, V, attention-out, fc2
# and norm2 biases, all of norm1, [CLS], and the patch-embedding bias (its `proj.bias` name
# matches the released code's attention-out switch too).
PLUS_RULES = {
    "paper": ((BIAS_SUBSETS["key"], "bias"), (BIAS_SUBSETS["value"], "bias"), ("cls", "cls")),
    "code": ((BIAS_SUBSETS["key"], "bias"), (BIAS_SUBSETS["value"], "bias"),
             (BIAS_SUBSETS["out"], "bias"), (BIAS_SUBSETS["mlp_out"], "bias"),
             (BIAS_SUBSETS["norm2"], "bias"), (rf"{BLOCK}/LayerNorm_0/(scale|bias)", "bias"),
             (BIAS_SUBSETS["embedding"], "bias"), ("cls", "cls")),
}
# (paper value, code value) of the fields that follow the preset when None.
_PRESET_VALUES = {
    "normalize_positives": ("with_positives", "all"),
    "patch_feature": ("attn_out_mean", "input_patch_mean"),
    "prompt_query": (True, False),
    "cls_query": (False, True),
    "init": ("vpt", "xavier8"),
    "l2norm": (False, False),
    "attention_mask": (False, False),
    "kmeans_layer_norm": (False, True),
}


@dataclasses.dataclass(frozen=True)
class DAVPT(Method):
  """Loss: `CE + patch_weight * L_ML(X, P) + cls_weight * L_ML(P, x_cls)`, each a proxy-anchor
  loss (alpha, delta_pos, delta_neg, normalize_positives, scale_ratio) averaged over
  `proxy_layers`. The class -> prompt mapping clusters `mapping_images_per_class` images per
  class and is refreshed after every epoch from `refresh_from_epoch` (0: never). More proxy
  prompts than classes needs `surplus_prompts="unused"` (class c -> prompt c)."""
  name = "da_vpt"
  family = "prompt"
  summary = "DA-VPT: VPT-Deep + metric losses with prompts as class proxies"
  mergeable = False
  preset: str = "code"
  num_prompts: int = 10
  num_proxy_prompts: int = 10
  proxy_layers: tuple[int, ...] = (-1,)
  patch_weight: float = 0.05
  cls_weight: float = 0.05
  scale_ratio: float = 1.0
  dropout: float = 0.0
  alpha: float = 32.0
  delta_pos: float = 0.1
  delta_neg: float = -0.1
  normalize_positives: str | None = None
  patch_feature: str | None = None
  prompt_query: bool | None = None
  cls_query: bool | None = None
  init: str | None = None
  l2norm: bool | None = None
  attention_mask: bool | None = None
  mapping_images_per_class: int = 10
  refresh_from_epoch: int = 1
  kmeans_layer_norm: bool | None = None
  surplus_prompts: str = ""

  def resolve(self, num_layers):
    n = self.name
    if self.preset not in PRESETS:
      raise ValueError(f"{n}.preset={self.preset!r}; allowed: {PRESETS}.")
    layers = tuple(int(l) for l in self.proxy_layers)
    if not layers:
      raise ValueError(f"{n}.proxy_layers is empty: give at least one block index.")
    for l in layers:
      if not -num_layers <= l < num_layers:
        raise ValueError(f"{n}.proxy_layers contains {l}: the model has {num_layers} blocks "
                         f"(valid: 0..{num_layers - 1} or negative from the end).")
    for field in ("patch_weight", "cls_weight"):
      if getattr(self, field) < 0:
        raise ValueError(f"{n}.{field}={getattr(self, field)}: must be >= 0.")
    if self.num_prompts < 0:
      raise ValueError(f"{n}.num_prompts={self.num_prompts}: must be >= 0.")
    if self.num_proxy_prompts <= 0:
      raise ValueError(f"{n}.num_proxy_prompts={self.num_proxy_prompts}: must be > 0.")
    if self.refresh_from_epoch < 0:
      raise ValueError(f"{n}.refresh_from_epoch={self.refresh_from_epoch}: must be >= 0 "
                       "(0: never refresh the mapping).")
    paper = self.preset == "paper"
    picked = {k: (getattr(self, k) if getattr(self, k) is not None else v[0 if paper else 1])
              for k, v in _PRESET_VALUES.items()}
    out = dataclasses.replace(
        self, proxy_layers=tuple(sorted({l % num_layers for l in layers})),
        surplus_prompts=str(self.surplus_prompts or ""), **picked)
    if out.surplus_prompts not in ("", "unused"):
      raise ValueError(f"{n}.surplus_prompts={out.surplus_prompts!r}; allowed: "
                       "'' (more proxy prompts than classes is an error), 'unused'.")
    if out.patch_feature not in PATCH_FEATURES:
      raise ValueError(f"{n}.patch_feature={out.patch_feature!r}; allowed: "
                       "'attn_out_mean' (paper), 'input_patch_mean' (released code).")
    if out.normalize_positives not in NORMALIZE_POSITIVES:
      raise ValueError(f"{n}.normalize_positives={out.normalize_positives!r}; "
                       "allowed: 'with_positives' (paper), 'all' (released code).")
    if out.init not in ("vpt", "xavier8"):
      raise ValueError(f"{n}.init={out.init!r}; allowed: ('vpt', 'xavier8').")
    return out

  def prompt_tokens(self, num_layers: int) -> tuple[int, ...]:
    layers = {l % num_layers for l in self.proxy_layers}
    return tuple(int(self.num_proxy_prompts) if i in layers else int(self.num_prompts)
                 for i in range(num_layers))

  def claims(self, num_layers):
    return {"prompt_tokens": self.prompt_tokens(num_layers), "deep_prompts": True,
            "prompt_dropout": float(self.dropout), "prompt_init": self.init,
            "prompt_l2norm": bool(self.l2norm),
            "prompt_attention_mask": bool(self.attention_mask), "davpt": self}

  def partition_rules(self, num_layers):
    return ((r"Transformer/prompts/.*", "prompt"),)

  # ------------------------------------------------------------------ plug-in
  def on_encoder(self, scope, site):
    tokens = self.prompt_tokens(site.num_layers)
    inserting = tuple(i for i, m in enumerate(tokens) if m > 0)
    return Prompts(tokens, inserting, site.hidden_size, site.patch_size, prompt_init=self.init,
                   groups=tuple(self.proxy_layers), l2norm=bool(self.l2norm),
                   dropout=float(self.dropout), dtype=site.dtype, name="prompts")

  def discards_prompts(self, layer, num_layers):
    return True  # `on_tokens` replaces the prompts before every block

  def on_tokens(self, shared, x, site):
    return insert_prompts(shared, x, self.prompt_tokens(site.num_layers)[site.layer], site)

  def on_attention_mask(self, mask, site):
    if not self.attention_mask or not site.num_prompts:
      return mask
    own = prompt_attention_mask(site.num_tokens, site.num_prompts, site.num_prefix)
    return own if mask is None else mask & own

  # ------------------------------------------------------------------ loss
  def loss_term(self):
    from jvt.methods.da_vpt.objective import DAVPTLoss
    return DAVPTLoss(self)


@dataclasses.dataclass(frozen=True)
class DAVPTPlus(DAVPT):
  """DA-VPT plus bias tuning and [CLS] (`PLUS_RULES[preset]`)."""
  name = "da_vpt_plus"
  summary = "DA-VPT+: DA-VPT + bias tuning (+ [CLS])"

  def partition_rules(self, num_layers):
    return super().partition_rules(num_layers) + PLUS_RULES[self.preset]
