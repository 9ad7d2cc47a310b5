"""Tests for jvt.checkpoints.RunCheckpointer (orbax run checkpoints)."""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import xla_flags

from jvt.train.checkpointing import RunCheckpointer


def _state(seed):
  """A trainable subtree, a masked optimizer state (frozen leaves carry no state) and a mapping."""
  rng = np.random.default_rng(seed)
  params = {"prompts": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32),
            "head": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                     "bias": jnp.zeros((5,), jnp.float32)}}
  labels = {"prompts": "train", "head": {"kernel": "train", "bias": "frozen"}}
  tx = optax.partition({"train": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, labels)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {"params": params, "opt_state": opt_state, "step": jnp.asarray(seed, jnp.int32),
          "class_to_prompt": jnp.asarray(rng.integers(0, 3, size=(5,)), jnp.int32)}


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


METADATA = {"config": {"lr": 0.01, "method": "vpt"}, "data": {"epoch": 3, "position": 1200},
            "teacher": None}


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip(tmp_path, async_save):
  state = _state(1)
  with RunCheckpointer(tmp_path / "ckpt", async_save=async_save) as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(10, state, METADATA)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 10
    restored, metadata = ckpt.restore(target=_state(2))
  _assert_equal(restored, state)
  assert metadata == METADATA
  with RunCheckpointer(tmp_path / "ckpt") as again:  # a new process finds it
    restored, metadata = again.restore(10, target=jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  _assert_equal(restored, state)


def test_restore_without_target_gives_saved_values(tmp_path):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.asarray(3, jnp.int32)}
  with RunCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, state, {"a": 1})
    ckpt.wait_until_finished()
    restored, metadata = ckpt.restore()
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0).reshape(2, 3))
  assert int(restored["n"]) == 3 and metadata == {"a": 1}


def test_restore_into_target_shardings(tmp_path):
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P())
  state = {"w": jnp.arange(8.0)}
  with RunCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, state, {})
    ckpt.wait_until_finished()
    target = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)}
    restored, _ = ckpt.restore(1, target=target)
  assert restored["w"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(8.0))


def test_max_to_keep(tmp_path):
  with RunCheckpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in (1, 2, 3, 4):
      ckpt.save(step, {"x": jnp.full((2,), float(step))}, {"step": step})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 4]
    restored, metadata = ckpt.restore(3, target={"x": jnp.zeros((2,))})
  np.testing.assert_array_equal(np.asarray(restored["x"]), [3.0, 3.0])
  assert metadata == {"step": 3}
  assert sorted(d for d in os.listdir(tmp_path) if d.isdigit()) == ["3", "4"]


def test_crashed_temporary_checkpoint_is_ignored(tmp_path):
  with RunCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, {"x": jnp.ones((3,))}, {"step": 1})
    ckpt.save(2, {"x": jnp.full((3,), 2.0)}, {"step": 2})
  # What a process killed while writing step 3 leaves behind: an unfinished temporary directory.
  crashed = tmp_path / "3.orbax-checkpoint-tmp-1700000000"
  (crashed / "state").mkdir(parents=True)
  (crashed / "state" / "partial").write_bytes(b"\x00" * 10)
  (crashed / "metadata").mkdir()
  with RunCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [1, 2]
    restored, metadata = ckpt.restore(target={"x": jnp.zeros((3,))})
  np.testing.assert_array_equal(np.asarray(restored["x"]), [2.0, 2.0, 2.0])
  assert metadata == {"step": 2}


def test_errors(tmp_path):
  with RunCheckpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
      ckpt.restore()
    ckpt.save(5, {"x": jnp.ones(2)}, {})
    ckpt.wait_until_finished()
    with pytest.raises(FileNotFoundError, match=r"step 7.*\[5\]"):
      ckpt.restore(7)
    with pytest.raises(ValueError, match="JSON-serialisable"):
      ckpt.save(6, {"x": jnp.ones(2)}, {"bad": np.ones(2)})
  json.dumps(METADATA)  # the fixture itself is valid JSON


_WORKER = """
import json, sys
import jax
pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
import jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jvt.train.checkpointing import RunCheckpointer
mesh = Mesh(np.asarray(jax.devices()), ("data",))
sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
full = np.arange(8.0, dtype=np.float32)
state = {"x": jax.make_array_from_callback((8,), sharded, lambda idx: full[idx]),
         "r": jax.make_array_from_callback((3,), replicated, lambda idx: np.ones(3, np.float32)[idx])}
with RunCheckpointer(directory) as ckpt:
  ckpt.save(1, state, {"epoch": 1})
  ckpt.wait_until_finished()
  target = {"x": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharded),
            "r": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=replicated)}
  restored, metadata = ckpt.restore(target=target)
  print(json.dumps({"devices": jax.device_count(), "latest": ckpt.latest_step(), "metadata": metadata,
                    "x": [np.asarray(s.data).tolist() for s in restored["x"].addressable_shards],
                    "r": np.asarray(restored["r"].addressable_shards[0].data).tolist()}))
"""


