"""ViT variants by name: widths, depths and heads of the published models, and the options of
each pretrained family.

Two kinds of names:
- plain `"<size>/<patch>"` ("B/16", "S/32", "H/14"): the ViT of google-research/vision_transformer
  (size Ti, S, B, L, H; any integer patch size);
- family variants, the exact strings of the published backbones: `dinov2-{S,B,L,g}/14`,
  `dinov2-reg4-{S,B,L,g}/14`, `clip-{B/32,B/16,L/14}`, `openclip-{B/32,B/16,L/14,H/14}`,
  `siglip-{B/16,L/16,So400m/14}`. Each sets its family's architectural options (layer scale,
  registers, pre-norm, activation, layer-norm eps, pooling, ...), which `build_model`'s
  `checkpoint=` and explicit overrides may still change.
"""
from __future__ import annotations

import re

# name -> (hidden_size, mlp_dim, num_heads, num_layers)
VARIANT_DIMS = {
    "Ti": (192, 768, 3, 12),
    "S": (384, 1536, 6, 12),
    "B": (768, 3072, 12, 12),
    "L": (1024, 4096, 16, 24),
    "H": (1280, 5120, 16, 32),
}

# Each family's options (ViT fields), from its reference code:
# - DINOv2 (facebookresearch/dinov2, timm `vit_*_patch14_dinov2`): layer scale on both residual
#   branches, layer-norm eps 1e-6, exact GELU; giant uses a SwiGLU MLP of hidden width 4096
#   (the fused first layer has 8192 outputs); `-reg4` adds 4 register tokens after [CLS].
# - CLIP (openai/CLIP `VisionTransformer`): a patch embedding without bias, `ln_pre` after the
#   position embedding, QuickGELU, layer-norm eps 1e-5, [CLS] after `ln_post`, and `proj`
#   (kept as `projection`, an optional output). OpenCLIP's LAION towers: the same with GELU.
# - SigLIP (big_vision `vit.py`, pool_type "map"): no [CLS], a position embedding of the patch
#   grid only, a MAP head (`MAPHead_0`) after the final norm, tanh-approximated GELU (flax's
#   default), layer-norm eps 1e-6.
_DINOV2 = dict(layer_scale=True, layer_norm_eps=1e-6, gelu_approximate=False)
_CLIP = dict(pre_norm=True, patch_bias=False, layer_norm_eps=1e-5, activation="quick_gelu")
_OPENCLIP = dict(_CLIP, activation="gelu", gelu_approximate=False)
_SIGLIP = dict(class_token=False, pool="map", layer_norm_eps=1e-6, gelu_approximate=True)


def _dims(hidden, mlp, heads, layers, patch):
  return dict(hidden_size=hidden, mlp_dim=mlp, num_heads=heads, num_layers=layers,
              patch_size=patch)


_DINOV2_SIZES = {
    "S": _dims(384, 1536, 6, 12, 14),
    "B": _dims(768, 3072, 12, 12, 14),
    "L": _dims(1024, 4096, 16, 24, 14),
    "g": dict(_dims(1536, 4096, 24, 40, 14), activation="swiglu"),
}
_CLIP_SIZES = {
    "B/32": dict(_dims(768, 3072, 12, 12, 32), projection_dim=512),
    "B/16": dict(_dims(768, 3072, 12, 12, 16), projection_dim=512),
    "L/14": dict(_dims(1024, 4096, 16, 24, 14), projection_dim=768),
    "H/14": dict(_dims(1280, 5120, 16, 32, 14), projection_dim=1024),
}
_SIGLIP_SIZES = {
    "B/16": _dims(768, 3072, 12, 12, 16),
    "L/16": _dims(1024, 4096, 16, 24, 16),
    "So400m/14": _dims(1152, 4304, 16, 27, 14),
}

# variant -> (family, ViT fields). The family names the loaders' defaults (posemb resizing).
FAMILY_VARIANTS: dict[str, tuple[str, dict]] = {
    **{f"dinov2-{s}/14": ("dinov2", {**_DINOV2, **d}) for s, d in _DINOV2_SIZES.items()},
    **{f"dinov2-reg4-{s}/14": ("dinov2", {**_DINOV2, **d, "num_registers": 4})
       for s, d in _DINOV2_SIZES.items()},
    **{f"clip-{s}": ("clip", {**_CLIP, **d}) for s, d in _CLIP_SIZES.items() if s != "H/14"},
    **{f"openclip-{s}": ("clip", {**_OPENCLIP, **d}) for s, d in _CLIP_SIZES.items()},
    **{f"siglip-{s}": ("siglip", {**_SIGLIP, **d}) for s, d in _SIGLIP_SIZES.items()},
}

# The input normalisation each family was trained with (a `jvt.data.preprocess.NORMALISATIONS`
# name: ImageNet mean / std for the supervised ViTs as VPT feeds them and for DINOv2, OpenAI's
# CLIP mean / std for CLIP and OpenCLIP, [-1, 1] for SigLIP) and the resolution configs use
# (224 px: every family's 224 px models; other grids are resized at load).
FAMILY_NORMALISATION = {"vit": "imagenet", "dinov2": "imagenet", "clip": "clip",
                        "siglip": "minus_one_one"}
FAMILY_IMAGE_SIZE = 224


def variant_family(variant: str) -> str:
  """"vit" for plain variants, else "dinov2", "clip" or "siglip"."""
  if variant in FAMILY_VARIANTS:
    return FAMILY_VARIANTS[variant][0]
  variant_config(variant)  # raises for unknown names
  return "vit"


def variant_config(variant: str) -> dict:
  """The ViT fields of a variant.

  "B/16" -> dict(hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12, patch_size=16);
  "dinov2-B/14" -> the same dims with patch 14 plus DINOv2's options (layer_scale=True, ...).
  """
  if variant in FAMILY_VARIANTS:
    return dict(FAMILY_VARIANTS[variant][1])
  m = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)", variant)
  if not m:
    raise ValueError(
        f"Unknown ViT variant {variant!r}: expected <size>/<patch> with size in "
        f"{sorted(VARIANT_DIMS)} and an integer patch size, e.g. 'B/16', 'S/32', 'H/14', or "
        f"one of the pretrained families: {', '.join(FAMILY_VARIANTS)}.")
  hidden, mlp, heads, layers = VARIANT_DIMS[m.group(1)]
  return dict(hidden_size=hidden, mlp_dim=mlp, num_heads=heads, num_layers=layers,
              patch_size=int(m.group(2)))
