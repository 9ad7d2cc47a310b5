"""Tuned models as small files: `save_adapter` / `load_adapter` / `adapter_info`.

    jvt.save_adapter("dtd_vpt.safetensors", model, params, base="ViT-B_16.npz")
    model, params = jvt.load_adapter("dtd_vpt.safetensors", "ViT-B_16.npz")

An adapter file is a safetensors file holding the tuned leaves (the trainable ones, plus any
leaf that loading the base checkpoint does not provide) under their `/`-joined parameter paths,
and, in its metadata (key `jvt_adapter`, JSON), everything needed to rebuild the model around
them: the tuning config (`jvt.methods.tuning_config`), the ViT fields (variant dimensions and
model options), the number of classes, the image size, the run's preprocessing preset when
known, and a fingerprint of the base checkpoint file (SHA-256, name and size). `load_adapter`
builds the model, loads the frozen backbone from the base checkpoint (`jvt.load_pretrained`,
position embeddings resized as in the run) and puts the stored leaves back bit for bit, so the
logits are the run's. A base whose fingerprint differs is refused unless `check_base=False`.

Runs write `export/adapter.safetensors` this way when they start from a pretrained checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

FORMAT = "jvt-adapter"
VERSION = 1
METADATA_KEY = "jvt_adapter"
# ViT fields that are not model options: set by build_model from the tuning config or by flax.
_NOT_OPTIONS = ("num_classes", "methods", "partition_rules", "explicit_options", "parent", "name")


def fingerprint(path: str | os.PathLike) -> dict:
  """{"file", "size", "sha256"} of a checkpoint file (a hub name is resolved through the cache)."""
  from jvt.checkpoints import hub
  path = hub.resolve(path) if hub.is_hub_name(path) else os.fspath(path)
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return {"file": os.path.basename(path), "size": os.path.getsize(path),
          "sha256": digest.hexdigest()}


def model_description(model) -> dict:
  """What rebuilds `model`: tuning config (JSON-able method dicts), ViT fields, classes."""
  import jax.numpy as jnp
  from jvt.methods import tuning_config
  options = {}
  for field in dataclasses.fields(model):
    if field.name in _NOT_OPTIONS:
      continue
    value = getattr(model, field.name)
    options[field.name] = jnp.dtype(value).name if field.name == "dtype" else value
  return {"tuning": tuning_config(model), "num_classes": int(model.num_classes),
          "model": options}


def build_from_description(description: dict):
  """The model `model_description` described (the variant name only seeds the fields)."""
  import jax.numpy as jnp
  from jvt.models import build_model
  options = dict(description["model"])
  options["dtype"] = jnp.dtype(options["dtype"])
  return build_model("B/16", description["num_classes"], tuning=description["tuning"],
                     **options)


def _stored_keys(params: dict, model, base_path: str, base_format: str | None) -> list[str]:
  """The trainable leaves plus every leaf `load_pretrained` does not take from the base (the
  head, tuning leaves, leaves the file lacks), so loading reproduces `params` exactly."""
  from flax import traverse_util
  from jvt import partition
  from jvt.checkpoints import formats
  _, in_base, _ = formats.read_checkpoint(base_path, num_heads=model.num_heads,
                                          format=base_format)
  mask = traverse_util.flatten_dict(partition.trainable_mask(params, model), sep="/")
  return sorted(k for k, trains in mask.items()
                if trains or k not in in_base or k.startswith("head/")
                or not formats.is_backbone_leaf(k))


def save_adapter(path: str | os.PathLike, model, params: dict, *, base: str | os.PathLike,
                 preprocess: str | None = None, image_size: int | None = None,
                 posemb_interpolation: str | None = None, base_format: str | None = None) -> str:
  """Writes the tuned leaves of `params` and the model's description to `path` (safetensors).

  Args:
    path: the file to write (atomically), e.g. `export/adapter.safetensors`.
    model, params: the tuned model and its full parameter tree.
    base: the pretrained checkpoint the run started from (a file or a hub name); its
      fingerprint is recorded, not its weights.
    preprocess: the run's preprocessing preset (`dataset.preprocess`), recorded for
      `jvt.predict(..., preprocess=jvt.adapter_info(path))`.
    image_size: the run's image size; default: read off the position embeddings.
    posemb_interpolation, base_format: how the run loaded `base` (`config.pretrained.*`;
      None: the base file's family's own resizing and the detected format).
  Returns the path written.
  """
  import jax
  import safetensors.numpy
  from flax import traverse_util
  from jvt.checkpoints import hub
  from jvt.prediction import image_size_of
  params = jax.device_get(params)
  flat = traverse_util.flatten_dict(params, sep="/")
  base_path = hub.resolve(base) if hub.is_hub_name(base) else os.fspath(base)
  tensors = {k: np.ascontiguousarray(np.asarray(flat[k]))
             for k in _stored_keys(params, model, base_path, base_format)}
  meta = {"format": FORMAT, "version": VERSION, **model_description(model),
          "image_size": int(image_size or image_size_of(params, model.patch_size)),
          "preprocess": preprocess, "posemb_interpolation": posemb_interpolation,
          "base": {**fingerprint(base), "format": base_format}}
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # A temporary name opened normally (not mkstemp's 0600), so the file gets the umask's mode.
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as f:
      f.write(safetensors.numpy.save(tensors, metadata={METADATA_KEY: json.dumps(meta)}))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


def save_run_adapter(path: str, model, params: dict, config: dict) -> str | None:
  """A run's export: its adapter against `config["pretrained"]["path"]`; None (nothing
  written) for a run from a random backbone, which no checkpoint can rebuild."""
  pretrained = config.get("pretrained") or {}
  if not pretrained.get("path"):
    return None
  return save_adapter(path, model, params, base=pretrained["path"],
                      preprocess=(config.get("dataset") or {}).get("preprocess"),
                      image_size=(config.get("model") or {}).get("image_size"),
                      posemb_interpolation=pretrained.get("posemb_interpolation") or None,
                      base_format=pretrained.get("format") or None)


def adapter_info(path: str | os.PathLike) -> dict:
  """The description stored in an adapter file (tuning, model, num_classes, image_size,
  preprocess, base fingerprint), without reading its arrays."""
  from safetensors import safe_open
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"adapter {path}: no such file.")
  with safe_open(path, framework="numpy") as f:
    text = (f.metadata() or {}).get(METADATA_KEY)
  if text is None:
    raise ValueError(f"{path} is a safetensors file without jvt adapter metadata (key "
                     f"{METADATA_KEY!r}); write adapters with jvt.save_adapter.")
  meta = json.loads(text)
  if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
    raise ValueError(f"{path}: adapter format {meta.get('format')!r} version "
                     f"{meta.get('version')} is not readable by this jvt (reads {FORMAT} "
                     f"<= {VERSION}).")
  return meta


def load_adapter(path: str | os.PathLike, base: str | os.PathLike, *,
                 check_base: bool = True) -> tuple[Any, dict]:
  """(model, full parameters) of an adapter applied to its base checkpoint.

  Raises ValueError when `base` is not the file the adapter was tuned from (by SHA-256),
  unless `check_base=False`.
  """
  import jax
  import safetensors.numpy
  from flax import traverse_util
  from jvt.checkpoints import load_pretrained
  from jvt.models import param_shapes
  meta = adapter_info(path)
  if check_base:
    want, have = meta["base"], fingerprint(base)
    if want["sha256"] != have["sha256"]:
      raise ValueError(
          f"adapter {os.fspath(path)} was tuned from {want['file']} ({want['size']:,} bytes, "
          f"sha256 {want['sha256'][:12]}...), but {os.fspath(base)} is {have['file']} "
          f"({have['size']:,} bytes, sha256 {have['sha256'][:12]}...). Pass the base checkpoint "
          "the run used, or check_base=False to apply the adapter to this one anyway (its "
          "outputs will then differ from the run's).")
  model = build_from_description(meta)
  shapes = param_shapes(model, image_size=meta["image_size"])
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  params = load_pretrained(base, params, model, format=meta["base"].get("format"),
                           posemb_interpolation=meta["posemb_interpolation"])
  stored = safetensors.numpy.load_file(os.fspath(path))
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  unknown = sorted(set(stored) - set(flat))
  if unknown:
    raise ValueError(f"adapter {os.fspath(path)}: leaves {unknown[:5]} are not parameters of "
                     "the model it describes.")
  for key, value in stored.items():
    if value.shape != np.shape(flat[key]):
      raise ValueError(f"adapter {os.fspath(path)}: {key} is {list(value.shape)}, the model "
                       f"expects {list(np.shape(flat[key]))}.")
    flat[key] = value
  return model, traverse_util.unflatten_dict(flat, sep="/")
