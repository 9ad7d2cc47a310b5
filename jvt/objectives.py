"""Training objectives: what a method adds to the loss, and the state it keeps.

The trainer is the same for every method: it asks `make_objective` for the objective of the
model and config, captures the intermediates the objective names, and calls its hooks:

  * `init_state(ctx)` once before training (host side) -> method state, a dict of arrays kept
    in the train state and checkpointed (e.g. DA-VPT's class -> prompt mapping);
  * `constants(ctx)` -> arrays the loss reads but never trains or saves (e.g. a teacher);
  * `loss(logits, aux, batch, state, constants)` inside the jitted step ->
    (loss, metrics, new state);
  * `end_of_epoch(state, epoch)` on the host after each epoch -> new state.

A new method that needs its own loss adds an objective here and touches neither the trainer nor
the backbone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jvt.losses import classification

PyTree = Any


@dataclasses.dataclass
class ObjectiveContext:
  """What an objective may use to set itself up (host side, before training)."""
  model: Any
  params: PyTree  # the full (pretrained + plug-in) parameters
  config: Any
  num_classes: int
  # (images per class K) -> (images [C*K', S, S, 3] float32, labels [C*K']) from the train split
  class_examples: Callable[[int], tuple[Any, Any]]
  # jitted forward on a big host batch, in chunks: (params, images) -> (logits, aux)
  apply_fn: Callable[..., Any]
  workdir: str = ""


class CrossEntropy:
  """Softmax cross-entropy on the labels (with optional label smoothing)."""
  capture: tuple[str, ...] = ()
  capture_layers: tuple[int, ...] = ()

  def __init__(self, label_smoothing: float = 0.0):
    self.label_smoothing = label_smoothing

  def init_state(self, ctx: ObjectiveContext) -> dict:
    del ctx
    return {}

  def constants(self, ctx: ObjectiveContext) -> dict:
    del ctx
    return {}

  def classification_loss(self, logits, batch):
    return classification.softmax_cross_entropy(
        logits, batch["label"], label_smoothing=self.label_smoothing)

  def loss(self, logits, aux, batch, state, constants):
    del aux, constants
    loss = self.classification_loss(logits, batch)
    return loss, {"ce_loss": loss}, state

  def end_of_epoch(self, state: dict, epoch: int) -> dict:
    del epoch
    return state


def make_objective(model, config) -> CrossEntropy:
  """The objective of a model (from its tuning) and a config (distillation, smoothing)."""
  smoothing = float(config.get("label_smoothing", 0.0))
  distill = config.get("distill")
  if distill is not None and distill.get("enabled", False):
    from jvt.distill import DistillationObjective
    return DistillationObjective(model, config, label_smoothing=smoothing)
  if model.tuning.davpt is not None:
    from jvt.davpt.objective import DAVPTObjective
    return DAVPTObjective(model.tuning.davpt, label_smoothing=smoothing)
  return CrossEntropy(smoothing)


def global_norm(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
