"""Tests for jvt.viz: PNG sizes, shape errors, and the two numeric helpers against numpy."""

import pathlib
import re
import subprocess
import sys

import matplotlib
import numpy as np
from PIL import Image
import pytest

from jvt import viz

FIGSIZE, DPI = (4, 3), 50
EXPECTED_SIZE = (200, 150)  # figsize * dpi, (width, height)


def _png_size(path):
  assert path.stat().st_size > 0
  with Image.open(path) as image:
    assert image.format == "PNG"
    return image.size


def _shape_error(message):
  return pytest.raises(ValueError, match=re.escape(message))


# ----------------------------------------------------------------------------- training curves

ROWS = [
    {"step": 0, "train/loss": 2.3, "train/accuracy": 0.1, "split": "train"},
    {"step": 10, "train/loss": 1.2, "train/accuracy": 0.5, "val/accuracy": 0.4},
    {"step": 20, "train/loss": 0.9, "train/accuracy": 0.7, "train/patch_loss": np.float32(0.3)},
]


def test_training_curves_png_size(tmp_path):
  path = viz.plot_training_curves(ROWS, tmp_path / "curves.png", figsize=FIGSIZE, dpi=DPI)
  assert path == tmp_path / "curves.png"
  assert _png_size(path) == EXPECTED_SIZE


def test_training_curves_default_keys_set_the_grid(tmp_path):
  # Four numeric metrics ("split" is a string, "step" the x axis): 3 columns x 2 rows of 4 x 3
  # inches by default.
  path = viz.plot_training_curves(ROWS, tmp_path / "curves.png", dpi=10)
  assert _png_size(path) == (3 * 4 * 10, 2 * 3 * 10)
  path = viz.plot_training_curves(ROWS, tmp_path / "one.png", keys=["val/accuracy"], dpi=10)
  assert _png_size(path) == (4 * 10, 3 * 10)


def test_training_curves_errors(tmp_path):
  out = tmp_path / "c.png"
  with _shape_error("rows: expected a non-empty list of dicts, got 0 rows"):
    viz.plot_training_curves([], out)
  with _shape_error("rows[1]: missing the x key 'step'"):
    viz.plot_training_curves([{"step": 0, "a": 1.0}, {"a": 2.0}], out)
  with _shape_error("keys: 'val/loss' is in no row"):
    viz.plot_training_curves(ROWS, out, keys=["val/loss"])
  with _shape_error("keys: 'split' holds a non-numeric value 'train'"):
    viz.plot_training_curves(ROWS, out, keys=["split"])
  with _shape_error("path: expected a file name ending in .png"):
    viz.plot_training_curves(ROWS, tmp_path / "c.pdf")


def test_size_ignores_user_rcparams_and_creates_folders(tmp_path):
  out = tmp_path / "a" / "b" / "curves.png"
  with matplotlib.rc_context({"savefig.bbox": "tight", "savefig.dpi": 300}):
    path = viz.plot_training_curves(ROWS, out, figsize=FIGSIZE, dpi=DPI)
  assert _png_size(path) == EXPECTED_SIZE


# ----------------------------------------------------------------------------- attention


def test_cls_attention_grid_matches_loops():
  rng = np.random.default_rng(0)
  batch, heads, prefix, (gh, gw) = 2, 3, 4, (2, 3)
  tokens = prefix + gh * gw
  attn = rng.random((batch, heads, tokens, tokens)).astype(np.float32)
  for query in (0, 2):
    want = np.zeros((batch, gh, gw))
    for b in range(batch):
      for i in range(gh):
        for j in range(gw):
          want[b, i, j] = sum(attn[b, h, query, prefix + i * gw + j] for h in range(heads)) / heads
    got = viz.cls_attention_grid(attn, prefix, (gh, gw), query_index=query)
    assert got.shape == (batch, gh, gw)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cls_attention_grid_hand_built():
  # [CLS] + 1 prompt, 2 x 2 grid: head 0 of image 1 looks only at patch (1, 0) (token 2 + 2),
  # head 1 only at patch (0, 1) (token 2 + 1); image 0 attends nowhere among the patches.
  attn = np.zeros((2, 2, 6, 6))
  attn[1, 0, 0, 4] = 1.0
  attn[1, 1, 0, 3] = 1.0
  attn[1, 1, 1, 5] = 1.0  # the prompt's row, ignored for query_index=0
  got = viz.cls_attention_grid(attn, num_prefix_tokens=2, grid_hw=(2, 2))
  np.testing.assert_array_equal(got[0], np.zeros((2, 2)))
  np.testing.assert_array_equal(got[1], [[0.0, 0.5], [0.5, 0.0]])
  prompt = viz.cls_attention_grid(attn, num_prefix_tokens=2, grid_hw=(2, 2), query_index=1)
  np.testing.assert_array_equal(prompt[1], [[0.0, 0.0], [0.0, 0.5]])


