"""Pretrained ViT checkpoint files -> flat `{linen/path: np.ndarray}` dicts.

One job: read a file without unpickling anything, tell which of the supported layouts it is,
rename/transpose its arrays into jvt's Linen names (those of google-research/vision_transformer's
and big_vision's Linen ViT), and say which architectural options the file implies
(`checkpoint_options`). Matching against a model, position-embedding resizing and head handling
live in `pretrained.py`.

- `vit_npz` (.npz): `Transformer/posembed_input/pos_embedding`, pre-Linen block names.
- `big_vision_npz` (.npz): `params/` prefix, root `pos_embedding`, scanned blocks, `MAPHead_0`
  (SigLIP image towers under `params/img/`).
- `timm` (.safetensors): `blocks.{i}.*`, `patch_embed.*`, `cls_token`, `pos_embed`; also
  DINOv2 (`ls1.gamma`, `reg_token`; the original `register_tokens`, `mlp.w12` / `mlp.w3`), CLIP
  (`norm_pre`, the projection as `head`) and SigLIP (`attn_pool.*`).
- `hf` (.safetensors): transformers' `ViTModel` (`embeddings.*`, `encoder.layer.{i}.*`, optional
  `vit.` prefix), `Dinov2Model` (`norm1`, `layer_scale1.lambda1`, optional `dinov2.` prefix),
  `CLIPVisionModel` / `SiglipVisionModel` (`vision_model.*`, `visual_projection`).
- `openclip` (.safetensors): OpenAI CLIP / OpenCLIP state dicts (`visual.conv1`,
  `visual.transformer.resblocks.{i}.*`, `visual.proj`), saved as safetensors.

Keys a reader does not know keep their file name, so the matcher reports them as unexpected.
"""
from __future__ import annotations

import os
import re
import zipfile
import zlib
from typing import Callable

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

FORMATS = ("vit_npz", "big_vision_npz", "timm", "hf", "openclip")
_CONTAINER = {"vit_npz": "npz", "big_vision_npz": "npz", "timm": "safetensors",
              "hf": "safetensors", "openclip": "safetensors"}
FAMILIES = ("vit", "dinov2", "clip", "siglip")
# Written by jvt's own npz export: the GELU form of the model that produced the weights
# ("tanh" or "erf"). Not a parameter; read by `checkpoint_options`, dropped by the readers.
GELU_MARKER = "jvt/gelu"

POSEMB = "Transformer/posembed_input/pos_embedding"

# Every leaf of a plain ViT (no tuning parameters): the leaves a checkpoint may provide.
BACKBONE_LEAF = re.compile(
    r"embedding/(kernel|bias)"
    r"|cls"
    r"|reg"
    r"|Transformer/posembed_input/pos_embedding"
    r"|Transformer/pre_norm/(scale|bias)"
    r"|Transformer/encoderblock_\d+/LayerNorm_[01]/(scale|bias)"
    r"|Transformer/encoderblock_\d+/LayerScale_[01]/scale"
    r"|Transformer/encoderblock_\d+/MultiHeadDotProductAttention_0/(query|key|value|out)/"
    r"(kernel|bias)"
    r"|Transformer/encoderblock_\d+/MlpBlock_0/Dense_[01]/(kernel|bias)"
    r"|Transformer/encoder_norm/(scale|bias)"
    r"|fc_norm/(scale|bias)"
    r"|MAPHead_0/probe"
    r"|MAPHead_0/MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)"
    r"|MAPHead_0/LayerNorm_0/(scale|bias)"
    r"|MAPHead_0/MlpBlock_0/Dense_[01]/(kernel|bias)"
    r"|projection/kernel"
    r"|pre_logits/(kernel|bias)"
    r"|head/(kernel|bias)"
)

# vision_transformer's pre-Linen files number submodules across classes inside a block.
PRE_LINEN_TO_LINEN = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}
LINEN_TO_PRE_LINEN = {v: k for k, v in PRE_LINEN_TO_LINEN.items()}

TO_SAFETENSORS = (
    "python -c \"import torch, safetensors.torch as st; "
    "sd=torch.load('f.pth', map_location='cpu'); sd=sd.get('model', sd); "
    "sd=sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'f.safetensors')\""
)

Arrays = dict[str, np.ndarray]


class CheckpointFormatError(ValueError):
  """The file is unreadable, pickled, corrupt, or in no supported layout."""


def is_backbone_leaf(path: str) -> bool:
  """True for `/`-joined paths of plain-ViT leaves (a checkpoint may hold them)."""
  return BACKBONE_LEAF.fullmatch(path) is not None


