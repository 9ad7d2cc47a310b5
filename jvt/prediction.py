"""`jvt.predict(model, params, images_or_paths)`: class probabilities for a few images.

For trying a tuned model on your own pictures: image files or arrays in, softmax
probabilities out, with the evaluation preprocessing of the run (resize / crop / normalise as
at test time). The preprocessing must be the run's own:

    model, params = jvt.load_adapter("run/export/adapter.npz", "ViT-B_16.npz")
    probs = jvt.predict(model, params, ["cat.jpg", "dog.png"])   # [2, num_classes]

The default is the `vtab` preset (resize, ImageNet mean/std; `base_config`'s default) at the
image size of the position embeddings. When the run used another one, pass it as
`preprocess=`: a preset name of `jvt.data.preprocess.PRESETS` (`preprocess="vit"` for the
demo's runs), the adapter's description `jvt.adapter_info(path)` (a run's adapter records its
preset and image size), the run's config (its `dataset.preprocess` and `model.image_size`), or
any callable mapping a uint8 [H, W, 3] image to float32 [S, S, 3].
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import numpy as np

DEFAULT_PRESET = "vtab"  # base_config().dataset.preprocess


def image_size_of(params: dict, patch_size: int) -> int:
  """The square input side the position embeddings were made for (patch grid x patch size)."""
  posemb = params["Transformer"]["posembed_input"]["pos_embedding"]  # [1, T, D]
  tokens = posemb.shape[1] - (1 if "cls" in params else 0)
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f"predict: {tokens} position embeddings are not a square grid; pass "
                     "image_size=.")
  return side * patch_size


def _preprocessor(preprocess: Any, image_size: int) -> Callable[[np.ndarray], np.ndarray]:
  from jvt.data import preprocess as presets
  if callable(preprocess):
    return preprocess
  if isinstance(preprocess, str):
    return presets.get_preprocess(preprocess, image_size, train=False)
  if hasattr(preprocess, "get") and isinstance(preprocess.get("preprocess"), str):
    return presets.get_preprocess(preprocess["preprocess"],  # an adapter's description
                                  int(preprocess.get("image_size") or image_size), train=False)
  dataset = preprocess.get("dataset") if hasattr(preprocess, "get") else None
  if dataset is not None and dataset.get("preprocess"):  # a run config
    model_cfg = preprocess.get("model") or {}
    return presets.get_preprocess(dataset["preprocess"],
                                  int(model_cfg.get("image_size", image_size)), train=False)
  raise TypeError(f"predict: preprocess must be a preset name ({', '.join(presets.PRESETS)}), "
                  "an adapter description (jvt.adapter_info), a run config or a callable, "
                  f"got {type(preprocess).__name__}.")


def _load(item: Any) -> np.ndarray:
  from jvt.data.lists import read_image
  if isinstance(item, (str, os.PathLike)):
    if not os.path.isfile(item):
      raise FileNotFoundError(f"predict: no image file {os.fspath(item)!r}.")
    return read_image(os.fspath(item))  # uint8 [H, W, 3]
  image = np.asarray(item)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"predict: an image array must be uint8 [H, W, 3] (or [H, W]) as read "
                     f"from a file, got {image.dtype} {image.shape}.")
  return image


def predict(model, params: dict, images_or_paths: Any, *, preprocess: Any = None,
            image_size: int | None = None, batch_size: int = 64) -> np.ndarray:
  """Softmax class probabilities float32 [N, num_classes], in the order of the inputs.

  Args:
    model: the ViT (`jvt.build_model` or `jvt.load_adapter`).
    params: its full parameter tree.
    images_or_paths: image file paths, uint8 arrays [H, W, 3], a list mixing both, or a uint8
      batch [N, H, W, 3].
    preprocess: the evaluation preprocessing (see the module docstring); None: `vtab`.
    image_size: the side fed to the model; default the size the parameters were made for.
    batch_size: images per forward pass.
  """
  import jax
  import jax.numpy as jnp
  if isinstance(images_or_paths, (str, os.PathLike)):
    images_or_paths = [images_or_paths]
  elif isinstance(images_or_paths, np.ndarray) and images_or_paths.ndim == 3:
    images_or_paths = [images_or_paths]  # one [H, W, 3] image
  items: Sequence[Any] = list(images_or_paths)
  if not items:
    raise ValueError("predict: no images given.")
  image_size = image_size or image_size_of(params, model.patch_size)
  fn = _preprocessor(DEFAULT_PRESET if preprocess is None else preprocess, image_size)
  apply = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)[0], axis=-1))
  out = []
  for start in range(0, len(items), batch_size):
    batch = np.stack([fn(_load(x)) for x in items[start:start + batch_size]])  # [b, S, S, 3]
    out.append(np.asarray(apply(params, jnp.asarray(batch)), np.float32))  # [b, classes]
  return np.concatenate(out)
