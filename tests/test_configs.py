"""The benchmark method configs `configs/{vtab,fgvc}/*.py`: arguments, protocols, recipes, sweeps
and the trainable-parameter count of every method on ViT-B/16 (shapes only, nothing allocated).

Golden counts are written out from the ViT-B/16 dimensions (D=768, 12 blocks, MLP 3072, 16x16
patches, 197 tokens), independently of jvt's partition rules.
"""
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import jvt
from jvt import config_lib, partition, sweep
from jvt.config_lib import load_config
from jvt.data import fgvc, vtab
from jvt.train import loop as train_lib
from jvt.train import model_from_config

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ("vtab", "fgvc")
FILES = [(b, p.stem) for b in BENCHMARKS for p in sorted((REPO / "configs" / b).glob("*.py"))
         if not p.stem.startswith("_")]
OURS = ("vpt_shallow", "vpt_deep", "lora", "adapter", "adaptformer", "bitfit", "ssf", "linear",
        "full")
# The survey's methods (issue 13): docstring, published number and sweeps checked as OURS'.
SURVEY = ("convpass", "fact", "repadapter", "e2vpt", "vp", "dora", "difffit", "adapter_plus")
# Tasks every file serves (the DA-VPT files cover only the tasks with released values). The
# first of each has 102 classes, so a method's VTAB and FGVC models share one shape trace.
TASKS = {"vtab": ("caltech101", "cifar100", "patch_camelyon", "smallnorb_ele"),
         "fgvc": ("flowers", "cub", "cars")}
CLASSES = {"caltech101": 102, "flowers": 102}
PROTOCOL_FIELDS = {  # protocol -> (train, val, test split, trainer's epoch selection)
    "vtab_final": ("train800val200", "", "test", "last_epoch"),
    "vtab_tune": ("train800", "val200", "", "last_epoch"),
    "fgvc": ("train", "val", "test", "best_val_epoch"),
    "fgvc_legacy_max_test": ("train", "val", "test", "legacy_max_test_epoch"),
}
PROTOCOLS = {"vtab": ("vtab_final", "vtab_tune"), "fgvc": ("fgvc", "fgvc_legacy_max_test")}

# Published ViT-B/16 ImageNet-21k numbers (%): VTAB-1k mean of the three group means, FGVC mean.
PUBLISHED = {
    "vtab": dict(vpt_shallow=67.82, vpt_deep=71.96, adapter=73.9, adaptformer=74.75, lora=74.5,
                 bitfit=65.22, ssf=75.69, linear=57.64, full=68.96),
    "fgvc": dict(vpt_shallow=84.62, vpt_deep=89.11, adaptformer=88.48, ssf=90.72, linear=79.32,
                 full=88.54, lora=None, adapter=None, bitfit=None),
}
PUBLISHED["vtab"].update(convpass=76.56, fact=75.6, repadapter=76.1, e2vpt=73.94, vp=None,
                         dora=None, difffit=None, adapter_plus=77.6)
PUBLISHED["fgvc"].update(convpass=None, fact=None, repadapter=None, e2vpt=89.22, vp=None,
                         dora=None, difffit=None, adapter_plus=None)

D, L, F = 768, 12, 3072


def _bottleneck(r):  # down (D x r + r) and up (r x D + D)
  return D * r + r + r * D + D


_BLOCK_BIASES = 4 * D + 2 * D + F + D  # q, k, v, out; norm1, norm2; fc1, fc2
_BLOCK_SSF = 2 * (3 * D + D + F + D + D + D)  # q, k, v, out, fc1, fc2, norm1, norm2
_BACKBONE = (16 * 16 * 3 * D + D + D + 197 * D  # patch embedding, [CLS], position embedding
             + L * (4 * D + 4 * (D * D + D) + D * F + F + F * D + D) + 2 * D)
