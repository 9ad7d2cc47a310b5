"""benchmarks/torch_step.py's CLI and benchmarks/compare.py's join and table, without torch
(torch and timm are the optional "bench" extra, never a test dependency)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")


def _load(name):
  spec = importlib.util.spec_from_file_location(f"test_bench_{name}",
                                                os.path.join(BENCH, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_torch_step_imports_without_torch_and_parses_run_py_flags():
  code = (f"import sys; sys.path.insert(0, {BENCH!r}); import torch_step; "
          "assert 'torch' not in sys.modules and 'jax' not in sys.modules; "
          "a = torch_step.parse(['--variant', 'B/16', '--batch', '32', '--dtype', 'bfloat16', "
          "'--methods', 'full, vpt_deep,lora', '--num-prompts', '50', '--out', 'x']); "
          "print(a.methods, a.batch, a.dtype, a.num_prompts)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["['full',", "'vpt_deep',", "'lora']", "32", "bfloat16", "50"]


def test_torch_step_rejects_bad_flags():
  ts = _load("torch_step")
  with pytest.raises(SystemExit):
    ts.parse(["--methods", "full,prefix_tuning", "--out", "x"])
  with pytest.raises(SystemExit):
    ts.parse(["--overrides", '{"pool": "gap"}', "--out", "x"])
  with pytest.raises(SystemExit):
    ts.parse(["--dtype", "float16", "--out", "x"])


def test_torch_specs_carry_the_keys_run_py_children_read():
  ts, run = _load("torch_step"), _load("run")
  args = ts.parse(["--methods", "full,linear", "--batch", "4", "--out", "x"])
  specs = ts.specs(args)
  assert [s["method"] for s in specs] == ["full", "linear"]
  # Same spec fields as run.py's children (which also have remat): one compare loop feeds both.
  run_spec = dict(specs[0], remat="none")
  config = run.bench_config(run_spec)
  assert (config.batch_size, config.model.variant) == (4, "S/16")


def test_torch_ops_table_orders_by_self_time_per_step_and_sums_the_shares():
  ts = _load("torch_step")
  rows = [("aten::add", 3000.0, 6), ("aten::mm", 9000.0, 12), ("aten::gelu", 0.0, 3)]
  table = ts.ops_table(rows, steps=3, title="torch full")
  lines = table.splitlines()
  # 12,000 us over 3 steps = 4.0 ms a step; mm 3.0 ms (75%), add 1.0 ms (25%).
  assert lines[0] == "torch full: 4.0 ms of operations per step (self CPU time)"
  assert lines[4:] == ["| 3.0 | 75.0% | 4 | `aten::mm` |", "| 1.0 | 25.0% | 2 | `aten::add` |",
                       "| 0.0 | 0.0% | 1 | `aten::gelu` |"]
  assert len(ts.ops_table(rows, steps=1, title="t", limit=1).splitlines()) == 5


def test_torch_step_profile_steps_reach_the_child_spec():
  ts = _load("torch_step")
  spec = ts.specs(ts.parse(["--methods", "full", "--profile-steps", "3", "--out", "x"]))[0]
  assert spec["profile_steps"] == 3 and spec["profile_out"] == os.path.abspath("x")
  with pytest.raises(SystemExit):
    ts.parse(["--profile-steps", "-1", "--out", "x"])


def test_vit_dims_follow_jvt_variants():
  ts = _load("torch_step")
  assert ts.vit_dims("B/16", {}) == dict(hidden_size=768, mlp_dim=3072, num_heads=12,
                                         num_layers=12, patch_size=16)
  assert ts.vit_dims("S/16", {"num_layers": 2})["num_layers"] == 2
  with pytest.raises(ValueError, match="no timm equivalent"):
    ts.vit_dims("S/16", {"pool": "gap"})


def _row(method, img_s, peak, base, framework, **kw):
  return dict(method=method, train_img_s=img_s, peak_mem_mb=peak, base_rss_mb=base,
              variant="S/16", batch=8, image_size=224, dtype="float32", framework=framework,
              **kw)


def test_join_and_table_ratios_by_hand():
  cmp = _load("compare")
  jvt = [_row("full", 6.0, 1800.0, 200.0, "jvt", remat="none"),
         _row("vpt_deep", 12.0, 1400.0, 200.0, "jvt", remat="none"),
         _row("vpt_deep", 11.0, 900.0, 200.0, "jvt", remat="full"),  # vs the same torch row
         _row("ssf", 9.0, 1500.0, 200.0, "jvt", remat="none"),
         _row("full", 5.0, 1000.0, 200.0, "jvt", remat="dots"),
         _row("vpt_deep", 10.0, 800.0, 200.0, "jvt", remat="dots")]
  torch = [_row("vpt_deep", 8.0, 1000.0, 700.0, "torch"), _row("full", 4.0, 1200.0, 700.0,
                                                                  "torch"),
           dict(_row("ssf", 5.0, 1000.0, 700.0, "torch"), dtype="bfloat16")]  # other dtype
  pairs = cmp.join(jvt, torch)
  assert [(p["jvt"]["method"], p["torch"] and p["torch"]["method"]) for p in pairs] == [
      ("full", "full"), ("vpt_deep", "vpt_deep"), ("vpt_deep", "vpt_deep"), ("ssf", None),
      ("full", "full"), ("vpt_deep", "vpt_deep")]
  meta = dict(date="d", command="c", cpu="cpu", cpus=2, uptime_before="u0",
              uptime_after="u1", load_before_1m=0.1, load_after_1m=0.2)
  table = cmp.markdown(pairs, meta)
  lines = {l.split("|")[1].strip(): l for l in table.splitlines() if l.startswith("| ")}
  # full: 6 / 4 = 1.50x; peaks 1800 / 1200 = 1.50x, steps (1800-200) / (1200-700) = 3.20x.
  assert "| 6.00 | 4.00 | 1.50x | 1,800 (1,600) | 1,200 (500) | 1.50x (3.20x) |" in lines["full"]
  # vpt_deep: 12 / 8 = 1.50x; x own full: 12 / 6 = 2.00x and 8 / 4 = 2.00x.
  assert lines["vpt_deep"].endswith("| 2.00x | 2.00x |")
  # With remat: 11 / 8 = 1.38x, peaks 900 / 1000 = 0.90x, steps 700 / 300 = 2.33x.
  assert "| 11.00 | 8.00 | 1.38x | 900 (700) | 1,000 (300) | 0.90x (2.33x) |" in lines[
      "vpt_deep (remat full)"]
  # No full fine-tuning row with remat "full": over the one without remat, 11 / 6 = 1.83x.
  assert lines["vpt_deep (remat full)"].endswith("| 1.83x | 2.00x |")
  # With remat "dots", over full fine-tuning with "dots": 10 / 5 = 2.00x (torch: 8 / 4).
  assert lines["vpt_deep (remat dots)"].endswith("| 2.00x | 2.00x |")
  assert lines["full (remat dots)"].endswith("| 1.00x | 1.00x |")
  assert "| 9.00 | - | - |" in lines["ssf"]
  assert "WARNING" not in table
  assert "WARNING" not in cmp.markdown(pairs, dict(meta, load_after_1m=2.0))  # its own load
  noisy = cmp.markdown(pairs, dict(meta, load_before_1m=0.7))
  assert "WARNING: 1-minute load above 0.5 before the run" in noisy


def test_gpu_rows_name_the_device_compare_allocator_peaks_and_show_jvt_mfu():
  cmp = _load("compare")
  dev = dict(mem_source="device peak_bytes_in_use", device_kind="NVIDIA H200", backend="gpu",
             dtype="bfloat16", variant="B/16", batch=128)
  jvt = [dict(_row("vpt_deep", 5000.0, 20000.0, 900.0, "jvt", remat="none"), **dev,
              mfu=0.374, peak_tflops=989.4),
         dict(_row("full", 2500.0, 30000.0, 900.0, "jvt", remat="none"), **dev, mfu=0.25,
              peak_tflops=989.4)]
  torch = [dict(_row(m, v, p, 700.0, "torch"), dtype="bfloat16", variant="B/16", batch=128,
                mem_source="device max_memory_allocated", device_kind="NVIDIA H200")
           for m, v, p in (("vpt_deep", 4000.0, 25000.0), ("full", 2000.0, 40000.0))]
  meta = dict(date="d", command="c", cpu="EPYC", cpus=16, uptime_before="u0",
              uptime_after="u1", load_before_1m=0.1, load_after_1m=0.2)
  table = cmp.markdown(cmp.join(jvt, torch), meta)
  assert "- hardware: NVIDIA H200 (one device); host EPYC, 16 CPUs;" in table
  lines = {l.split("|")[1].strip(): l for l in table.splitlines() if l.startswith("| ")}
  # 5000 / 4000 = 1.25x; peaks 20,000 / 25,000 = 0.80x, and no RSS-based "step" share.
  assert "| 5000.00 | 4000.00 | 1.25x | 20,000 | 25,000 | 0.80x (-) |" in lines["vpt_deep"]
  assert "jvt's MFU (its step's matrix FLOP/s over the device's bf16 peak, 989.4 " \
         "TFLOP/s): vpt_deep 37.4%, full 25.0%." in table
  assert "device allocator peak" in table and "resident high-water mark" not in table
  assert "WARNING" not in table
  # The start-up load of a 16-core GPU host does not spoil a GPU step; half its cores busy does.
  assert "WARNING" not in cmp.markdown(cmp.join(jvt, torch), dict(meta, load_before_1m=2.0))
  assert "WARNING: 1-minute load above 8 before the run" in cmp.markdown(
      cmp.join(jvt, torch), dict(meta, load_before_1m=9.0))


def test_compare_refuses_a_jvt_row_from_the_wrong_backend():
  cmp = _load("compare")
  cmp.check_backend({"method": "full", "backend": "gpu"}, "gpu")
  cmp.check_backend({"method": "full", "backend": "cpu"}, "cpu")
  with pytest.raises(RuntimeError, match="JAX_PLATFORMS=cpu"):
    cmp.check_backend({"method": "full", "backend": "gpu"}, "cpu")
  with pytest.raises(RuntimeError, match="ran on JAX's 'cpu' backend, not 'gpu'"):
    cmp.check_backend({"method": "full", "backend": "cpu"}, "gpu")
  assert cmp.parse(["--device", "gpu", "--out", "x"]).device == "gpu"


def test_torch_step_device_reaches_the_child_spec_and_profiles_only_on_cpu():
  ts = _load("torch_step")
  assert ts.specs(ts.parse(["--methods", "full", "--out", "x"]))[0]["device"] == "cpu"
  spec = ts.specs(ts.parse(["--methods", "full", "--device", "cuda", "--out", "x"]))[0]
  assert spec["device"] == "cuda"
  with pytest.raises(SystemExit):
    ts.parse(["--device", "cuda", "--profile-steps", "2", "--out", "x"])
  with pytest.raises(SystemExit):
    ts.parse(["--device", "tpu", "--out", "x"])


def test_method_with_a_remat_policy():
  cmp = _load("compare")
  assert cmp.parse_method("full") == ("full", "none")
  assert cmp.parse_method("full:dots") == ("full", "dots")


def test_compare_rejects_empty_methods():
  cmp = _load("compare")
  with pytest.raises(SystemExit):
    cmp.parse(["--methods", " ,", "--out", "x"])


def test_torch_step_has_every_method_run_py_benchmarks():
  """A method benchmarked by run.py has a PyTorch step to compare with."""
  ts, run = _load("torch_step"), _load("run")
  assert set(run.DEFAULT_METHODS.split(",")) <= set(ts.METHODS)
  assert set(ts.DEFAULT_METHODS.split(",")) <= set(ts.METHODS)


def test_rounds_report_the_median_of_the_rounds_own_ratios():
  cmp = _load("compare")
  # The machine slows down between rounds: each round's ratio is 0.9, 1.2 or 1.0, while the
  # sides' medians (8 and 10) would give 0.8.
  rounds = [{"jvt": _row("vpt_deep", a, pj, 200.0, "jvt", remat="none", train_img_s_min=a - 1,
                         train_img_s_max=a + 1, eval_img_s=2 * a),
             "torch": _row("vpt_deep", b, pt, 700.0, "torch")}
            for a, b, pj, pt in ((9.0, 10.0, 900.0, 1000.0), (6.0, 5.0, 950.0, 990.0),
                                 (8.0, 8.0, 910.0, 1010.0))]
  pair = cmp.merge_rounds(rounds)
  assert pair["jvt"]["train_img_s"] == 8.0 and pair["torch"]["train_img_s"] == 8.0
  assert (pair["jvt"]["train_img_s_min"], pair["jvt"]["train_img_s_max"]) == (5.0, 10.0)
  assert pair["jvt"]["eval_img_s"] == 16.0
  assert (pair["jvt"]["peak_mem_mb"], pair["torch"]["peak_mem_mb"]) == (950.0, 1010.0)
  assert cmp.pair_ratio(pair) == pytest.approx(1.0)
  assert pair["ratio_range"] == pytest.approx((0.9, 1.2))
  table = cmp.markdown([pair], {"load_before_1m": 0.1})
  assert "| 1.00x (0.90-1.20, 3 rounds) |" in table and "Rounds:" in table
  # One round: the plain ratio of the two rows, no rounds note.
  single = cmp.merge_rounds(rounds[:1])
  assert "rounds" not in single and cmp.pair_ratio(single) == pytest.approx(0.9)
  assert "Rounds:" not in cmp.markdown([single], {"load_before_1m": 0.1})


def test_steal_line_shows_each_sides_highest_round_and_is_absent_without_readings():
  cmp = _load("compare")
  rounds = [{"jvt": _row("layernorm", 2.0, 900.0, 200.0, "jvt", remat="dots",
                         cpu_steal_frac=j),
             "torch": _row("layernorm", 2.0, 1000.0, 700.0, "torch", cpu_steal_frac=t)}
            for j, t in ((0.001, None), (0.25, 0.002))]
  pair = cmp.merge_rounds(rounds)
  assert pair["jvt"]["cpu_steal_frac"] == 0.25 and pair["torch"]["cpu_steal_frac"] == 0.002
  other = {"jvt": _row("vp", 2.0, 900.0, 200.0, "jvt"), "torch": None}  # an older row
  table = cmp.markdown([pair, other], {"load_before_1m": 0.1})
  assert ("hypervisor ran other work, `/proc/stat`; the highest of the rounds), jvt / torch: "
          "layernorm (remat dots) 25.0% / 0.2%, vp - / -.") in table
  assert "CPU steal" not in cmp.markdown([other], {"load_before_1m": 0.1})


def test_rounds_flag_must_be_positive():
  cmp = _load("compare")
  assert cmp.parse(["--rounds", "3", "--out", "x"]).rounds == 3
  with pytest.raises(SystemExit):
    cmp.parse(["--rounds", "0", "--out", "x"])


def test_cpu_detail_names_family_model_and_the_isa_that_matters(tmp_path):
  cmp = _load("compare")
  path = tmp_path / "cpuinfo"
  path.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
                  "flags\t\t: fpu avx avx2 fma\n\nprocessor\t: 1\ncpu family\t: 26\n"
                  "flags\t\t: avx512f avx512_bf16\n")
  assert cmp.cpu_detail(str(path)) == ("cpu family 25 model 1; avx2; no avx512f, avx512_bf16, "
                                       "amx_bf16")
  path.write_text("cpu family\t: 26\nmodel\t\t: 2\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n")
  assert cmp.cpu_detail(str(path)) == "cpu family 26 model 2; avx2, avx512f, avx512_bf16, amx_bf16"
  assert cmp.cpu_detail(str(tmp_path / "missing")) == ""
  table = cmp.markdown([{"jvt": _row("full", 1.0, 1.0, 0.0, "jvt"), "torch": None}],
                       {"cpu": "AMD EPYC", "cpu_detail": "cpu family 25 model 1; avx2",
                        "cpus": 2, "load_before_1m": 0.1})
  assert "- hardware: AMD EPYC (cpu family 25 model 1; avx2), 2 CPUs" in table