# ----------------------------------------------------------------------------- reading files


def _refuse_pickle(path: str, what: str) -> CheckpointFormatError:
  return CheckpointFormatError(
      f"{path}: {what}. jvt never unpickles checkpoint files (unpickling runs arbitrary "
      f"code). Convert it once, where torch is installed, to safetensors:\n  {TO_SAFETENSORS}\n"
      "(replace f.pth by your file) and load the .safetensors file."
  )


def _container(path: str) -> str:
  """'npz' or 'safetensors', from the file's first bytes; refuses pickles."""
  with open(path, "rb") as f:
    head = f.read(16)
  if head[:2] == b"PK":
    try:
      with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
      raise CheckpointFormatError(
          f"{path}: zip/npz archive is truncated or corrupt ({err}). Download or write it again."
      ) from None
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
      raise _refuse_pickle(path, "this is a torch.save zip archive (it holds data.pkl)")
    return "npz"
  if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
    raise _refuse_pickle(path, "this is a Python pickle (legacy torch.save / .pkl)")
  if len(head) >= 9 and head[8:9] == b"{":
    return "safetensors"
  if head.startswith(b"\x93NUMPY"):
    raise CheckpointFormatError(
        f"{path}: a single .npy array is not a checkpoint; save the named arrays with np.savez."
    )
  raise CheckpointFormatError(
      f"{path}: unknown file format (first bytes {head[:8]!r}). Supported: .npz "
      "(vision_transformer, big_vision) and .safetensors (timm, HuggingFace ViTModel)."
      + ("" if head else " The file is empty.")
  )


def _as_float_array(key: str, value: np.ndarray) -> np.ndarray:
  """big_vision saves bfloat16 as numpy void `V2`: view those as bfloat16."""
  if value.dtype.kind == "V":
    if value.dtype.itemsize != 2:
      raise CheckpointFormatError(f"array {key!r} has an opaque dtype {value.dtype}.")
    value = value.view(ml_dtypes.bfloat16)
  return value


def _read_npz(path: str) -> Arrays:
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    others = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if not others:
      return {k: _as_float_array(k, v) for k, v in arrays.items()}
  except ValueError as err:
    if "allow_pickle" in str(err):
      raise CheckpointFormatError(
          f"{path}: the npz holds object (pickled) arrays; jvt loads npz with "
          "allow_pickle=False. If you trust the file, flatten it once:\n  python -c \"import "
          "numpy as np; d=np.load('f.npz', allow_pickle=True); np.savez('f_flat.npz', "
          "**{k: np.asarray(v, np.float32) for k, v in d.items()})\""
      ) from None
    raise CheckpointFormatError(f"{path}: corrupt npz ({err}).") from None
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
    raise CheckpointFormatError(
        f"{path}: npz is truncated or corrupt ({err}). Download or write it again."
    ) from None
  raise CheckpointFormatError(  # a zip whose members are not .npy arrays
      f"{path}: a zip archive whose members {others[:3]} are not numpy arrays; an .npz "
      "checkpoint holds .npy arrays (np.savez).")


def _read_safetensors(path: str) -> Arrays:
  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError, ValueError, KeyError) as err:
    raise CheckpointFormatError(
        f"{path}: safetensors file is truncated or corrupt ({err})."
    ) from None


