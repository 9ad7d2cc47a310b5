"""Training and evaluation batches from a Source: sharded, prefetched, checkpointable.

Design: a sampler plans each epoch as dataset indices [steps, global_batch]; process i of P
keeps rows [i * B / P, (i + 1) * B / P) of every global batch, so the concatenation over
processes is the single-process batch. Examples are read and preprocessed by a thread pool
(decoding and PIL resizing release the GIL) into preallocated batch buffers, `prefetch`
batches ahead of the consumer. Augmentation randomness is keyed by (seed, epoch, position in
the epoch's stream), so any (epoch, step) is reproducible without replaying the past: the
loader state is just {epoch, step}.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import sys
import threading
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from jvt.data import preprocess as pp
from jvt.data import samplers
from jvt.data import sources

Batch = dict  # {"image": float32 [B, S, S, 3], "label": int32 [B](, "mask": bool [B])}
PreprocessArg = Union[str, Callable[[np.ndarray, Optional[np.random.Generator]], np.ndarray]]
SAMPLERS = ("shuffle", "balanced")


def _default_workers() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _resolve_preprocess(preprocess: PreprocessArg, image_size: int, train: bool):
  if isinstance(preprocess, str):
    return pp.get_preprocess(preprocess, image_size, train=train)
  if callable(preprocess):
    return preprocess
  raise ValueError(f"preprocess must be a preset name {list(pp.PRESETS)} or a callable "
                   f"(image, rng) -> float32 [S, S, 3], got {preprocess!r}.")


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Need 0 <= process_index ({process_index}) < process_count "
                     f"({process_count}).")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                     f"process_count ({process_count}).")
  return global_batch_size // process_count


def _label_error(label: int, index: int, where: str, num_classes: int) -> ValueError:
  return ValueError(f"Label {label} of example {index} in {where} is outside "
                    f"[0, {num_classes}): check the label feature / num_classes.")


class PreparedCache:
  """Every example's deterministic preprocessing output, kept after its first read.

  Holds each example's `Preprocessor.prepare` result (decoded, RGB, resized: uint8
  [R, R', 3], R' = R unless the resize keeps the aspect ratio) and its checked label, filled as
  examples are first read; later epochs only crop, flip and normalise (`Preprocessor.finish`),
  with the same per-row randomness, so the batches are exactly those of the uncached loader.
  VTAB-1k's 1,000 training images at 224 px take 144 MB. An index is filled once, by the first
  thread that reads it (a striped lock keeps a prefetching thread from reading it again);
  `filled` is set after the image.
  """
  _STRIPES = 64

  def __init__(self, num_examples: int):
    self.images: list = [None] * num_examples
    self.labels = np.zeros((num_examples,), np.int64)
    self.filled = np.zeros((num_examples,), bool)
    self._locks = [threading.Lock() for _ in range(self._STRIPES)]

  def lock(self, index: int) -> threading.Lock:
    """The lock that guards filling example `index`."""
    return self._locks[index % self._STRIPES]

  @property
  def nbytes(self) -> int:
    return sum(im.nbytes for im in self.images if im is not None)


def cacheable(preprocess: Any) -> bool:
  """Whether `preprocess` splits into a costly deterministic `prepare` and a per-draw
  `finish` (a preset Preprocessor without a random-resized crop)."""
  return isinstance(preprocess, pp.Preprocessor) and preprocess.cacheable


@dataclasses.dataclass
class _Reader:
  """Reads one example, checks its label, preprocesses it into a batch buffer row.

  With a `cache`, an example is read and prepared once; each draw then runs only
  `preprocess.finish` on the cached uint8 image.
  """
  source: Any
  preprocess: Callable
  image_size: int
  num_classes: int
  where: str  # e.g. "split 'train' of jvt_synthetic", for error messages
  cache: Optional[PreparedCache] = None

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    example = self.source[index]
    label = int(example["label"])
    if not 0 <= label < self.num_classes:
      raise _label_error(label, index, self.where, self.num_classes)
    return example["image"], label

  def load(self, images: np.ndarray, labels: np.ndarray, row: int, index: int,
           rng_key: Optional[list]) -> None:
    rng = None if rng_key is None else np.random.default_rng(rng_key)
    c, s = self.cache, self.image_size
    if c is None:
      raw, label = self._read(index)
      image = self.preprocess(raw, rng)
      if image.shape != (s, s, 3):
        raise ValueError(f"Preprocessing example {index} of {self.where} gave shape "
                         f"{image.shape}, expected {(s, s, 3)}.")
      images[row] = image
    else:  # the loader checked once that the preprocess's crop is image_size
      if not c.filled[index]:
        with c.lock(index):
          if not c.filled[index]:
            raw, c.labels[index] = self._read(index)
            c.images[index] = self.preprocess.prepare(raw)  # [R, R', 3] uint8
            c.filled[index] = True
      label = int(c.labels[index])
      self.preprocess.finish(c.images[index], rng, out=images[row])  # straight into the row
    labels[row] = label


@dataclasses.dataclass
class _Pending:
  """A batch being filled by the thread pool."""
  images: np.ndarray  # [B, S, S, 3] float32
  labels: np.ndarray  # [B] int32
  mask: np.ndarray  # [B] bool
  futures: list

  def result(self) -> Batch:
    for f in self.futures:
      f.result()  # re-raises a worker's error here, in the consumer
    return {"image": self.images, "label": self.labels}

  def cancel(self) -> None:
    for f in self.futures:
      f.cancel()


# Rows a pool task loads, one after the other. A task per row cost more in the pool's
# hand-offs than a cached row's crop, flip and normalise (docs/performance.md, "The loader on
# the Zen 3"); 8 rows still split a batch of 64 over 8 tasks.
ROWS_PER_TASK = 8


def _load_rows(reader: _Reader, images: np.ndarray, labels: np.ndarray,
               rows: list[tuple[int, int, Optional[list]]]) -> None:
  for row, index, key in rows:
    reader.load(images, labels, row, index, key)


class _BatchBuffers:
  """Batch arrays handed out again once nothing outside this object references them.

  A fresh [B, S, S, 3] float32 batch is tens of MB (38.5 MB for 64 images of 224 px): glibc maps
  it afresh and every page faults on its first write (reused, the cached loader ran 1.05-1.30x
  faster on a 2-core Zen 3; docs/performance.md, "The loader on the Zen 3"). A kept pair (images,
  labels) is reused only when both reference counts are back to what they were when this object
  alone held them: a consumer holding the batch or a view of it, a JAX array aliasing it, or a
  pool task still writing it keeps it out. At most `keep` pairs are tracked; past that the
  oldest is dropped (left to its holders, if any).
  """

  def __init__(self, keep: int):
    self._keep = keep
    self._kept: list[list] = []  # [images, labels, (their reference counts when unreferenced)]

  @staticmethod
  def _refs(entry: list) -> tuple[int, int]:
    return sys.getrefcount(entry[0]), sys.getrefcount(entry[1])

  def take(self, b: int, s: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [b, s, s, 3], labels int32 [b]), zero where `mask` ([b] bool) is False."""
    for entry in self._kept:
      if entry[0].shape == (b, s, s, 3) and self._refs(entry) == entry[2]:
        if not mask.all():  # padding rows: the loads write only the rows in the mask
          entry[0][~mask] = 0
          entry[1][~mask] = 0
        return entry[0], entry[1]
    # The arrays are made inside the entry, so no local name adds to the counts measured here.
    entry = [np.zeros((b, s, s, 3), np.float32), np.zeros((b,), np.int32), None]
    self._kept.append(entry)
    entry[2] = self._refs(entry)
    if len(self._kept) > self._keep:
      self._kept.pop(0)
    return entry[0], entry[1]


