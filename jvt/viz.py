"""Pictures of runs, attention, features and the DA-VPT mapping, written as PNG files.

Every plotting function draws on its own `matplotlib.figure.Figure` attached to an Agg canvas
and saves it to `path`: pyplot is never imported, so importing or calling this module leaves
matplotlib's global backend and figure registry alone (safe in notebooks, trainers and
headless workers). Each function checks the shapes of its inputs first and raises a
`ValueError` naming the argument, the expected shape and the received one.

The written image is exactly `figsize * dpi` pixels (no tight bounding box), so callers and
tests can rely on its size.
"""

from __future__ import annotations

import math
import numbers
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import matplotlib.colors
import matplotlib.lines
import matplotlib.patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
import numpy as np

PathLike = str | os.PathLike

# Markers for projection groups without an explicit `markers` entry, in dict order.
_DEFAULT_MARKERS = ("o", "^", "s", "*", "D", "v", "P", "X")


# ----------------------------------------------------------------------------- helpers


def _shape_of(x: Any) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _check_shape(
    name: str,
    x: Any,
    spec: Sequence[int | str],
    dims: dict[str, int] | None = None,
    note: str = "",
) -> dict[str, int]:
  """Checks `x` against `spec` and returns the named dimensions it bound.

  `spec` entries are ints (exact sizes) or names; a name already in `dims` (or seen earlier in
  the same spec) must match, otherwise it is bound to the size found. The error message shows
  the expected shape with the known names replaced by their values.
  """
  dims = dict(dims or {})
  shape = _shape_of(x)
  expected = "[" + ", ".join(str(dims.get(s, s)) if isinstance(s, str) else str(s)
                             for s in spec) + "]"
  message = f"{name}: expected shape {expected}, got {shape}" + (f" ({note})" if note else "")
  if len(shape) != len(spec):
    raise ValueError(message)
  for size, want in zip(shape, spec):
    if isinstance(want, str):
      if dims.setdefault(want, size) != size:
        raise ValueError(message)
    elif size != want:
      raise ValueError(message)
  return dims


def _is_number(value: Any) -> bool:
  """True for real scalars (Python, numpy or 0-d arrays), False for bools and everything else."""
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, numbers.Real):
    return True
  if not hasattr(value, "dtype"):
    return False
  return np.ndim(value) == 0 and np.dtype(value.dtype).kind in "iuf"


def _check_rows(rows: Any) -> None:
  if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
    raise ValueError(f"rows: expected a list of dicts, got {type(rows).__name__}")
  if not rows:
    raise ValueError("rows: expected a non-empty list of dicts, got 0 rows")
  for i, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise ValueError(f"rows[{i}]: expected a dict, got {type(row).__name__}")


def _new_figure(figsize: tuple[float, float], dpi: float) -> Figure:
  fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: PathLike) -> pathlib.Path:
  """Writes `fig` as a PNG of exactly figsize * dpi pixels, whatever the user's rcParams say."""
  path = pathlib.Path(path)
  if path.suffix.lower() != ".png":
    raise ValueError(f"path: expected a file name ending in .png, got {str(path)!r}")
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png", dpi=fig.dpi, bbox_inches=fig.bbox_inches)
  return path


# Readable axis labels for the keys runs and benchmarks write.
_AXIS_LABELS = {
    "accuracy": "test accuracy", "test_accuracy": "test accuracy",
    "val_accuracy": "validation accuracy", "trainable_params": "trainable parameters",
    "params": "parameters", "step": "training step", "epoch": "epoch", "wall_s": "time (s)",
}


def axis_label(key: str) -> str:
  """'trainable_params' -> 'trainable parameters', 'train/ce_loss' -> 'train ce loss'."""
  return _AXIS_LABELS.get(key, key.replace("/", " ").replace("_", " "))


