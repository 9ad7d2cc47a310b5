"""The training loader's prepared-image cache: the same batches as without it, fewer reads."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from jvt.data import pipeline, preprocess, samplers


class CountingSource:
  """Random uint8 images of varied sizes (so resizing matters), counting reads per index."""

  def __init__(self, n: int, num_classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.images = [rng.integers(0, 256, (20 + i % 5, 24 + i % 3, 3), dtype=np.uint8)
                   for i in range(n)]
    self.images[1] = self.images[1][:, :, 0]  # one gray image
    self.label_list = [i % num_classes for i in range(n)]
    self.num_classes = num_classes
    self.reads = np.zeros(n, int)
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    with self._lock:
      self.reads[i] += 1
    return {"image": self.images[i], "label": self.label_list[i]}


def _batches(source, preset, *, cache, steps, batch=4, size=16):
  loader = pipeline.TrainLoader(
      source, sampler=samplers.ShuffleSampler(len(source), batch, seed=3),
      preprocess=preset, image_size=size, cache=cache)
  with loader:
    return [next(loader) for _ in range(steps)]


@pytest.mark.parametrize("preset", ["vtab", "fgvc", "da_vpt_vtab", "vit_aug"])
def test_cached_loader_yields_exactly_the_uncached_batches(preset):
  # vtab, da_vpt_vtab: deterministic (square / shorter-side resize, center crop, normalise);
  # fgvc, vit_aug: random crop and flip on top of the resize.
  n, steps = 10, 7  # 2 batches of 4 per epoch (drop remainder): several epochs
  plain = _batches(CountingSource(n), preset, cache=False, steps=steps)
  source = CountingSource(n)
  cached = _batches(source, preset, cache=True, steps=steps)
  for a, b in zip(plain, cached):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])  # bit-identical float32
  # And against an independent computation: the preset applied directly to the example.
  fn = preprocess.get_preprocess(preset, 16, train=True)
  if not fn.needs_rng:
    sampler = samplers.ShuffleSampler(n, 4, seed=3)
    for step, batch in enumerate(plain[:2]):
      rows = sampler.epoch_indices(0)[step]
      want = np.stack([fn(source.images[i]) for i in rows])
      np.testing.assert_array_equal(batch["image"], want)


def test_cached_loader_reads_each_example_once():
  source = CountingSource(8)
  _batches(source, "fgvc", cache=True, steps=8)  # 4 epochs of 2 batches
  assert source.reads.tolist() == [1] * 8
  uncached = CountingSource(8)
  _batches(uncached, "fgvc", cache=False, steps=8)
  assert uncached.reads.min() >= 3  # read again every epoch (plus prefetch)


def test_cache_holds_resized_uint8_images():
  source = CountingSource(8)
  loader = pipeline.TrainLoader(source, sampler=samplers.ShuffleSampler(8, 4, seed=0),
                                preprocess="fgvc", image_size=16, cache=True)
  with loader:
    next(loader), next(loader)
  r = round(16 * 256 / 224)  # fgvc's shorter side before the crop (aspect kept)
  c = loader.cache
  assert c.filled.all() and c.labels.tolist() == source.label_list
  for i in range(8):
    h, w = source.images[i].shape[:2]
    want = preprocess.resize(preprocess.to_rgb(source.images[i]),
                             *preprocess.shorter_side_size(h, w, r))
    assert c.images[i].dtype == np.uint8 and min(c.images[i].shape[:2]) == r
    np.testing.assert_array_equal(c.images[i], want)
  assert c.nbytes == sum(im.nbytes for im in c.images)


def test_cache_needs_the_preprocess_crop_to_be_the_image_size():
  # Cached draws are written straight into [S, S, 3] batch rows: a mismatch is refused up front.
  fn = preprocess.get_preprocess("fgvc", 12, train=True)
  with pytest.raises(ValueError, match="crops 12 px but image_size is 16"):
    pipeline.TrainLoader(CountingSource(10), sampler=samplers.ShuffleSampler(10, 4, seed=0),
                         preprocess=fn, image_size=16, cache=True)


@pytest.mark.parametrize("preprocess_arg", [lambda image, rng: image, "da_vpt_fgvc"])
def test_cache_needs_a_preset_preprocess_that_resizes(preprocess_arg):
  # A callable has no deterministic part to cache; da_vpt_fgvc's random-resized crop resizes a
  # random box of the original at every draw.
  with pytest.raises(ValueError, match="cache=True needs a preset preprocess"):
    pipeline.TrainLoader(CountingSource(8), sampler=samplers.ShuffleSampler(8, 4, seed=0),
                         preprocess=preprocess_arg, image_size=16, cache=True)