def test_cls_attention_grid_accepts_jax_arrays():
  jnp = pytest.importorskip("jax.numpy")
  attn = np.random.default_rng(1).random((1, 2, 5, 5))
  np.testing.assert_allclose(viz.cls_attention_grid(jnp.asarray(attn), 1, (2, 2)),
                             viz.cls_attention_grid(attn, 1, (2, 2)), rtol=1e-6)


def test_cls_attention_grid_errors():
  with _shape_error("attn_probs: expected shape [B, heads, 9, 9], got (2, 3, 10, 10) "
                    "(T = num_prefix_tokens + gh * gw = 3 + 2 * 3)"):
    viz.cls_attention_grid(np.zeros((2, 3, 10, 10)), 3, (2, 3))
  with _shape_error("attn_probs: expected shape [B, heads, 9, 9], got (3, 9, 9)"):
    viz.cls_attention_grid(np.zeros((3, 9, 9)), 3, (2, 3))
  with _shape_error("query_index: expected 0 <= query_index < 9, got 9"):
    viz.cls_attention_grid(np.zeros((1, 1, 9, 9)), 3, (2, 3), query_index=9)


def test_attention_maps_png_size_and_overlay(tmp_path):
  images = np.zeros((2, 16, 16, 3), np.float32)
  attention = np.random.default_rng(0).random((2, 4, 4))
  plain = viz.plot_attention_maps(images, attention, tmp_path / "plain.png", alpha=0.0,
                                  figsize=FIGSIZE, dpi=DPI)
  overlaid = viz.plot_attention_maps(images, attention, tmp_path / "att.png", alpha=0.8,
                                     titles=["a", "b"], figsize=FIGSIZE, dpi=DPI)
  assert _png_size(plain) == _png_size(overlaid) == EXPECTED_SIZE
  # Black images with an invisible map stay grey-scale; a visible jet map adds colour.
  def colourfulness(path):
    rgb = np.asarray(Image.open(path).convert("RGB"), np.int32)
    return np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).max()
  assert colourfulness(plain) == 0
  assert colourfulness(overlaid) > 50
  uint8 = viz.plot_attention_maps(np.full((3, 8, 8, 3), 200, np.uint8), np.ones((3, 2, 2)),
                                  tmp_path / "u8.png", figsize=FIGSIZE, dpi=DPI)
  assert _png_size(uint8) == EXPECTED_SIZE


def test_attention_maps_errors(tmp_path):
  out = tmp_path / "a.png"
  images = np.zeros((2, 16, 16, 3))
  with _shape_error("images: expected shape [B, H, W, 3], got (2, 16, 16)"):
    viz.plot_attention_maps(np.zeros((2, 16, 16)), np.zeros((2, 4, 4)), out)
  with _shape_error("attention: expected shape [2, h, w], got (3, 4, 4) (one map per image)"):
    viz.plot_attention_maps(images, np.zeros((3, 4, 4)), out)
  with _shape_error("attention: expected shape [2, h, w], got (2, 16)"):
    viz.plot_attention_maps(images, np.zeros((2, 16)), out)
  with _shape_error("images: float values must lie in [0, 1], got range [0, 255]"):
    ramp = np.broadcast_to(np.arange(256.0).reshape(1, 16, 16, 1), images.shape)  # 0..255
    viz.plot_attention_maps(ramp, np.zeros((2, 4, 4)), out)
  with _shape_error("titles: expected 2 titles (one per image), got 1"):
    viz.plot_attention_maps(images, np.zeros((2, 4, 4)), out, titles=["x"])


# ----------------------------------------------------------------------------- projections


def test_pca_2d_matches_numpy_svd_up_to_sign():
  x = np.random.default_rng(0).normal(size=(20, 6)) * np.array([5, 3, 1, 0.5, 0.2, 0.1])
  centred = x - x.mean(axis=0)
  u, s, vt = np.linalg.svd(centred)
  want = u[:, :2] * s[:2]  # [N, 2]
  got = viz.pca_2d(x)
  assert got.shape == (20, 2)
  for k in range(2):
    sign = np.sign(got[:, k] @ want[:, k])
    np.testing.assert_allclose(got[:, k], sign * want[:, k], atol=1e-10)
    # Documented convention: the largest-magnitude loading of each component is positive.
    assert sign == np.sign(vt[k, np.argmax(np.abs(vt[k]))])


