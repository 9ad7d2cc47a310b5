"""`TuningSpec`: the static description of which plug-ins a ViT carries.

A spec is hashable data, a field of the `ViT` module. The method registry (`jvt.tuning`) turns
users' tuning configs into one; the backbone reads it at its extension points and never needs
to know which named method asked for what.
"""
from __future__ import annotations

import dataclasses

LORA_TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")
ADAPTER_POSITIONS = ("attn", "mlp")
PROMPT_INITS = ("vpt", "xavier8")


@dataclasses.dataclass(frozen=True)
class DAVPTSpec:
  """DA-VPT settings: which features the proxy blocks expose and how the metric losses use them.

  `patch_feature`: "input_patch_mean" (released code: mean of the block's input image tokens)
  or "attn_out_mean" (paper: mean of the block's attention-output image tokens).
  `prompt_query`: project the prompts with the block's query before the [CLS] term (paper).
  `cls_query`: use the query projection of norm1(x_cls) as the [CLS] feature (released code);
  otherwise the block's output [CLS] token.
  Loss: `total = CE + patch_weight * L_ML(X, P) + cls_weight * L_ML(P, x_cls)`, each a
  proxy-anchor loss (alpha, delta_pos, delta_neg, normalize_positives, scale_ratio) averaged over
  `proxy_layers` (absolute block indices).
  """
  proxy_layers: tuple[int, ...] = (11,)
  patch_feature: str = "input_patch_mean"
  prompt_query: bool = False
  cls_query: bool = True
  preset: str = "code"
  num_proxy_prompts: int = 10
  patch_weight: float = 0.05
  cls_weight: float = 0.05
  scale_ratio: float = 1.0
  alpha: float = 32.0
  delta_pos: float = 0.1
  delta_neg: float = -0.1
  normalize_positives: str = "all"
  mapping_images_per_class: int = 10
  refresh_from_epoch: int = 1
  kmeans_layer_norm: bool = False
  # More proxy prompts than classes: "" is an error, "unused" maps class c -> prompt c and the
  # remaining prompts serve only as negatives.
  surplus_prompts: str = ""


@dataclasses.dataclass(frozen=True)
class TuningSpec:
  """Which tuning modules the backbone gets. The default is the plain backbone.

  prompt_tokens: prompts inserted at the input of each block (len == num_layers or empty).
    With `deep_prompts` block l replaces the previous prompt outputs by its own; otherwise only
    block 0 inserts and later blocks carry the prompt outputs on (VPT-Shallow).
  """
  prompt_tokens: tuple[int, ...] = ()
  deep_prompts: bool = True
  prompt_dropout: float = 0.0
  prompt_init: str = "vpt"
  prompt_proj_dim: int | None = None
  prompt_l2norm: bool = False
  prompt_attention_mask: bool = False
  adapter_dim: int = 0
  adapter_positions: tuple[str, ...] = ("attn", "mlp")
  adaptformer_dim: int = 0
  adaptformer_scale: float = 0.1
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_targets: tuple[str, ...] = ()
  ssf: bool = False
  davpt: DAVPTSpec | None = None
  # Feature distillation: K learned maps [D] -> [distill_proj_dim] (one per matched layer), in
  # `distill_proj/{kernel [K, D, D'], bias [K, D']}`. Training-only: the ViT returns them in
  # aux["distill_proj"] and `jvt.distill` applies them to the block features it matches.
  distill_proj_dim: int = 0
  distill_proj_num: int = 1

  def prompts_before(self, layer: int) -> int:
    """Number of prompt tokens in the sequence entering block `layer` (after insertion)."""
    if not self.prompt_tokens:
      return 0
    if self.deep_prompts:
      return self.prompt_tokens[layer]
    return self.prompt_tokens[0]

  def inserts_prompts(self, layer: int) -> bool:
    """Whether block `layer` writes its own prompts into the sequence."""
    if not self.prompt_tokens:
      return False
    return self.deep_prompts or layer == 0
