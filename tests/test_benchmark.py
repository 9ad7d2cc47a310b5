"""The benchmark harness (benchmarks/run.py): it runs, writes every key, and its table's ratios
are the hand-computed ones (no timing is asserted); and remat saves memory on XLA:CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jvt
from jvt.train import loop as train
from jvt.train import objectives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "run.py")
TINY = {"hidden_size": 32, "mlp_dim": 64, "num_heads": 4, "num_layers": 2, "patch_size": 8}


def _load_script(name: str):
  """benchmarks/<name>.py as a module (the folder is not a package, and putting it on sys.path
  would shadow the standard library's `profile`)."""
  spec = importlib.util.spec_from_file_location(
      f"benchmarks_{name}", os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_harness_runs_two_methods_and_writes_every_key(tmp_path):
  out = tmp_path / "bench"
  cmd = [sys.executable, SCRIPT, "--variant", "S/16", "--batch", "4", "--image-size", "32",
         "--overrides", json.dumps(TINY), "--methods", "full,da_vpt", "--dtype", "float32",
         "--remat", "none", "--steps", "2", "--warmup", "1", "--num-prompts", "4",
         "--num-classes", "6", "--out", str(out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((out / "results.json").read_text())
  assert [r["method"] for r in rows] == ["full", "da_vpt"]
  run = _load_script("run")
  for row in rows:
    assert set(run.REQUIRED_KEYS) <= set(row)
    for key in ("train_img_s", "train_img_s_min", "train_img_s_max", "eval_img_s",
                "peak_mem_mb", "compile_s", "flops_per_img"):
      assert row[key] > 0, (row["method"], key, row[key])
    assert row["train_img_s_min"] <= row["train_img_s"] <= row["train_img_s_max"]
    assert row["page_faults_per_step"] >= 0
    assert row["cpu_steal_frac"] is None or 0.0 <= row["cpu_steal_frac"] <= 1.0
    assert (row["variant"], row["batch"], row["backend"]) == ("S/16", 4, "cpu")
    np.testing.assert_allclose(row["step_tflops"],
                               row["flops_per_img"] * row["train_img_s"] / 1e12, rtol=1e-9)
    assert row["peak_tflops"] is None and row["mfu"] is None  # no peak listed for a CPU
  # Trainable parameters, counted by hand for the tiny model (D=32, 2 blocks, 6 classes):
  # full = patch embedding 8*8*3*32+32, cls 32, posemb 17*32, 2 blocks of
  # (2 norms 4*32, qkv+out 4*(32*32+32), mlp 32*64+64 + 64*32+32), final norm 64, head 32*6+6.
  block = 4 * 32 + 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32)
  full = (8 * 8 * 3 * 32 + 32) + 32 + 17 * 32 + 2 * block + 64 + (32 * 6 + 6)
  assert rows[0]["trainable_params"] == full
  assert rows[1]["trainable_params"] == 2 * 4 * 32 + 32 * 6 + 6  # 4 prompts per block + head
  table = (out / "results.md").read_text()
  assert "| full | none |" in table and "| da_vpt | none |" in table
  assert "da_vpt vs vpt_deep" not in table  # no vpt_deep row, so no such ratio


def test_time_calls_counts_the_fresh_pages_each_timed_call_touches():
  import mmap
  run = _load_script("run")
  pages = 2048  # 8 MB of fresh anonymous memory a call, each page written once
  page = mmap.PAGESIZE
  finished = []

  def touch():
    block = mmap.mmap(-1, pages * page)
    np.frombuffer(block, np.uint8)[::page] = 1
    block.close()
    return "out"

  times, faults, steal = run._time_calls(touch, 1, 3, finish=finished.append)
  assert len(times) == 3 and all(t > 0 for t in times)
  assert finished == ["out"] * 4  # every call's result, warm-up included, went to `finish`
  assert pages <= faults < 2 * pages
  assert steal is None or 0.0 <= steal <= 1.0


def test_cpu_steal_is_the_eighth_field_over_the_first_eight_of_proc_stat():
  run = _load_script("run")
  # user nice system idle iowait irq softirq steal guest guest_nice: guest is inside user.
  before = run._cpu_ticks("cpu  1000 0 200 700 50 0 10 40 300 0\ncpu0 500 0 100 350 25 0 5 20 "
                          "150 0\nintr 1 2\n")
  after = run._cpu_ticks("cpu  1900 0 260 720 50 0 20 240 600 0\n")
  assert before == (40, 1000 + 200 + 700 + 50 + 10 + 40) and after == (240, 3190)
  # 200 ticks stolen of the 1,190 that passed on all CPUs together.
  assert run._steal_fraction(before, after) == pytest.approx(200 / 1190)
  assert run._steal_fraction(None, after) is None  # no /proc/stat: unknown, not zero
  assert run._steal_fraction(after, after) is None  # no time passed
  with pytest.raises(ValueError, match="not a /proc/stat 'cpu' line"):
    run._cpu_ticks("intr 1 2 3\n")
  if os.path.exists("/proc/stat"):
    steal, total = run._read_cpu_ticks()
    assert 0 <= steal <= total


@pytest.mark.slow  # three benchmark processes (25 s); the chunked count is also checked below
def test_cpu_devices_split_the_step_and_count_the_whole_batch(tmp_path):
  # XLA's cost analysis of a step over 2 devices counts one device's half; the harness
  # reports the whole batch's FLOPs, those of the same step on one device, also when each
  # device runs its rows in chunks (then the count comes from the step lowered in one piece).
  rows = {}
  for devices, chunk_rows in ((1, 0), (2, 0), (2, 1)):
    out = tmp_path / f"bench{devices}_{chunk_rows}"
    cmd = [sys.executable, SCRIPT, "--variant", "S/16", "--batch", "4", "--image-size", "32",
           "--overrides", json.dumps(TINY), "--methods", "vpt_deep", "--dtype", "float32",
           "--steps", "1", "--warmup", "1", "--num-prompts", "2", "--num-classes", "4",
           "--cpu-devices", str(devices), "--forward-chunk-rows", str(chunk_rows),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows[devices, chunk_rows] = json.loads((out / "results.json").read_text())[0]
    table = (out / "results.md").read_text()
    label = {(1, 0): "vpt_deep", (2, 0): "vpt_deep (2 devices)",
             (2, 1): "vpt_deep (2 devices, 2 row chunks)"}[devices, chunk_rows]
    assert f"| {label} |" in table, table
  assert [r["num_devices"] for r in rows.values()] == [1, 2, 2]
  assert rows[2, 1]["forward_chunks"] == 2
  # Half the count would be the error; the lowered (unoptimised) step of (2, 1) and the
  # compiled ones differ by a few percent in this tiny model's elementwise work.
  for key in ((2, 0), (2, 1)):
    np.testing.assert_allclose(rows[key]["flops_per_img"], rows[1, 0]["flops_per_img"],
                               rtol=0.05, err_msg=str(key))


def test_markdown_ratios_and_goals():
  run = _load_script("run")
  base = dict(backend="cpu", device_kind="cpu", variant="S/16", batch=8, eval_img_s=1.0,
              compile_s=1.0, trainable_params=10, remat="none", flops_per_img=2e9)
  rows = [dict(base, method="full", train_img_s=2.0, train_img_s_min=1.0, train_img_s_max=3.0,
               peak_mem_mb=1000.0),
          dict(base, method="vpt_deep", train_img_s=3.0, train_img_s_min=3.0,
               train_img_s_max=3.0, peak_mem_mb=800.0),
          dict(base, method="da_vpt", train_img_s=2.5, train_img_s_min=2.5,
               train_img_s_max=2.5, peak_mem_mb=820.0)]
  table = run.markdown(rows)
  lines = {l.split("|")[1].strip(): l for l in table.splitlines() if l.startswith("| ")}
  assert "| 1.50x |" in lines["vpt_deep"]  # 3.0 / 2.0
  assert "| 1.25x |" in lines["da_vpt"]  # 2.5 / 2.0
  assert "| 6.0 |" in lines["vpt_deep"]  # GFLOP/s = 2 GFLOP/img * 3 img/s
  goals = run.goals(rows)
  assert "- vpt_deep: 1.50x full fine-tuning's images/s (goal >= 1.4x): met" in goals
  assert "- da_vpt: 1.25x full fine-tuning's images/s (goal >= 1.4x): MISSED" in goals
  # step time 3.0 / 2.5 - 1 = +20.0 %, memory 820 / 800 - 1 = +2.5 %.
  assert ("- da_vpt vs vpt_deep: step time +20.0%, peak memory +2.5% (goal <= +5% each): "
          "MISSED") in goals


def test_mfu_is_the_step_flops_over_the_listed_bf16_peak():
  run = _load_script("run")
  assert run.peak_tflops("NVIDIA H200", "bfloat16") == 989.4
  assert run.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0  # before the SXM prefix
  assert run.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
  assert run.peak_tflops("NVIDIA H200", "float32") is None  # no fp32 peak is listed
  assert run.peak_tflops("cpu", "bfloat16") is None
  assert run.peak_tflops("cpu", "float32", given=2.0) == 2.0  # --peak-tflops wins
  # 74 GFLOP/img at 5,000 img/s = 370 TFLOP/s; over 989.4 TFLOP/s: 37.4 %.
  row = dict(backend="gpu", device_kind="NVIDIA H200", variant="B/16", batch=128,
             dtype="bfloat16", eval_img_s=1.0, compile_s=1.0, trainable_params=10,
             remat="none", method="vpt_deep", train_img_s=5000.0, train_img_s_min=5000.0,
             train_img_s_max=5000.0, peak_mem_mb=1.0, flops_per_img=74e9,
             step_tflops=370.0, peak_tflops=989.4, mfu=370.0 / 989.4)
  assert "| 37.4% |" in run.markdown([row])
  assert run.goals([row]) == [
      "- vpt_deep, B/16 batch 128 bfloat16: 37.4% MFU (370 of 989 TFLOP/s; goal >= 40% at "
      "bf16 B/16 batch 128): MISSED"]
  assert run.goals([dict(row, mfu=0.41)])[0].endswith(": met")


def test_jaxpr_flops_counts_every_product_by_hand():
  run = _load_script("run")
  a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  batched = jax.make_jaxpr(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))(a, b)
  assert run.jaxpr_flops(batched) == 2 * 2 * 3 * 5 * 4
  # The gradient of a frozen weight's layer with respect to its input only: forward x W and
  # the input gradient g W^T, two [8, 6] x [6, 7]-sized products; under jit (a sub-jaxpr).
  x, w = jnp.ones((8, 6)), jnp.ones((6, 7))
  grad = jax.make_jaxpr(jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(x @ w)))))(x)
  assert run.jaxpr_flops(grad) == 2 * (2 * 8 * 6 * 7)
  # A 3x3 convolution, 2 -> 4 features, on 5x5 images (SAME): 2 * 2 * 5*5 * 4 * (3*3*2).
  img, kern = jnp.ones((2, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
  conv = jax.make_jaxpr(lambda i, k: jax.lax.conv_general_dilated(
      i, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(img, kern)
  assert run.jaxpr_flops(conv) == 2 * 2 * 25 * 4 * 18
  # A scan's body counts its length times; a cond its largest branch.
  def scanned(c, xs):
    return jax.lax.scan(lambda c, x: (c @ w @ w.T, x), c, xs)[0]
  scan = jax.make_jaxpr(scanned)(x, jnp.ones((5,)))
  assert run.jaxpr_flops(scan) == 5 * 2 * (2 * 8 * 7 * 6)
  cond = jax.make_jaxpr(lambda p, x: jax.lax.cond(p, lambda x: (x @ w) @ w.T, lambda x: x, x))(
      True, x)
  assert run.jaxpr_flops(cond) == 2 * (2 * 8 * 6 * 7)


def test_jaxpr_flops_counts_cudnn_attention_as_its_einsums():
  # cuDNN's fused attention is a primitive of its own; it is counted as the unfused einsums
  # are: 2 products forward, 4 backward, each 2 B N T S H (q [B, T, N, H], k [B, S, N, H]).
  from jax.extend import core as jex
  run = _load_script("run")
  prims = {}
  for which in ("fwd", "bwd"):
    p = jex.Primitive(f"dot_product_attention_{which}_wrapper")
    p.def_abstract_eval(lambda q, k, v, layout: jax.core.ShapedArray(q.shape, q.dtype))
    prims[which] = p
  q, k = jnp.ones((2, 7, 3, 8)), jnp.ones((2, 10, 3, 8))
  both = jax.make_jaxpr(lambda q, k: prims["bwd"].bind(prims["fwd"].bind(q, k, k, layout=0),
                                                       k, k, layout=0))(q, k)
  assert run.jaxpr_flops(both) == (4 + 8) * 2 * 3 * 7 * 10 * 8


@pytest.mark.parametrize("method,dtype", [("full", "float32"), ("vpt_deep", "bfloat16")])
def test_jaxpr_flops_of_a_train_step_are_xla_cpu_products(method, dtype):
  # The tiny model's step: the live jaxpr's products against XLA:CPU's count of the compiled
  # step, which adds the elementwise work and removes dead code. In bf16 on CPU the
  # projections' custom VJP also forms the frozen weights' gradients, which nothing uses:
  # counted without dead-code elimination they would exceed XLA's count.
  import importlib
  run = _load_script("run")
  spec = dict(variant="S/16", batch=4, eval_batch=4, image_size=32, dtype=dtype,
              remat="none", overrides=TINY, method=method, num_prompts=4, num_classes=6,
              seed=0, warmup=0, steps=1)
  train = importlib.import_module("jvt.train")
  sharding = importlib.import_module("jvt.train.sharding")
  s = train.setup(run.bench_config(spec), num_classes=6, steps_per_epoch=10**9,
                  class_examples=lambda k: (np.zeros((6, 32, 32, 3), np.float32),
                                            np.arange(6, dtype=np.int32)))
  batch = sharding.shard_batch({"image": np.zeros((4, 32, 32, 3), np.float32),
                                "label": np.zeros((4,), np.int32)}, s.mesh)
  args = (s.state, s.frozen, s.constants, batch)
  traced = s.train_step.trace(*args).jaxpr
  products = run.jaxpr_flops(run.live_jaxpr(traced))
  xla = s.train_step.lower(*args).compile().cost_analysis()["flops"]
  assert 0.8 * xla < products <= xla
  if method == "vpt_deep":
    assert run.jaxpr_flops(traced) > xla  # the dead frozen-weight gradients


def test_unknown_method_is_a_clear_error():
  run = _load_script("run")
  with pytest.raises(ValueError, match="unknown method 'vtp_deep'"):
    run.tuning_for("vtp_deep", 10)


def _remat_step(remat: str):
  """The trainer's compiled step for a tiny full-fine-tuning ViT, and its arguments."""
  # 4 blocks: the last computes only [CLS] (`skip_unread_tokens`), so it saves little to remat
  model = jvt.build_model("B/16", 5, dict(method="full"), **(TINY | {"num_layers": 4}),
                          remat=remat)
  params = jvt.init_params(model, jax.random.key(0), image_size=32)
  tx = optax.sgd(0.1)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), trainable=params,
                           opt_state=tx.init(params), method_state={})
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.standard_normal((16, 32, 32, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 5, 16), jnp.int32)}
  step = train.make_train_step(model, tx, objectives.CrossEntropy())
  return step.lower(state, {}, {}, batch).compile(), (state, {}, {}, batch)


def test_remat_saves_xla_cpu_memory_with_the_same_step():
  # XLA:CPU used to CSE / schedule the recomputation into the forward pass, so remat saved
  # nothing; the trainer keeps the barriers (`step_compiler_options`).
  plain, plain_args = _remat_step("none")
  remat, remat_args = _remat_step("full")
  plain_mb = plain.memory_analysis().temp_size_in_bytes / 2**20
  remat_mb = remat.memory_analysis().temp_size_in_bytes / 2**20
  assert remat_mb < 0.75 * plain_mb, (plain_mb, remat_mb)
  _, m_plain = plain(*plain_args)
  _, m_remat = remat(*remat_args)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(float(m_remat[key]), float(m_plain[key]), rtol=1e-5)


def test_profile_op_table_sums_trace_events_per_model_operation():
  prof = _load_script("profile")
  hlo = "\n".join([
      "%fused_computation.1 (p: f32[2]) -> f32[2] {",
      '  %inner = f32[2]{0} add(%p, %p), metadata={op_name="jit(step)/inside/a/fusion"}',
      "}", "", "ENTRY %main (x: f32[8,4]) -> f32[8,4] {",
      '  %ynn_fusion.3 = f32[8,4]{1,0} fusion(%x), kind=kCustom, calls=%f, '
      'metadata={op_name="jit(step)/jvp(ViT)/Transformer/encoderblock_0/MlpBlock_0/dot_general"}',
      '  %ynn_fusion.7 = f32[8,4]{1,0} fusion(%x), kind=kCustom, calls=%f, '
      'metadata={op_name="jit(step)/jvp(ViT)/Transformer/encoderblock_11/MlpBlock_0/dot_general"}',
      '  ROOT %copy.2 = f32[4,8]{1,0} copy(%x), metadata={op_name="jit(step)/transpose"}',
      "}"])
  names = prof.hlo_op_names(hlo)
  # Not the fusion computation's own instruction; both blocks' products fold into one operation.
  assert set(names) == {"ynn_fusion.3", "ynn_fusion.7", "copy.2"}
  mlp = ("jvp(ViT)/Transformer/block/MlpBlock_0/dot_general", "f32[8,4]{1,0}")
  assert names["ynn_fusion.3"] == names["ynn_fusion.7"] == mlp
  events = [{"ph": "X", "name": "ynn_fusion.3", "dur": 3000.0},
            {"ph": "X", "name": "ynn_fusion.7", "dur": 5000.0},
            {"ph": "X", "name": "ynn_fusion.3", "dur": 4000.0},
            {"ph": "X", "name": "copy.2", "dur": 1000.0},
            {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 99000.0},  # not an op
            {"ph": "M", "name": "copy.2", "dur": 50000.0}]  # metadata, not a span
  rows = prof.op_table(events, names, steps=2)
  # MLP: (3 + 5 + 4) ms over 2 steps = 6 ms, 1.5 calls a step; copy: 0.5 ms, 0.5 calls.
  assert [(r["op"], r["ms_per_step"], r["calls_per_step"]) for r in rows] == [
      (mlp[0], 6.0, 1.5), ("transpose", 0.5, 0.5)]
  table = prof.ops_markdown(rows, dict(method="full", variant="S/16", batch=8,
                                       dtype="float32", remat="none"))
  assert "6.5 ms of operations per step" in table
  assert "| 6.0 | 92.3% | 1.5 | `f32[8,4]{1,0}` |" in table


def test_profile_op_names_reach_into_the_computations_control_flow_runs():
  # A step in row chunks runs its blocks inside lax.map's while loop: the instructions of the
  # loop's body and condition, and of what they call, execute as thunks with trace events of
  # their own; a fusion's and a reduction's computations do not.
  prof = _load_script("profile")
  hlo = "\n".join([
      "%fused_computation.1 (p: f32[2]) -> f32[2] {",
      '  %inner = f32[2]{0} add(%p, %p), metadata={op_name="jit(step)/inside/a/fusion"}',
      "}", "",
      "%region_add.8 (a: f32[], b: f32[]) -> f32[] {",
      '  ROOT %add.3 = f32[] add(%a, %b), metadata={op_name="jit(step)/reducer/add"}',
      "}", "",
      "%region_called.7 (z: f32[2,4]) -> f32[2,4] {",
      '  ROOT %copy.8 = f32[2,4]{1,0} copy(%z), metadata={op_name="jit(step)/while/body/copy"}',
      "}", "",
      "%region_cond.5 (arg: (s32[], f32[8,4])) -> pred[] {",
      '  ROOT %lt.1 = pred[] compare(%i, %n), direction=LT, '
      'metadata={op_name="jit(step)/while/cond/lt"}',
      "}", "",
      "%region_body.6 (arg: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {",
      '  %ynn_fusion.9 = f32[2,4]{1,0} fusion(%y), kind=kCustom, calls=%fused_computation.1, '
      'metadata={op_name="jit(step)/while/body/closed_call/ViT/Transformer/encoderblock_3/'
      'MlpBlock_0/dot_general"}',
      '  %call.2 = f32[2,4]{1,0} call(%y), to_apply=%region_called.7, '
      'metadata={op_name="jit(step)/while/body/call"}',
      "}", "",
      "ENTRY %main.9 (x: f32[8,4]) -> f32[8] {",
      '  %while.4 = (s32[], f32[8,4]{1,0}) while(%t), condition=%region_cond.5, '
      'body=%region_body.6, metadata={op_name="jit(step)/while"}',
      '  ROOT %reduce.5 = f32[8]{0} reduce(%x, %c), dimensions={1}, to_apply=%region_add.8, '
      'metadata={op_name="jit(step)/reduce_sum"}',
      "}"])
  names = prof.hlo_op_names(hlo)
  assert set(names) == {"while.4", "reduce.5", "lt.1", "ynn_fusion.9", "call.2", "copy.8"}
  assert names["ynn_fusion.9"] == (
      "while/body/closed_call/ViT/Transformer/block/MlpBlock_0/dot_general", "f32[2,4]{1,0}")
  assert names["copy.8"] == ("while/body/copy", "f32[2,4]{1,0}")


def test_startup_script_times_every_phase_of_a_tiny_run(tmp_path):
  # The script imports the trainer's internals (setup, its init_params): a move there must
  # not break it silently. DA-VPT: its set-up also needs the class examples the script passes.
  out = tmp_path / "startup"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "startup.py"), "--variant", "S/16",
       "--method", "da_vpt", "--image-size", "32", "--batch", "2", "--inits", "lazy",
       "--overrides", json.dumps(TINY), "--out", str(out)],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (row,) = json.loads((out / "startup.json").read_text())["rows"]
  phases = ("import", "build", "init_params", "setup_rest", "compile_step", "first_step")
  assert all(row[p] >= 0 for p in phases) and row["init"] == "lazy"
  assert abs(row["total"] - sum(row[p] for p in phases)) < 1e-6


