"""Training objectives: the task loss plus every active method's loss term.

    loss = task loss (cross-entropy, or distillation's blend when config.distill.enabled)
           + sum over the model's methods of `method.loss_term()`'s loss

The trainer is the same for every method: it asks `make_objective` for the objective of the
model and config, captures the intermediates the task and the terms name, and calls:

  * `init_state(ctx)` once before training (host side) -> {method name: term state}, kept in
    the train state and checkpointed (e.g. DA-VPT's class -> prompt mapping under "da_vpt");
  * `constants(ctx)` -> arrays the task loss reads but never trains or saves (a teacher);
  * `records()` -> JSON files the trainer writes into the workdir once the run has started
    (distillation's `teacher.json`);
  * `loss(logits, aux, batch, state, constants)` inside the jitted step ->
    (loss, metrics, new state); metrics hold the task's and every term's entries;
  * `end_of_epoch(state, epoch)` on the host after each epoch -> new state.

Loss terms and task losses are defined by the methods (`jvt.methods.terms`); a new method adds
its term in its own module and touches neither this file nor the trainer.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jvt.methods import terms
from jvt.methods.distill.objective import DistillationObjective
from jvt.methods.terms import LossTerm, ObjectiveContext, chunked_apply

PyTree = Any
__all__ = ["Objective", "ObjectiveContext", "CrossEntropy", "LossTerm", "make_objective",
           "global_norm", "chunked_apply"]


class Objective:
  """A task loss plus named loss terms; state {name: term state}."""

  def __init__(self, task, terms: dict[str, LossTerm]):
    self.task = task
    self.terms = dict(terms)
    capture, layers = list(task.capture), set(task.capture_layers)
    for term in self.terms.values():
      capture.extend(term.capture)
      layers.update(term.capture_layers)
    self.capture = tuple(dict.fromkeys(capture))
    self.capture_layers = tuple(sorted(layers))

  def init_state(self, ctx: ObjectiveContext) -> dict:
    return {name: term.init_state(ctx) for name, term in self.terms.items()}

  def constants(self, ctx: ObjectiveContext) -> dict:
    return self.task.constants(ctx)

  def records(self) -> dict[str, dict]:
    """{file name: JSON object} to write into the workdir after the run has started (never
    during set-up: a run that fails before it starts leaves its workdir untouched)."""
    return self.task.records()

  def loss(self, logits, aux, batch, state, constants):
    total, metrics = self.task.loss(logits, aux, batch, constants)
    metrics, state = dict(metrics), dict(state)
    owner = {k: "the task loss" for k in metrics}
    for name, term in self.terms.items():
      value, term_metrics, state[name] = term.loss(logits, aux, batch, state[name])
      clash = sorted(set(term_metrics) & set(metrics))
      if clash:
        raise ValueError(f"methods {owner[clash[0]]!r} and {name!r} cannot train together: "
                         f"both report the metric(s) {clash}.")
      total = total + value
      metrics.update(term_metrics)
      owner.update(dict.fromkeys(term_metrics, name))
    return total, metrics, state

  def end_of_epoch(self, state: dict, epoch: int) -> dict:
    return {name: term.end_of_epoch(state[name], epoch) for name, term in self.terms.items()}

  def legacy_state(self, state: dict) -> dict | None:
    """The method-state layout of runs saved before loss terms were named: the one stateful
    term's state at the top (DA-VPT's `mapping`, ...), or None when no such layout existed."""
    stateful = [name for name, value in state.items() if value]
    if len(stateful) != 1 or len(state) != 1:
      return None
    return state[stateful[0]]

  def from_legacy_state(self, legacy: dict) -> dict:
    """Inverse of `legacy_state`."""
    (name,) = self.terms
    return {name: legacy}


class CrossEntropy(Objective):
  """The objective of plain cross-entropy: no loss term (the task loss alone)."""

  def __init__(self, label_smoothing: float = 0.0):
    super().__init__(terms.CrossEntropy(label_smoothing), {})


def make_objective(model, config) -> Objective:
  """The objective of a model (its methods' loss terms) and a config (distillation,
  label smoothing)."""
  smoothing = float(config.get("label_smoothing", 0.0))
  distill = config.get("distill")
  if distill is not None and distill.get("enabled", False):
    task = DistillationObjective(model, config, label_smoothing=smoothing)
  else:
    task = terms.CrossEntropy(smoothing)
  by_method = {}
  for m in model.methods:
    term = m.loss_term()
    if term is None:
      continue
    if m.name in by_method:
      raise ValueError(f"two methods named {m.name!r} add a loss term: their states would share "
                       "one name in the train state. Give one of them another name.")
    by_method[m.name] = term
  return Objective(task, by_method)


def global_norm(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
