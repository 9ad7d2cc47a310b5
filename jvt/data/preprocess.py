"""Per-example image preprocessing on the host (numpy + PIL), selected by preset name.

Every preset maps a uint8 image [H, W, C] (C in {1, 3}, or [H, W]) to float32 [S, S, 3].
Random operations draw from an explicit `np.random.Generator`, so the loader can key them by
(seed, epoch, position) and a restored run sees the same augmentations.

Presets (train / eval), R = round(S * 256 / 224) (256 for S = 224):
  vtab         resize S x S bilinear; no augmentation (VPT's VTAB-1k).
  fgvc         resize the shorter side to R bilinear (aspect kept); train: random crop S +
               random horizontal flip; eval: center crop S (VPT's `src/data/transforms.py`:
               Resize(256), RandomCrop / CenterCrop(224)).
  da_vpt_fgvc  train: random-resized crop to S (area fraction ~ U(0.08, 1), log aspect ratio
               ~ U(log 3/4, log 4/3), torchvision's sampler) bicubic + random flip; eval:
               resize the shorter side to R bicubic, center crop S (DA-VPT's released
               `Dataset/transforms.py`, FGVC).
  da_vpt_vtab  resize the shorter side to S bicubic, center crop S; no augmentation (DA-VPT's
               released VTAB transform).
  vit          resize S x S bilinear, scale to [-1, 1] (google-research/vision_transformer).
  vit_aug      train: resize R' x R' with R' = round(S * 512 / 384), random crop S, random
               flip; eval: resize S x S; scale to [-1, 1] (vision_transformer's fine-tuning).
All but vit / vit_aug normalise with the ImageNet mean / std.

Resizing is PIL on uint8 (antialiased when shrinking), as torchvision does on PIL images in VPT
and DA-VPT; a shorter-side resize gives the longer side int(R * long / short), as torchvision's
`Resize(int)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import numpy as np
import PIL.Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("vtab", "fgvc", "da_vpt_fgvc", "da_vpt_vtab", "vit", "vit_aug")
RESIZES = ("square", "shorter")
CROPS = ("center", "random", "random_resized")
INTERPOLATIONS = {"bilinear": PIL.Image.Resampling.BILINEAR,
                  "bicubic": PIL.Image.Resampling.BICUBIC}
# torchvision's RandomResizedCrop defaults: area fraction and aspect-ratio (w / h) ranges.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Input normalisations a preset name may end with ("vtab:clip"): the pretrained families' own.
NORMALISATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "minus_one_one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # x / 127.5 - 1 (SigLIP)
}

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


def resize(image: np.ndarray, height: int, width: int,
           interpolation: str = "bilinear") -> np.ndarray:
  """Resize of a uint8 image [H, W, 3] to [height, width, 3] (PIL, antialiased)."""
  if image.shape[:2] == (height, width):
    return image
  pil = PIL.Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(pil.resize((width, height), resample=INTERPOLATIONS[interpolation]))


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(new height, new width) with the shorter side `size` and the aspect ratio kept; the longer
  side is int(size * long / short), as torchvision's `Resize(int)` computes it."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


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


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = RRC_SCALE,
                            ratio: tuple[float, float] = RRC_RATIO
                            ) -> tuple[int, int, int, int]:
  """(top, left, box height, box width) drawn as torchvision's `RandomResizedCrop.get_params`.

  Up to 10 tries: area = H * W * U(scale), aspect w / h = exp(U(log ratio)), box sides
  rounded; the first box that fits gets a uniform position. If none fits, the central box of
  the whole image clamped to the ratio range.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _check_crop(h: int, w: int, size: int) -> None:
  if size > h or size > w:
    raise ValueError(f"Cannot crop {size}x{size} from an image of {h}x{w}.")


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """resize -> (random | center) crop, or a random-resized crop -> optional flip -> normalise.

  Attributes:
    resize_to: the resize target R: the side of the square resize, or the shorter side
      (== crop_size when there is no crop). Unused by the random-resized crop.
    crop_size: output side S.
    random_crop: random crop (training) instead of a center crop.
    flip: random horizontal flip (training).
    mean, std: per-channel normalisation applied to x / 255: (x / 255 - mean) / std.
    resize_mode: "square" (R x R, aspect not kept) or "shorter" (shorter side R, aspect kept).
    interpolation: "bilinear" or "bicubic".
    random_resized_crop: crop a `random_resized_crop_box` of the image and resize it to S x S
      (replaces resize + crop; training).
  """
  resize_to: int
  crop_size: int
  random_crop: bool
  flip: bool
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resize_mode: str = "square"
  interpolation: str = "bilinear"
  random_resized_crop: bool = False

  def __post_init__(self):
    if self.crop_size < 1 or self.resize_to < self.crop_size:
      raise ValueError(f"Need 1 <= crop_size <= resize_to, got {self.crop_size}, {self.resize_to}.")
    if self.resize_mode not in RESIZES:
      raise ValueError(f"resize_mode={self.resize_mode!r}; allowed: {RESIZES}.")
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f"interpolation={self.interpolation!r}; allowed: {list(INTERPOLATIONS)}.")

  @property
  def needs_rng(self) -> bool:
    return self.random_crop or self.flip or self.random_resized_crop

  @property
  def cacheable(self) -> bool:
    """Whether `prepare` does the costly part (decode -> resize): not for the random-resized
    crop, which resizes a random box of the original image at every draw."""
    return not self.random_resized_crop

  def __call__(self, image: np.ndarray,
               rng: Optional[np.random.Generator] = None) -> np.ndarray:
    return self.finish(self.prepare(image), rng)

  def prepare(self, image: np.ndarray) -> np.ndarray:
    """The deterministic part: uint8 [H, W, C] -> uint8 [R, R', 3] (RGB, resized unless the
    crop is random-resized); the loader may cache it."""
    image = to_rgb(image)  # [H, W, 3]
    if self.random_resized_crop:
      return image
    if self.resize_mode == "square":
      size = (self.resize_to, self.resize_to)
    else:
      size = shorter_side_size(image.shape[0], image.shape[1], self.resize_to)
    return resize(image, *size, self.interpolation)  # [R, R', 3]

  def finish(self, image: np.ndarray, rng: Optional[np.random.Generator] = None,
             out: Optional[np.ndarray] = None) -> np.ndarray:
    """The rest, per draw: a `prepare` output -> crop, flip, normalise -> float32 [S, S, 3].

    out: an optional float32 [S, S, 3] C-contiguous array (a row of the loader's batch) to
    write the result into, saving a copy; returned.
    """
    if self.needs_rng and rng is None:
      raise ValueError("This training preprocess is random: pass an np.random.Generator.")
    s = self.crop_size
    if self.random_resized_crop:
      top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng)
      image = resize(image[top:top + h, left:left + w], s, s, self.interpolation)  # [S, S, 3]
    elif self.random_crop:
      image = random_crop(image, s, rng)
    else:
      image = center_crop(image, s)  # [S, S, 3]
    rows = image.reshape(s, s * 3)  # uint8 [S, S * 3]; a view: each row of a crop is contiguous
    if self.flip and rng.random() < 0.5:  # mirror left-right with probability 1/2
      # A gather of whole pixels; copying the [:, ::-1] view moves 3 bytes at a time (3x slower).
      rows = np.take(rows, self._mirrored_columns, axis=1)
    if out is None:
      out = np.empty((s, s, 3), np.float32)
    elif out.shape != (s, s, 3) or out.dtype != np.float32 or not out.flags.c_contiguous:
      raise ValueError(f"finish(out=...): need a C-contiguous float32 array of shape "
                       f"{(s, s, 3)}, got {out.dtype} {out.shape}.")
    flat = out.reshape(s, s * 3)  # a view of out
    scale, offset = self._affine_rows  # [S * 3] each
    np.copyto(flat, rows, casting="unsafe")  # uint8 -> float32
    flat *= scale
    flat += offset
    return out

  @functools.cached_property
  def _mirrored_columns(self) -> np.ndarray:
    """[S * 3] column order of a mirrored [S, S * 3] row: pixels reversed, channels kept."""
    pixels = np.arange(self.crop_size)[::-1, None] * 3  # [S, 1]
    return (pixels + np.arange(3)).reshape(-1)  # [S * 3]

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
  base, sep, norm = name.partition(":")
  if sep:  # "<preset>:<normalisation>": the preset's resizing and augmentation, another mean/std
    if norm not in NORMALISATIONS:
      raise ValueError(f"Unknown normalisation {norm!r} in preprocess {name!r}; choose one of "
                       f"{list(NORMALISATIONS)}.")
    mean, std = NORMALISATIONS[norm]
    return dataclasses.replace(get_preprocess(base, image_size, train=train), mean=mean, std=std)
  s = int(image_size)
  r = int(round(s * 256 / 224))
  imagenet = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
  minus_one_one = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # x / 127.5 - 1
  if name == "vtab":
    return Preprocessor(s, s, random_crop=False, flip=False, **imagenet)
  if name == "fgvc":
    return Preprocessor(r, s, random_crop=train, flip=train, resize_mode="shorter", **imagenet)
  if name == "da_vpt_fgvc":
    if train:
      return Preprocessor(s, s, random_crop=False, flip=True, interpolation="bicubic",
                          random_resized_crop=True, **imagenet)
    return Preprocessor(r, s, random_crop=False, flip=False, resize_mode="shorter",
                        interpolation="bicubic", **imagenet)
  if name == "da_vpt_vtab":
    return Preprocessor(s, s, random_crop=False, flip=False, resize_mode="shorter",
                        interpolation="bicubic", **imagenet)
  if name == "vit":
    return Preprocessor(s, s, random_crop=False, flip=False, **minus_one_one)
  if name == "vit_aug":
    if not train:
      return Preprocessor(s, s, random_crop=False, flip=False, **minus_one_one)
    r = int(round(s * 512 / 384))
    return Preprocessor(r, s, random_crop=True, flip=True, **minus_one_one)
  raise ValueError(f"Unknown preprocess preset {name!r}; choose one of {list(PRESETS)}.")
