"""ViT backbone, its tuning plug-ins, and the factory `build_model` / `init_params`."""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from jvt.models.variants import VARIANT_DIMS, variant_config
from jvt.models.vit import CAPTURE_KEYS, ViT


# ViT fields that build_model sets itself (or flax owns): not valid as overrides.
_NOT_OVERRIDES = {"num_classes", "methods", "partition_rules", "explicit_options", "parent",
                  "name"}
# Architectural options a checkpoint file implies (jvt.checkpoints.formats.checkpoint_options).
_FILE_OPTIONS = ("gelu_approximate", "layer_norm_eps", "class_token", "num_registers",
                 "layer_scale", "pre_norm", "patch_bias", "activation", "pool", "fc_norm",
                 "projection_dim")


def build_model(variant: str, num_classes: int, tuning: Any = None, *,
                checkpoint: str | os.PathLike | None = None, **overrides) -> ViT:
  """Builds a ViT by variant name ("B/16", "dinov2-B/14", "siglip-B/16", ...; see
  `jvt.models.variants`) with the tuning methods of `tuning`.

  tuning: a method dict such as `dict(method="vpt", num_prompts=50, deep=True)`, a ConfigDict,
    `jvt.methods.Method` settings, or a list of such (a composition); None is the plain
    backbone (trains the head only). `jvt.methods.tuning_config(model)` gives it back.
  checkpoint: a pretrained file (any format `load_pretrained` reads): the options it implies
    (GELU form, layer-norm eps, pooling, [CLS], registers, layer scale, pre-norm, patch bias,
    fc_norm, projection width) replace the variant's. Only key names and shapes are read.
  overrides: any `ViT` field, e.g. `dtype=jnp.bfloat16`, `remat="dots"`, `pool="gap"`,
    `representation_size=768`, `gelu_approximate=False`, `drop_path_rate=0.1`, or smaller dims
    for tests (`hidden_size=32, num_layers=2`). They win over the variant and the checkpoint,
    and `load_pretrained` does not check them against the file.
  """
  from jvt.methods.registry import resolve_tuning
  allowed = sorted(set(ViT.__dataclass_fields__) - _NOT_OVERRIDES)
  unknown = sorted(set(overrides) - set(allowed))
  if unknown:
    raise ValueError(f"build_model: unknown ViT field(s) {unknown}; allowed overrides: "
                     f"{allowed}.")
  implied = {}
  if checkpoint is not None:
    from jvt.checkpoints.formats import checkpoint_options  # models/ stays light at import
    implied = {k: v for k, v in checkpoint_options(checkpoint).items() if k in _FILE_OPTIONS}
  fields = {**variant_config(variant), **implied, **overrides}
  fields["explicit_options"] = tuple(sorted(k for k in overrides if k in _FILE_OPTIONS))
  if fields["hidden_size"] % fields["num_heads"]:
    raise ValueError(f"hidden_size={fields['hidden_size']} is not divisible by "
                     f"num_heads={fields['num_heads']}.")
  resolved = resolve_tuning(tuning if tuning is not None else dict(method="linear"),
                            fields["num_layers"])
  return ViT(num_classes=num_classes, methods=resolved.methods, partition_rules=resolved.rules,
             **fields)


def init_params(model: ViT, key: jax.Array, image_size: int = 224) -> dict:
  """Randomly initialised parameters for images of `image_size` x `image_size` (fp32).

  Flax's `lazy_init` traces the model on an abstract image and runs only what the parameters
  need, never the forward pass: on the 2-core CPU a ViT-B/16 initialises in 55-75% of the time
  of a jitted `model.init`, whose XLA compilation of every initialiser cost about as much as
  compiling the train step (docs/performance.md).
  """
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  # Remat does not change the parameters (same tree, same values), but under lazy_init
  # jax.checkpoint's trace cache kept a whole fp32 copy of them alive for the life of the
  # process (ViT-S/16: 83 MB, B/16: 330 MB; freed only by jax.clear_caches): initialise the
  # same model without it.
  if getattr(model, "remat", "none") != "none":
    model = model.clone(remat="none")
  return model.lazy_init(key, images)["params"]


def param_shapes(model: ViT, image_size: int = 224) -> dict:
  """The parameter tree as ShapeDtypeStructs, without allocating (jax.eval_shape)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape)))["params"]