GOLDEN = {  # trainable parameters besides the head
    "vpt_deep": L * 50 * D,
    "vpt_shallow": 50 * D,
    "lora": L * 2 * (D * 8 + 8 * D),
    "adapter": L * 2 * _bottleneck(8),
    "adaptformer": L * _bottleneck(8),
    "bitfit": L * _BLOCK_BIASES + D + D,  # + patch-embedding and final-norm biases
    "ssf": L * _BLOCK_SSF + 2 * D + 2 * D,  # + after the patch embedding and the final norm
    "linear": 0,
    "full": _BACKBONE,
    # The survey's methods at each benchmark's first task (caltech101, flowers): per-task values
    # where the authors choose them per task.
    "convpass": L * 2 * (D * 8 + 8 + 9 * 8 * 8 + 8 + 8 * D + D),  # down, 3x3 conv, up
    "fact": 2 * D * 32 + 32 ** 3 + 32 * 12 * L,  # FacT-TK rank 32: U, V, G, P
    "repadapter": L * 2 * (D * 8 + 8 + 4 * D + D),  # down; up in 2 groups of [4, 384]
    "e2vpt": {"vtab": L * (32 + 5) * D, "fgvc": L * (5 + 5) * D},  # visual + key-value
    "vp": 2 * 30 * 224 * 3 + 2 * 164 * 30 * 3,  # the 30-pixel frame
    "dora": L * 2 * (D * 8 + 8 * D + D),  # A, B, magnitude of query and value
    "difffit": L * _BLOCK_BIASES + D + D + L * 2 * D + D + L * 2 * D,  # biases, norms, gammas
    "adapter_plus": {"vtab": L * (D * 4 + 4 + 4 * D + D + D),  # dim 4 + channel scale
                     "fgvc": L * (D * 1 + 1 + 1 * D + D + D)},  # dim 1
}


def _path(benchmark, name):
  return str(REPO / "configs" / benchmark / f"{name}.py")


def _load(benchmark, name, arg=None):
  return load_config(_path(benchmark, name) + (f":{arg}" if arg is not None else ""))


def _module(benchmark, name):
  return sweep.load_config_module(_path(benchmark, name))


@functools.lru_cache(maxsize=None)
def _trainable_count(tuning_json: str, variant: str, image_size: int, num_classes: int) -> int:
  config = ml_collections.ConfigDict(dict(
      tuning=json.loads(tuning_json),
      model=dict(variant=variant, dtype="float32", remat="none", overrides={})))
  model = model_from_config(config, num_classes)
  shapes = jvt.param_shapes(model, image_size)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  trainable, _ = partition.split_params(shapes, partition.trainable_mask(shapes, model))
  return partition.count_params(trainable)


def test_every_method_has_both_benchmark_files():
  for benchmark in BENCHMARKS:
    present = {name for b, name in FILES if b == benchmark}
    assert set(OURS + SURVEY) <= present, sorted(set(OURS + SURVEY) - present)


ALL_TASKS = {"vtab": tuple(vtab.VTAB_TASKS), "fgvc": tuple(fgvc.FGVC_TASKS)}


@pytest.mark.parametrize("benchmark,name", FILES)
def test_loads_for_every_task_and_protocol(benchmark, name):
  """Every method x task config of both benchmarks loads (DA-VPT: all 19 VTAB tasks too)."""
  assert len(ALL_TASKS["vtab"]) == 19 and len(ALL_TASKS["fgvc"]) == 5
  for task in ALL_TASKS[benchmark]:
    for protocol in PROTOCOLS[benchmark]:
      c = _load(benchmark, name, f"task={task},protocol={protocol},seed=3")
      assert isinstance(c, ml_collections.ConfigDict) and c.is_locked
      with pytest.raises(AttributeError):
        c.no_such_field = 1
      assert c.dataset.name == f"{benchmark}/{task}"
      want = f"da_vpt_{benchmark}" if name.startswith("da_vpt") else benchmark
      assert c.dataset.preprocess == want
      train, val, test, selection = PROTOCOL_FIELDS[protocol]
      assert (c.dataset.train_split, c.dataset.val_split, c.dataset.test_split, c.protocol) == (
          train, val, test, selection)
      assert c.seed == 3
      assert (c.model.variant, c.model.image_size) == ("B/16", 224)


@pytest.mark.parametrize("benchmark,name", FILES)
def test_model_shapes_and_trainable_count(benchmark, name):
  task = TASKS[benchmark][0]
  c = _load(benchmark, name, f"task={task}")
  count = _trainable_count(json.dumps(c.tuning.to_dict()), c.model.variant, c.model.image_size,
                           CLASSES[task])
  head = D * CLASSES[task] + CLASSES[task]
  assert count > 0
  if name in GOLDEN:
    expected = GOLDEN[name]
    expected = expected[benchmark] if isinstance(expected, dict) else expected
    assert count == expected + head


@pytest.mark.parametrize("benchmark,name", FILES)
def test_rejects_unknown_arg_key(benchmark, name):
  with pytest.raises(ValueError, match="bogus"):
    _load(benchmark, name, f"task={TASKS[benchmark][0]},bogus=1")


