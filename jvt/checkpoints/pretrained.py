"""`load_pretrained`: a checkpoint file merged into a freshly initialised jvt parameter tree.

Loading is a tree merge: the file (converted to Linen names by `formats.py`) provides every
backbone leaf of the model; by design the head, the tuning parameters and any leaf the file
cannot have (`fc_norm` for MAE-style models, `pre_logits` the file lacks) keep their initial
values. Anything else that does not fit raises one `CheckpointMismatchError` naming every key.
Before the arrays are matched, the model's architectural options (GELU form, layer-norm eps, [CLS],
registers, layer scale, pre-norm, patch bias, MAP pooling) are checked against those the file
implies (`formats.checkpoint_options`); options the model was explicitly built with
(`ViT.explicit_options`) are the user's choice and are not checked. A contradicted option is
reported in the same error as the keys that do not fit.
"""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jvt.checkpoints import formats
from jvt.checkpoints import hub
from jvt.checkpoints import posemb as posemb_lib

PyTree = Any

# Options a file fixes and a model must share (unless chosen explicitly at build time).
CHECKED_OPTIONS = ("gelu_approximate", "layer_norm_eps", "class_token", "num_registers",
                   "layer_scale", "pre_norm", "patch_bias", "activation")

# (hidden, layers, mlp) -> variant name, to suggest which model a file was trained as.
_VARIANTS = {
    (192, 12, 768): "Ti", (384, 12, 1536): "S", (768, 12, 3072): "B", (1024, 24, 4096): "L",
    (1280, 32, 5120): "H", (1408, 40, 6144): "g", (1664, 48, 8192): "G", (1152, 27, 4304): "So400m",
}


class CheckpointMismatchError(ValueError):
  """The file's leaves do not fit the model: missing, unexpected or wrongly shaped keys.

  The message is short (diagnosis first, two keys per kind); `details` lists every key.
  """

  def __init__(self, message: str, details: str = ""):
    super().__init__(message)
    self.details = details or message


def flatten_params(tree: PyTree) -> dict[str, Any]:
  """`{'a/b/kernel': leaf}` view of a nested parameter tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  return dict(flat)


def tree_geometry(flat: dict[str, Any]) -> dict[str, int]:
  """Hidden size, patch size, depth, MLP width and heads read off a flat ViT tree."""
  geo = {}
  if "embedding/kernel" in flat:
    shape = np.shape(flat["embedding/kernel"])
    geo["hidden size"], geo["patch size"] = shape[-1], shape[0]
  blocks = {m.group(1) for k in flat if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
  if blocks:
    geo["layers"] = len(blocks)
  mlp = flat.get("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel")
  if mlp is not None and np.ndim(mlp) == 2:
    geo["MLP dim"] = np.shape(mlp)[1]
  query = flat.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
  if query is not None and np.ndim(query) == 3:
    geo["heads"] = np.shape(query)[1]
  return geo


def _variant(geo: dict[str, int]) -> str | None:
  name = _VARIANTS.get((geo.get("hidden size"), geo.get("layers"), geo.get("MLP dim")))
  return f"{name}/{geo['patch size']}" if name else None


def _likely_cause(loaded: dict, target: dict, fmt: str) -> str:
  file_geo, model_geo = tree_geometry(loaded), tree_geometry(target)
  causes = [f"{k} {file_geo[k]} in file vs {model_geo[k]} in model"
            for k in file_geo if k in model_geo and file_geo[k] != model_geo[k]]
  if causes:
    variant = _variant(file_geo)
    causes = [(f"the file looks like {variant}: " if variant else "") + "wrong variant? "
              + ", ".join(causes)]
  if "fc_norm/scale" in loaded and "fc_norm/scale" not in target:
    causes.append("the file has fc_norm (MAE-style global pool): build the model with "
                  "pool='gap' and fc_norm=True")
  if "cls" in target and "cls" not in loaded:
    causes.append("the file has no cls token: build the model with class_token=False (and "
                  "pool='gap' or 'map'), or with checkpoint=PATH")
  expected = [k for k in target if formats.is_backbone_leaf(k) and not k.startswith("head/")]
  if sum(k in loaded for k in expected) < len(expected) / 2:  # names, whatever the shapes
    causes.append(f"wrong format? the file was read as {fmt!r}; pass format= one of "
                  f"{formats.FORMATS}")
  return "; ".join(causes) if causes else "the file was written for another model"


def _mismatch_message(head: str, cause: str, sections) -> CheckpointMismatchError:
  """At most 12 lines, the diagnosis first; every key goes to a file (named) and the debug log."""
  full = [f"{head}:"]
  for title, items in sections:
    full += [f"  {title}:"] + [f"    {item}" for item in items] if items else []
  full.append(f"likely cause: {cause}")
  details = "\n".join(full)
  logging.debug("%s", details)
  fd, listing = tempfile.mkstemp(prefix="jvt_checkpoint_mismatch_", suffix=".txt")
  with os.fdopen(fd, "w") as f:
    f.write(details + "\n")
  lines = [f"{head}.", f"likely cause: {cause}"]
  for title, items in sections:
    if items:
      lines.append(f"  {title}:" if len(items) <= 2 else f"  {title}, first 2:")
      lines += [f"    {item}" for item in items[:2]]
  lines.append(f"every key: {listing}")
  return CheckpointMismatchError("\n".join(lines), details)


def _shape(x) -> list[int]:
  return list(np.shape(x))


def _place(value: np.ndarray, like) -> jax.Array:
  """The file value as a jax array with the dtype (and sharding) of the model leaf."""
  value = np.asarray(value).astype(np.dtype(like.dtype))
  if isinstance(like, jax.Array):
    return jax.make_array_from_callback(value.shape, like.sharding, lambda idx: value[idx])
  return jnp.asarray(value)


def _posemb_fits(file_shape, model_shape) -> bool:
  """Only the token count may differ (resized); the grids must be square."""
  if len(file_shape) != 3 or len(model_shape) != 3 or file_shape[0] != 1:
    return False
  if file_shape[2] != model_shape[2]:
    return False
  try:
    posemb_lib.num_prefix_tokens(file_shape[1])
  except ValueError:
    return False
  return True


def default_posemb_interpolation(options: dict) -> str:
  """How the file's own family resizes its position grid (see docs/checkpoints.md)."""
  family, fmt = options["family"], options["format"]
  if family == "dinov2":
    return "bicubic" if options.get("num_registers") else "dinov2"
  if family == "clip" or (family == "siglip" and fmt not in ("vit_npz", "big_vision_npz")):
    return "bicubic"
  return "linear"


