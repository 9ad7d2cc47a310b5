"""jvt.barrier: an identity for values and gradients that keeps XLA:CPU's backward
fusions from recomputing the residual stream's cotangent chain in every block."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jvt
from jvt.barrier import materialize_cotangent
from jvt.train import loop as train
from jvt.train import objectives


def test_values_and_gradients_are_the_identitys():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
  w = rng.standard_normal((5, 5))

  def f(x):  # a chain whose cotangent passes the barrier twice
    h = materialize_cotangent(jnp.tanh(x) @ w)
    return jnp.sum(materialize_cotangent(h + x) ** 2)

  val, grad = jax.jit(jax.value_and_grad(f), compiler_options=train.step_compiler_options())(x)
  # float64 reference: f = sum((tanh(x) w + x)^2), df/dx = 2 r w^T (1 - tanh^2 x) + 2 r.
  x64 = np.asarray(x, np.float64)
  r = np.tanh(x64) @ w + x64
  np.testing.assert_allclose(val, np.sum(r ** 2), rtol=1e-5)
  np.testing.assert_allclose(grad, 2 * (r @ w.T) * (1 - np.tanh(x64) ** 2) + 2 * r, rtol=1e-5)


def _compiled_step_hlo(tuning: dict, num_layers: int, mlp_dim: int = 64) -> str:
  """The optimised HLO of the trainer's CPU train step for a tiny ViT with `tuning`."""
  model = jvt.build_model("S/16", 5, tuning, hidden_size=32, mlp_dim=mlp_dim, num_heads=2,
                          num_layers=num_layers, patch_size=8)
  params = jvt.init_params(model, jax.random.key(0), image_size=32)
  tx = optax.sgd(0.1)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), trainable=params,
                           opt_state=tx.init(params), method_state={})
  batch = {"image": jnp.zeros((4, 32, 32, 3)), "label": jnp.zeros((4,), jnp.int32)}
  step = train.make_train_step(model, tx, objectives.CrossEntropy())
  return step.lower(state, {}, {}, batch).compile().as_text()


def _widest_backward_fusion(num_layers: int, method: str) -> int:
  """Operands of the widest fusion inside the encoder blocks of the compiled CPU train step."""
  hlo = _compiled_step_hlo(dict(method=method), num_layers)
  entry = hlo[hlo.index("\nENTRY"):]
  return max(m.group(1).count("%")
             for m in re.finditer(r" fusion\((.*?)\), kind=\w+.*encoderblock", entry))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU fusion pathology")
@pytest.mark.parametrize("method", ["full", "adapter"])
def test_backward_fusions_do_not_grow_with_depth(method):
  # Without the barriers XLA:CPU fused the cotangent chain of every block above into each
  # block's weight-gradient transposes: the widest fusion took 37 operands at 2 blocks and
  # 148 at 8 (full fine-tuning), and the step's time grew as the square of the depth.
  assert _widest_backward_fusion(8, method) == _widest_backward_fusion(2, method)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU fusion pathology")
def test_fact_materialises_the_mlp_pre_activation_cotangent():
  # FacT's MLP path takes V's gradient through a transposed copy of the pre-activation's
  # cotangent; without the barrier that copy took 29 ms a block (ViT-S/16 batch 8) and the
  # step ran 15-31% slower with 23% more scratch. The barrier must reach the compiled step,
  # once in every block.
  hlo = _compiled_step_hlo(dict(method="fact", rank=4), num_layers=3, mlp_dim=128)
  barriers = re.findall(r"opt-barrier\(.*encoderblock_(\d+)/MlpBlock_0/Dense_0/", hlo)
  assert sorted(set(barriers)) == ["0", "1", "2"]