def _span(lo: float, hi: float, min_span: float, fraction: bool) -> tuple[float, float]:
  """[lo, hi] padded by 5% and widened to at least min_span (kept inside [0, 1] for fractions)."""
  pad = 0.05 * max(hi - lo, min_span)
  lo, hi = lo - pad, hi + pad
  if hi - lo < min_span:
    mid = (lo + hi) / 2
    lo, hi = mid - min_span / 2, mid + min_span / 2
  if fraction:
    if lo < 0:
      lo, hi = 0.0, max(hi - lo, hi)
    if hi > 1.02:
      lo, hi = max(0.0, lo - (hi - 1.02)), 1.02
  return lo, hi


def _grid(n: int, ncols: int | None, max_cols: int) -> tuple[int, int]:
  cols = min(n, max_cols) if ncols is None else ncols
  if cols < 1:
    raise ValueError(f"ncols: expected a positive int, got {ncols}")
  return math.ceil(n / cols), cols


# ----------------------------------------------------------------------------- training curves


def plot_training_curves(
    rows: list[dict],
    path: PathLike,
    *,
    keys: Sequence[str] | None = None,
    x_key: str = "step",
    ncols: int | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float = 100,
) -> pathlib.Path:
  """Plots metric records (one subplot per metric key) against `x_key` and saves a PNG.

  Args:
    rows: metric records such as `{"step": 10, "train/loss": 1.2, "val/accuracy": 0.4}`; a
      key may be missing from some rows (eval metrics are logged less often), and each
      subplot only uses the rows that have its key. Every row must have `x_key`.
    path: output file, ending in `.png`; parent folders are created.
    keys: metrics to plot, in order; default every key holding a number in every row where it
      appears, except `x_key`, in order of first appearance.
    x_key: the x axis (e.g. `"step"` or `"epoch"`).
    ncols: subplots per row (default min(3, number of metrics)).
    figsize: inches (default 4 x 3 per subplot); the PNG is `figsize * dpi` pixels.
    dpi: pixels per inch.

  Returns:
    `path` as a `pathlib.Path`.
  """
  _check_rows(rows)
  for i, row in enumerate(rows):
    if x_key not in row:
      raise ValueError(f"rows[{i}]: missing the x key {x_key!r} (pass x_key=... or drop the "
                       f"row); its keys are {sorted(row)}")
    if not _is_number(row[x_key]):
      raise ValueError(f"rows[{i}][{x_key!r}]: expected a number, got {row[x_key]!r}")
  if keys is None:
    seen = dict.fromkeys(k for row in rows for k in row if k != x_key)
    keys = [k for k in seen if all(_is_number(row[k]) for row in rows if k in row)]
    if not keys:
      raise ValueError(f"rows: no numeric metric keys besides {x_key!r}; keys found: "
                       f"{list(seen)}")
  else:
    keys = list(keys)
    if not keys:
      raise ValueError("keys: expected at least one metric key, got an empty list")
    for key in keys:
      present = [row for row in rows if key in row]
      if not present:
        raise ValueError(f"keys: {key!r} is in no row")
      bad = next((row[key] for row in present if not _is_number(row[key])), None)
      if bad is not None:
        raise ValueError(f"keys: {key!r} holds a non-numeric value {bad!r}")

  nrows, ncols = _grid(len(keys), ncols, max_cols=3)
  fig = _new_figure(figsize or (4 * ncols, 3 * nrows), dpi)
  for i, key in enumerate(keys):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    xs = [float(row[x_key]) for row in rows if key in row]  # [n_key]
    ys = [float(row[key]) for row in rows if key in row]  # [n_key]
    # Markers keep single evaluations (often the case for val metrics) visible.
    ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel(x_key, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
  return _save(fig, path)


def run_title(config: Mapping[str, Any], workdir: PathLike) -> str:
  """'<run folder>: <method(s)> on <dataset>[/<task>]' from a run's config (dict of config.json)."""
  tuning = config.get("tuning") or {"method": "linear"}
  methods = "+".join(str(t.get("method")) for t in (tuning if isinstance(tuning, list)
                                                     else [tuning]))
  dataset = config.get("dataset") or {}
  task = str(dataset.get("name", "?")) + (f"/{dataset['task']}" if dataset.get("task") else "")
  return f"{pathlib.Path(workdir).name}: {methods} on {task}"


_LOSS_TOTAL = "train/loss"
_CURVE_EXTRAS = (("train/lr", "learning rate"), ("train/grad_norm", "gradient norm"),
                 ("train/img_per_s", "throughput (images/s)"))


def plot_run_curves(
    rows: list[dict],
    path: PathLike,
    *,
    title: str = "",
    x_key: str = "step",
    dpi: float = 100,
) -> pathlib.Path:
  """The curves of one run (its metrics.jsonl records) in labelled panels, saved as a PNG.

  Panels: the training loss; each other loss term the objective logs (`train/*_loss`, e.g.
  DA-VPT's `cls_loss` and `patch_loss` or distillation's terms), in its own panel since their
  scales differ; accuracy (train as a line, validation and test evaluations as large markers
  labelled with their value, on an axis of at least 0.2 so noise does not look like a cliff);
  learning rate, gradient norm and throughput when logged. The legend gives the last
  validation and test accuracy.

  Args:
    rows: the run's records, e.g. `{"step": 25, "train/loss": 1.3, "train/accuracy": 0.4}`
      and `{"step": 300, "val/accuracy": 0.6, "test/accuracy": 0.59}`.
    path: output file, ending in `.png`.
    title: the figure title; name the run, the method and the task (`run_title`).
    x_key: the x axis.
    dpi: pixels per inch (each panel is 4 x 3 inches).
  """
  _check_rows(rows)

  def series(key):
    pts = [(float(r[x_key]), float(r[key])) for r in rows if key in r and x_key in r
           and _is_number(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]

  present = dict.fromkeys(k for r in rows for k in r)
  terms = [k for k in present if k.startswith("train/") and k.endswith("_loss")]
  if terms == ["train/ce_loss"]:
    terms = []  # the cross-entropy alone is the total loss: no panel of its own
  panels = []  # (title, [(key, label, style)], y-axis settings)
  if _LOSS_TOTAL in present:
    panels.append(("training loss (total)", [(_LOSS_TOTAL, "total", "line")], None))
  panels += [(f"loss term: {k[len('train/'):]}", [(k, k[len("train/"):], "line")], None)
             for k in terms]
  accuracy = [(k, label, style) for k, label, style in (
      ("train/accuracy", "train (batch)", "line"), ("val/accuracy", "validation", "points"),
      ("test/accuracy", "test", "points")) if k in present]
  if accuracy:
    panels.append(("accuracy", accuracy, "fraction"))
  panels += [(label, [(k, label, "line")], None) for k, label in _CURVE_EXTRAS if k in present]
  if not panels:
    raise ValueError(f"rows: no run metrics to plot (keys found: {list(present)})")

  nrows, ncols = _grid(len(panels), None, max_cols=3)
  fig = _new_figure((4 * ncols, 3 * nrows + (0.4 if title else 0)), dpi)
  for i, (panel_title, curves, yaxis) in enumerate(panels):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    values = []
    for j, (key, label, style) in enumerate(curves):
      xs, ys = series(key)
      values += ys
      if style == "line":
        ax.plot(xs, ys, linewidth=1.2, color=f"C{j}", label=label,
                marker="o" if len(xs) <= 3 else None, markersize=3)
      else:
        ax.scatter(xs, ys, s=60, color=f"C{j}", edgecolors="black", linewidths=0.5, zorder=3,
                   label=f"{label}: {ys[-1]:.3f}" if ys else label)
    if yaxis == "fraction" and values:
      ax.set_ylim(*_span(min(values), max(values), 0.2, fraction=True))
    if len(curves) > 1:
      ax.legend(fontsize=7, loc="best")
    ax.set_title(panel_title, fontsize=9)
    ax.set_xlabel(axis_label(x_key), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  return _save(fig, path)


# ----------------------------------------------------------------------------- attention


def cls_attention_grid(
    attn_probs: Any,
    num_prefix_tokens: int,
    grid_hw: tuple[int, int],
    query_index: int = 0,
) -> np.ndarray:
  """Attention of one query token over the image patches, averaged over heads.

  The token order is `[CLS, prompts..., patches...]` (VPT inserts prompts right after [CLS]),
  so the patches are the last `gh * gw` tokens, in row-major grid order.

  Args:
    attn_probs: one block's attention probabilities, `[B, heads, T, T]` (query, key), with
      `T = num_prefix_tokens + gh * gw`. Slice off any padding tokens first.
    num_prefix_tokens: tokens before the patches: 1 ([CLS]) + the number of prompts.
    grid_hw: the patch grid `(gh, gw)`, e.g. `(14, 14)` for a 224 image and 16 pixel patches.
    query_index: the query token: 0 for [CLS], `1 + m` for prompt m.

  Returns:
    `[B, gh, gw]` float32: per image, the head-averaged attention from the query to each patch.
  """
  gh, gw = (int(s) for s in grid_hw)
  if gh < 1 or gw < 1:
    raise ValueError(f"grid_hw: expected two positive ints, got {tuple(grid_hw)}")
  if num_prefix_tokens < 0:
    raise ValueError(f"num_prefix_tokens: expected >= 0, got {num_prefix_tokens}")
  tokens = num_prefix_tokens + gh * gw
  attn = attn_probs if hasattr(attn_probs, "shape") else np.asarray(attn_probs)
  _check_shape("attn_probs", attn, ("B", "heads", "T", "T"), {"T": tokens},
               note=f"T = num_prefix_tokens + gh * gw = {num_prefix_tokens} + {gh} * {gw}")
  if not 0 <= query_index < tokens:
    raise ValueError(f"query_index: expected 0 <= query_index < {tokens}, got {query_index}")
  # Slice before converting so only [B, heads, gh*gw] leaves the device, not the whole T x T.
  rows = np.asarray(attn[:, :, query_index, num_prefix_tokens:], dtype=np.float32)  # [B, h, N]
  return rows.mean(axis=1).reshape(rows.shape[0], gh, gw)  # [B, gh, gw]


def plot_attention_maps(
    images: Any,
    attention: Any,
    path: PathLike,
    *,
    titles: Sequence[str] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    ncols: int | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float = 100,
) -> pathlib.Path:
  """Draws each image with its attention map upsampled (bilinear) and overlaid; saves a PNG.

  Args:
    images: `[B, H, W, 3]`, float in [0, 1] or uint8.
    attention: `[B, h, w]`, one map per image on the patch grid (e.g. from
      `cls_attention_grid`). Each map is scaled to its own min..max for display.
    path: output file, ending in `.png`; parent folders are created.
    titles: optional, one string per image.
    alpha: opacity of the heat map, in [0, 1].
    cmap: matplotlib colormap name of the heat map.
    ncols: images per row (default min(4, B)).
    figsize: inches (default 2.5 x 2.5 per image); the PNG is `figsize * dpi` pixels.
    dpi: pixels per inch.

  Returns:
    `path` as a `pathlib.Path`.
  """
  images = np.asarray(images)
  attention = np.asarray(attention)
  dims = _check_shape("images", images, ("B", "H", "W", 3))
  _check_shape("attention", attention, ("B", "h", "w"), dims, note="one map per image")
  if images.dtype != np.uint8:
    if images.dtype.kind != "f":
      raise ValueError(f"images: expected dtype uint8 or float, got {images.dtype}")
    if not (np.all(images >= 0) and np.all(images <= 1)):
      raise ValueError(f"images: float values must lie in [0, 1], got range "
                       f"[{np.nanmin(images):.3g}, {np.nanmax(images):.3g}] "
                       "(rescale, or pass uint8)")
  num = dims["B"]
  if num == 0:
    raise ValueError("images: expected at least one image, got B = 0")
  if titles is not None and len(titles) != num:
    raise ValueError(f"titles: expected {num} titles (one per image), got {len(titles)}")
  if not 0 <= alpha <= 1:
    raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")

  height, width = dims["H"], dims["W"]
  nrows, ncols = _grid(num, ncols, max_cols=4)
  fig = _new_figure(figsize or (2.5 * ncols, 2.5 * nrows), dpi)
  for i in range(num):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    ax.imshow(images[i])
    # The map covers the image's pixel extent, so imshow does the upsampling.
    ax.imshow(attention[i], cmap=cmap, alpha=alpha, interpolation="bilinear",
              extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    ax.set_axis_off()
    if titles is not None:
      ax.set_title(titles[i], fontsize=8)
  return _save(fig, path)


# ----------------------------------------------------------------------------- projections


def pca_2d(x: Any) -> np.ndarray:
  """Projects `x` `[N, D]` onto its first two principal components: `[N, 2]` float64.

  PCA by SVD of the centred data. Each component's sign is fixed so that its largest-magnitude
  loading is positive, making plots reproducible across runs and platforms.
  """
  x = np.asarray(x, dtype=np.float64)
  _check_shape("x", x, ("N", "D"))
  if x.shape[0] < 2 or x.shape[1] < 2:
    raise ValueError(f"x: expected shape [N, D] with N >= 2 and D >= 2, got {x.shape}")
  centred = x - x.mean(axis=0)  # [N, D]
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  components = vt[:2]  # [2, D]
  signs = np.sign(components[np.arange(2), np.argmax(np.abs(components), axis=1)])
  return centred @ (components * signs[:, None]).T  # [N, 2]


def _tsne_2d(x: np.ndarray, seed: int) -> np.ndarray:
  try:
    from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError("method='tsne' needs scikit-learn: `pip install scikit-learn`, or use "
                     "method='pca'") from e
  perplexity = min(30.0, x.shape[0] - 1.0)  # t-SNE requires perplexity < N.
  return TSNE(n_components=2, perplexity=perplexity, init="pca",
              random_state=seed).fit_transform(x)  # [N, 2]


def plot_projection(
    groups: Mapping[str, Any],
    path: PathLike,
    *,
    labels: Mapping[str, Any] | None = None,
    method: str = "pca",
    title: str | None = None,
    markers: Mapping[str, str] | None = None,
    label_title: str = "label",
    seed: int = 0,
    figsize: tuple[float, float] = (6, 5),
    dpi: float = 100,
) -> pathlib.Path:
  """Projects all groups jointly to 2-D and scatter-plots them, one marker per group.

  The groups share one projection (fit on their concatenation), so distances between, say,
  prompts and [CLS] features are comparable. Groups with `labels` are coloured by label with
  one colour scale shared by all groups (so prompt m and the features mapped to m can share
  a colour); groups without labels get one colour each. Up to 20 distinct integer labels get
  one legend entry each ("<label_title> <value>"), more a colour bar. Star-marked groups (e.g.
  the prompts) are drawn large and above the others, so a few prompts stay visible over
  hundreds of feature points.

  Args:
    groups: name -> features `[N_i, D]`, same D for all, e.g.
      `{"cls": cls_feats, "patch": patch_feats, "prompts": prompts}`.
    path: output file, ending in `.png`; parent folders are created.
    labels: optional name -> numeric labels `[N_i]` for some of the groups.
    method: `"pca"` (numpy SVD) or `"tsne"` (needs scikit-learn).
    title: optional axes title.
    markers: optional name -> matplotlib marker (e.g. `{"prompts": "*"}`); other groups take
      `o ^ s * D v P X` in order.
    label_title: what the labels are, for the legend (e.g. `"prompt id"`).
    seed: random state for t-SNE.
    figsize: inches; the PNG is `figsize * dpi` pixels.
    dpi: pixels per inch.

  Returns:
    `path` as a `pathlib.Path`.
  """
  if not isinstance(groups, Mapping) or not groups:
    raise ValueError("groups: expected a non-empty dict of name -> [N_i, D] arrays")
  labels = dict(labels or {})
  markers = dict(markers or {})
  for arg, given in (("labels", labels), ("markers", markers)):
    unknown = sorted(set(given) - set(groups))
    if unknown:
      raise ValueError(f"{arg}: names {unknown} are not in groups {list(groups)}")
  if method not in ("pca", "tsne"):
    raise ValueError(f"method: expected 'pca' or 'tsne', got {method!r}")

  feats, width = {}, {}
  for name, value in groups.items():
    feats[name] = np.asarray(value, dtype=np.float64)
    # The first group fixes D; the rest must match it.
    width = {"D": _check_shape(f"groups[{name!r}]", feats[name], ("N", "D"), width)["D"]}
    if feats[name].shape[0] == 0:
      raise ValueError(f"groups[{name!r}]: expected at least one row, got shape "
                       f"{feats[name].shape}")
  label_values = {}
  for name, value in labels.items():
    label_values[name] = np.asarray(value)
    _check_shape(f"labels[{name!r}]", label_values[name], (feats[name].shape[0],),
                 note=f"one label per row of groups[{name!r}]")
    if label_values[name].dtype.kind not in "iuf":
      raise ValueError(f"labels[{name!r}]: expected numeric labels, got dtype "
                       f"{label_values[name].dtype}")

  stacked = np.concatenate(list(feats.values()), axis=0)  # [sum N_i, D]
  coords = pca_2d(stacked) if method == "pca" else _tsne_2d(stacked, seed)  # [sum N_i, 2]

  fig = _new_figure(figsize, dpi)
  ax = fig.add_subplot(1, 1, 1)
  norm = cmap = colour_of = None
  if label_values:
    every = np.concatenate(list(label_values.values()))
    distinct = np.unique(every)
    if distinct.size <= 20 and np.all(distinct == np.round(distinct)):
      palette = matplotlib.colormaps["tab10" if distinct.size <= 10 else "tab20"]
      colour_of = {float(v): palette(i) for i, v in enumerate(distinct)}
    else:
      cmap = matplotlib.colormaps["viridis"]
      norm = matplotlib.colors.Normalize(vmin=float(every.min()), vmax=float(every.max()))
  handles, start = [], 0
  default_markers = iter(_DEFAULT_MARKERS)
  for i, (name, value) in enumerate(feats.items()):
    xy = coords[start:start + value.shape[0]]  # [N_i, 2]
    start += value.shape[0]
    marker = markers[name] if name in markers else next(default_markers, "o")
    star = marker == "*"  # stars (prompts) large and on top of the feature points
    style = dict(marker=marker, s=260 if star else 24, edgecolors="black",
                 linewidths=1.2 if star else 0.4, zorder=4 if star else 2)
    if name in label_values:
      if colour_of is not None:
        colours = [colour_of[float(v)] for v in label_values[name]]
        ax.scatter(xy[:, 0], xy[:, 1], c=colours, **style)
      else:
        ax.scatter(xy[:, 0], xy[:, 1], c=label_values[name], cmap=cmap, norm=norm, **style)
      colour = "grey"
    else:
      colour = f"C{i}" if not label_values else "black"
      ax.scatter(xy[:, 0], xy[:, 1], color=colour, **style)
    handles.append(matplotlib.lines.Line2D([], [], linestyle="", marker=marker, color=colour,
                                           markeredgecolor="black", markersize=9 if star else 6,
                                           label=name))
  if colour_of is not None:
    handles += [matplotlib.patches.Patch(color=c, label=f"{label_title} {v:g}")
                for v, c in colour_of.items()]
  elif label_values:
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label_title)
  ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.8)
  ax.set_xlabel(f"{method} 1")
  ax.set_ylabel(f"{method} 2")
  if title:
    ax.set_title(title)
  return _save(fig, path)


# ----------------------------------------------------------------------------- benchmarks


def plot_accuracy_vs_params(
    rows: list[dict],
    path: PathLike,
    *,
    x_key: str = "trainable_params",
    y_key: str = "accuracy",
    label_key: str | None = "method",
    title: str | None = None,
    chance: float | None = None,
    min_span: float = 0.2,
    figsize: tuple[float, float] = (6, 4),
    dpi: float = 100,
) -> pathlib.Path:
  """Scatter of accuracy against trainable parameters (log x), each point labelled.

  The y axis spans at least `min_span` (clipped to [0, 1] for fractions), so that accuracies a
  few tenths of a point apart are drawn close together instead of at opposite edges.

  Args:
    rows: records from the benchmark or the results aggregator, e.g.
      `{"method": "vpt_deep", "trainable_params": 92160, "accuracy": 0.71}`; every row needs
      `x_key` (> 0, for the log axis) and `y_key`, and `label_key` unless it is None.
    path: output file, ending in `.png`; parent folders are created.
    x_key, y_key, label_key: which row fields to read. Points sharing a label share a colour.
    title: optional axes title (name the task and the backbone).
    chance: optional chance accuracy, drawn as a dashed line.
    min_span: the smallest y range drawn, in units of `y_key`.
    figsize: inches; the PNG is `figsize * dpi` pixels.
    dpi: pixels per inch.

  Returns:
    `path` as a `pathlib.Path`.
  """
  _check_rows(rows)
  needed = [x_key, y_key] + ([label_key] if label_key is not None else [])
  for i, row in enumerate(rows):
    for key in needed:
      if key not in row:
        raise ValueError(f"rows[{i}]: missing {key!r}; its keys are {sorted(row)}")
    for key in (x_key, y_key):
      if not _is_number(row[key]):
        raise ValueError(f"rows[{i}][{key!r}]: expected a number, got {row[key]!r}")
    if not row[x_key] > 0:
      raise ValueError(f"rows[{i}][{x_key!r}]: expected > 0 for the log axis, got {row[x_key]}")

  fig = _new_figure(figsize, dpi)
  ax = fig.add_subplot(1, 1, 1)
  names = [str(row[label_key]) if label_key is not None else "" for row in rows]
  colour_of = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(names))}
  for row, name in zip(rows, names):
    x, y = float(row[x_key]), float(row[y_key])
    ax.scatter([x], [y], color=colour_of[name], s=30, edgecolors="black", linewidths=0.4)
    if name:
      ax.annotate(name, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
  ys = [float(row[y_key]) for row in rows] + ([float(chance)] if chance is not None else [])
  if chance is not None:
    ax.axhline(float(chance), color="grey", linestyle="--", linewidth=1)
    ax.annotate("chance", (0.01, float(chance)), xycoords=("axes fraction", "data"),
                xytext=(0, 3), textcoords="offset points", fontsize=7, color="grey")
  ax.set_ylim(*_span(min(ys), max(ys), min_span, fraction=all(0 <= y <= 1 for y in ys)))
  ax.set_xscale("log")
  ax.set_xlabel(axis_label(x_key) + " (log scale)")
  ax.set_ylabel(axis_label(y_key))
  ax.grid(True, which="both", alpha=0.3)
  if title:
    ax.set_title(title, fontsize=10)
  return _save(fig, path)


def plot_accuracy_bars(
    rows: list[dict],
    path: PathLike,
    *,
    label_key: str = "label",
    y_key: str = "accuracy",
    title: str | None = None,
    chance: float | None = None,
    figsize: tuple[float, float] = (6, 3),
    dpi: float = 100,
) -> pathlib.Path:
  """Horizontal bars of accuracy, one per row (top to bottom in row order), values written on.

  For models that share a parameter count (the distillation demo's students), where a scatter
  against parameters would stack their labels. The axis runs from 0 to 1 for fractions.
  """
  _check_rows(rows)
  for i, row in enumerate(rows):
    for key in (label_key, y_key):
      if key not in row:
        raise ValueError(f"rows[{i}]: missing {key!r}; its keys are {sorted(row)}")
    if not _is_number(row[y_key]):
      raise ValueError(f"rows[{i}][{y_key!r}]: expected a number, got {row[y_key]!r}")
  values = [float(r[y_key]) for r in rows]
  fig = _new_figure(figsize, dpi)
  ax = fig.add_subplot(1, 1, 1)
  ys = np.arange(len(rows))[::-1]  # first row on top
  ax.barh(ys, values, color=[f"C{i % 10}" for i in range(len(rows))], edgecolor="black",
          linewidth=0.4)
  for y, v in zip(ys, values):
    ax.annotate(f"{v:.3f}", (v, y), xytext=(3, 0), textcoords="offset points", va="center",
                fontsize=8)
  ax.set_yticks(ys, [str(r[label_key]) for r in rows], fontsize=8)
  if chance is not None:
    ax.axvline(float(chance), color="grey", linestyle="--", linewidth=1, label="chance")
    ax.legend(fontsize=7, loc="lower right")
  if all(0 <= v <= 1 for v in values):
    ax.set_xlim(0, 1.08)
  ax.set_xlabel(axis_label(y_key))
  ax.grid(True, axis="x", alpha=0.3)
  if title:
    ax.set_title(title, fontsize=10)
  return _save(fig, path)


# ----------------------------------------------------------------------------- DA-VPT mapping


def plot_mapping(
    mapping: Any,
    num_prompts: int,
    path: PathLike,
    *,
    class_names: Sequence[str] | None = None,
    figsize: tuple[float, float] = (8, 4),
    dpi: float = 100,
) -> pathlib.Path:
  """Draws the DA-VPT class -> prompt mapping: a C x M one-hot image and classes per prompt.

  Args:
    mapping: `[C]` ints in `[0, num_prompts)`; class c uses prompt `mapping[c]`.
    num_prompts: M, the number of proxy prompts.
    path: output file, ending in `.png`; parent folders are created.
    class_names: optional, C names shown on the class axis (readable for up to ~50 classes
      at the default size; enlarge `figsize` for more).
    figsize: inches; the PNG is `figsize * dpi` pixels.
    dpi: pixels per inch.

  Returns:
    `path` as a `pathlib.Path`.
  """
  mapping = np.asarray(mapping)
  _check_shape("mapping", mapping, ("C",), note="one prompt index per class")
  if mapping.dtype.kind not in "iu":
    raise ValueError(f"mapping: expected integer prompt indices, got dtype {mapping.dtype}")
  if not isinstance(num_prompts, numbers.Integral) or num_prompts < 1:
    raise ValueError(f"num_prompts: expected a positive int, got {num_prompts!r}")
  num_classes = mapping.shape[0]
  if num_classes == 0:
    raise ValueError("mapping: expected at least one class, got shape (0,)")
  if mapping.min() < 0 or mapping.max() >= num_prompts:
    raise ValueError(f"mapping: values must lie in [0, {num_prompts}) (num_prompts), got "
                     f"range [{mapping.min()}, {mapping.max()}]")
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f"class_names: expected {num_classes} names (one per class), got "
                     f"{len(class_names)}")

  one_hot = np.zeros((num_classes, num_prompts))  # [C, M]
  one_hot[np.arange(num_classes), mapping] = 1.0
  counts = one_hot.sum(axis=0)  # [M]

  fig = _new_figure(figsize, dpi)
  left = fig.add_subplot(1, 2, 1)
  left.imshow(one_hot, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
  left.set_xlabel("prompt")
  left.set_ylabel("class")
  left.set_title("class -> prompt", fontsize=9)
  if class_names is not None:
    left.set_yticks(np.arange(num_classes), labels=list(class_names), fontsize=6)
  right = fig.add_subplot(1, 2, 2)
  right.bar(np.arange(num_prompts), counts, color="C0")
  right.set_xlabel("prompt")
  right.set_ylabel("classes")
  right.set_title(f"classes per prompt ({int((counts == 0).sum())} unused)", fontsize=9)
  for ax in (left, right):
    ax.xaxis.get_major_locator().set_params(integer=True)
  return _save(fig, path)