def option_conflicts(model: Any, options: dict) -> list[str]:
  """Each option of `model` that the file (its `checkpoint_options`) contradicts, as text."""
  explicit = set(getattr(model, "explicit_options", ()))
  wrong = []
  for name in CHECKED_OPTIONS:
    if name not in options or name in explicit or not hasattr(model, name):
      continue
    have, want = getattr(model, name), options[name]
    same = math.isclose(have, want) if isinstance(want, float) else have == want
    if not same:
      wrong.append(f"{name}={have!r} in the model, the file implies {name}={want!r}")
  file_map, model_map = options.get("pool") == "map", getattr(model, "pool", "tok") == "map"
  if file_map != model_map and "pool" not in explicit:
    wrong.append(f"pool={model.pool!r} in the model, the file "
                 + ("pools with a MAP head (pool='map')" if file_map else "has no MAP head"))
  return wrong


def load_pretrained(path: str | os.PathLike, params: PyTree, model: Any, *,
                    format: str | None = None, posemb_interpolation: str | None = None,
                    keep_head: bool = False,
                    log: Callable[[str], Any] = logging.info) -> PyTree:
  """Returns `params` with every backbone leaf replaced by the checkpoint's.

  Args:
    path: a `.npz` (vision_transformer, big_vision) or `.safetensors` (timm, HuggingFace,
      OpenAI / OpenCLIP) file, or a hub name `hf-hub:<org>/<repo>` / `timm:<model>.<tag>` read
      through the Hugging Face cache (jvt.checkpoints.hub). Pickles (`.pth`, `.pt`, `.pkl`,
      torch `.bin`) are refused unread.
    params: the model's freshly initialised parameter tree (`variables["params"]`); it fixes
      the structure, shapes, dtypes and shardings of the result.
    model: the jvt ViT module (`num_heads` splits fused torch projections; its options are
      checked against those the file implies, see `option_conflicts`).
    format: one of formats.FORMATS; None detects it from the keys.
    posemb_interpolation: when the position grid size differs: "linear" (scipy.ndimage.zoom
      order=1, as vision_transformer and big_vision), "bicubic" (antialiased cubic, as timm and
      OpenCLIP) or "dinov2" (DINOv2's interpolate_pos_encoding); None or "": the file's
      family's own.
    keep_head: keep the file's head when its shapes match the model's (pre_logits is loaded
      whenever the model has a representation layer and the file holds one).
    log: where the one-line summaries go (ignored arrays, leaves kept from init).

  Raises:
    FileNotFoundError: `path` does not exist.
    formats.CheckpointFormatError: unreadable, pickled, corrupt or unknown file.
    CheckpointMismatchError: options the file contradicts, missing, unexpected or
      mis-shaped leaves (all named at once).
  """
  if isinstance(params, dict | flax.core.FrozenDict) and set(params) == {"params"}:
    raise ValueError("pass the parameter collection variables['params'], not the variables dict.")
  if hub.is_hub_name(path):
    path = hub.resolve(path)
  if posemb_interpolation and posemb_interpolation not in posemb_lib.METHODS:
    raise ValueError(f"unknown posemb_interpolation {posemb_interpolation!r}; "
                     f"choose one of {posemb_lib.METHODS} or None (the file's family's own).")
  fmt, loaded, notes = formats.read_checkpoint(path, num_heads=model.num_heads, format=format)
  options = formats.checkpoint_options(path, format=fmt)
  conflicts = option_conflicts(model, options)
  posemb_interpolation = posemb_interpolation or default_posemb_interpolation(options)
  for note in notes:
    log(f"{os.fspath(path)}: {note}")

  target = flatten_params(params)
  from_file: dict[str, np.ndarray] = {}
  from_init: list[str] = []
  dropped: list[str] = []
  missing, mismatched = [], []

  file_has_fc_norm = any(k.startswith("fc_norm/") for k in loaded)
  model_has_encoder_norm = any(k.startswith("Transformer/encoder_norm/") for k in target)
  for key, like in target.items():
    in_file = key in loaded
    if not formats.is_backbone_leaf(key):
      from_init.append(key)  # tuning parameters
    elif key.startswith("head/"):
      if keep_head and in_file and _shape(loaded[key]) == _shape(like):
        from_file[key] = loaded[key]
      else:
        if keep_head:
          logging.warning("keep_head: %s is %s in the file, %s in the model; using the "
                          "initial head.", key, _shape(loaded[key]) if in_file else "absent",
                          _shape(like))
        from_init.append(key)
    elif not in_file and key.startswith(("pre_logits/", "fc_norm/", "projection/")):
      from_init.append(key)
    elif not in_file:
      missing.append(f"{key}: model {_shape(like)}")
    elif key == formats.POSEMB and _posemb_fits(_shape(loaded[key]), _shape(like)):
      from_file[key] = loaded[key]
    elif _shape(loaded[key]) != _shape(like):
      mismatched.append(f"{key}: file {_shape(loaded[key])} vs model {_shape(like)}")
    else:
      from_file[key] = loaded[key]

  unexpected = []
  for key in sorted(set(loaded) - set(target)):
    if key.startswith(("head/", "pre_logits/", "projection/")):
      dropped.append(key)
    elif (key.startswith("Transformer/encoder_norm/") and not model_has_encoder_norm
          and not file_has_fc_norm and any(k.startswith("fc_norm/") for k in target)):
      dropped.append(key)  # MAE fine-tuning: global pool with a fresh fc_norm replaces it
    else:
      unexpected.append(f"{key}: file {_shape(loaded[key])}")
  for key in sorted(set(loaded) & set(target)):
    if not formats.is_backbone_leaf(key):
      unexpected.append(f"{key}: file {_shape(loaded[key])} (a tuning parameter, not a "
                        "checkpoint leaf)")

  if conflicts or missing or unexpected or mismatched:
    sections = [(f"options the file contradicts ({len(conflicts)})", conflicts),
                (f"missing from the file ({len(missing)})", missing),
                (f"unexpected in the file ({len(unexpected)})", unexpected),
                (f"shape mismatch ({len(mismatched)})", mismatched)]
    causes = []
    if conflicts:
      causes.append(f"the model's options differ from the file's; build it with "
                    f"jvt.build_model(variant, num_classes, checkpoint={os.fspath(path)!r}), which "
                    "sets every option the file implies (or pass an option explicitly to "
                    "override it on purpose)")
    if missing or unexpected or mismatched:
      causes.append(_likely_cause(loaded, target, fmt))
    raise _mismatch_message(f"checkpoint {os.fspath(path)} ({options['family']} weights, read as "
                            f"{fmt!r}) does not fit the model", "; ".join(causes), sections)

  if dropped:
    log(f"{os.fspath(path)}: not loaded by design (head / pre_logits / projection / MAE "
        "encoder_norm): "
        f"{dropped}")
  log(f"{os.fspath(path)}: {len(from_file)} leaves from the {fmt} file; "
      f"from init by design: {from_init}")

  out = {}
  for key, like in target.items():
    if key not in from_file:
      out[key] = like
      continue
    value = from_file[key]
    if key == formats.POSEMB and _shape(value) != _shape(like):
      num_prefix = posemb_lib.num_prefix_tokens(_shape(like)[1])
      log(f"{os.fspath(path)}: position embedding {_shape(value)} -> {_shape(like)} "
          f"({posemb_interpolation})")
      value = posemb_lib.resize_posemb(value, _shape(like)[1], num_prefix, posemb_interpolation)
    out[key] = _place(value, like)
  tree = flax.traverse_util.unflatten_dict(out, sep="/")
  return flax.core.freeze(tree) if isinstance(params, flax.core.FrozenDict) else tree
