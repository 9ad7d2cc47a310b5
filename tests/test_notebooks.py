"""The Colab notebooks run top to bottom, offline, on the synthetic data with tiny settings.

Each notebook is executed with nbclient in its own temporary working directory by a kernel of
this interpreter (a kernel spec written to a temporary JUPYTER_PATH, so no installed kernel is
needed) with `JVT_NOTEBOOK_SMALL=1`, which the notebooks read to pick a tiny model and a few
steps. The tests then check what the notebooks printed, displayed and wrote against the run
files and, for the reloaded model's predictions, against a forward pass computed here.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import sys

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO / "colabs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """Environment for the kernels: this interpreter's kernel spec, jvt importable, small mode."""
  jupyter_path = tmp_path_factory.mktemp("jupyter")
  spec_dir = jupyter_path / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (jvt tests)", "language": "python"}))
  mp = pytest.MonkeyPatch()
  mp.setenv("JUPYTER_PATH", str(jupyter_path))
  mp.setenv("JVT_NOTEBOOK_SMALL", "1")
  # Both notebooks pretrain the same tiny backbone and rebuild models they trained: a compilation
  # cache shared by the kernels compiles each of these programs once.
  mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
  mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")])))
  yield
  mp.undo()


def _execute(name: str, workdir: pathlib.Path) -> nbformat.NotebookNode:
  nb = nbformat.read(COLABS / name, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(workdir)}})
  client.execute()
  return nb


