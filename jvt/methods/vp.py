"""VP, visual prompting in pixel space (Bahng et al. 2022, hjbahng/visual_prompting): a learnable
frame of width `pad` added to the (normalised) input image, `x <- x + frame`.

The frame is four leaves, as the authors' `PadPrompter` keeps it: `vp/pad_up` and
`vp/pad_down` [pad, W, 3] (full width), `vp/pad_left` and `vp/pad_right` [H - 2 pad, pad, 3];
the image centre gets nothing. Drawn from N(0, 1) as the authors' `torch.randn`. The only
trainable input-space method: it runs before the patch embedding and composes with every
token-space method. Not mergeable (a plain ViT has no additive image term).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jvt.methods.base import Method


class PadPrompter(nn.Module):
  """Adds a learnable frame of width `pad` to [B, H, W, C] images."""
  pad: int

  @nn.compact
  def __call__(self, images):
    _, h, w, c = images.shape
    p = self.pad
    normal = nn.initializers.normal(1.0)
    up = self.param("pad_up", normal, (p, w, c))
    down = self.param("pad_down", normal, (p, w, c))
    left = self.param("pad_left", normal, (h - 2 * p, p, c))
    right = self.param("pad_right", normal, (h - 2 * p, p, c))
    centre = jnp.zeros((h - 2 * p, w - 2 * p, c), up.dtype)
    middle = jnp.concatenate([left, centre, right], axis=1)  # [H - 2p, W, C]
    frame = jnp.concatenate([up, middle, down], axis=0)  # [H, W, C]
    return images + frame.astype(images.dtype)[None]


@dataclasses.dataclass(frozen=True)
class VP(Method):
  """pad: frame width in pixels (30 at 224 px, the authors' `prompt_size`); 2 pad must be
  smaller than the image's height and width."""
  name = "vp"
  family = "prompt"
  summary = "VP: a learnable pixel frame added to the input image"
  mergeable = False
  pad: int = 30

  def resolve(self, num_layers):
    if self.pad <= 0:
      raise ValueError(f"vp.pad={self.pad}: must be a positive number of pixels.")
    return self

  def claims(self, num_layers):
    return {"image_prompt": "vp"}

  def partition_rules(self, num_layers):
    return ((r"vp/pad_(up|down|left|right)", "prompt"),)

  def on_image(self, scope, images, site):
    _, h, w, _ = images.shape
    if 2 * self.pad >= min(h, w):
      raise ValueError(f"vp.pad={self.pad}: the frame must leave a centre, 2 * pad < "
                       f"{min(h, w)} (the images are {h}x{w}); use a smaller pad.")
    return PadPrompter(self.pad, name="vp")(images)
