"""`jvt_synthetic`: a procedurally generated image set written as a real TFDS dataset.

Each image shows 1 to 4 objects of one shape and one colour on a noisy gray background, one
object per image quadrant; the first object is the largest. Four label features make four
tasks on the same pixels:
  shape     4 classes: square, disc, triangle, cross (shared by all objects)
  color     6 classes: red, green, blue, yellow, magenta, cyan (shared by all objects)
  count     4 classes: 1..4 objects (label = count - 1)
  position  4 classes: quadrant of the largest object (top_left, top_right, bottom_left,
            bottom_right)
  shape_color  24 classes: the joint (shape, colour) label, a fine-grained "upstream" task
            (the demo pretrains on it, as ImageNet-21k pretraining precedes VTAB tasks)
Each task is learnable by a tiny ViT in minutes on a CPU. The four factors are drawn
independently, so a backbone pretrained on one task becomes invariant to the others; tuning it
for another task then depends on what its frozen features still hold (docs/data.md gives
measured numbers).

The builder writes array_record files under `<data_dir>/jvt_synthetic/1.1.0/` and needs no
download and no TensorFlow; read it back with `tfds.builder("jvt_synthetic", data_dir=...)`
or `jvt.data.sources.get_source`. Build it with `build_synthetic(data_dir)` or
`python -m jvt.data.synthetic --data_dir=DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import shutil
from typing import Iterator, Optional, Sequence

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

NAME = "jvt_synthetic"
_VERSION = "1.1.0"
SHAPES = ("square", "disc", "triangle", "cross")
COLORS = {  # name -> RGB
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
}
POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right")
COUNTS = ("1", "2", "3", "4")
SHAPE_COLORS = tuple(f"{shape}_{color}" for shape in SHAPES for color in COLORS)
TASKS = {"shape": SHAPES, "color": tuple(COLORS), "count": COUNTS, "position": POSITIONS,
         "shape_color": SHAPE_COLORS}
SPLITS = ("train", "validation", "test")

# Object radii as fractions of the image side: the first object is larger than the others.
_MAIN_RADIUS = (0.19, 0.23)
_EXTRA_RADIUS = (0.10, 0.14)
_COLOR_JITTER = 20
_NOISE_STD = (3, 10)  # range of the per-image Gaussian pixel noise
_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
  """Everything that determines the generated files."""
  num_train: int = 2000
  num_validation: int = 500
  num_test: int = 500
  image_size: int = 32
  seed: int = 0

  def __post_init__(self):
    if self.image_size < 16:  # below 24 px the small objects are only a few pixels
      raise ValueError(f"image_size must be >= 16, got {self.image_size}.")
    for split in SPLITS:
      if getattr(self, f"num_{split}") < 1:
        raise ValueError(f"num_{split} must be >= 1.")
    if self.seed < 0:
      raise ValueError(f"seed must be >= 0, got {self.seed}.")

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _shape_mask(shape: str, cy: float, cx: float, r: float, size: int) -> np.ndarray:
  """Boolean mask [size, size] of one object centred at (cy, cx) with radius r (pixels)."""
  ys = np.arange(size, dtype=np.float32)[:, None] + 0.5 - cy  # [S, 1]
  xs = np.arange(size, dtype=np.float32)[None, :] + 0.5 - cx  # [1, S]
  if shape == "square":
    half = 0.8 * r
    return (np.abs(ys) <= half) & (np.abs(xs) <= half)
  if shape == "disc":
    return ys**2 + xs**2 <= r**2
  if shape == "triangle":  # apex up, base 2r wide at the bottom
    return (ys >= -r) & (ys <= r) & (np.abs(xs) <= (ys + r) / 2)
  if shape == "cross":
    arm = r / 3
    return (((np.abs(xs) <= arm) & (np.abs(ys) <= r)) |
            ((np.abs(ys) <= arm) & (np.abs(xs) <= r)))
  raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")


def render_example(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, dict]:
  """Draws one image uint8 [S, S, 3] and its labels {shape, color, count, position, shape_color}."""
  s = image_size
  shape = int(rng.integers(len(SHAPES)))
  color = int(rng.integers(len(COLORS)))
  count = int(rng.integers(1, 5))
  quadrants = rng.permutation(4)[:count]  # distinct quadrant per object; [0] is the main one

  gray = rng.uniform(70, 170)
  tint = rng.uniform(-15, 15, size=3)
  canvas = np.empty((s, s, 3), np.float32)
  canvas[:] = gray + tint
  rgb = np.asarray(list(COLORS.values())[color], np.float32)
  half = s / 2
  for k, quadrant in enumerate(quadrants):
    r = rng.uniform(*(_MAIN_RADIUS if k == 0 else _EXTRA_RADIUS)) * s
    c_lo, c_hi = r + 0.5, max(r + 0.5, half - r - 0.5)  # centres keeping it in the quadrant
    cy = (quadrant // 2) * half + rng.uniform(c_lo, c_hi)
    cx = (quadrant % 2) * half + rng.uniform(c_lo, c_hi)
    mask = _shape_mask(SHAPES[shape], cy, cx, r, s)
    canvas[mask] = rgb + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, size=3)
  canvas += rng.normal(0.0, rng.uniform(*_NOISE_STD), size=canvas.shape)
  image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
  labels = dict(shape=shape, color=color, count=count - 1, position=int(quadrants[0]),
                shape_color=shape * len(COLORS) + color)
  return image, labels


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


class JvtSynthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder of the synthetic shapes set (see the module docstring)."""

  name = NAME
  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "Shapes, colours, counts and positions on noise; joint shape_color label."}
  # Nothing is downloaded, so there is no checksums file next to the code. TFDS 4.9 looks
  # for one through `code_path`, which for a builder inside a package needs the
  # `importlib_resources` backport; None skips that look-up.
  code_path = None

  def __init__(self, *, settings: SyntheticSettings = SyntheticSettings(), **kwargs):
    self._settings = settings
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self._settings.image_size
    features = {"image": tfds.features.Image(shape=(s, s, 3), encoding_format="png")}
    features.update({task: tfds.features.ClassLabel(names=list(names))
                     for task, names in TASKS.items()})
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(self._settings.to_json()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    st = self._settings
    split_id = SPLITS.index(split)
    for i in range(getattr(st, f"num_{split}")):
      rng = np.random.default_rng([st.seed, split_id, i])
      image, labels = render_example(rng, st.image_size)
      yield i, dict(image=_png(image), **labels)


def _built_settings(version_dir) -> Optional[dict]:
  """Settings recorded by a finished build in `version_dir`, None if there is none."""
  meta = version_dir / "metadata.json"
  if not (version_dir / "dataset_info.json").exists() or not meta.exists():
    return None
  return json.loads(meta.read_text())


def build_synthetic(data_dir: str, *, num_train: int = 2000, num_validation: int = 500,
                    num_test: int = 500, image_size: int = 32,
                    seed: int = 0) -> tfds.core.DatasetBuilder:
  """Writes `jvt_synthetic` to `<data_dir>/jvt_synthetic/1.1.0/` and returns its builder.

  Idempotent: files built with the same settings are reused. Files built with other
  settings are replaced (logged), since this set is cheap to regenerate. Build once before
  starting several processes that share `data_dir`.
  """
  settings = SyntheticSettings(num_train=num_train, num_validation=num_validation,
                               num_test=num_test, image_size=image_size, seed=seed)
  builder = JvtSynthetic(settings=settings, data_dir=data_dir, file_format="array_record")
  version_dir = builder.data_path
  built = _built_settings(version_dir)
  if built == settings.to_json():
    return tfds.builder(NAME, data_dir=data_dir)
  if built is not None or version_dir.exists():
    _logger.warning("Replacing %s (built with %s) by a build with %s.",
                    version_dir, built, settings.to_json())
    shutil.rmtree(version_dir)
    builder = JvtSynthetic(settings=settings, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return tfds.builder(NAME, data_dir=data_dir)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """CLI: `python -m jvt.data.synthetic --data_dir=DIR [--image_size=32 ...]`."""
  defaults = SyntheticSettings()
  parser = argparse.ArgumentParser(description="Build the jvt_synthetic TFDS dataset.")
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write to.")
  for field in dataclasses.fields(SyntheticSettings):
    parser.add_argument(f"--{field.name}", type=int, default=getattr(defaults, field.name))
  args = parser.parse_args(argv)
  kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSettings)}
  builder = build_synthetic(args.data_dir, **kwargs)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"{NAME} ready in {builder.data_dir}: {splits}")


if __name__ == "__main__":
  main()
