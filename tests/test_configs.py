"""The benchmark method configs `configs/{vtab,fgvc}/*.py`: arguments, protocols, recipes, sweeps
and the trainable-parameter count of every method on ViT-B/16 (shapes only, nothing allocated).

Golden counts are written out from the ViT-B/16 dimensions (D=768, 12 blocks, MLP 3072, 16x16
patches, 197 tokens), independently of jvt's partition rules.
"""
import functools
import json
import pathlib

import jax
import ml_collections
import pytest

import jvt
from jvt import partition, sweep
from jvt.config_lib import load_config
from jvt.train import model_from_config

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ("vtab", "fgvc")
FILES = [(b, p.stem) for b in BENCHMARKS for p in sorted((REPO / "configs" / b).glob("*.py"))]
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
    "vtab_final": ("train800val200", "", "test", "last"),
    "vtab_tune": ("train800", "val200", "", "last"),
    "fgvc": ("train", "val", "test", "best_val"),
    "fgvc_legacy_max_test": ("train", "val", "test", "legacy_max_test"),
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


@pytest.mark.parametrize("benchmark,name", FILES)
def test_loads_for_tasks_and_protocols(benchmark, name):
  for task in TASKS[benchmark]:
    for protocol in PROTOCOLS[benchmark]:
      c = _load(benchmark, name, f"task={task},protocol={protocol},seed=3")
      assert isinstance(c, ml_collections.ConfigDict) and c.is_locked
      with pytest.raises(AttributeError):
        c.no_such_field = 1
      assert c.dataset.name == f"{benchmark}/{task}"
      assert c.dataset.preprocess == benchmark
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
  assert _load("fgvc", "vpt_deep").protocol == "best_val"
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
  assert list(spec) == ["optimizer.lr", "optimizer.weight_decay"]
  sizes = {"sgd": (10, 4), "full": (4, 4), "adamw": (5, 4)}[
      "full" if name == "full" else _load(benchmark, name).optimizer.name]
  assert (len(spec["optimizer.lr"]), len(spec["optimizer.weight_decay"])) == sizes
  assert len(sweep.expand_sweep(spec)) == sizes[0] * sizes[1]
  if name in ("vpt_deep", "vpt_shallow", "linear"):
    assert spec["optimizer.lr"] == [50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05]
    assert spec["optimizer.weight_decay"] == [0.01, 0.001, 0.0001, 0.0]
  # Every run of the grid applies to the config the sweep runner builds (locked: typos fail).
  config = _load(benchmark, name, grid_arg)
  sweep.apply_overrides(config, sweep.expand_sweep(spec)[-1])
  assert config.optimizer.lr == spec["optimizer.lr"][-1]


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
  assert len(commands) == 40
  assert commands[0].endswith("--config.optimizer.lr=50.0 --config.optimizer.weight_decay=0.01")
