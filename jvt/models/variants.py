"""ViT variants by name ("B/16", "S/32", ...): widths, depths and heads of the published models."""
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


def variant_config(variant: str) -> dict:
  """"B/16" -> dict(hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12, patch_size=16)."""
  m = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)", variant)
  if not m:
    raise ValueError(
        f"Unknown ViT variant {variant!r}: expected <size>/<patch> with size in "
        f"{sorted(VARIANT_DIMS)} and an integer patch size, e.g. 'B/16', 'S/32', 'H/14'.")
  hidden, mlp, heads, layers = VARIANT_DIMS[m.group(1)]
  return dict(hidden_size=hidden, mlp_dim=mlp, num_heads=heads, num_layers=layers,
              patch_size=int(m.group(2)))
