"""jvt: parameter-efficient visual tuning of Vision Transformers in JAX/Flax.

    model = jvt.build_model("B/16", num_classes=100, tuning=dict(method="vpt", num_prompts=50),
                            checkpoint="ViT-B_16.npz")
    params = jvt.init_params(model, jax.random.key(0), image_size=224)
    params = jvt.load_pretrained("ViT-B_16.npz", params, model)
    logits, aux = model.apply({"params": params}, images)

`import jvt` is light (no JAX import): the names above and every submodule (`jvt.losses`,
`jvt.partition`, `jvt.train`, ...) load on first use.
"""
import importlib
import importlib.util

__version__ = "0.1.0"

# Top-level names that live in a submodule: name -> module.
_LAZY_NAMES = {"build_model": "jvt.models", "init_params": "jvt.models",
               "param_shapes": "jvt.models", "merge": "jvt.methods.merge",
               "predict": "jvt.prediction", "save_adapter": "jvt.adapters",
               "load_adapter": "jvt.adapters", "adapter_info": "jvt.adapters"}


def load_pretrained(path, params, model, **kwargs):
  """Loads a pretrained checkpoint of any supported format into `params` (see
  `jvt.checkpoints.load_pretrained`; imported lazily so `import jvt` stays light)."""
  from jvt.checkpoints import load_pretrained as _load
  return _load(path, params, model, **kwargs)


def __getattr__(name: str):
  """`jvt.<submodule>` and the lazily imported top-level names, on first access."""
  if name in _LAZY_NAMES:
    value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
  elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
    value = importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY_NAMES))
