"""Index samplers: which examples make up each global batch of an epoch.

A sampler is a pure function of (seed, epoch): `epoch_indices(epoch)` returns the dataset
indices of every global batch of that epoch, int64 [steps_per_epoch, global_batch_size]. No
state is carried between epochs, so a loader resumes at any (epoch, step) by recomputing that
epoch's plan.
"""

from __future__ import annotations

import numpy as np

# SeedSequence stream tags, so sampling and augmentation never share random numbers.
SAMPLER_STREAM = 0
AUGMENT_STREAM = 1


def _check_seed(seed: int) -> int:
  if int(seed) < 0:
    raise ValueError(f"seed must be >= 0, got {seed}.")
  return int(seed)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
  """The generator that plans epoch `epoch` of a run seeded with `seed`."""
  return np.random.default_rng([seed, SAMPLER_STREAM, epoch])


class ShuffleSampler:
  """A fresh permutation per epoch; the last partial batch is dropped."""

  def __init__(self, num_examples: int, global_batch_size: int, seed: int):
    if global_batch_size < 1:
      raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
    self.num_examples = int(num_examples)
    self.global_batch_size = int(global_batch_size)
    self.seed = _check_seed(seed)
    self.steps_per_epoch = self.num_examples // self.global_batch_size

  @property
  def description(self) -> str:
    return "shuffle"

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """Indices of epoch `epoch`, int64 [steps_per_epoch, global_batch_size]."""
    order = epoch_rng(self.seed, epoch).permutation(self.num_examples)  # [N]
    used = self.steps_per_epoch * self.global_batch_size
    return order[:used].reshape(self.steps_per_epoch, self.global_batch_size).astype(np.int64)


class BalancedSampler:
  """Class-balanced batches: C = global_batch_size // images_per_class classes x K images.

  Each batch picks C distinct classes uniformly at random and K images of each class. Images
  of a class are drawn without replacement from a per-class shuffled queue that is refilled
  with a new shuffle when it runs out; a class with fewer than K images repeats images within
  a batch. An epoch has floor(N / global_batch_size) batches, like the shuffle sampler. Rows
  of a batch are grouped by class: [c0 x K, c1 x K, ...].
  """

  def __init__(self, labels: np.ndarray, global_batch_size: int, images_per_class: int,
               seed: int):
    labels = np.asarray(labels, np.int64)  # [N]
    if images_per_class < 1 or global_batch_size % images_per_class:
      raise ValueError(f"global_batch_size ({global_batch_size}) must be a positive multiple "
                       f"of images_per_class ({images_per_class}).")
    self.classes = np.unique(labels)  # [num present classes]
    self.classes_per_batch = global_batch_size // images_per_class
    if self.classes_per_batch > len(self.classes):
      raise ValueError(f"A balanced batch needs {self.classes_per_batch} classes "
                       f"({global_batch_size} // {images_per_class}) but the split has only "
                       f"{len(self.classes)}: lower global_batch_size or raise images_per_class.")
    self.num_examples = len(labels)
    self.global_batch_size = int(global_batch_size)
    self.images_per_class = int(images_per_class)
    self.seed = _check_seed(seed)
    self.steps_per_epoch = self.num_examples // self.global_batch_size
    self._members = [np.flatnonzero(labels == c) for c in self.classes]

  @property
  def description(self) -> str:
    return f"balanced(images_per_class={self.images_per_class})"

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """Indices of epoch `epoch`, int64 [steps_per_epoch, global_batch_size]."""
    rng = epoch_rng(self.seed, epoch)
    k = self.images_per_class
    queues = [rng.permutation(m) for m in self._members]
    heads = [0] * len(queues)
    plan = np.empty((self.steps_per_epoch, self.classes_per_batch, k), np.int64)
    for step in range(self.steps_per_epoch):
      chosen = rng.choice(len(self.classes), self.classes_per_batch, replace=False)
      for slot, c in enumerate(chosen):
        taken = 0
        while taken < k:
          if heads[c] == len(queues[c]):
            queues[c] = rng.permutation(self._members[c])
            heads[c] = 0
          n = min(k - taken, len(queues[c]) - heads[c])
          plan[step, slot, taken:taken + n] = queues[c][heads[c]:heads[c] + n]
          heads[c] += n
          taken += n
    return plan.reshape(self.steps_per_epoch, self.global_batch_size)
