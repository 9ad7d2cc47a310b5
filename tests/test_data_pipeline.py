"""Tests of jvt.data: sources, preprocessing presets, samplers, train/eval loaders."""

import io
import json

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from jvt.data import pipeline
from jvt.data import preprocess as pp
from jvt.data import samplers
from jvt.data import sources

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# ---------------------------------------------------------------- helpers


class ArraySource:
  """In-memory source whose image encodes its index: pixel [.., 0] = i % 256, [.., 1] = i // 256."""

  def __init__(self, labels, num_classes, size=4):
    self.labels_ = np.asarray(labels)
    self.num_classes = num_classes
    self.size = size

  def __len__(self):
    return len(self.labels_)

  def __getitem__(self, i):
    image = np.zeros((self.size, self.size, 3), np.uint8)
    image[..., 0] = i % 256
    image[..., 1] = i // 256
    return {"image": image, "label": int(self.labels_[i])}


def raw(image, rng):
  del rng
  return image.astype(np.float32)


def noisy(image, rng):
  """Keeps the index channels, puts rng noise in channel 2 (checks augmentation keys)."""
  out = image.astype(np.float32)
  out[..., 2] = rng.normal(size=out.shape[:2])
  return out


def indices_of(batch):
  img = batch["image"]
  return (np.round(img[:, 0, 0, 0]) + 256 * np.round(img[:, 0, 0, 1])).astype(int)


def train_loader(source, *, batch=8, seed=0, fn=raw, sampler="shuffle", k=2, **kw):
  if sampler == "balanced":
    plan = samplers.BalancedSampler(source.labels_, batch, k, seed)
  else:
    plan = samplers.ShuffleSampler(len(source), batch, seed)
  return pipeline.TrainLoader(source, sampler=plan, preprocess=fn, image_size=source.size,
                              split="split 'train' of arrays", **kw)


def take(loader, n):
  return [next(loader) for _ in range(n)]


# ---------------------------------------------------------------- shuffle sampler / loader


def test_shuffle_epochs_are_deterministic_permutations():
  src = ArraySource(np.arange(50) % 3, 3)
  with train_loader(src, batch=8, seed=3) as a, train_loader(src, batch=8, seed=3) as b, \
      train_loader(src, batch=8, seed=4) as c:
    assert a.steps_per_epoch == 6 and a.num_examples == 50 and a.num_classes == 3
    batches = take(a, 12)
    epochs = [np.concatenate([indices_of(x) for x in batches[e * 6:(e + 1) * 6]])
              for e in range(2)]
    for e in epochs:
      assert len(e) == 48 and len(set(e)) == 48 and e.min() >= 0 and e.max() < 50
    assert not np.array_equal(epochs[0], epochs[1])
    for x in batches:
      assert x["image"].dtype == np.float32 and x["image"].shape == (8, 4, 4, 3)
      assert x["label"].dtype == np.int32
      np.testing.assert_array_equal(x["label"], indices_of(x) % 3)
    again = np.concatenate([indices_of(x) for x in take(b, 6)])
    np.testing.assert_array_equal(again, epochs[0])
    other = np.concatenate([indices_of(x) for x in take(c, 6)])
    assert not np.array_equal(other, epochs[0])


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_resume_from_state_gives_identical_batches(sampler):
  src = ArraySource(np.arange(40) % 5, 5)
  with train_loader(src, batch=8, fn=noisy, sampler=sampler, prefetch=3) as a:
    take(a, 3)
    state = json.loads(json.dumps(a.get_state()))
    assert state["epoch"] == 0 and state["step"] == 3
    expected = take(a, 6)  # crosses into epoch 1 (5 steps per epoch)
  with train_loader(src, batch=8, fn=noisy, sampler=sampler, prefetch=1) as b:
    take(b, 1)  # prefetched work is discarded by set_state
    b.set_state(state)
    got = take(b, 6)
  for x, y in zip(expected, got):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert b.get_state()["epoch"] == 1