def test_pca_2d_errors():
  with _shape_error("x: expected shape [N, D], got (5,)"):
    viz.pca_2d(np.zeros(5))
  with _shape_error("x: expected shape [N, D] with N >= 2 and D >= 2, got (1, 4)"):
    viz.pca_2d(np.zeros((1, 4)))


def _groups():
  rng = np.random.default_rng(0)
  return {"cls": rng.normal(size=(10, 8)), "patch": rng.normal(size=(12, 8)),
          "prompts": rng.normal(size=(3, 8))}


def test_projection_png_size(tmp_path):
  labels = {"cls": np.arange(10) % 3, "prompts": np.arange(3)}
  path = viz.plot_projection(_groups(), tmp_path / "proj.png", labels=labels,
                             markers={"prompts": "*"}, title="t", figsize=FIGSIZE, dpi=DPI)
  assert _png_size(path) == EXPECTED_SIZE
  path = viz.plot_projection(_groups(), tmp_path / "plain.png", figsize=FIGSIZE, dpi=DPI)
  assert _png_size(path) == EXPECTED_SIZE


def test_projection_errors(tmp_path, monkeypatch):
  out = tmp_path / "p.png"
  groups = _groups()
  with _shape_error("groups['bad']: expected shape [N, 8], got (3, 7)"):
    viz.plot_projection({**groups, "bad": np.zeros((3, 7))}, out)
  with _shape_error("groups['bad']: expected shape [N, 8], got (3,)"):
    viz.plot_projection({**groups, "bad": np.zeros(3)}, out)
  with _shape_error("labels['cls']: expected shape [10], got (9,)"):
    viz.plot_projection(groups, out, labels={"cls": np.zeros(9, int)})
  with _shape_error("labels: names ['nope'] are not in groups"):
    viz.plot_projection(groups, out, labels={"nope": np.zeros(3, int)})
  with _shape_error("method: expected 'pca' or 'tsne', got 'umap'"):
    viz.plot_projection(groups, out, method="umap")
  monkeypatch.setitem(sys.modules, "sklearn", None)
  monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
  with _shape_error("method='tsne' needs scikit-learn: `pip install scikit-learn`, or use "
                    "method='pca'"):
    viz.plot_projection(groups, out, method="tsne")


def test_projection_tsne(tmp_path):
  pytest.importorskip("sklearn")
  path = viz.plot_projection(_groups(), tmp_path / "tsne.png", method="tsne",
                             figsize=FIGSIZE, dpi=DPI)
  assert _png_size(path) == EXPECTED_SIZE


# ----------------------------------------------------------------------------- benchmarks

BENCH = [
    {"method": "linear", "trainable_params": 7_690, "accuracy": 0.63},
    {"method": "vpt_deep", "trainable_params": 92_160, "accuracy": 0.72},
    {"method": "full", "trainable_params": 85_800_000, "accuracy": 0.69},
]


def test_accuracy_vs_params_png_size(tmp_path):
  path = viz.plot_accuracy_vs_params(BENCH, tmp_path / "acc.png", figsize=FIGSIZE, dpi=DPI)
  assert _png_size(path) == EXPECTED_SIZE
  rows = [{"n": 10, "top1": 0.5}, {"n": 1000, "top1": 0.7}]
  path = viz.plot_accuracy_vs_params(rows, tmp_path / "nolabel.png", x_key="n", y_key="top1",
                                     label_key=None, figsize=FIGSIZE, dpi=DPI)
  assert _png_size(path) == EXPECTED_SIZE


def test_accuracy_axis_has_a_minimum_span(tmp_path):
  """0.982 vs 0.984 (noise) is drawn on at least 0.2 of axis, not edge to edge."""
  lo, hi = viz._span(0.982, 0.984, 0.2, fraction=True)
  assert hi - lo >= 0.2 - 1e-9 and hi <= 1.02 and lo < 0.982
  lo, hi = viz._span(0.25, 0.81, 0.2, fraction=True)  # wider data: 5% padding
  assert lo == pytest.approx(0.25 - 0.028) and hi == pytest.approx(0.81 + 0.028)
  assert viz._span(0.01, 0.02, 0.2, fraction=True) == pytest.approx((0.0, 0.2))
  rows = [dict(BENCH[0], accuracy=0.982), dict(BENCH[1], accuracy=0.984)]
  path = viz.plot_accuracy_vs_params(rows, tmp_path / "a.png", chance=0.25, title="t", dpi=DPI)
  assert _png_size(path) == (300, 200)
  assert viz.axis_label("trainable_params") == "trainable parameters"
  assert viz.axis_label("train/ce_loss") == "train ce loss"