def test_step_cost_of_a_chunked_step_counts_every_chunk():
  # XLA counts a loop body once: a step in 2 row chunks must still report the whole step's
  # FLOPs, those of the same step compiled in one piece.
  run = _load_script("run")
  from jvt.train import sharding
  spec = dict(variant="S/16", image_size=32, dtype="float32", remat="none", overrides=TINY,
              method="vpt_deep", num_prompts=2, batch=16, eval_batch=16, warmup=1, steps=1,
              seed=0)
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((16, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 4, 16).astype(np.int32)}
  flops = {}
  for rows in (16, 8):
    s = train.setup(run.bench_config(dict(spec, forward_chunk_rows=rows)), num_classes=4,
                    steps_per_epoch=10)
    b = sharding.shard_batch(batch, s.mesh)
    compiled = s.train_step.lower(s.state, s.frozen, s.constants, b).compile()
    flops[s.forward_chunks] = run.step_cost(s, b, compiled)["flops"]
    if s.forward_chunks > 1:  # what the compiled loop alone reports: about one chunk's share
      looped = compiled.cost_analysis()
      looped = looped[0] if isinstance(looped, (list, tuple)) else looped
      assert looped["flops"] < 0.75 * flops[1]
  np.testing.assert_allclose(flops[2], flops[1], rtol=0.02)