def read_arrays(path: str | os.PathLike) -> tuple[str, Arrays]:
  """Returns (container, {file key: array}) with container 'npz' or 'safetensors'."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist.")
  if os.path.isdir(path):
    raise CheckpointFormatError(
        f"{path} is a directory; load_pretrained reads one .npz or .safetensors file "
        "(training runs saved by RunCheckpointer restore with RunCheckpointer.restore)."
    )
  container = _container(path)
  arrays = _read_npz(path) if container == "npz" else _read_safetensors(path)
  if not arrays:
    raise CheckpointFormatError(f"{path}: the file holds no arrays.")
  return container, arrays


# ----------------------------------------------------------------------------- detection

_OPENCLIP_KEY = re.compile(r"(^|\.)(conv1\.weight|transformer\.resblocks\.\d+\.|ln_pre\.)")


def detect_format(container: str, keys) -> str | None:
  """One of FORMATS from the key names, or None when nothing matches."""
  keys = list(keys)
  if container == "safetensors":
    if any(k.startswith(("embeddings.", "vit.embeddings.", "dinov2.embeddings.",
                         "vision_model.")) or ".encoder.layer." in "." + k for k in keys):
      return "hf"
    if any(k.startswith("visual.") or _OPENCLIP_KEY.search(k) for k in keys):
      return "openclip"
    if any(re.search(r"(^|\.)(patch_embed|blocks\.\d+)\.", k)
           or k.endswith(("cls_token", "pos_embed")) for k in keys):
      return "timm"
    return None
  if any(k.endswith(POSEMB) for k in keys):
    return "vit_npz"
  if any(k.startswith("params/") or k.split("/")[-1] == "pos_embedding"
         or "Transformer/encoderblock/" in k for k in keys):
    return "big_vision_npz"
  if any(re.search(r"(^|/)Transformer/encoderblock_\d+/", k) for k in keys):
    return "vit_npz"
  return None


# ----------------------------------------------------------------------------- helpers


def _subtree(arrays: Arrays, prefix: str, what: str, notes: list[str]) -> Arrays:
  """Keeps the keys under `prefix` (stripped) when any exist; notes what else was dropped."""
  inside = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  if not inside:
    return arrays
  rest = sorted(k for k in arrays if not k.startswith(prefix))
  if rest:
    notes.append(f"kept {what} ({prefix}*); ignored {len(rest)} other arrays, e.g. {rest[:3]}")
  return inside


def _drop(arrays: Arrays, pattern: str, what: str, notes: list[str]) -> Arrays:
  regex = re.compile(pattern)
  dropped = sorted(k for k in arrays if regex.fullmatch(k))
  if dropped:
    notes.append(f"ignored {len(dropped)} {what} arrays, e.g. {dropped[:3]}")
  return {k: v for k, v in arrays.items() if not regex.fullmatch(k)}


def _heads_kernel(w_out_in: np.ndarray, num_heads: int) -> np.ndarray:
  """torch Linear weight [H*Dh, D] -> Flax DenseGeneral kernel [D, H, Dh]."""
  kernel = w_out_in.T  # [D, H*Dh]
  if kernel.ndim == 2 and kernel.shape[1] % num_heads == 0:
    kernel = kernel.reshape(kernel.shape[0], num_heads, -1)
  return kernel


def _heads_bias(b: np.ndarray, num_heads: int) -> np.ndarray:
  """[H*Dh] -> [H, Dh]."""
  return b.reshape(num_heads, -1) if b.ndim == 1 and b.shape[0] % num_heads == 0 else b


def _out_kernel(w_out_in: np.ndarray, num_heads: int) -> np.ndarray:
  """torch Linear weight [D, H*Dh] -> Flax out kernel [H, Dh, D]."""
  kernel = w_out_in.T  # [H*Dh, D]
  if kernel.ndim == 2 and kernel.shape[0] % num_heads == 0:
    kernel = kernel.reshape(num_heads, -1, kernel.shape[1])
  return kernel


def _conv_kernel(w_oihw: np.ndarray) -> np.ndarray:
  """torch conv weight [D, 3, ph, pw] (OIHW) -> Flax [ph, pw, 3, D] (HWIO)."""
  return w_oihw.transpose(2, 3, 1, 0) if w_oihw.ndim == 4 else w_oihw



def _torch_to_flax(kind: str, is_weight: bool, value: np.ndarray, num_heads: int) -> np.ndarray:
  """One torch parameter -> its Flax layout. Biases only change shape for per-head inputs."""
  if kind == "conv" and is_weight:
    return _conv_kernel(value)
  if kind == "linear" and is_weight:
    return value.T  # (out, in) -> (in, out)
  if kind == "heads_in":
    return _heads_kernel(value, num_heads) if is_weight else _heads_bias(value, num_heads)
  if kind == "heads_out" and is_weight:
    return _out_kernel(value, num_heads)
  return value


# A rule: (file key regex with groups i = block, p = weight|bias, n = projection name,
#          Linen path template, kind). Kinds: "as_is" (the template is the whole path), "transpose"
# (the same, a torch [out, in] matrix -> [in, out]), "token" (a [D] vector -> [1, 1, D]), "table" (a [T, D] embedding table -> [1, T, D]), "norm"
# (weight -> scale), "conv", "linear", "heads_in" (q/k/v), "heads_out" (attention output),
# "qkv" (fused q, k, v rows: timm's `qkv`, torch MultiheadAttention's `in_proj`), "kv" (timm's
# fused k, v rows of the attention pool).
Rule = tuple[str, str, str]
_BLK = "Transformer/encoderblock_{i}"
_ATTN = _BLK + "/MultiHeadDotProductAttention_0"
_MAP = "MAPHead_0"
_P = r"(?P<p>weight|bias)"
_I = r"(?P<i>\d+)"
_FUSED = {"qkv": ("query", "key", "value"), "kv": ("key", "value")}


def _rename(arrays: Arrays, rules: list[Rule], num_heads: int) -> Arrays:
  """Applies the first matching rule per key; keys no rule matches keep their file name."""
  compiled = [(re.compile(pattern), template, kind) for pattern, template, kind in rules]
  out: Arrays = {}
  for key, value in arrays.items():
    match = next(((m, t, k) for r, t, k in compiled if (m := r.fullmatch(key))), None)
    if match is None or (match[2] in _FUSED and value.shape[0] % len(_FUSED[match[2]])):
      out[key] = value
      continue
    m, template, kind = match
    path = template.format(**m.groupdict())
    if kind in ("as_is", "token", "table", "transpose"):
      shape = {"token": (1, 1, -1), "table": (1, *value.shape)}.get(kind, None)
      out[path] = value.T if kind == "transpose" else value.reshape(shape or value.shape)
      continue
    is_weight = m.group("p") == "weight"
    leaf = "bias" if not is_weight else "scale" if kind == "norm" else "kernel"
    if kind in _FUSED:
      names = _FUSED[kind]
      for name, part in zip(names, np.split(value, len(names), axis=0)):
        out[f"{path}/{name}/{leaf}"] = _torch_to_flax("heads_in", is_weight, part, num_heads)
    else:
      out[f"{path}/{leaf}"] = _torch_to_flax(kind, is_weight, value, num_heads)
  return out


# ----------------------------------------------------------------------------- converters


def from_vit_npz(arrays: Arrays, num_heads: int) -> tuple[Arrays, list[str]]:
  """google-research/vision_transformer npz: pre-Linen block names; optional `opt/target/`
  (old Flax optimizer files) or `params/` prefix."""
  del num_heads  # stored per head already
  notes: list[str] = []
  arrays = _subtree(arrays, "opt/target/", "the model weights of a Flax optimizer file", notes)
  arrays = _subtree(arrays, "params/", "the model parameters", notes)
  out = {}
  for key, value in arrays.items():
    parts = key.split("/")
    if len(parts) > 2 and parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
      parts[2] = PRE_LINEN_TO_LINEN.get(parts[2], parts[2])
    out["/".join(parts)] = value
  return out, notes


def from_big_vision_npz(arrays: Arrays, num_heads: int) -> tuple[Arrays, list[str]]:
  """big_vision npz: `params/` (or `params/img/`) prefix, root `pos_embedding` without the cls
  slot ([1, N, D]; pretrained.py inserts a zero cls slot, exactly big_vision's arithmetic, or
  keeps it as is for models without [CLS]), optional scanned blocks `Transformer/encoderblock/...`
  with a leading depth axis, optional `MAPHead_0` (pool 'map', SigLIP: jvt uses its names)."""
  del num_heads
  notes: list[str] = []
  arrays = _subtree(arrays, "params/", "the model parameters", notes)
  arrays = _subtree(arrays, "img/", "the image tower of a two-tower model", notes)
  out = {}
  for key, value in arrays.items():
    if key == "pos_embedding":
      out[POSEMB] = value
    elif key.startswith("Transformer/encoderblock/"):
      rest = key[len("Transformer/encoderblock/"):]
      for i, layer in enumerate(value):  # scanned: leading depth axis
        out[f"Transformer/encoderblock_{i}/{rest}"] = layer
    else:
      out[key] = value
  return out, notes


_TIMM_RULES: list[Rule] = [
    (r"cls_token", "cls", "as_is"),
    (r"reg_token|register_tokens", "reg", "as_is"),
    (r"pos_embed", POSEMB, "as_is"),
    (rf"patch_embed\.proj\.{_P}", "embedding", "conv"),
    (rf"norm_pre\.{_P}", "Transformer/pre_norm", "norm"),
    (rf"blocks\.{_I}\.norm1\.{_P}", _BLK + "/LayerNorm_0", "norm"),
    (rf"blocks\.{_I}\.norm2\.{_P}", _BLK + "/LayerNorm_1", "norm"),
    (rf"blocks\.{_I}\.attn\.qkv\.{_P}", _ATTN, "qkv"),
    (rf"blocks\.{_I}\.attn\.proj\.{_P}", _ATTN + "/out", "heads_out"),
    (rf"blocks\.{_I}\.ls1\.gamma", _BLK + "/LayerScale_0/scale", "as_is"),
    (rf"blocks\.{_I}\.ls2\.gamma", _BLK + "/LayerScale_1/scale", "as_is"),
    (rf"blocks\.{_I}\.mlp\.(fc1|w12)\.{_P}", _BLK + "/MlpBlock_0/Dense_0", "linear"),
    (rf"blocks\.{_I}\.mlp\.(fc2|w3)\.{_P}", _BLK + "/MlpBlock_0/Dense_1", "linear"),
    (rf"norm\.{_P}", "Transformer/encoder_norm", "norm"),
    (rf"fc_norm\.{_P}", "fc_norm", "norm"),
    (r"attn_pool\.latent", _MAP + "/probe", "as_is"),
    (rf"attn_pool\.q\.{_P}", _MAP + "/MultiHeadDotProductAttention_0/query", "heads_in"),
    (rf"attn_pool\.kv\.{_P}", _MAP + "/MultiHeadDotProductAttention_0", "kv"),
    (rf"attn_pool\.proj\.{_P}", _MAP + "/MultiHeadDotProductAttention_0/out", "heads_out"),
    (rf"attn_pool\.norm\.{_P}", _MAP + "/LayerNorm_0", "norm"),
    (rf"attn_pool\.mlp\.fc1\.{_P}", _MAP + "/MlpBlock_0/Dense_0", "linear"),
    (rf"attn_pool\.mlp\.fc2\.{_P}", _MAP + "/MlpBlock_0/Dense_1", "linear"),
    (r"projection\.weight", "projection/kernel", "transpose"),
    (rf"pre_logits\.fc\.{_P}", "pre_logits", "linear"),
    (rf"head\.{_P}", "head", "linear"),
]


def from_timm(arrays: Arrays, num_heads: int) -> tuple[Arrays, list[str]]:
  """timm VisionTransformer state dict (also MAE, MoCo-v3 and the original DINOv2 files, which
  use timm's names). timm's CLIP models hold the image projection as a zero-bias `head`: it
  becomes jvt's `projection` (an optional output), not the classifier."""
  notes: list[str] = []
  if any(k.startswith("module.base_encoder.") for k in arrays):  # MoCo-v3
    arrays = _subtree(arrays, "module.base_encoder.", "MoCo-v3's base encoder", notes)
    arrays = _drop(arrays, r"head\.\d+\..*", "MoCo-v3 projection-head", notes)
  for prefix in ("module.", "model."):
    if all(k.startswith(prefix) for k in arrays):
      arrays = {k[len(prefix):]: v for k, v in arrays.items()}
  arrays = _drop(arrays, r"mask_token|decoder_.*", "MAE decoder / DINOv2 mask token "
                 "(pre-training only)", notes)
  bias = arrays.get("head.bias")
  if "norm_pre.weight" in arrays and "head.weight" in arrays and bias is not None \
      and not np.any(np.asarray(bias, np.float32)):
    arrays = dict(arrays)
    arrays["projection.weight"] = arrays.pop("head.weight")  # [E, D]
    arrays.pop("head.bias")
    notes.append("timm CLIP: its zero-bias `head` is the image projection (jvt `projection`)")
  return _rename(arrays, _TIMM_RULES, num_heads), notes


_HF_LAYER = rf"encoder\.layers?\.{_I}"
_HF_RULES: list[Rule] = [
    # ViTModel / Dinov2Model
    (r"embeddings\.cls_token", "cls", "as_is"),
    (r"embeddings\.register_tokens", "reg", "as_is"),
    (r"embeddings\.position_embeddings", POSEMB, "as_is"),
    (rf"embeddings\.patch_embeddings\.projection\.{_P}", "embedding", "conv"),
    (rf"{_HF_LAYER}\.(layernorm_before|norm1|layer_norm1)\.{_P}", _BLK + "/LayerNorm_0", "norm"),
    (rf"{_HF_LAYER}\.(layernorm_after|norm2|layer_norm2)\.{_P}", _BLK + "/LayerNorm_1", "norm"),
    (rf"{_HF_LAYER}\.attention\.attention\.(?P<n>query|key|value)\.{_P}", _ATTN + "/{n}",
     "heads_in"),
    (rf"{_HF_LAYER}\.attention\.output\.dense\.{_P}", _ATTN + "/out", "heads_out"),
    (rf"{_HF_LAYER}\.layer_scale1\.lambda1", _BLK + "/LayerScale_0/scale", "as_is"),
    (rf"{_HF_LAYER}\.layer_scale2\.lambda1", _BLK + "/LayerScale_1/scale", "as_is"),
    (rf"{_HF_LAYER}\.(intermediate\.dense|mlp\.fc1|mlp\.weights_in)\.{_P}",
     _BLK + "/MlpBlock_0/Dense_0", "linear"),
    (rf"{_HF_LAYER}\.(output\.dense|mlp\.fc2|mlp\.weights_out)\.{_P}",
     _BLK + "/MlpBlock_0/Dense_1", "linear"),
    (rf"layernorm\.{_P}", "Transformer/encoder_norm", "norm"),
    (rf"pooler\.dense\.{_P}", "pre_logits", "linear"),
    (rf"classifier\.{_P}", "head", "linear"),
    # CLIPVisionModel / SiglipVisionModel (`vision_model.` stripped)
    (r"embeddings\.class_embedding", "cls", "token"),
    (r"embeddings\.position_embedding\.weight", POSEMB, "table"),
    (rf"embeddings\.patch_embedding\.{_P}", "embedding", "conv"),
    (rf"pre_layrnorm\.{_P}", "Transformer/pre_norm", "norm"),
    (rf"{_HF_LAYER}\.self_attn\.q_proj\.{_P}", _ATTN + "/query", "heads_in"),
    (rf"{_HF_LAYER}\.self_attn\.k_proj\.{_P}", _ATTN + "/key", "heads_in"),
    (rf"{_HF_LAYER}\.self_attn\.v_proj\.{_P}", _ATTN + "/value", "heads_in"),
    (rf"{_HF_LAYER}\.self_attn\.out_proj\.{_P}", _ATTN + "/out", "heads_out"),
    (rf"post_layernorm\.{_P}", "Transformer/encoder_norm", "norm"),
    (r"head\.probe", _MAP + "/probe", "as_is"),
    (rf"head\.attention\.in_proj_{_P}", _MAP + "/MultiHeadDotProductAttention_0", "qkv"),
    (rf"head\.attention\.out_proj\.{_P}", _MAP + "/MultiHeadDotProductAttention_0/out",
     "heads_out"),
    (rf"head\.layernorm\.{_P}", _MAP + "/LayerNorm_0", "norm"),
    (rf"head\.mlp\.fc1\.{_P}", _MAP + "/MlpBlock_0/Dense_0", "linear"),
    (rf"head\.mlp\.fc2\.{_P}", _MAP + "/MlpBlock_0/Dense_1", "linear"),
    (r"visual_projection\.weight", "projection/kernel", "transpose"),
]


def from_hf(arrays: Arrays, num_heads: int) -> tuple[Arrays, list[str]]:
  """HuggingFace transformers: ViTModel / ViTForImageClassification (`vit.` prefix,
  `classifier` head), Dinov2Model (`dinov2.` prefix with a classifier),
  CLIPVisionModel(WithProjection) / CLIPModel and SiglipVisionModel / SiglipModel
  (`vision_model.`; the text tower is ignored)."""
  notes: list[str] = []
  if any(k.startswith("vision_model.") for k in arrays):
    projection = {k: v for k, v in arrays.items() if k == "visual_projection.weight"}
    arrays = _subtree(arrays, "vision_model.", "the vision tower", notes)
    arrays = {**arrays, **projection}
  for prefix in ("vit.", "dinov2."):
    arrays = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in arrays.items()}
  arrays = _drop(arrays, r"embeddings\.(mask_token|position_ids)", "mask-token / buffer", notes)
  return _rename(arrays, _HF_RULES, num_heads), notes


