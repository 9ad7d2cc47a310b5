"""Per-example image preprocessing on the host (numpy + PIL), selected by preset name.

Every preset maps a uint8 image [H, W, C] (C in {1, 3}, or [H, W]) to float32 [S, S, 3].
Random operations draw from an explicit `np.random.Generator`, so the loader can key them by
(seed, epoch, position) and a restored run sees the same augmentations.

Presets (train / eval):
  vtab     resize S x S bilinear, /255, ImageNet mean/std; no augmentation (VPT's VTAB-1k).
  fgvc     train: resize R x R, random crop S, random horizontal flip; eval: resize R x R,
           center crop S; ImageNet mean/std. R = round(S * 256 / 224) (256 for S = 224, VPT).
  vit      resize S x S bilinear, scale to [-1, 1] (google-research/vision_transformer).
  vit_aug  train: resize R x R with R = round(S * 512 / 384), random crop S, random flip;
           eval: resize S x S; scale to [-1, 1] (vision_transformer's fine-tuning recipe).

Resizing is PIL bilinear on uint8 (antialiased when shrinking), as torchvision does on PIL
images in VPT.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import numpy as np
import PIL.Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("vtab", "fgvc", "vit", "vit_aug")

# (image uint8 [H, W, C], rng or None) -> float32 [S, S, 3]
Preprocess = Callable[[np.ndarray, Optional[np.random.Generator]], np.ndarray]


def to_rgb(image: np.ndarray) -> np.ndarray:
  """Returns `image` as uint8 [H, W, 3]; gray [H, W] or [H, W, 1] is tiled to 3 channels."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"Expected a uint8 image, got dtype {image.dtype}.")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"Expected an image [H, W], [H, W, 1] or [H, W, 3], got {image.shape}.")
  if image.shape[-1] == 1:
    image = np.broadcast_to(image, image.shape[:2] + (3,))
  return image


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a uint8 image [H, W, 3] to [height, width, 3] (PIL, antialiased)."""
  if image.shape[:2] == (height, width):
    return image
  pil = PIL.Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(pil.resize((width, height), resample=PIL.Image.Resampling.BILINEAR))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Crops the central size x size window (offsets rounded as torchvision's CenterCrop)."""
  h, w = image.shape[:2]
  _check_crop(h, w, size)
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """Crops a size x size window at a uniform offset (top first, then left)."""
  h, w = image.shape[:2]
  _check_crop(h, w, size)
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return image[top:top + size, left:left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors left-right with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def _check_crop(h: int, w: int, size: int) -> None:
  if size > h or size > w:
    raise ValueError(f"Cannot crop {size}x{size} from an image of {h}x{w}.")


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """resize -> (random | center) crop -> optional flip -> affine normalisation.

  Attributes:
    resize_to: side R of the square resize (== crop_size when there is no crop).
    crop_size: output side S.
    random_crop: random crop (training) instead of a center crop.
    flip: random horizontal flip (training).
    mean, std: per-channel normalisation applied to x / 255: (x / 255 - mean) / std.
  """
  resize_to: int
  crop_size: int
  random_crop: bool
  flip: bool
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  def __post_init__(self):
    if self.crop_size < 1 or self.resize_to < self.crop_size:
      raise ValueError(f"Need 1 <= crop_size <= resize_to, got {self.crop_size}, {self.resize_to}.")

  @property
  def needs_rng(self) -> bool:
    return self.random_crop or self.flip

  def __call__(self, image: np.ndarray,
               rng: Optional[np.random.Generator] = None) -> np.ndarray:
    return self.finish(self.prepare(image), rng)

  def prepare(self, image: np.ndarray) -> np.ndarray:
    """The deterministic part: uint8 [H, W, C] -> uint8 [R, R, 3] (the loader can cache it)."""
    return resize(to_rgb(image), self.resize_to, self.resize_to)

  def finish(self, image: np.ndarray,
             rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The rest, per draw: uint8 [R, R, 3] from `prepare` -> crop, flip, float32 [S, S, 3]."""
    if self.needs_rng and rng is None:
      raise ValueError("This training preprocess is random: pass an np.random.Generator.")
    if self.random_crop:
      image = random_crop(image, self.crop_size, rng)
    else:
      image = center_crop(image, self.crop_size)  # [S, S, 3]
    if self.flip:
      image = random_flip(image, rng)
    s = self.crop_size
    scale, offset = self._affine_rows  # [S * 3] each
    out = image.reshape(s, s * 3).astype(np.float32)  # [S, S * 3]
    out *= scale
    out += offset
    return out.reshape(s, s, 3)  # [S, S, 3] float32

  @functools.cached_property
  def _affine_rows(self) -> tuple[np.ndarray, np.ndarray]:
    """x -> x * scale + offset == (x / 255 - mean) / std, tiled over an image row.

    Operating on [S, S * 3] rows keeps numpy's inner loop long (10x faster than
    broadcasting a [3] vector over [S, S, 3]).
    """
    std = np.asarray(self.std, np.float64)
    scale = 1.0 / (255.0 * std)  # [3]
    offset = -np.asarray(self.mean, np.float64) / std  # [3]
    return (np.tile(scale, self.crop_size).astype(np.float32),
            np.tile(offset, self.crop_size).astype(np.float32))


def get_preprocess(name: str, image_size: int, *, train: bool) -> Preprocessor:
  """Returns the preset `name` (one of PRESETS) for square outputs of side `image_size`."""
  s = int(image_size)
  imagenet = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
  minus_one_one = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # x / 127.5 - 1
  if name == "vtab":
    return Preprocessor(s, s, random_crop=False, flip=False, **imagenet)
  if name == "fgvc":
    r = int(round(s * 256 / 224))
    return Preprocessor(r, s, random_crop=train, flip=train, **imagenet)
  if name == "vit":
    return Preprocessor(s, s, random_crop=False, flip=False, **minus_one_one)
  if name == "vit_aug":
    if not train:
      return Preprocessor(s, s, random_crop=False, flip=False, **minus_one_one)
    r = int(round(s * 512 / 384))
    return Preprocessor(r, s, random_crop=True, flip=True, **minus_one_one)
  raise ValueError(f"Unknown preprocess preset {name!r}; choose one of {list(PRESETS)}.")