@pytest.mark.parametrize("benchmark,name", [f for f in FILES if f[1] in OURS + SURVEY])
def test_published_number_and_command_in_docstring(benchmark, name):
  module = _module(benchmark, name)
  expected = PUBLISHED[benchmark][name]
  assert module.PUBLISHED == expected
  doc = module.__doc__
  assert f"--config=configs/{benchmark}/{name}.py:task=" in doc
  assert "python -m jvt.sweep" in doc
  if expected is None:
    assert "no published" in doc
  else:
    assert f"published {expected}" in " ".join(doc.split())
  assert _load(benchmark, name).method == name


@pytest.mark.parametrize("benchmark,name", [f for f in FILES if f[1] in OURS])
def test_recipe(benchmark, name):
  c = _load(benchmark, name)
  o = c.optimizer
  assert (c.total_epochs, o.schedule) == (100.0, "cosine")
  if name in ("vpt_shallow", "vpt_deep", "linear"):  # VPT's SGD recipe
    assert (o.name, o.momentum, o.base_batch_size, o.warmup_epochs) == ("sgd", 0.9, 256, 10.0)
    assert c.batch_size == {"vtab": 64, "fgvc": 128}[benchmark]
  elif name == "full":  # VPT's full fine-tuning
    assert (o.name, o.base_batch_size, o.warmup_epochs) == ("adamw", 256, 5.0)
  else:  # NOAH-style AdamW
    assert (o.name, o.lr, o.weight_decay, o.base_batch_size, o.warmup_epochs, c.batch_size) == (
        "adamw", 1e-3, 1e-4, -1, 10.0, 64)
  assert c.pretrained.path == "ViT-B_16.npz"
  assert c.dataset.num_classes == -1  # from the data
  assert (c.tuning.get("dropout", 0.0)) == (0.1 if name == "vpt_deep" else 0.0)


def test_default_protocols():
  assert _load("vtab", "vpt_deep").dataset.train_split == "train800val200"
  assert _load("vtab", "vpt_deep").dataset.name == "vtab/cifar100"
  assert _load("fgvc", "vpt_deep").protocol == "best_val_epoch"
  assert _load("fgvc", "vpt_deep").dataset.name == "fgvc/cub"


@pytest.mark.parametrize("benchmark,name", [f for f in FILES if f[1] in OURS + SURVEY])
def test_sweep_specs(benchmark, name):
  path = _path(benchmark, name)
  task = TASKS[benchmark][0]
  final = "vtab_final" if benchmark == "vtab" else "fgvc"
  assert sweep.load_spec(None, f"{path}:task={task},protocol={final}") == {
      "seed": [0, 1, 2, 3, 4]}
  grid_arg = f"task={task},protocol=vtab_tune" if benchmark == "vtab" else f"task={task},sweep=grid"
  spec = sweep.load_spec(None, f"{path}:{grid_arg}")
  vpt = name in ("vpt_deep", "vpt_shallow")
  assert list(spec) == ["optimizer.lr", "optimizer.weight_decay"] + (
      ["tuning.num_prompts"] if vpt else [])
  sizes = {"sgd": (10, 4), "full": (4, 4), "adamw": (5, 4)}[
      "full" if name == "full" else _load(benchmark, name).optimizer.name]
  assert (len(spec["optimizer.lr"]), len(spec["optimizer.weight_decay"])) == sizes
  assert len(sweep.expand_sweep(spec)) == sizes[0] * sizes[1] * (6 if vpt else 1)
  if name in ("vpt_deep", "vpt_shallow", "linear"):
    # KMnP/vpt tune_vtab.py `get_lrwd_range` ("prompt" and "linear").
    assert sorted(spec["optimizer.lr"], reverse=True) == [50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5,
                                                          0.25, 0.1, 0.05]
    assert spec["optimizer.weight_decay"] == [0.01, 0.001, 0.0001, 0.0]
  if vpt:  # VPT's prompt lengths (paper: searched per task)
    assert spec["tuning.num_prompts"] == [1, 5, 10, 50, 100, 200]
  # Every run of the grid applies to the config the sweep runner builds (locked: typos fail).
  config = _load(benchmark, name, grid_arg)
  last = sweep.expand_sweep(spec)[-1]
  sweep.apply_overrides(config, last)
  assert config.optimizer.lr == spec["optimizer.lr"][-1]
  if vpt:
    assert config.tuning.num_prompts == 200
    count = _trainable_count(json.dumps(config.tuning.to_dict()), "B/16", 224, CLASSES[task])
    assert count == (12 if name == "vpt_deep" else 1) * 200 * D + D * 102 + 102