_OPENCLIP_BLK = rf"transformer\.resblocks\.{_I}"
_OPENCLIP_RULES: list[Rule] = [
    (r"class_embedding", "cls", "token"),
    (r"positional_embedding", POSEMB, "table"),
    (rf"conv1\.{_P}", "embedding", "conv"),
    (rf"ln_pre\.{_P}", "Transformer/pre_norm", "norm"),
    (rf"{_OPENCLIP_BLK}\.ln_1\.{_P}", _BLK + "/LayerNorm_0", "norm"),
    (rf"{_OPENCLIP_BLK}\.ln_2\.{_P}", _BLK + "/LayerNorm_1", "norm"),
    (rf"{_OPENCLIP_BLK}\.attn\.in_proj_{_P}", _ATTN, "qkv"),
    (rf"{_OPENCLIP_BLK}\.attn\.out_proj\.{_P}", _ATTN + "/out", "heads_out"),
    (rf"{_OPENCLIP_BLK}\.ls_1\.gamma", _BLK + "/LayerScale_0/scale", "as_is"),
    (rf"{_OPENCLIP_BLK}\.ls_2\.gamma", _BLK + "/LayerScale_1/scale", "as_is"),
    (rf"{_OPENCLIP_BLK}\.mlp\.c_fc\.{_P}", _BLK + "/MlpBlock_0/Dense_0", "linear"),
    (rf"{_OPENCLIP_BLK}\.mlp\.c_proj\.{_P}", _BLK + "/MlpBlock_0/Dense_1", "linear"),
    (rf"ln_post\.{_P}", "Transformer/encoder_norm", "norm"),
    (r"proj", "projection/kernel", "as_is"),  # already [D, E]: used as x @ proj
]


