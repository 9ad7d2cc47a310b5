"""Loss terms and task losses: how a method adds to the training loss and what state it keeps.

The training loss is a task loss (`CrossEntropy`, or distillation's blend) plus the loss term
of every active method (`Method.loss_term()`); `jvt.train.objectives` composes them. A term:

  * `capture`, `capture_layers`: the intermediates it reads from `aux["blocks"][layer]`;
  * `init_state(ctx) -> dict` once before training (host side): its state, kept in the train
    state under the method's name (checkpointed, replicated over devices);
  * `loss(logits, aux, batch, state) -> (loss, metrics, state)` inside the jitted step;
    `loss` is added to the total as is (weight it inside), `metrics` are logged as train/<key>;
  * `end_of_epoch(state, epoch) -> state` on the host after each (1-based) epoch.

A task loss has the same methods, plus `constants(ctx)` (arrays it reads but never trains or
saves, e.g. a teacher's parameters) and a `constants` argument to `loss`; it keeps no state.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from jvt.losses import classification

PyTree = Any


@dataclasses.dataclass
class ObjectiveContext:
  """What a loss term may use to set itself up (host side, before training)."""
  model: Any
  params: PyTree  # the full (pretrained + plug-in) parameters
  config: Any
  num_classes: int
  # (images per class K) -> (images [C*K', S, S, 3] float32, labels [C*K']) from the train
  # split; None when the caller has none (a term that needs them says so)
  class_examples: Callable[[int], tuple[Any, Any]] | None
  # (model, params, images [N, S, S, 3]) -> host (logits, aux) of a deterministic forward,
  # jitted once per model and run in fixed-size chunks (see `chunked_apply`)
  apply_fn: Callable[..., Any] = None

  def __post_init__(self):
    if self.apply_fn is None:
      self.apply_fn = chunked_apply


class LossTerm:
  """Base of a method's loss term: no captures, no state, zero loss."""
  capture: tuple[str, ...] = ()
  capture_layers: tuple[int, ...] = ()

  def init_state(self, ctx: ObjectiveContext) -> dict:
    del ctx
    return {}

  def loss(self, logits, aux, batch, state):
    del logits, aux, batch
    return 0.0, {}, state

  def end_of_epoch(self, state: dict, epoch: int) -> dict:
    del epoch
    return state


class CrossEntropy:
  """The task loss of classification: softmax cross-entropy (optional label smoothing)."""
  capture: tuple[str, ...] = ()
  capture_layers: tuple[int, ...] = ()

  def __init__(self, label_smoothing: float = 0.0):
    self.label_smoothing = label_smoothing

  def constants(self, ctx: ObjectiveContext) -> dict:
    del ctx
    return {}

  def records(self) -> dict[str, dict]:
    """{file name: JSON object} the run writes into its workdir once it has started."""
    return {}

  def classification_loss(self, logits, batch):
    return classification.softmax_cross_entropy(
        logits, batch["label"], label_smoothing=self.label_smoothing)

  def loss(self, logits, aux, batch, constants):
    del aux, constants
    loss = self.classification_loss(logits, batch)
    return loss, {"ce_loss": loss}


@functools.lru_cache(maxsize=16)
def _jitted_apply(model):
  return jax.jit(lambda params, images: model.apply({"params": params}, images, train=False))


def chunked_apply(model, params, images, chunk: int = 64):
  """Host (logits [N, C], aux) of `model` over a large host batch, `chunk` images at a time
  (the last chunk zero-padded, so one compilation per model). Leaves of aux without a leading
  batch axis come from the first chunk."""
  fwd = _jitted_apply(model)
  outs = []
  for i in range(0, len(images), chunk):
    part = np.asarray(images[i:i + chunk])
    pad = chunk - len(part)
    if pad:
      part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
    out = jax.device_get(fwd(params, part))
    outs.append(jax.tree.map(lambda x: np.asarray(x)[:chunk - pad] if np.ndim(x) and
                             np.shape(x)[0] == chunk else np.asarray(x), out))
  return jax.tree.map(lambda *xs: np.concatenate(xs) if np.ndim(xs[0]) else xs[0], *outs)