def test_arg_overrides():
  c = _load("vtab", "vpt_deep", "task=dtd,lr=2.5,wd=0.001,num_prompts=10,pretrained=/w/b.npz,"
            "data_dir=/data/tfds")
  assert (c.optimizer.lr, c.optimizer.weight_decay) == (2.5, 0.001)
  assert c.tuning.to_dict() == dict(method="vpt", deep=True, num_prompts=10, dropout=0.1)
  assert (c.pretrained.path, c.dataset.data_dir) == ("/w/b.npz", "/data/tfds")
  assert _load("vtab", "lora", "rank=4").tuning.rank == 4
  assert _load("fgvc", "adaptformer", "dim=64").tuning.dim == 64
  assert _load("vtab", "ssf", "task=dtd,lists=/data/vtab-1k/").dataset.name == (
      "list:/data/vtab-1k/dtd")
  # A registry field the file does not set becomes an arg key too (VPT's prompt init).
  assert _load("fgvc", "vpt_shallow", "init=xavier8").tuning.init == "xavier8"
  assert "init" not in _load("fgvc", "vpt_shallow").tuning


@pytest.mark.parametrize("benchmark,arg,match", [
    ("vtab", "task=cub", "not a vtab task"),
    ("vtab", "protocol=fgvc", "not a vtab protocol"),
    ("fgvc", "protocol=vtab_final", "not a fgvc protocol"),
    ("vtab", "sweep=all", "sweep='all'"),
    ("vtab", "lists=/x,nonsense", "expected key=value"),
    ("fgvc", "lists=/x", "key 'lists' unknown"),  # list folders are a VTAB-1k format
])
def test_bad_args(benchmark, arg, match):
  with pytest.raises(ValueError, match=match):
    _load(benchmark, "linear", arg)


def test_config_spec():
  c = ml_collections.ConfigDict(dict(sweep=dict(optimizer=dict(lr=(0.1, 1.0)), seed=[0, 1],
                                                dataset=dict(name="vtab/dtd"))))
  assert sweep.config_spec(c) == {"optimizer.lr": [0.1, 1.0], "seed": [0, 1],
                                  "dataset.name": "vtab/dtd"}
  assert len(sweep.expand_sweep(sweep.config_spec(c))) == 4
  assert sweep.config_spec(ml_collections.ConfigDict(dict(lr=0.1))) is None
  assert sweep.config_spec(None) is None


def test_sweep_cli_reads_the_config_sweep(tmp_path, capsys):
  config = _path("vtab", "vpt_deep") + ":task=dtd,protocol=vtab_tune"
  assert sweep.main([f"--config={config}", f"--root={tmp_path}", "--print_commands"]) == 0
  commands = capsys.readouterr().out.strip().splitlines()
  assert len(commands) == 240
  assert commands[0].endswith("--config.optimizer.lr=50.0 --config.optimizer.weight_decay=0.01 "
                              "--config.tuning.num_prompts=1")


# ----------------------------------------------------------------------------- the config loader
def test_config_files_import_common_as_a_package():
  """No config file loads another by file path; `configs` is a package."""
  for path in (REPO / "configs").rglob("*.py"):
    text = path.read_text()
    assert "spec_from_file_location" not in text and "exec_module" not in text, path
  for folder in ("configs", "configs/vtab", "configs/fgvc", "configs/distill"):
    assert (REPO / folder / "__init__.py").is_file()


def test_split_spec():
  assert config_lib.split_spec("configs/vtab/vpt_deep.py:task=dtd,lr=0.5") == (
      "configs/vtab/vpt_deep.py", "task=dtd,lr=0.5")
  assert config_lib.split_spec("configs/demo.py") == ("configs/demo.py", None)
  assert config_lib.split_spec("/a:b/c.py:x=1") == ("/a:b/c.py", "x=1")
  assert config_lib.split_spec("c.py:") == ("c.py", "")
  assert sweep.split_config_arg("c.py:x") == ("c.py", "x")