def from_openclip(arrays: Arrays, num_heads: int) -> tuple[Arrays, list[str]]:
  """OpenAI CLIP / OpenCLIP state dict: the image tower under `visual.` (the text tower,
  `logit_scale` and OpenAI's `input_resolution` / `context_length` / `vocab_size` are ignored)."""
  notes: list[str] = []
  arrays = _subtree(arrays, "visual.", "the image tower", notes)
  return _rename(arrays, _OPENCLIP_RULES, num_heads), notes


CONVERTERS: dict[str, Callable[[Arrays, int], tuple[Arrays, list[str]]]] = {
    "vit_npz": from_vit_npz,
    "big_vision_npz": from_big_vision_npz,
    "timm": from_timm,
    "hf": from_hf,
    "openclip": from_openclip,
}


def _resolve_format(path, container: str, keys, format: str | None) -> str:
  if format is not None and format not in FORMATS:
    raise ValueError(f"unknown checkpoint format {format!r}; choose one of {FORMATS} "
                     "or None to detect it.")
  if format is None:
    format = detect_format(container, keys)
    if format is None:
      raise CheckpointFormatError(
          f"{os.fspath(path)}: cannot tell which ViT layout this {container} file uses "
          f"(first keys: {sorted(keys)[:5]}). Pass format= one of {FORMATS}."
      )
  elif _CONTAINER[format] != container:
    raise CheckpointFormatError(
        f"{os.fspath(path)}: format {format!r} is stored as {_CONTAINER[format]}, but this "
        f"file is {container}."
    )
  return format