def _text(nb) -> str:
  """All stream and text/plain outputs of the executed notebook."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        parts.append(out.text)
      elif "data" in out and "text/plain" in out.data:
        parts.append(out.data["text/plain"])
  return "\n".join(parts)


def _displayed(nb, mime: str) -> list[str]:
  return [out.data[mime] for cell in nb.cells for out in cell.get("outputs", [])
          if "data" in out and mime in out.data]


def _check_png(path: pathlib.Path) -> np.ndarray:
  """The image of a written PNG file; fails if it is missing or blank."""
  import matplotlib.image
  assert path.read_bytes()[:8] == PNG_SIGNATURE, path
  pixels = matplotlib.image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50, path
  assert float(pixels[..., :3].std()) > 0.01, f"{path} is blank"
  return pixels


def test_notebooks_are_stored_without_outputs():
  for path in sorted(COLABS.glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None, path.name


def test_quickstart(kernel_env, tmp_path):
  nb = _execute("quickstart.ipynb", tmp_path)
  text = _text(nb)
  workdir = tmp_path / "jvt_quickstart"
  run_dir = workdir / "runs" / "vpt_deep"

  # The accuracy line is the run's final test accuracy.
  final = json.loads((run_dir / "final_metrics.json").read_text())
  match = re.search(r"test accuracy: (\d\.\d{4}) \(vpt_deep, ([\d,]+) trainable", text)
  assert match, text[-3000:]
  assert float(match.group(1)) == pytest.approx(final["test_accuracy"], abs=1e-4)
  assert int(match.group(2).replace(",", "")) == final["trainable_params"]
  assert final["total_steps"] == 20 and final["methods"] == ["vpt"]

  # The training curves were written and shown inline.
  _check_png(run_dir / "curves.png")
  assert len(_displayed(nb, "image/png")) >= 1

  # The trainable file holds exactly the prompts and the head, and matches the export.
  saved = np.load(workdir / "vpt_deep_trainable.npz")
  exported = np.load(run_dir / "export" / "trainable.npz")
  assert sorted(saved.files) == sorted(exported.files)
  assert all(k.startswith(("Transformer/prompts/", "head/")) for k in saved.files)
  for key in saved.files:
    np.testing.assert_array_equal(saved[key], exported[key])
  assert "predictions of the reloaded model equal the trained state's: True" in text

  # Predictions recomputed here from the backbone checkpoint + the trainable file alone.
  import jax
  from flax import traverse_util

  import jvt
  from jvt.data import pipeline

  pred = json.loads((workdir / "predictions.json").read_text())
  config = json.loads((run_dir / "config.json").read_text())
  assert config["pretrained"]["path"] == pred["checkpoint"]
  assert pred["checkpoint"] == str(workdir / "pretrained" / "vit_demo.npz")
  model = jvt.build_model(config["model"]["variant"], final["num_classes"],
                          tuning=config["tuning"], **config["model"]["overrides"])
  size = config["model"]["image_size"]
  params = jvt.load_pretrained(pred["checkpoint"],
                               jvt.init_params(model, jax.random.key(7), size), model)
  flat = traverse_util.flatten_dict(params, sep="/")
  flat.update({k: saved[k] for k in saved.files})
  params = traverse_util.unflatten_dict(flat, sep="/")
  labels, predicted = [], []
  for batch in pipeline.make_eval_batches(config["dataset"], "test", global_batch_size=64,
                                          image_size=size, preprocess="vit"):
    logits, _ = model.apply({"params": params}, batch["image"])
    labels.append(batch["label"][batch["mask"]])
    predicted.append(np.asarray(logits).argmax(-1)[batch["mask"]])
  labels, predicted = np.concatenate(labels), np.concatenate(predicted)
  np.testing.assert_array_equal(labels, pred["labels"])
  np.testing.assert_array_equal(predicted, pred["predicted"])
  assert np.mean(predicted == labels) == pytest.approx(final["test_accuracy"],
                                                      abs=2.5 / len(labels))


def _markdown_table(markdown: str) -> dict[str, list[int]]:
  """class -> prompt columns of a `| class | ... |` markdown table."""
  rows = [[c.strip() for c in line.strip().strip("|").split("|")]
          for line in markdown.splitlines() if line.startswith("|")]
  return {r[0]: [int(v) for v in r[1:]] for r in rows[2:]}


def _check_kmeans_fixed_point(config: dict, mapping: np.ndarray, num_prompts: int) -> None:
  """The initial mapping is a converged cosine k-means of the frozen model's class means.

  Recomputed here: final [CLS] of the backbone (no prompts) on the first
  `mapping_images_per_class` training images of each class, l2-normalised and averaged per
  class (then layer-normed without affine if the spec says so); each prompt's centroid is the
  normalised sum of its classes' unit means, and every class must be closest to its own.
  """
  import jax

  import jvt
  from jvt.data import preprocess, sources

  variant, size = config["model"]["variant"], config["model"]["image_size"]
  overrides, num_classes = config["model"]["overrides"], len(mapping)
  spec = jvt.methods.find(jvt.build_model(variant, num_classes, tuning=config["tuning"],
                                          **overrides), "da_vpt")
  plain = jvt.build_model(variant, num_classes, tuning=None, **overrides)
  params = jvt.load_pretrained(config["pretrained"]["path"],
                               jvt.init_params(plain, jax.random.key(3), size), plain)
  source = sources.get_source(config["dataset"], config["dataset"]["train_split"])
  labels = np.asarray(source.labels())
  to_input = preprocess.get_preprocess("vit", size, train=False)
  means = []
  for c in range(num_classes):
    rows = np.flatnonzero(labels == c)[:spec.mapping_images_per_class]
    images = np.stack([to_input(source[int(i)]["image"], np.random.default_rng(0))
                       for i in rows])
    _, aux = plain.apply({"params": params}, images)
    feats = np.asarray(aux["cls"], np.float64)  # [K, D]
    means.append((feats / np.linalg.norm(feats, axis=1, keepdims=True)).mean(axis=0))
  means = np.stack(means)  # [C, D]
  if spec.kmeans_layer_norm:
    means = (means - means.mean(1, keepdims=True)) / np.sqrt(means.var(1, keepdims=True) + 1e-6)
  unit = means / np.linalg.norm(means, axis=1, keepdims=True)
  centroids = np.stack([unit[mapping == j].sum(0) for j in range(num_prompts)])  # [M, D]
  centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
  np.testing.assert_array_equal(np.argmax(unit @ centroids.T, axis=1), mapping)


def test_da_vpt_explained(kernel_env, tmp_path):
  nb = _execute("da_vpt_explained.ipynb", tmp_path)
  text = _text(nb)
  workdir = tmp_path / "jvt_da_vpt"
  saved = json.loads((workdir / "mapping.json").read_text())
  classes, m = saved["classes"], saved["num_prompts"]
  assert classes == ["red", "green", "blue", "yellow", "magenta", "cyan"] and m == 3

  # The tables show the mappings that were saved; k-means leaves no prompt without a class.
  tables = [_markdown_table(t) for t in _displayed(nb, "text/markdown")]
  assert len(tables) == 2
  assert tables[0] == {c: [saved["initial"][i]] for i, c in enumerate(classes)}
  assert tables[1] == {c: [saved["initial"][i], saved["after_training"][i]]
                       for i, c in enumerate(classes)}
  assert sorted(set(saved["initial"])) == list(range(m))
  assert all(0 <= p < m for p in saved["after_training"])
  config = json.loads((workdir / "run" / "config.json").read_text())
  assert config["pretrained"]["path"] == str(workdir / "pretrained" / "vit_demo.npz")
  _check_kmeans_fixed_point(config, np.asarray(saved["initial"]), m)

  # Both metric losses were logged over training, finite, and printed before/after.
  rows = [json.loads(line) for line in
          (workdir / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
  logged = [r for r in rows if "train/patch_loss" in r]
  assert len(logged) >= 5
  assert all(math.isfinite(r["train/patch_loss"]) and math.isfinite(r["train/cls_loss"])
             for r in logged)
  terms = re.findall(r"(before|after) tuning: +L_ML\(X, P\) = ([-\d.]+), "
                     r"L_ML\(P, x_cls\) = ([-\d.]+)", text)
  assert [t[0] for t in terms] == ["before", "after"]
  assert all(math.isfinite(float(v)) for t in terms for v in t[1:])
  assert re.search(r"test accuracy: \d\.\d{4}", text)

  # Every picture was written and shown inline.
  figures = workdir / "figures"
  names = ["mapping.png", "losses.png", "projection_pca_before.png",
           "projection_pca_after.png", "attention.png"]
  for name in names:
    _check_png(figures / name)
  try:
    import sklearn  # noqa: F401
    names += ["projection_tsne_before.png", "projection_tsne_after.png"]
  except ImportError:
    pass
  assert sorted(p.name for p in figures.glob("*.png")) == sorted(names)
  assert len(_displayed(nb, "image/png")) == len(names)
  # 4 query rows ([CLS] + 3 prompts) x 6 images at 2 inches x 100 dpi each.
  assert _check_png(figures / "attention.png").shape[:2] == (800, 1200)