def test_augmentation_changes_with_epoch_and_row_but_not_with_rerun():
  src = ArraySource(np.arange(8) % 2, 2)
  with train_loader(src, batch=8, fn=noisy) as a, train_loader(src, batch=8, fn=noisy) as b:
    e0, e1 = take(a, 2)  # one step per epoch
    noise0, noise1 = e0["image"][..., 2], e1["image"][..., 2]
    assert not np.allclose(np.sort(noise0.ravel()), np.sort(noise1.ravel()))
    assert not np.allclose(noise0[0], noise0[1])
    np.testing.assert_array_equal(next(b)["image"], e0["image"])


def test_set_state_rejects_a_different_run():
  src = ArraySource(np.arange(40) % 5, 5)
  with train_loader(src, batch=8, seed=1) as a, train_loader(src, batch=8, seed=2) as b:
    with pytest.raises(ValueError, match="seed"):
      b.set_state(a.get_state())


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_two_processes_concatenate_to_the_single_process_batch(sampler):
  src = ArraySource(np.arange(36) % 6, 6)
  with train_loader(src, batch=12, fn=noisy, sampler=sampler) as single, \
      train_loader(src, batch=12, fn=noisy, sampler=sampler, process_index=0,
                   process_count=2) as p0, \
      train_loader(src, batch=12, fn=noisy, sampler=sampler, process_index=1,
                   process_count=2) as p1:
    assert p0.local_batch_size == 6
    for _ in range(7):  # 3 steps per epoch: crosses two epoch boundaries
      x, a, b = next(single), next(p0), next(p1)
      np.testing.assert_array_equal(x["image"], np.concatenate([a["image"], b["image"]]))
      np.testing.assert_array_equal(x["label"], np.concatenate([a["label"], b["label"]]))


def test_batch_must_split_evenly_over_processes():
  src = ArraySource(np.arange(40) % 5, 5)
  with pytest.raises(ValueError, match="process_count"):
    train_loader(src, batch=6, process_count=4)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    train_loader(ArraySource(np.arange(5) % 5, 5), batch=8)


# ---------------------------------------------------------------- balanced sampler


@pytest.mark.parametrize("k", [2, 4])
def test_balanced_batches_hold_k_images_of_each_class(k):
  sizes = [2, 3, 10, 20, 5]  # uneven classes; class 0 has fewer than k=4 images
  labels = np.repeat(np.arange(5), sizes)
  src = ArraySource(labels, 5)
  with train_loader(src, batch=8, sampler="balanced", k=k, seed=7) as loader:
    assert loader.steps_per_epoch == 40 // 8
    per_epoch = []
    for _ in range(3):
      drawn = []
      for x in take(loader, loader.steps_per_epoch):
        idx = indices_of(x)
        np.testing.assert_array_equal(x["label"], labels[idx])
        classes, counts = np.unique(x["label"], return_counts=True)
        assert len(classes) == 8 // k and np.all(counts == k)
        drawn.append(idx)
      per_epoch.append(np.concatenate(drawn))
  assert not np.array_equal(per_epoch[0], per_epoch[1])
  # Within an epoch, a class's images are used evenly (queue without replacement).
  for drawn in per_epoch:
    for c, n in enumerate(sizes):
      uses = np.bincount(drawn[labels[drawn] == c], minlength=len(labels))[labels == c]
      if uses.sum():
        assert uses.max() - uses.min() <= 1


def test_balanced_sampler_is_deterministic_and_validates():
  labels = np.arange(30) % 6
  a = samplers.BalancedSampler(labels, 6, 2, seed=5).epoch_indices(2)
  b = samplers.BalancedSampler(labels, 6, 2, seed=5).epoch_indices(2)
  c = samplers.BalancedSampler(labels, 6, 2, seed=6).epoch_indices(2)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (5, 6) and not np.array_equal(a, c)
  with pytest.raises(ValueError, match="multiple of images_per_class"):
    samplers.BalancedSampler(labels, 7, 2, seed=0)
  with pytest.raises(ValueError, match="only 6"):
    samplers.BalancedSampler(labels, 16, 2, seed=0)