def read_checkpoint(path: str | os.PathLike, *, num_heads: int,
                    format: str | None = None) -> tuple[str, Arrays, list[str]]:
  """Reads `path` and converts it to Linen names.

  Returns (format, {linen path: array as stored (dtype kept)}, notes about ignored arrays).
  `num_heads` splits fused torch projections into [D, H, Dh].
  """
  container, arrays = read_arrays(path)
  arrays.pop(GELU_MARKER, None)
  format = _resolve_format(path, container, arrays, format)
  converted, notes = CONVERTERS[format](arrays, num_heads)
  return format, converted, notes


# ----------------------------------------------------------------------------- options


def _key_shapes(path: str | os.PathLike) -> tuple[str, dict[str, tuple[int, ...]], str | None]:
  """(container, {key: shape}, GELU marker or None) without reading the weights."""
  path = os.fspath(path)
  container = _container(path)
  if container == "safetensors":
    with safetensors.safe_open(path, framework="numpy") as f:
      return container, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, None
  shapes, marker = {}, None
  with np.load(path, allow_pickle=False) as f:
    others = sorted(n for n in f.zip.namelist() if not n.endswith(".npy"))
    if others:
      raise CheckpointFormatError(
          f"{path}: a zip archive whose members {others[:3]} are not numpy arrays; an .npz "
          "checkpoint holds .npy arrays (np.savez).")
    for k in f.files:
      with f.zip.open(k + ".npy") as member:  # the .npy header only, not the array
        major, _ = np.lib.format.read_magic(member)
        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                       else np.lib.format.read_array_header_2_0)
        shape, _, _ = read_header(member)
      shapes[k] = tuple(shape)
    if GELU_MARKER in f.files:
      marker = str(f[GELU_MARKER])
  return container, shapes, marker


