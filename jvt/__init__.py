"""jvt: parameter-efficient visual tuning of Vision Transformers in JAX/Flax.

    model = jvt.build_model("B/16", num_classes=100, tuning=dict(method="vpt", num_prompts=50))
    params = jvt.init_params(model, jax.random.key(0), image_size=224)
    params = jvt.load_pretrained("ViT-B_16.npz", params, model)
    logits, aux = model.apply({"params": params}, images)
"""
from jvt import partition
from jvt.methods.merge import merge
from jvt.models import build_model, init_params, param_shapes

__version__ = "0.1.0"


def load_pretrained(path, params, model, **kwargs):
  """Loads a pretrained checkpoint of any supported format into `params` (see
  `jvt.checkpoints.load_pretrained`; imported lazily so `import jvt` stays light)."""
  from jvt.checkpoints import load_pretrained as _load
  return _load(path, params, model, **kwargs)