@pytest.mark.slow
def test_two_processes_save_and_restore_their_shards(tmp_path):
  """Every process calls save/restore; each gets back its own shard of a data-sharded array."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  (tmp_path / "worker.py").write_text(_WORKER)
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
  procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(i), str(port),
                             str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert [r["x"] for r in results] == [[[0.0, 1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0, 7.0]]]
  for r in results:
    assert r["devices"] == 2 and r["latest"] == 1 and r["metadata"] == {"epoch": 1}
    assert r["r"] == [1.0, 1.0, 1.0]


def test_write_errors_name_the_step_and_the_cause(tmp_path, monkeypatch):
  """A storage error of orbax / tensorstore (here injected) becomes one CheckpointWriteError
  naming the step's directory and the cause; any other exception keeps its type."""
  import errno
  import orbax.checkpoint as ocp
  from jvt.train.checkpointing import CheckpointWriteError

  def denied(self, step, args=None):
    raise ValueError('PERMISSION_DENIED: Error writing "x/0" in OCDBT database: Failed to open '
                     "file: Permission denied [os_error_code='13']")

  with RunCheckpointer(tmp_path) as ckpt:
    monkeypatch.setattr(ocp.CheckpointManager, "save", denied)
    with pytest.raises(CheckpointWriteError) as info:
      ckpt.save(3, {"x": jnp.ones(2)}, {})
    assert str(info.value) == (f"cannot write checkpoint {tmp_path / '3'}: Permission denied "
                               "(check the permissions of the directory, or use another "
                               "--workdir)")
    assert info.value.errno == errno.EACCES and isinstance(info.value, OSError)
    monkeypatch.setattr(ocp.CheckpointManager, "save",
                        lambda self, step, args=None: {}["a bug"])
    with pytest.raises(KeyError):
      ckpt.save(4, {"x": jnp.ones(2)}, {})


def test_restore_newest_moves_a_damaged_newer_step_aside(tmp_path, caplog):
  import shutil
  from jvt.train.checkpointing import CheckpointRestoreError
  with RunCheckpointer(tmp_path / "ckpt") as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, {"x": jnp.full((2,), float(step))}, {"step": step})
  (tmp_path / "ckpt" / "3" / "metadata" / "metadata").write_text('{"step": ')
  shutil.rmtree(tmp_path / "ckpt" / "2" / "state")
  with RunCheckpointer(tmp_path / "ckpt") as ckpt:
    step, state, metadata = ckpt.restore_newest({"x": jnp.zeros((2,))},
                                                damaged_dir=str(tmp_path / "damaged"))
    assert ckpt.all_steps() == [1]
  assert step == 1 and metadata == {"step": 1}
  np.testing.assert_array_equal(np.asarray(state["x"]), [1.0, 1.0])
  moved = sorted(os.listdir(tmp_path / "damaged"))
  assert [m.split("-")[0] for m in moved] == ["2", "3"]
  assert os.path.exists(tmp_path / "damaged" / moved[1] / "state")  # moved whole, not deleted
  assert caplog.text.count("does not restore") == 2
  # Nothing restores: an error listing each step, and nothing is moved.
  shutil.rmtree(tmp_path / "ckpt" / "1" / "state")
  with RunCheckpointer(tmp_path / "ckpt") as ckpt:
    with pytest.raises(CheckpointRestoreError, match=r"step 1: .*\"state\" was not found"):
      ckpt.restore_newest({"x": jnp.zeros((2,))}, damaged_dir=str(tmp_path / "damaged"))
  assert os.path.isdir(tmp_path / "ckpt" / "1")
  assert sorted(os.listdir(tmp_path / "damaged")) == moved


def _unretrieved_task_failure(filename: str) -> None:
  """Runs, in a fresh event loop, a task whose coroutine (compiled as if it lived in `filename`)
  raises, and lets it be collected without anyone retrieving the exception: asyncio then
  reports "Task exception was never retrieved" with the traceback, as it does for orbax's
  other array reads when one read of a damaged checkpoint has already failed the restore."""
  import asyncio
  import gc
  namespace = {}
  exec(compile("async def async_deserialize():\n  raise ValueError('truncated array file')\n",
               filename, "exec"), namespace)

  async def start_and_forget():
    asyncio.ensure_future(namespace["async_deserialize"]())
    await asyncio.sleep(0)  # the task runs and fails; nobody awaits it

  loop = asyncio.new_event_loop()
  loop.run_until_complete(start_and_forget())
  loop.close()
  gc.collect()  # the task is collected: asyncio reports its exception now


@pytest.mark.parametrize("filename,env,printed", [
    ("/site-packages/orbax/checkpoint/_src/serialization/serialization.py", None, False),
    ("/site-packages/orbax/checkpoint/_src/serialization/serialization.py", "1", True),
    ("/site-packages/somelib/reader.py", None, True),  # not orbax: reported as usual
])
def test_restore_silences_only_orbax_reads_unretrieved_failures(tmp_path, caplog, monkeypatch,
                                                                filename, env, printed):
  """The CLI promises one warning and no library traceback for a damaged checkpoint
  (tests/test_resume.py); asyncio's reports of orbax's other failed reads come or not with
  timing, so a RunCheckpointer filters exactly those (JVT_TRACEBACK=1 keeps them)."""
  if env is None:
    monkeypatch.delenv("JVT_TRACEBACK", raising=False)
  else:
    monkeypatch.setenv("JVT_TRACEBACK", env)
  assert RunCheckpointer(tmp_path / "ckpt").restore_newest() is None  # a restore, as the CLI's
  with caplog.at_level("ERROR", logger="asyncio"):
    _unretrieved_task_failure(filename)
  reports = [r for r in caplog.records
             if r.name == "asyncio" and r.getMessage().startswith("Task exception was never")]
  assert len(reports) == int(printed)