def _family(keys: list[str]) -> str:
  joined = "\n".join(keys)
  if re.search(r"MAPHead_0/|(^|\.)attn_pool\.|(^|\.)head\.probe$", joined, re.M):
    return "siglip"
  if re.search(r"\.(ls1\.gamma|layer_scale1\.lambda1)$|(^|\.)(reg_token|register_tokens)$"
               r"|/LayerScale_0/scale$|^reg$", joined, re.M):
    return "dinov2"
  if re.search(r"(^|\.)(norm_pre|pre_layrnorm|ln_pre)\.weight$|^Transformer/pre_norm/scale$",
               joined, re.M):
    return "clip"
  return "vit"


def checkpoint_options(path: str | os.PathLike, *, format: str | None = None) -> dict:
  """The architectural options a checkpoint file implies, as `ViT` fields plus "family".

  Reads key names and shapes only (no weights). Always present: "family" (one of FAMILIES),
  "format", "gelu_approximate" (tanh GELU for files written by Google's Flax code —
  vision_transformer and big_vision npz, whose `flax.linen.gelu` defaults to the tanh form —
  and for HuggingFace SigLIP, whose config says `gelu_pytorch_tanh`; exact erf GELU for timm,
  other HuggingFace models and OpenAI / OpenCLIP; an npz written by jvt's `save_npz` records
  its model's form), "layer_norm_eps", "class_token", "num_registers", "layer_scale",
  "pre_norm", "patch_bias". "pool" / "fc_norm" when the file fixes them (MAP head; MAE-style
  fc_norm), "activation" "swiglu" for DINOv2-g, "projection_dim" when the file holds CLIP's
  image projection. CLIP files cannot tell QuickGELU (OpenAI) from GELU (OpenCLIP LAION): the
  variant (`clip-*` / `openclip-*`) decides.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist.")
  if os.path.isdir(path):
    raise CheckpointFormatError(f"{path} is a directory, not a checkpoint file.")
  try:
    container, shapes, marker = _key_shapes(path)
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
          safetensors.SafetensorError) as err:
    if isinstance(err, CheckpointFormatError):
      raise
    raise CheckpointFormatError(f"{path}: unreadable or corrupt checkpoint ({err}).") from None
  shapes.pop(GELU_MARKER, None)
  fmt = _resolve_format(path, container, shapes, format)
  keys = sorted(shapes)
  family = _family(keys)
  npz = container == "npz"
  opts: dict = {"family": family, "format": fmt}
  if marker is not None:
    if marker not in ("tanh", "erf"):
      raise CheckpointFormatError(f"{path}: {GELU_MARKER} is {marker!r}; expected tanh or erf.")
    opts["gelu_approximate"] = marker == "tanh"
  else:
    opts["gelu_approximate"] = npz or (fmt == "hf" and family == "siglip")
  eps = {"vit": 1e-12 if fmt == "hf" else 1e-6, "dinov2": 1e-6, "clip": 1e-5, "siglip": 1e-6}
  opts["layer_norm_eps"] = eps[family]
  has = lambda pattern: any(re.search(pattern, k) for k in keys)  # noqa: E731
  opts["class_token"] = has(r"(^|[/.])(cls|cls_token|class_embedding)$")
  reg = next((shapes[k] for k in keys
              if re.search(r"(^|\.)(reg_token|register_tokens)$|^reg$", k)), None)
  opts["num_registers"] = int(reg[1]) if reg else 0
  opts["layer_scale"] = has(r"(ls1\.gamma|layer_scale1\.lambda1|ls_1\.gamma|LayerScale_0)")
  opts["pre_norm"] = family == "clip"
  opts["patch_bias"] = has(r"(^|[/.])(embedding/bias|patch_embed\.proj\.bias|"
                           r"patch_embeddings\.projection\.bias|patch_embedding\.bias|conv1\.bias)$")
  if family == "siglip":
    opts["pool"] = "map"
  elif has(r"(^|[/.])fc_norm[/.]"):
    opts.update(pool="gap", fc_norm=True)
  elif not opts["class_token"]:
    opts["pool"] = "gap"
  projection = next(((shapes[k], k) for k in keys if re.fullmatch(
      r"(visual\.)?proj|visual_projection\.weight|projection/kernel", k)
      or (family == "clip" and k == "head.weight")), None)
  if projection is not None:  # CLIP's image projection: [D, E] as `proj`, else (E, D)
    shape, key = projection
    opts["projection_dim"] = int(shape[-1] if key.endswith(("proj", "kernel")) else shape[0])
  if has(r"mlp\.(w12|weights_in)\.weight$"):
    opts["activation"] = "swiglu"
  else:
    fc1 = next((shapes[k] for k in keys if re.fullmatch(r"(.*\.)?blocks\.0\.mlp\.fc1\.weight", k)),
               None)
    fc2 = next((shapes[k] for k in keys if re.fullmatch(r"(.*\.)?blocks\.0\.mlp\.fc2\.weight", k)),
               None)
    if family == "dinov2" and fc1 and fc2 and fc1[0] == 2 * fc2[1]:
      opts["activation"] = "swiglu"  # timm's packed SwiGLU (giant)
  return opts