def _submit(pool: concurrent.futures.Executor, reader: _Reader, indices: np.ndarray,
            rng_keys: Optional[list], buffers: _BatchBuffers) -> _Pending:
  """Starts loading `indices` ([B], -1 = padding row) with per-row rng keys (or None)."""
  b, s = len(indices), reader.image_size
  mask = indices >= 0
  images, labels = buffers.take(b, s, mask)
  pending = _Pending(images=images, labels=labels, mask=mask, futures=[])
  rows = [(row, int(index), None if rng_keys is None else rng_keys[row])
          for row, index in enumerate(indices) if index >= 0]
  for start in range(0, len(rows), ROWS_PER_TASK):
    pending.futures.append(pool.submit(_load_rows, reader, pending.images, pending.labels,
                                       rows[start:start + ROWS_PER_TASK]))
  return pending


class TrainLoader:
  """Infinite iterator of this process's shard of the training batches, epoch after epoch.

  `sampler` (jvt.data.samplers) plans the epochs and carries the seed, which also keys the
  augmentation of each row by (seed, epoch, position in the epoch).

  Yields {"image": float32 [local_batch, S, S, 3], "label": int32 [local_batch]}.
  With `cache=True` (a preset preprocess only) each example is decoded and resized once and
  kept as uint8 (`PreparedCache`, attribute `cache`); every draw still crops, flips and
  normalises afresh, so the batches equal the uncached loader's.

  Attributes: steps_per_epoch, num_examples, num_classes, global_batch_size,
  local_batch_size, cache. `get_state()` / `set_state()` save and restore the position (JSON).
  Call `close()` (or use it as a context manager) to stop its threads.
  """

  def __init__(self, source: Any, *, sampler: Any, preprocess: PreprocessArg, image_size: int,
               split: str = "train", num_classes: Optional[int] = None,
               process_index: int = 0, process_count: int = 1, prefetch: int = 2,
               num_workers: Optional[int] = None, cache: bool = False):
    self.global_batch_size = sampler.global_batch_size
    self.local_batch_size = _local_batch_size(self.global_batch_size, process_index,
                                              process_count)
    self.num_examples = len(source)
    self.num_classes = int(source.num_classes if num_classes is None else num_classes)
    self.steps_per_epoch = sampler.steps_per_epoch
    if self.steps_per_epoch < 1:
      raise ValueError(f"{split} has {self.num_examples} examples, fewer than one global batch "
                       f"of {self.global_batch_size}.")
    if prefetch < 0:
      raise ValueError(f"prefetch must be >= 0, got {prefetch}.")
    fn = _resolve_preprocess(preprocess, image_size, train=True)
    self._needs_rng = getattr(fn, "needs_rng", True)
    if cache and not cacheable(fn):
      raise ValueError("cache=True needs a preset preprocess whose deterministic part resizes "
                       f"(a jvt.data.preprocess.Preprocessor without random-resized crop), got "
                       f"{fn!r}; cache the decoded source instead (dataset.cache with such a "
                       "preprocess does: sources.CachedSource).")
    if cache and fn.crop_size != image_size:
      raise ValueError(f"cache=True: the preprocess crops {fn.crop_size} px but image_size is "
                       f"{image_size}; give the Preprocessor crop_size={image_size} (or a preset "
                       "name, which uses image_size).")
    self.cache = PreparedCache(self.num_examples) if cache else None
    self._reader = _Reader(source, fn, int(image_size), self.num_classes, split, self.cache)
    self._sampler = sampler
    self._seed = sampler.seed
    self._row0 = process_index * self.local_batch_size
    self._prefetch = int(prefetch)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        num_workers or _default_workers(), thread_name_prefix="jvt-train-data")
    self._epoch, self._step = 0, 0
    self._pending: collections.deque = collections.deque()  # batches from (epoch, step) on
    # In flight: prefetch + 1; one with the consumer; one a cancelled task may still write.
    self._buffers = _BatchBuffers(keep=self._prefetch + 3)
    self._plans: dict = {}  # epoch -> indices [steps, global_batch]

  def _plan(self, epoch: int) -> np.ndarray:
    if epoch not in self._plans:
      self._plans = {e: p for e, p in self._plans.items() if e >= self._epoch}
      self._plans[epoch] = self._sampler.epoch_indices(epoch)
    return self._plans[epoch]

  def _advance(self, epoch: int, step: int) -> tuple[int, int]:
    return (epoch + 1, 0) if step + 1 == self.steps_per_epoch else (epoch, step + 1)

  def _submit(self, epoch: int, step: int) -> _Pending:
    rows = slice(self._row0, self._row0 + self.local_batch_size)
    indices = self._plan(epoch)[step, rows]  # [local_batch]
    keys = None
    if self._needs_rng:
      first = step * self.global_batch_size + self._row0  # position in the epoch's stream
      keys = [[self._seed, samplers.AUGMENT_STREAM, epoch, first + r]
              for r in range(self.local_batch_size)]
    return _submit(self._pool, self._reader, indices, keys, self._buffers)

  def _fill(self) -> None:
    epoch, step = self._epoch, self._step
    for _ in range(len(self._pending)):
      epoch, step = self._advance(epoch, step)
    while len(self._pending) < self._prefetch + 1:
      self._pending.append(self._submit(epoch, step))
      epoch, step = self._advance(epoch, step)

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    self._fill()
    batch = self._pending[0].result()
    self._pending.popleft()
    self._epoch, self._step = self._advance(self._epoch, self._step)
    self._fill()
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable position of the next batch, plus what must match on restore."""
    return {"epoch": self._epoch, "step": self._step, "seed": self._seed,
            "global_batch_size": self.global_batch_size, "num_examples": self.num_examples,
            "sampler": self._sampler.description}

  def set_state(self, state: dict) -> None:
    """Continues from `state` (from get_state), yielding what an uninterrupted run would."""
    expected = self.get_state()
    for key in ("seed", "global_batch_size", "num_examples", "sampler"):
      if state.get(key) != expected[key]:
        raise ValueError(f"Loader state has {key}={state.get(key)!r} but this loader has "
                         f"{expected[key]!r}: the restored batches would differ.")
    epoch, step = int(state["epoch"]), int(state["step"])
    if epoch < 0 or not 0 <= step < self.steps_per_epoch:
      raise ValueError(f"Bad loader state epoch={epoch}, step={step} "
                       f"(steps_per_epoch={self.steps_per_epoch}).")
    for p in self._pending:
      p.cancel()
    self._pending.clear()
    self._epoch, self._step = epoch, step

  def close(self) -> None:
    for p in self._pending:
      p.cancel()
    self._pending.clear()
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self) -> "TrainLoader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class EvalBatches:
  """Every example of a split exactly once, in order, in padded batches.

  Iterating yields {"image": float32 [local_batch, S, S, 3], "label": int32 [local_batch],
  "mask": bool [local_batch]}; padding rows (after the last example) have mask False, a zero
  image and label 0. Every process yields `len(self)` = ceil(N / global_batch) batches.
  Can be iterated any number of times.
  """

  def __init__(self, source: Any, *, global_batch_size: int, preprocess: PreprocessArg,
               image_size: int, split: str = "eval", num_classes: Optional[int] = None,
               process_index: int = 0, process_count: int = 1, prefetch: int = 2,
               num_workers: Optional[int] = None):
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = _local_batch_size(self.global_batch_size, process_index,
                                              process_count)
    self.num_examples = len(source)
    if self.num_examples < 1:
      raise ValueError(f"{split} is empty.")
    self.num_classes = int(source.num_classes if num_classes is None else num_classes)
    if prefetch < 0:
      raise ValueError(f"prefetch must be >= 0, got {prefetch}.")
    fn = _resolve_preprocess(preprocess, image_size, train=False)
    self._reader = _Reader(source, fn, int(image_size), self.num_classes, split)
    self._row0 = process_index * self.local_batch_size
    self._prefetch = int(prefetch)
    self._num_workers = num_workers or _default_workers()

  def __len__(self) -> int:
    return -(-self.num_examples // self.global_batch_size)

  def _indices(self, b: int) -> np.ndarray:
    start = b * self.global_batch_size + self._row0
    positions = np.arange(start, start + self.local_batch_size)  # [local_batch]
    return np.where(positions < self.num_examples, positions, -1)

  def __iter__(self) -> Iterator[Batch]:
    pool = concurrent.futures.ThreadPoolExecutor(self._num_workers,
                                                 thread_name_prefix="jvt-eval-data")
    pending: collections.deque = collections.deque()
    buffers = _BatchBuffers(keep=self._prefetch + 2)  # in flight: prefetch + 1; one yielded
    try:
      submitted = 0
      for _ in range(len(self)):
        while submitted < len(self) and len(pending) < self._prefetch + 1:
          pending.append(_submit(pool, self._reader, self._indices(submitted), None, buffers))
          submitted += 1
        head = pending.popleft()
        yield {**head.result(), "mask": head.mask}
    finally:
      for p in pending:
        p.cancel()
      pool.shutdown(wait=True, cancel_futures=True)


def _checked_labels(source: Any, where: str, num_classes: int,
                    pool: concurrent.futures.Executor) -> np.ndarray:
  """All labels of `source`, int64 [N] (fast path: `sources.known_labels`), range-checked."""
  labels = sources.known_labels(source)
  if labels is None:
    labels = np.asarray(list(pool.map(lambda i: int(source[i]["label"]), range(len(source)))),
                        np.int64)
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise _label_error(int(labels[bad[0]]), int(bad[0]), where, num_classes)
  return labels


def _where(ds_cfg: Any, split: str) -> str:
  return f"split {split!r} of {ds_cfg.get('name')}"


def make_train_loader(ds_cfg: Any, split: str, *, global_batch_size: int, image_size: int,
                      preprocess: PreprocessArg, seed: int, process_index: int = 0,
                      process_count: int = 1, sampler: str = "shuffle",
                      images_per_class: int = 2, num_classes: Optional[int] = None,
                      prefetch: int = 2, num_workers: Optional[int] = None,
                      cache: Optional[bool] = None) -> TrainLoader:
  """The training loader of `split` of dataset `ds_cfg` (see `sources.get_source`).

  Args:
    ds_cfg: dataset config (name, data_dir, ...).
    split: split to train on.
    global_batch_size: batch over all processes; each yields global_batch_size //
      process_count rows (rows [i * local, (i + 1) * local) of the global batch).
    image_size: output side S.
    preprocess: preset name (`jvt.data.preprocess.PRESETS`, training variant) or a callable
      (uint8 image [H, W, 3], np.random.Generator) -> float32 [S, S, 3].
    seed: seeds shuffling (per epoch) and augmentation (per epoch and position).
    process_index, process_count: this process and the number of processes.
    sampler: "shuffle" (a permutation per epoch) or "balanced" (C classes x images_per_class).
    images_per_class: K for the balanced sampler.
    num_classes: labels must lie in [0, num_classes); default: the source's num_classes.
    prefetch: batches prepared ahead of the consumer.
    num_workers: reading/preprocessing threads (default: the usable CPU cores).
    cache: keep each example decoded and resized in memory (see TrainLoader); default
      `ds_cfg.cache`. With a preset preprocess the loader caches the resized uint8 image
      instead of the source's decoded example (`sources.CachedSource`), which is unwrapped.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}.")
  source = sources.get_source(ds_cfg, split)
  if cache is None:
    cache = bool(ds_cfg.get("cache") or False)
  cache = cache and cacheable(_resolve_preprocess(preprocess, image_size, train=True))
  if cache and isinstance(source, sources.CachedSource):
    source = source.source  # the loader keeps the smaller, resized copy instead
  where = _where(ds_cfg, split)
  n_classes = int(source.num_classes if num_classes is None else num_classes)
  if sampler == "shuffle":
    plan = samplers.ShuffleSampler(len(source), global_batch_size, seed)
  else:
    with concurrent.futures.ThreadPoolExecutor(num_workers or _default_workers()) as pool:
      labels = _checked_labels(source, where, n_classes, pool)
    plan = samplers.BalancedSampler(labels, global_batch_size, images_per_class, seed)
  return TrainLoader(source, sampler=plan, preprocess=preprocess, image_size=image_size,
                     split=where, num_classes=n_classes,
                     process_index=process_index, process_count=process_count,
                     prefetch=prefetch, num_workers=num_workers, cache=cache)


def make_eval_batches(ds_cfg: Any, split: str, *, global_batch_size: int, image_size: int,
                      preprocess: PreprocessArg, process_index: int = 0,
                      process_count: int = 1, num_classes: Optional[int] = None,
                      prefetch: int = 2, num_workers: Optional[int] = None) -> EvalBatches:
  """Padded evaluation batches of `split` (see EvalBatches); preset in its eval variant."""
  source = sources.get_source(ds_cfg, split)
  return EvalBatches(source, global_batch_size=global_batch_size, preprocess=preprocess,
                     image_size=image_size, split=_where(ds_cfg, split),
                     num_classes=num_classes, process_index=process_index,
                     process_count=process_count, prefetch=prefetch, num_workers=num_workers)
