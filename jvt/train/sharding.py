"""Data-parallel placement: one mesh axis "data" over every device of every process.

Parameters and optimizer state are replicated (`P()`), batches are split along their leading
axis (`P("data")`). Each process feeds its own rows of the global batch
(`jax.make_array_from_process_local_data`), so the same code runs on one CPU, 8 fake CPU
devices, a GPU host or a multi-host TPU pod. `use_cpu_devices` (config `cpu_devices`) splits
one CPU into several devices, which runs a bf16 step faster than one CPU device does.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jvt import scratch

DATA_AXIS = "data"


def use_cpu_devices(n: int) -> None:
  """Runs this process's CPU as `n` XLA devices, one data-parallel replica of the step each.

  n: the `cpu_devices` config key; 0 keeps the process's devices (JAX's default: one CPU
  device, or what XLA_FLAGS=--xla_force_host_platform_device_count says). Why: XLA:CPU
  spreads one device's operations over the cores with a small gain (a bf16 ViT-S/16 step runs
  1.55x faster on two cores than on one), while devices run their shares side by side: on a
  2-core CPU that step ran 20-30% faster over 2 devices (batch 8) or 4 (batch 32) than on one;
  fp32 steps did not gain (docs/performance.md). Every device holds its own copy of the
  parameters and optimizer state, so runs that train every weight use more memory.

  JAX fixes the device count when its backend starts (the first JAX computation or device
  query): call this before that. Later, a different count is an error. Only CPU runs are
  affected: on a GPU or TPU host the mesh is made of the accelerators either way.
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"cpu_devices={n!r}: expected an integer >= 0 (0: the process's devices).")
  n = int(n)
  if n == 0:
    return
  scratch.set_slots(n)  # n steps' scratch blocks are in use at once (no-op if not preloaded)
  if jax.config.jax_num_cpu_devices == n:
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
    return
  except RuntimeError:  # the backend has started
    pass
  if jax.default_backend() != "cpu" or jax.local_device_count() == n:
    return
  raise ValueError(
      f"cpu_devices={n}: JAX's CPU backend already runs with {jax.local_device_count()} "
      "device(s) in this process, and the count is fixed when the backend starts. Set it "
      f"before the first JAX computation (jvt.train.use_cpu_devices({n}) right after the "
      f"imports, or XLA_FLAGS=--xla_force_host_platform_device_count={n} before Python "
      "starts), or use cpu_devices=0 to keep the process's devices.")


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices (Auto axis type, as Linen's sharding rules expect)."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(
        f"batch_size={global_batch_size} is not divisible by the {n} devices of this run "
        f"({jax.process_count()} process(es)); choose a multiple of {n}, e.g. "
        f"{max(n, global_batch_size // n * n)}.")
  if global_batch_size % jax.process_count():
    raise ValueError(f"batch_size={global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes.")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays split over the "data" axis."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
  """Host values (identical on every process) -> arrays replicated over the mesh."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree)