# ---------------------------------------------------------------- batch buffers reused


def _address(batch):
  return batch["image"].__array_interface__["data"][0]


def test_a_batch_buffer_is_reused_only_once_nothing_holds_it():
  """Loader `a`'s batches are all held; loader `b` (same plan and seed) drops each one, so its
  buffers come back. Every batch must hold what it held when it was yielded: `a`'s, never
  reused, against copies of `b`'s; a kept view and a JAX array made from a dropped batch must
  not change while `b` goes on."""
  src = ArraySource(np.arange(40) % 4, 4)
  with train_loader(src, batch=8, fn=noisy, seed=5) as a, \
      train_loader(src, batch=8, fn=noisy, seed=5) as b:
    held = take(a, 12)
    copies, addresses = [], []
    for _ in range(12):
      batch = next(b)
      copies.append({k: v.copy() for k, v in batch.items()})
      addresses.append(_address(batch))
      del batch
    assert len(set(addresses)) < len(addresses)  # b's buffers were reused
    assert len({_address(h) for h in held}) == len(held)  # a's were not: all still held
    for h, c in zip(held, copies):
      np.testing.assert_array_equal(h["image"], c["image"])
      np.testing.assert_array_equal(h["label"], c["label"])
    view = next(b)["image"][2:5]  # only a view of the batch stays
    view_before = view.copy()
    on_device = jax.device_put(next(b)["image"])  # the host batch is dropped at once
    device_before = np.asarray(on_device).copy()
    take(b, 10)
    np.testing.assert_array_equal(view, view_before)
    np.testing.assert_array_equal(np.asarray(on_device), device_before)


def test_reused_eval_buffers_have_zero_padding_rows():
  n, batch = 22, 4  # 6 batches, the last with 2 padding rows, written into a reused buffer
  src = ArraySource(np.arange(n) % 3, 3)
  ev = pipeline.EvalBatches(src, global_batch_size=batch, preprocess=raw, image_size=4,
                            prefetch=1)
  addresses = []
  for step, out in enumerate(ev):
    positions = step * batch + np.arange(batch)
    np.testing.assert_array_equal(out["mask"], positions < n)
    np.testing.assert_array_equal(indices_of(out)[out["mask"]], positions[out["mask"]])
    assert np.all(out["image"][~out["mask"]] == 0) and np.all(out["label"][~out["mask"]] == 0)
    addresses.append(_address(out))
    del out
  assert len(set(addresses)) < len(addresses)


# ---------------------------------------------------------------- evaluation batches