def test_products_table_is_every_forward_with_the_two_gradients_jvt_computes():
  # Each forward product is followed by its input- and weight-gradient products, whose specs
  # must be the ones jvt's mixed-precision VJP multiplies (jvt.precision._grad_specs).
  from jvt import precision
  prods = _load_script("products").PRODUCTS
  assert len(prods) % 3 == 0
  for i in range(0, len(prods), 3):
    (name, calls, spec), (_, ca, spec_a), (_, cb, spec_b) = prods[i:i + 3]
    assert (spec_a, spec_b) == precision._grad_specs(spec), name
    assert calls == ca == cb


def test_products_script_times_each_product_and_counts_its_flops(tmp_path):
  prods = _load_script("products")
  rc = prods.main(["--variant", "Ti/16", "--batch", "2", "--image-size", "32", "--rounds", "1",
                   "--calls", "1", "--out", str(tmp_path)])
  assert rc == 0
  rows = json.loads((tmp_path / "products.json").read_text())
  assert [r["spec"] for r in rows] == [s for _, _, s in prods.PRODUCTS]
  # Ti/16 at 32 px: 4 patches + [CLS] = 5 tokens, width 192, MLP 768, 3 heads of 64.
  sizes = dict(b=2, t=5, q=5, k=5, d=192, f=768, h=3, e=64)
  for r in rows:
    a, b = r["spec"].split("->")[0].split(",")
    assert [list(s) for s in r["shapes"]] == [[sizes[i] for i in a], [sizes[i] for i in b]]
    # FLOPs from the operands' and the result's shapes: 2 x result size x contracted size.
    out = r["spec"].split("->")[1]
    contracted = [i for i in a if i in b and i not in out]
    want = 2 * np.prod([sizes[i] for i in out]) * np.prod([sizes[i] for i in contracted])
    assert r["gflop"] * 1e9 == pytest.approx(want)
    assert r["jvt_ms"] > 0 and r["jvt_gflops"] == pytest.approx(r["gflop"] / r["jvt_ms"] * 1e3)
    assert r["jvt_cores"] > 0
  md = (tmp_path / "products.md").read_text()
  assert md.count("\n| ") == len(rows) + 1  # header row and one row per product


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_products_jvt_call_is_the_einsum_of_its_spec(dtype):
  # What the tool times is the product itself: on CPU in bf16, jvt's mixed path (bf16
  # operands, fp32 sums), against float64 numpy on the operands rounded to `dtype`.
  import ml_dtypes
  prods = _load_script("products")
  spec = "btd,bthe->hed"
  rng = np.random.default_rng(3)
  a, b = (rng.standard_normal(s, dtype=np.float32)
          for s in prods.operand_shapes(spec, dict(b=2, t=3, d=4, h=2, e=5)))
  got = prods.jvt_product(spec, a, b, dtype)()
  rounded = [x.astype(getattr(ml_dtypes, dtype, np.float32)).astype(np.float64) for x in (a, b)]
  np.testing.assert_allclose(np.asarray(got, np.float64), np.einsum(spec, *rounded),
                             rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- benchmarks/bound.py
BOUND_DOTS = [  # (lhs shape, rhs shape, ((lhs contract, rhs contract), (lhs batch, rhs batch)))
    ((2, 5, 3), (3, 4), (((2,), (0,)), ((), ()))),  # a projection
    ((2, 5, 3), (4, 3), (((2,), (1,)), ((), ()))),  # its input gradient against [out, in]
    ((2, 5, 3), (2, 5, 4), (((0, 1), (0, 1)), ((), ()))),  # a weight gradient: leading axes
    ((2, 3, 5, 4), (2, 3, 6, 4), (((3,), (3,)), ((0, 1), (0, 1)))),  # q.k^T over heads
    ((2, 3, 5, 6), (2, 3, 5, 4), (((2,), (2,)), ((0, 1), (0, 1)))),  # a key gradient
    ((2, 5, 3, 4), (3, 4, 7), (((2, 3), (0, 1)), ((), ()))),  # the heads' output projection
]


def _dot_eqn(lhs, rhs, dims):
  return jax.make_jaxpr(lambda a, b: jax.lax.dot_general(a, b, dims))(
      jnp.zeros(lhs), jnp.zeros(rhs)).jaxpr.eqns[0]


@pytest.mark.parametrize("lhs,rhs,dims", BOUND_DOTS)
def test_bound_times_each_product_as_the_same_product_in_every_form(lhs, rhs, dims):
  # Every back end's call, reshaped to the product's result, is lax.dot_general's result: a
  # form computing something else (a wrong transpose) could time faster and lower the floor.
  bound = _load_script("bound")
  eqn = _dot_eqn(lhs, rhs, dims)
  rng = np.random.default_rng(0)
  a, b = bound.operands(eqn, rng)
  want = np.asarray(jax.lax.dot_general(a, b, dims, precision="highest"))
  calls = dict(bound.matmul_calls(eqn, a, b, "numpy"), xla=bound.xla_call(eqn, a, b))
  if importlib.util.find_spec("torch") is not None:
    calls.update(bound.matmul_calls(eqn, a, b, "torch"))
  for name, call in calls.items():
    got = np.asarray(call()).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
  *_, nb, m, k, n = bound.blas_form(dims, lhs, rhs)
  assert 2 * nb * m * k * n == bound.product_flops(eqn)


def test_bound_counts_each_product_as_often_as_a_step_runs_it():
  # A scan's body runs `length` times, a cond its heavier branch, a nested jit once: counted
  # by hand, and the counts' FLOPs are run.jaxpr_flops's (the same walk, a second code path).
  bound, run = _load_script("bound"), _load_script("run")
  w = jnp.zeros((6, 6))

  def f(x):
    x = jax.jit(lambda x: x @ w)(x)  # [4, 6] x [6, 6], once
    def body(c, _):
      return jnp.tanh(c @ w) @ w, None  # twice [4, 6] x [6, 6] a trip
    x, _ = jax.lax.scan(body, x, None, length=3)
    return jax.lax.cond(x.sum() > 0, lambda x: (x @ w) @ w, lambda x: x * 2, x)

  found, saw_while = bound.step_products(jax.make_jaxpr(f)(jnp.zeros((4, 6))))
  assert not saw_while
  assert [times for _, times in found.values()] == [1 + 2 * 3 + 2]  # one shape: [4,6] x [6,6]
  (eqn, times), = found.values()
  assert bound.product_flops(eqn) == 2 * 4 * 6 * 6
  assert times * bound.product_flops(eqn) == run.jaxpr_flops(jax.make_jaxpr(f)(jnp.zeros((4, 6))))


def test_bound_row_chunks_count_the_same_step_products_as_one_piece():
  # The tiny model's VPT-Deep step in two row chunks (a lax.map) against the same step in one
  # piece: the same FLOPs, each block product run twice on half the rows.
  import importlib
  bound, run = _load_script("bound"), _load_script("run")
  train_mod = importlib.import_module("jvt.train")
  sharding = importlib.import_module("jvt.train.sharding")

  def products(chunk_rows):
    spec = dict(variant="S/16", batch=4, eval_batch=4, image_size=32, dtype="float32",
                remat="none", overrides=TINY, method="vpt_deep", num_prompts=4, num_classes=6,
                seed=0, warmup=0, steps=1, forward_chunk_rows=chunk_rows)
    s = train_mod.setup(run.bench_config(spec), num_classes=6, steps_per_epoch=10**9)
    batch = sharding.shard_batch({"image": np.zeros((4, 32, 32, 3), np.float32),
                                  "label": np.zeros((4,), np.int32)}, s.mesh)
    live = run.live_jaxpr(s.train_step.trace(s.state, s.frozen, s.constants, batch).jaxpr)
    return s.forward_chunks, bound.step_products(live)[0], run.jaxpr_flops(live)

  (one, whole, whole_flops), (two, chunked, chunked_flops) = products(4), products(2)
  assert (one, two) == (1, 2)
  flops = lambda found: sum(bound.product_flops(e) * t for e, t in found.values())
  # Every product of the whole step is listed: run.jaxpr_flops (checked against XLA's count of
  # the compiled step above) walks the same jaxpr on its own.
  assert flops(whole) == pytest.approx(whole_flops)
  assert flops(chunked) == pytest.approx(chunked_flops) == pytest.approx(flops(whole))
  mlp_in = lambda found, rows: [t for e, t in found.values() if e.primitive.name == "dot_general"
                                and [v.aval.shape for v in e.invars] == [(rows, 17, 32), (32, 64)]]
  assert mlp_in(whole, 4) == [1] and mlp_in(chunked, 2) == [2]  # block 0, its 17 read rows


def test_bound_script_writes_the_ceiling_from_its_products_best_times(tmp_path):
  bound = _load_script("bound")
  rc = bound.main(["--variant", "S/16", "--batch", "4", "--image-size", "32", "--overrides",
                   json.dumps(TINY), "--methods", "linear", "--num-classes", "6", "--rounds", "1",
                   "--round-seconds", "0.001", "--no-steps", "--out", str(tmp_path)])
  assert rc == 0
  (row,) = json.loads((tmp_path / "bound.json").read_text())
  assert row["method"] == "linear" and row["products"]
  for p in row["products"]:
    assert p["best_ms"] == min(p["ms"].values()) > 0 and p["ms"][p["best"]] == p["best_ms"]
    assert {"xla", "numpy", "numpy nt"} <= set(p["ms"])
  floor = sum(p["times_per_step"] * p["best_ms"] for p in row["products"])
  assert row["floor_ms"] == pytest.approx(floor)
  assert row["ceiling_img_s"] == pytest.approx(4 / floor * 1e3)
  assert "jvt_img_s" not in row
  md = (tmp_path / "bound.md").read_text()
  assert "| linear | " in md
  assert md.count("\n| dot ") + md.count("\n| conv ") == len(row["products"])


def test_bound_rounds_alternate_the_steps_and_take_the_median_of_each_rounds_ratios(monkeypatch):
  # Stand-ins for the three children: three rounds whose ceilings are 6, 4, 5 img/s.
  bound = _load_script("bound")
  ceilings, calls = iter([6.0, 4.0, 5.0]), []

  def ceiling_child(spec, timeout):
    c = next(ceilings)
    return dict(method=spec["method"], ceiling_img_s=c, floor_ms=8e3 / c, products=[c])

  def side(name, rate):
    def child(spec, timeout):
      calls.append(name)
      return {"train_img_s": rate(len(calls))}
    return child

  monkeypatch.setattr(bound, "run_child", ceiling_child)
  monkeypatch.setattr(bound._load("run"), "run_child", side("jvt", lambda n: 2.0 + n))
  monkeypatch.setattr(bound._load("torch_step"), "run_child", side("torch", lambda n: 1.0 + n))
  args = bound.parse(["--repeats", "3", "--out", "unused"])
  row = bound.rounds_of(dict(method="full", remat="none"), args, with_torch=False)
  assert calls == ["jvt", "torch", "torch", "jvt", "jvt", "torch"]
  # Rounds (ceiling, jvt, torch), a side's rate 2 or 1 + its call's number: (6, 3, 3),
  # (4, 6, 4), (5, 7, 7).
  assert row["products"] == [5.0] and row["ceiling_img_s"] == 5.0  # the median round's
  assert row["jvt_img_s"] == 6.0 and row["torch_img_s"] == 4.0
  assert row["jvt_over_ceiling"] == pytest.approx(np.median([3 / 6, 6 / 4, 7 / 5]))
  assert row["ceiling_over_torch"] == pytest.approx(np.median([6 / 3, 4 / 4, 5 / 7]))
  assert row["ceiling_over_torch_range"] == pytest.approx((5 / 7, 6 / 3))
  assert [r["jvt_img_s"] for r in row["rounds"]] == [3.0, 6.0, 7.0]


def test_bound_refuses_an_accelerator_backend_with_what_to_do(monkeypatch):
  bound = _load_script("bound")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(SystemExit, match="JAX_PLATFORMS=cpu"):
    bound.measure(dict(method="full", remat="none"))