def test_loader_from_another_directory_in_a_fresh_interpreter(tmp_path):
  """A config given by path loads from any working directory (its package is taken from the
  file's folders), with or without an arg; main's --config flag uses the same loader."""
  script = (
      "import sys\n"
      "from jvt.config_lib import load_config\n"
      f"c = load_config({str(REPO / 'configs/vtab/vpt_deep.py')!r} + ':task=dtd')\n"
      "assert c.dataset.name == 'vtab/dtd', c.dataset.name\n"
      f"d = load_config({str(REPO / 'configs/fgvc/da_vpt_plus.py')!r})\n"
      "assert d.method == 'da_vpt_plus'\n"
      "import configs\n"
      f"assert configs.__path__[0] == {str(REPO / 'configs')!r}, configs.__path__\n"
      "from jvt import main\n"
      f"argv = ['jvt', '--config={REPO}/configs/vtab/lora.py:task=dtd,rank=2', '--workdir=w',\n"
      "        '--config.optimizer.lr=0.5']\n"
      "sys.argv = argv  # absl reads the overrides from sys.argv, as on a command line\n"
      "main._parse_flags(argv)\n"
      "assert (main.FLAGS.config.tuning.rank, main.FLAGS.config.optimizer.lr) == (2, 0.5)\n"
      "assert main.FLAGS.config.is_locked\n"
      "print('ok')\n")
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_loader_lone_file_and_errors(tmp_path):
  lone = tmp_path / "cfg.py"
  lone.write_text("import ml_collections\n"
                  "def get_config(arg=None):\n  return ml_collections.ConfigDict({'arg': arg})\n")
  assert config_lib.load_config(f"{lone}:x=1").arg == "x=1"
  assert config_lib.load_config(str(lone)).arg is None
  with pytest.raises(FileNotFoundError, match="no config file"):
    config_lib.load_config(str(tmp_path / "missing.py") + ":a=1")
  empty = tmp_path / "empty.py"
  empty.write_text("X = 1\n")
  with pytest.raises(ValueError, match="defines no get_config"):
    config_lib.load_config(str(empty))
  # A second, different `configs` package in the same process is refused by name.
  other = tmp_path / "configs"
  (other / "vtab").mkdir(parents=True)
  (other / "__init__.py").write_text("")
  (other / "vtab" / "__init__.py").write_text("")
  (other / "vtab" / "x.py").write_text("def get_config(arg=None):\n  return None\n")
  config_lib.load_config_module(str(REPO / "configs" / "vtab" / "linear.py"))
  with pytest.raises(ValueError, match="different package 'configs'"):
    config_lib.load_config_module(str(other / "vtab" / "x.py"))


# ----------------------------------------------------------------------------- DA-VPT recipes
# warmup_lr / min_lr of Noahsark/DA-VPT configs/{fgvc,vtab}/vitb_*.yaml: 1e-8 / 1e-9 except
# vitb_flower102 and vitb_dspr_loc (1e-7 / 1e-8) and vitb_smallnorb_ele (min_lr 1e-8; the file is
# cut off before warmup_lr, so params.py's default 1e-7).
LR_ENDS = {"flowers102": (1e-7, 1e-8), "dsprites_loc": (1e-7, 1e-8),
           "smallnorb_ele": (1e-7, 1e-8)}
DAVPT = [(b, p) for b in BENCHMARKS for p in (False, True)]


def _davpt(benchmark, plus):
  return _module(benchmark, "da_vpt_plus" if plus else "da_vpt")


@pytest.mark.parametrize("benchmark,plus", DAVPT)
def test_davpt_released_training_recipe(benchmark, plus):
  """Released transforms, timm's per-update cosine with the released warm-up start and floor,
  and [CLS] decayed with the prompts' wd in DA-VPT+ (train_cls: true in every released file)."""
  module = _davpt(benchmark, plus)
  table = {**module.RELEASED, **getattr(module, "BORROWED", {})}
  for task, hp in table.items():
    c = module.get_config(f"task={task}")
    o = c.optimizer
    assert c.dataset.preprocess == f"da_vpt_{benchmark}"
    assert (o.schedule, o.warmup_epochs, c.total_epochs) == ("cosine_timm", 10.0, 100.0)
    source = module.BORROWED_FROM.get(task, task) if hasattr(module, "BORROWED_FROM") else task
    assert (o.warmup_init_lr, o.min_lr) == LR_ENDS.get(source, (1e-8, 1e-9)), task
    assert o.decay_cls == plus
    groups = {k: v.to_dict() for k, v in o.groups.items()}
    cls_wd = o.weight_decay * groups.get("cls", {}).get("wd_mult", 1.0) if plus else 0.0
    np.testing.assert_allclose(cls_wd, hp["wd"] if plus else 0.0, rtol=1e-12)
    opt = train_lib._optimizer_dict(c, warmup=70)
    assert (opt["schedule"], opt["min_lr"], opt.get("decay_cls", False)) == (
        "cosine_timm", o.min_lr, plus)