@pytest.mark.parametrize("process_count", [1, 2])
@pytest.mark.parametrize("batch", [2, 4, 6, 10, 16])
def test_eval_batches_cover_every_example_once(batch, process_count):
  n = 10
  src = ArraySource(np.arange(n) % 3, 3)
  per_process = []
  for p in range(process_count):
    ev = pipeline.EvalBatches(src, global_batch_size=batch, preprocess=raw, image_size=4,
                              process_index=p, process_count=process_count, prefetch=1)
    per_process.append(list(ev))
    assert len(ev) == -(-n // batch)
    assert len(list(ev)) == len(ev)  # iterable more than once
  assert len({len(b) for b in per_process}) == 1  # same number of batches everywhere
  seen = []
  for step in range(len(per_process[0])):
    rows = [per_process[p][step] for p in range(process_count)]
    image = np.concatenate([r["image"] for r in rows])
    mask = np.concatenate([r["mask"] for r in rows])
    label = np.concatenate([r["label"] for r in rows])
    positions = step * batch + np.arange(batch)
    np.testing.assert_array_equal(mask, positions < n)
    np.testing.assert_array_equal(indices_of({"image": image})[mask], positions[mask])
    np.testing.assert_array_equal(label[mask], positions[mask] % 3)
    assert np.all(image[~mask] == 0) and np.all(label[~mask] == 0)
    assert rows[0]["mask"].dtype == bool and rows[0]["image"].shape == (batch // process_count,
                                                                      4, 4, 3)
    seen.extend(positions[mask])
  assert sorted(seen) == list(range(n))


# ---------------------------------------------------------------- labels out of range


def test_out_of_range_label_is_reported_with_split_index_and_label():
  labels = np.arange(8) % 3
  labels[5] = 7
  src = ArraySource(labels, 3)
  with train_loader(src, batch=8) as loader:
    with pytest.raises(ValueError, match=r"Label 7 of example 5 in split 'train' of arrays"):
      next(loader)
  ev = pipeline.EvalBatches(src, global_batch_size=4, preprocess=raw, image_size=4,
                            split="split 'test' of arrays")
  with pytest.raises(ValueError, match=r"Label 7 of example 5 in split 'test'"):
    list(ev)


# ---------------------------------------------------------------- preprocessing presets


def _normalise(x, mean, std):
  return ((np.asarray(x, np.float64) / 255.0 - mean) / std).astype(np.float32)


@pytest.mark.parametrize("name", pp.PRESETS)
def test_presets_on_a_constant_image_give_the_normalisation_constants(name):
  rgb = np.array([200, 30, 117], np.uint8)
  image = np.broadcast_to(rgb, (13, 17, 3)).copy()
  rng = np.random.default_rng(0)
  for train in (True, False):
    out = pp.get_preprocess(name, 8, train=train)(image, rng)
    if name.startswith("vit"):
      want = rgb / 127.5 - 1.0
    else:
      want = (rgb / 255.0 - MEAN) / STD
    assert out.shape == (8, 8, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(want, (8, 8, 3)), rtol=1e-5, atol=1e-6)


def _bilinear_numpy(image, size):
  """Half-pixel-centre bilinear upsampling with edge clamping, in float."""
  h, w = image.shape[:2]

  def coords(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo

  y0, y1, fy = coords(h, size)
  x0, x1, fx = coords(w, size)
  img = image.astype(np.float64)
  top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
  bot = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
  return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def test_vtab_resize_is_bilinear():
  image = np.random.default_rng(1).integers(0, 256, (5, 5, 3), dtype=np.uint8)
  out = pp.get_preprocess("vtab", 10, train=False)(image)
  want = (_bilinear_numpy(image, 10) / 255.0 - MEAN) / STD
  # PIL resizes in uint8: one grey level of rounding.
  np.testing.assert_allclose(out, want, atol=1.01 / (255 * STD.min()))


# Transcriptions of the reference transforms on PIL images (torchvision 0.2x, as VPT's
# `src/data/transforms.py` and DA-VPT's `Dataset/transforms.py` call them): Resize(int) keeps the
# aspect ratio with the longer side int(size * long / short); CenterCrop rounds its offsets;
# RandomCrop draws top then left uniformly; ToTensor + Normalize is (x / 255 - mean) / std.
def _tv_resize_shorter(pil, size, resample):
  w, h = pil.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  return pil.resize((new_w, new_h), resample)


def _tv_center_crop(pil, size):
  w, h = pil.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return pil.crop((left, top, left + size, top + size))


def _tv_rrc_params(h, w, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision `RandomResizedCrop.get_params`, written out (torch.empty().uniform_ and
  torch.randint replaced by the same draws of a numpy Generator)."""
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      i = int(rng.integers(0, h - ch + 1))
      j = int(rng.integers(0, w - cw + 1))
      return i, j, ch, cw
  if w / h < min(ratio):
    cw, ch = w, int(round(w / min(ratio)))
  elif w / h > max(ratio):
    ch, cw = h, int(round(h * max(ratio)))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def _tensor(pil):
  return _normalise(np.asarray(pil), MEAN, STD)


def test_fgvc_sizes_and_center_crop():
  train, ev = pp.get_preprocess("fgvc", 224, train=True), pp.get_preprocess("fgvc", 224,
                                                                            train=False)
  assert (train.resize_to, train.crop_size, train.random_crop, train.flip) == (256, 224, True,
                                                                               True)
  assert (ev.resize_to, ev.crop_size, ev.random_crop, ev.flip) == (256, 224, False, False)
  assert train.resize_mode == ev.resize_mode == "shorter"
  image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  out = pp.get_preprocess("fgvc", 28, train=False)(image)  # R = 32: no resize, crop at 2
  np.testing.assert_allclose(out, _normalise(image[2:30, 2:30], MEAN, STD), atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 61), (75, 33), (37, 37)])
def test_fgvc_eval_is_vpts_resize_shorter_side_then_center_crop(shape):
  """VPT: Resize(256) (shorter side, aspect kept, bilinear), CenterCrop(224); here S = 28,
  R = 32."""
  image = np.random.default_rng(5).integers(0, 256, shape + (3,), dtype=np.uint8)
  pil = PIL.Image.fromarray(image)
  want = _tensor(_tv_center_crop(_tv_resize_shorter(pil, 32, PIL.Image.BILINEAR), 28))
  np.testing.assert_allclose(pp.get_preprocess("fgvc", 28, train=False)(image), want, atol=1e-5)


def test_fgvc_train_crops_the_aspect_kept_resize():
  """VPT: Resize(256), RandomCrop(224), flip: every output is a window of the shorter-side
  resize (32 x 48 for a 40 x 60 image), never of a squashed 32 x 32."""
  image = np.random.default_rng(6).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  resized = np.asarray(_tv_resize_shorter(PIL.Image.fromarray(image), 32, PIL.Image.BILINEAR))
  assert resized.shape == (32, 48, 3)
  fn = pp.get_preprocess("fgvc", 28, train=True)
  lefts = set()
  for seed in range(30):
    out = fn(image, np.random.default_rng(seed))
    found = [(t, l) for t in range(5) for l in range(21) for f in (False, True)
             if np.allclose(out, _normalise(resized[t:t + 28, l:l + 28][:, ::-1] if f else
                                            resized[t:t + 28, l:l + 28], MEAN, STD), atol=1e-5)]
    assert found, seed
    lefts.add(found[0][1])
  assert max(lefts) > 4  # offsets beyond what a 32 x 32 resize allows


def test_finish_into_a_batch_row_is_the_crop_mirror_and_normalisation():
  """`finish(out=...)` (the cached loader writes each batch row in place): every draw equals
  numpy's own crop, `[:, ::-1]` mirror and normalisation of the prepared image; the draw is
  written into `out` and nothing else; a wrong `out` is refused."""
  fn = pp.get_preprocess("fgvc", 28, train=True)
  prepared = np.random.default_rng(9).integers(0, 256, (32, 45, 3), dtype=np.uint8)
  batch = np.full((3, 28, 28, 3), -7.0, np.float32)
  mirrored = set()
  for seed in range(16):
    got = fn.finish(prepared, np.random.default_rng(seed), out=batch[1])
    assert np.shares_memory(got, batch[1])
    rng = np.random.default_rng(seed)
    top, left = int(rng.integers(0, 32 - 28 + 1)), int(rng.integers(0, 45 - 28 + 1))
    window = prepared[top:top + 28, left:left + 28]
    mirror = rng.random() < 0.5
    mirrored.add(mirror)
    want = _normalise(window[:, ::-1] if mirror else window, MEAN, STD)
    np.testing.assert_allclose(batch[1], want, atol=1e-5)
    np.testing.assert_array_equal(fn.finish(prepared, np.random.default_rng(seed)), batch[1])
  assert mirrored == {False, True}
  assert (batch[0] == -7.0).all() and (batch[2] == -7.0).all()
  with pytest.raises(ValueError, match="C-contiguous float32 array of shape"):
    fn.finish(prepared, np.random.default_rng(0), out=np.zeros((28, 28, 3), np.float64))
  with pytest.raises(ValueError, match="C-contiguous float32 array of shape"):
    fn.finish(prepared, np.random.default_rng(0), out=np.zeros((28, 56, 3), np.float32)[:, ::2])


@pytest.mark.parametrize("shape", [(40, 61), (75, 33)])
def test_da_vpt_eval_presets_are_the_released_transforms(shape):
  """DA-VPT FGVC eval: Resize(256, bicubic) shorter side + CenterCrop(224); VTAB (train and
  eval): Resize(224, bicubic) shorter side + CenterCrop(224). Here S = 28 (R = 32)."""
  image = np.random.default_rng(7).integers(0, 256, shape + (3,), dtype=np.uint8)
  pil = PIL.Image.fromarray(image)
  fgvc_want = _tensor(_tv_center_crop(_tv_resize_shorter(pil, 32, PIL.Image.BICUBIC), 28))
  np.testing.assert_allclose(pp.get_preprocess("da_vpt_fgvc", 28, train=False)(image),
                             fgvc_want, atol=1e-5)
  vtab_want = _tensor(_tv_center_crop(_tv_resize_shorter(pil, 28, PIL.Image.BICUBIC), 28))
  for train in (True, False):
    fn = pp.get_preprocess("da_vpt_vtab", 28, train=train)
    assert not fn.needs_rng
    np.testing.assert_allclose(fn(image), vtab_want, atol=1e-5)


def test_da_vpt_fgvc_train_is_random_resized_crop_bicubic_and_flip():
  """DA-VPT FGVC train: RandomResizedCrop(224, interpolation=3 (bicubic)), flip 0.5."""
  image = np.random.default_rng(8).integers(0, 256, (45, 70, 3), dtype=np.uint8)
  pil = PIL.Image.fromarray(image)
  fn = pp.get_preprocess("da_vpt_fgvc", 28, train=True)
  flips = set()
  for seed in range(20):
    out = fn(image, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    i, j, h, w = _tv_rrc_params(45, 70, rng)
    crop = pil.crop((j, i, j + w, i + h)).resize((28, 28), PIL.Image.BICUBIC)
    flip = rng.random() < 0.5
    flips.add(flip)
    want = _tensor(crop.transpose(PIL.Image.FLIP_LEFT_RIGHT) if flip else crop)
    np.testing.assert_allclose(out, want, atol=1e-5)
  assert flips == {False, True}


@pytest.mark.parametrize("shape", [(50, 50), (30, 200), (200, 30), (13, 17), (1, 1)])
def test_random_resized_crop_box_is_torchvisions_sampler(shape):
  """Same draws -> same box as the transcribed torchvision algorithm, the fallback (very
  elongated images, where most tries fail) included; every box lies inside the image."""
  h, w = shape
  for seed in range(200):
    box = pp.random_resized_crop_box(h, w, np.random.default_rng(seed))
    assert box == _tv_rrc_params(h, w, np.random.default_rng(seed))
    top, left, bh, bw = box
    assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w and bh > 0 and bw > 0


def test_random_resized_crop_box_distribution():
  """On a square image a try is accepted iff f * max(a, 1/a) <= 1 (f ~ U(0.08, 1) the area
  fraction, log a ~ U(log 3/4, log 4/3)); the accepted box's area and aspect follow that
  conditional law, computed here by integrating over a grid."""
  n, side = 4000, 1000
  rng = np.random.default_rng(0)
  boxes = np.array([pp.random_resized_crop_box(side, side, rng) for _ in range(n)])
  top, left, bh, bw = boxes.T
  frac, log_aspect = bh * bw / side**2, np.log(bw / bh)
  r = np.log(4 / 3)
  assert frac.min() >= 0.08 - 0.01 and frac.max() <= 1.0
  assert np.abs(log_aspect).max() <= r + 0.01
  f, l = np.meshgrid(np.linspace(0.08, 1, 801), np.linspace(-r, r, 801), indexing="ij")
  accept = f * np.exp(np.abs(l)) <= 1
  for q in (0.3, 0.5, 0.8):
    expected = (accept & (f < q)).sum() / accept.sum()
    assert abs(np.mean(frac < q) - expected) < 0.03, q
  expected_wide = (accept & (l > 0.1)).sum() / accept.sum()
  assert abs(np.mean(log_aspect > 0.1) - expected_wide) < 0.03
  # Positions are uniform over the free range.
  free_top = (side - bh).clip(1)
  assert abs(np.mean(top / free_top) - 0.5) < 0.03 and abs(np.mean(left / (side - bw).clip(1))
                                                           - 0.5) < 0.03


def test_vit_aug_sizes():
  train, ev = pp.get_preprocess("vit_aug", 384, train=True), pp.get_preprocess("vit_aug", 384,
                                                                               train=False)
  assert (train.resize_to, train.crop_size, train.random_crop, train.flip) == (512, 384, True,
                                                                               True)
  assert (ev.resize_to, ev.crop_size, ev.random_crop, ev.flip) == (384, 384, False, False)


def test_gray_images_become_three_channels():
  gray = np.random.default_rng(4).integers(0, 256, (6, 6), dtype=np.uint8)
  fn = pp.get_preprocess("vit", 6, train=False)
  want = np.repeat(gray[:, :, None], 3, axis=2) / 127.5 - 1.0
  np.testing.assert_allclose(fn(gray), want, atol=1e-6)
  np.testing.assert_allclose(fn(gray[:, :, None]), want, atol=1e-6)


def test_unknown_preset_lists_the_presets():
  with pytest.raises(ValueError, match="vtab.*fgvc.*da_vpt_fgvc.*da_vpt_vtab.*vit.*vit_aug"):
    pp.get_preprocess("imagenet", 224, train=True)


# ---------------------------------------------------------------- TFDS sources


class JvtTestTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Gray images whose pixel value v = 6 * i gives the label (v // 6) % 3."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # no checksums file

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(6, 6, 1), encoding_format="png"),
        "mask": tfds.features.Image(shape=(6, 6, 1), encoding_format="png"),
        "label": tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 30), "test": self._generate_examples(30, 10)}

  def _generate_examples(self, start, n):
    for i in range(start, start + n):
      buf = io.BytesIO()
      PIL.Image.fromarray(np.full((6, 6), 6 * i, np.uint8)).save(buf, format="PNG")
      yield i, {"image": buf.getvalue(), "mask": buf.getvalue(), "label": i % 3}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  JvtTestTiny(data_dir=data_dir, file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir


def _label_of_pixel(v):
  return (np.asarray(v, int) // 6) % 3


def test_tfds_source_reads_split_arithmetic_and_tiles_gray(tiny_dir):
  src = sources.get_source({"name": "tfds:jvt_test_tiny", "data_dir": tiny_dir},
                           "train[:6]+test[:2]")
  assert len(src) == 8 and src.num_classes == 3
  for i in range(8):
    ex = src[i]
    assert ex["image"].shape == (6, 6, 3) and ex["image"].dtype == np.uint8
    assert np.all(ex["image"] == ex["image"][0, 0, 0])
    assert ex["label"] == _label_of_pixel(ex["image"][0, 0, 0])
  np.testing.assert_array_equal(src.labels(), [src[i]["label"] for i in range(8)])
  cached = sources.get_source({"name": "tfds:jvt_test_tiny", "data_dir": tiny_dir,
                               "cache": True}, "test")
  assert isinstance(cached, sources.CachedSource) and cached[3] is cached[3]


def test_loaders_through_tfds(tiny_dir):
  cfg = ml_collections.ConfigDict({"name": "tfds:jvt_test_tiny", "data_dir": tiny_dir,
                                   "label_key": "label"})
  cfg.lock()
  with pipeline.make_train_loader(cfg, "train", global_batch_size=8, image_size=8,
                                  preprocess="vit", seed=0, sampler="balanced",
                                  images_per_class=4) as loader:
    assert (loader.steps_per_epoch, loader.num_examples, loader.num_classes) == (3, 30, 3)
    for x in take(loader, 4):
      assert x["image"].shape == (8, 8, 8, 3)
      pixel = np.round((x["image"][:, 0, 0, 0] + 1) * 127.5)
      np.testing.assert_array_equal(x["label"], _label_of_pixel(pixel))
      assert sorted(np.unique(x["label"], return_counts=True)[1]) == [4, 4]
  ev = pipeline.make_eval_batches(cfg, "test", global_batch_size=4, image_size=6,
                                  preprocess="vit")
  pixels = np.concatenate([np.round((b["image"][:, 0, 0, 0] + 1) * 127.5)[b["mask"]]
                           for b in ev])
  assert sorted(pixels.astype(int)) == sorted(6 * i for i in range(30, 40))


def test_too_small_num_classes_fails_early_and_late(tiny_dir):
  cfg = {"name": "tfds:jvt_test_tiny", "data_dir": tiny_dir}
  with pytest.raises(ValueError, match=r"Label 2 of example \d+ in split 'train' of tfds:"):
    pipeline.make_train_loader(cfg, "train", global_batch_size=4, image_size=6,
                               preprocess="vit", seed=0, sampler="balanced",
                               images_per_class=2, num_classes=2)
  with pipeline.make_train_loader(cfg, "train", global_batch_size=30, image_size=6,
                                  preprocess="vit", seed=0, num_classes=2) as loader:
    with pytest.raises(ValueError, match="Label 2 of example"):
      next(loader)


def test_missing_datasets_say_where_and_how(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    sources.get_source({"name": "tfds:cifar100:3.*.*", "data_dir": str(tmp_path)}, "train")
  assert str(tmp_path) in str(e.value) and "cifar100" in str(e.value)
  assert "array_record" in str(e.value)
  with pytest.raises(FileNotFoundError, match="no_such_set.*data_dir"):
    sources.get_source({"name": "tfds:no_such_set", "data_dir": str(tmp_path)}, "train")
  with pytest.raises(FileNotFoundError) as e:
    sources.get_source({"name": "jvt_synthetic", "data_dir": str(tmp_path)}, "train")
  assert "python -m jvt.data.synthetic" in str(e.value) and str(tmp_path) in str(e.value)


def test_unknown_names_list_the_accepted_forms():
  for name in ("imagenet", "tfds:", "vtab/"):
    with pytest.raises(ValueError, match="jvt_synthetic.*tfds:.*vtab/.*fgvc/.*list:"):
      sources.get_source({"name": name, "data_dir": None}, "train")
  with pytest.raises(ValueError, match="sampler"):
    pipeline.make_train_loader({"name": "imagenet"}, "train", global_batch_size=2,
                               image_size=4, preprocess="vit", seed=0, sampler="random")


def test_list_folders_are_dispatched_to_jvt_data_lists(tmp_path):
  for i, label in enumerate([1, 0]):
    PIL.Image.fromarray(np.full((5, 7), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
  (tmp_path / "train800.txt").write_text("0.png 1\n1.png 0\n")
  src = sources.get_source({"name": f"list:{tmp_path}", "data_dir": None}, "train800")
  assert len(src) == 2 and src.num_classes == 2
  assert src[0]["image"].shape == (5, 7, 3) and [src[i]["label"] for i in range(2)] == [1, 0]