def test_run_curves_plot_the_loss_terms(tmp_path):
  rows = [{"step": 10, "train/loss": 2.0, "train/ce_loss": 1.0, "train/cls_loss": 13.0,
           "train/accuracy": 0.4, "train/lr": 0.1},
          {"step": 20, "train/loss": 1.5, "train/ce_loss": 0.8, "train/cls_loss": 12.0,
           "train/accuracy": 0.6, "train/lr": 0.05},
          {"step": 20, "val/accuracy": 0.55, "test/accuracy": 0.5}]
  title = viz.run_title({"tuning": {"method": "da_vpt"},
                         "dataset": {"name": "jvt_synthetic", "task": "count"}}, tmp_path / "r")
  assert title == "r: da_vpt on jvt_synthetic/count"
  path = viz.plot_run_curves(rows, tmp_path / "curves.png", title=title, dpi=DPI)
  # total loss, ce_loss, cls_loss, accuracy, learning rate: 5 panels in a 2 x 3 grid.
  assert _png_size(path) == (12 * DPI, int((6 + 0.4) * DPI))
  with _shape_error("rows: no run metrics to plot"):
    viz.plot_run_curves([{"step": 1, "time": 3.0}], tmp_path / "none.png")


def test_accuracy_bars(tmp_path):
  rows = [{"label": "teacher", "accuracy": 0.84}, {"label": "student", "accuracy": 0.73}]
  path = viz.plot_accuracy_bars(rows, tmp_path / "bars.png", chance=0.25, figsize=FIGSIZE,
                                dpi=DPI)
  assert _png_size(path) == EXPECTED_SIZE
  with _shape_error("rows[1]: missing 'accuracy'"):
    viz.plot_accuracy_bars([rows[0], {"label": "x"}], tmp_path / "b.png")


def test_accuracy_vs_params_errors(tmp_path):
  out = tmp_path / "a.png"
  with _shape_error("rows[0]: missing 'accuracy'"):
    viz.plot_accuracy_vs_params([{"method": "x", "trainable_params": 5}], out)
  with _shape_error("rows[1]['trainable_params']: expected > 0 for the log axis, got 0"):
    viz.plot_accuracy_vs_params([BENCH[0], {**BENCH[1], "trainable_params": 0}], out)
  with _shape_error("rows: expected a list of dicts, got dict"):
    viz.plot_accuracy_vs_params(BENCH[0], out)


# ----------------------------------------------------------------------------- mapping


def test_mapping_png_size(tmp_path):
  mapping = np.array([0, 2, 2, 1, 0, 2])
  path = viz.plot_mapping(mapping, 4, tmp_path / "map.png", figsize=FIGSIZE, dpi=DPI,
                          class_names=[f"c{i}" for i in range(6)])
  assert _png_size(path) == EXPECTED_SIZE


def test_mapping_errors(tmp_path):
  out = tmp_path / "m.png"
  with _shape_error("mapping: expected shape [C], got (2, 3) (one prompt index per class)"):
    viz.plot_mapping(np.zeros((2, 3), int), 4, out)
  with _shape_error("mapping: values must lie in [0, 4) (num_prompts), got range [0, 4]"):
    viz.plot_mapping(np.array([0, 4]), 4, out)
  with _shape_error("mapping: expected integer prompt indices, got dtype float64"):
    viz.plot_mapping(np.array([0.0, 1.0]), 4, out)
  with _shape_error("class_names: expected 2 names (one per class), got 3"):
    viz.plot_mapping(np.array([0, 1]), 4, out, class_names=["a", "b", "c"])


# ----------------------------------------------------------------------------- global state


def test_pyplot_is_never_imported(tmp_path):
  code = (
      "import sys\n"
      "import numpy as np\n"
      "from jvt import viz\n"
      "assert 'matplotlib.pyplot' not in sys.modules, 'imported at import'\n"
      f"viz.plot_mapping(np.array([0, 1, 1]), 2, {str(tmp_path / 'm.png')!r})\n"
      "assert 'matplotlib.pyplot' not in sys.modules, 'imported when plotting'\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 0, result.stderr