@pytest.mark.parametrize("benchmark,plus", DAVPT)
def test_davpt_paper_preset_has_no_released_scale_ratio(benchmark, plus):
  module = _davpt(benchmark, plus)
  scaled = [t for t, hp in module.RELEASED.items() if hp["scale_ratio"] != 1.0]
  assert scaled  # 5, 10 or 60 in the released files
  for task in scaled:
    code = module.get_config(f"task={task}").tuning
    paper = module.get_config(f"task={task},preset=paper").tuning
    assert code.scale_ratio == module.RELEASED[task]["scale_ratio"] in (5.0, 10.0, 60.0)
    assert (paper.preset, paper.scale_ratio) == ("paper", 1.0)
    assert module.get_config(f"task={task},preset=paper,scale_ratio=7").tuning.scale_ratio == 7.0


def test_davpt_on_all_19_vtab_tasks_with_documented_borrowed_values():
  base, plus = _davpt("vtab", False), _davpt("vtab", True)
  assert len(base.RELEASED) == 16
  assert set(base.RELEASED) | set(base.BORROWED) == set(vtab.VTAB_TASKS)
  assert base.BORROWED_FROM == {"svhn": "cifar100", "sun397": "caltech101",
                                "kitti_dist": "clevr_dist"}
  for task, source in base.BORROWED_FROM.items():
    # Same VTAB group as the task it borrows from.
    assert [g for g, ts in vtab.VTAB_GROUPS.items() if task in ts] == [
        g for g, ts in vtab.VTAB_GROUPS.items() if source in ts]
    c, s = base.get_config(f"task={task}"), base.get_config(f"task={source}")
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.tuning.patch_weight,
            c.tuning.cls_weight, c.tuning.num_prompts) == (
                s.optimizer.lr, s.optimizer.weight_decay, s.tuning.patch_weight,
                s.tuning.cls_weight, s.tuning.num_prompts)
    # The tuning stage searches around them: 27 runs that apply to the config.
    tune = base.get_config(f"task={task},protocol=vtab_tune")
    spec = sweep.config_spec(tune)
    assert spec == {"optimizer.lr": [5e-3, 1e-3, 5e-4], "tuning.cls_weight": [0.01, 0.05, 0.1],
                    "tuning.patch_weight": [0.01, 0.1, 0.5]}
    runs = sweep.expand_sweep(spec)
    assert len(runs) == 27
    head_wd = tune.optimizer.weight_decay * tune.optimizer.groups.head.wd_mult
    sweep.apply_overrides(tune, runs[-1])
    assert (tune.optimizer.lr, tune.tuning.patch_weight) == (5e-4, 0.5)
    assert tune.optimizer.weight_decay * tune.optimizer.groups.head.wd_mult == head_wd
  for module in (base, plus):
    doc = " ".join(module.__doc__.split())
    assert "NOT THE AUTHORS'" in doc and "svhn" in doc and "kitti_dist" in doc
  text = " ".join((REPO / "docs" / "benchmark_configs.md").read_text().split())
  assert "NOT THE AUTHORS'" in text and "svhn <- cifar100" in text
  # Released tasks tune nothing but their own lr: the head's decay survives the override
  # (dmlab's released wd is 0: the trainer's weight_decay holds the head's).
  dmlab = base.get_config("task=dmlab,protocol=vtab_tune")
  assert sweep.config_spec(dmlab) == {"optimizer.lr": [5e-3]}
  sweep.apply_overrides(dmlab, sweep.expand_sweep(sweep.config_spec(dmlab))[0])
  assert dmlab.optimizer.weight_decay == 0.05


@pytest.mark.parametrize("path,expected", [
    ("configs/vtab/da_vpt.py:task=cifar100,backbone=clip-B/16", "da_vpt_vtab:clip"),
    ("configs/fgvc/da_vpt_plus.py:task=cub,backbone=siglip-B/16", "da_vpt_fgvc:minus_one_one"),
    ("configs/vtab/da_vpt.py:task=cifar100", "da_vpt_vtab"),
])
def test_da_vpt_keeps_the_released_transform_and_the_backbone_normalisation(path, expected):
  config = load_config(str(REPO / path))
  assert config.dataset.preprocess == expected
