"""An identity whose cotangent is computed once and stored: keeps backward chains unfused.

In the backward pass the residual stream's cotangent is a chain of element-wise adds (each
block adds its branches' input gradients and its layer norms' terms). XLA:CPU (jax 0.10)
fuses that chain into the transposes that feed the weight-gradient products, so each of them
recomputes the cotangent from the last block down to its own: O(L^2) work in a few huge loop
fusions (23% of a ViT-S/16 full fine-tuning step, a third of a sequential adapter's,
docs/performance.md). `materialize_cotangent(x)` is `x` in the forward pass; in the backward
pass it puts the cotangent behind an optimisation barrier, so the chain is computed once per
residual add and read from memory by every consumer. Values and gradients are unchanged.
FacT puts its MLP pre-activation behind one too (`jvt.methods.fact`: a step 1.15-1.31x faster).

XLA:CPU expands optimisation barriers before fusion unless its `cse_barrier_expander` pass is
disabled, which the trainer does for its CPU train step (`jvt.train.step_compiler_options`);
elsewhere the barrier is dropped and the step is as without it. Only on CPU, where it was
found and measured; GPU and TPU compile the chain with their own fusion heuristics, unmeasured.
"""
from __future__ import annotations

import jax


@jax.custom_vjp
def _barrier_cotangent(x):
  return x


def _fwd(x):
  return x, None


def _bwd(_, g):
  return (jax.lax.optimization_barrier(g),)


_barrier_cotangent.defvjp(_fwd, _bwd)


def materialize_cotangent(x):
  """x, unchanged; on CPU its cotangent is materialised once (see the module docstring)."""
  if jax.default_backend() != "cpu":
    return x
  return _barrier_cotangent(x)
