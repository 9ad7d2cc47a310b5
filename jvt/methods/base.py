"""What a tuning method is: a frozen settings dataclass whose methods are its plug-in hooks.

A method subclasses `Method` as a frozen dataclass. Its fields are the config vocabulary (a
method dict `dict(method=NAME, field=value, ...)` becomes `Settings(**fields)`), and it may
override any of:

  * `resolve(num_layers)`: validate the fields (ValueError naming `NAME.field`) and return the
    settings the model keeps (e.g. negative block indices made absolute); must be idempotent;
  * `partition_rules(num_layers)`: first-match `(regex, label)` partition rules of its leaves;
  * `claims(num_layers)`: the plug-in settings it asks for, e.g. {"prompt_tokens": (...)}; two
    methods of one composition that claim one key with different values are an error;
  * the backbone hooks `on_*` below (identity by default; the prefix keeps them apart from
    config fields such as `norm` or `attention_mask`);
  * `merge(params)`: fold its leaves into the backbone's weights (`mergeable = True`), or
    leave `mergeable = False` (then `jvt.merge` refuses the model, naming the method);
  * `loss_term()`: a `jvt.methods.terms.LossTerm` added to the training loss, or None.

Hooks: each receives the Flax module that calls it as `scope` (parameters and submodules a hook
creates belong to that module, so their paths are `<module path>/<name>`) and a `Site` saying
where it runs. A hook runs once per call of its module, except `on_tokens`, which runs before
every block in the encoder's scope: it receives what `on_encoder` returned (make submodules shared
by all blocks there).

| hook | scope | called with | returns |
|---|---|---|---|
| `on_model(scope, site)` | ViT | once per forward, first | arrays for `site.shared[name]` |
| `on_image(scope, images, site)` | ViT | [B, H, W, 3] input | images |
| `on_patch_embedding(scope, x, site)` | ViT | [B, h, w, D] patch embedding | x |
| `on_encoder(scope, site)` | Transformer | once per forward | shared state for `on_tokens` |
| `on_tokens(shared, x, site)` | Transformer | [B, K+P+N, D] before block `site.layer` | x |
| `on_attention_mask(mask, site)` | block | None or bool [1, 1, T, T] | mask |
| `on_kernel(scope, kernel, site)` | Projection | its weight [*in, *out] | the weight used |
| `on_projection(scope, x, y, site)` | Projection | input, output | output |
| `on_keys_values(scope, k, v, site)` | attention | [B, T, H, Dh] each | (k, v), may add tokens |
| `on_branch(scope, x, z, y, site)` | block | stream x, normed z, branch output y | y |
| `on_norm(scope, x, y, site)` | LayerNorm | input, normalised output | output |
| `on_outputs(scope, aux, site)` | ViT | aux after pooling | aux |

Unread token rows: a block computes its queries, attention output, residual branches and MLP
only for the token rows something reads later (`jvt.models.vit.ViT.skip_unread_tokens`): the
last block only for what the pooling reads ([CLS] for "tok"), and a block only for the
non-prompt rows when the next block's `on_tokens` replaces the prompts. Keys and values still
come from every row. These declarations make this exact:

  * `rowwise` (class attribute, True by default): every hook inside a block (`on_projection`,
    `on_norm`, `on_branch`, `on_kernel`) treats each token row on its own. A method whose block
    hooks mix rows sets it False, and its models compute every row, unless it also declares
  * `grid_local` (class attribute, False by default): its hooks mix only the image rows, among
    themselves, and treat every other row ([CLS], registers, prompts) on its own (Convpass's
    convolution over the token grid). A block then computes only the rows read after it, as
    for a rowwise method: those always hold every image row or none, and `Site.rows` tells
    the hooks after the attention which;
  * `discards_prompts(layer, num_layers)`: True when its `on_tokens` before block `layer` drops
    the prompt tokens it receives (deep prompts replace them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Site:
  """Where a hook runs and what the plug-in may need there.

  layer: block index (-1 outside the blocks). num_prompts: prompt tokens in the sequence
  (K prefix tokens, P prompts, N image tokens), before insertion in `tokens`; num_tokens:
  K + P + N. num_prefix: K, the tokens before the prompts: [CLS] and DINOv2's registers (1 for
  a plain ViT, 0 for SigLIP, which has no [CLS]: prompts go first).
  grid: the token grid's
  (h, w), N = h * w. name: the projection ("query", "key", "value", "out", "mlp_in" (Dense_0),
  "mlp_out" (Dense_1)), the norm ("LayerNorm_0", "LayerNorm_1", "encoder_norm", "fc_norm"), or
  the residual branch ("attn", "mlp"). train: training mode (dropout on; rngs via
  `scope.make_rng("dropout")` or `nn.Dropout`). capture / captured: the capture keys asked for
  at this block and the dict where a plug-in writes the ones it provides (e.g. "prompts").
  shared: method name -> what its `on_model` returned (arrays reach every hook, blocks under
  remat included). rows: inside a block after the attention (its branch, LayerNorm_1, the MLP's
  projections and branch), the ((start, stop), ...) token ranges the hooks' inputs hold, in
  order (`Encoder1DBlock.rows`; () for every row); `image_rows()` says whether those end with
  the whole image grid.
  """
  layer: int = -1
  num_layers: int = 0
  num_prompts: int = 0
  num_tokens: int = 0
  num_prefix: int = 1
  grid: tuple[int, int] = (0, 0)
  name: str = ""
  train: bool = False
  hidden_size: int = 0
  patch_size: int = 0
  in_axes: int = 1
  features: tuple[int, ...] = ()
  dtype: Any = jnp.float32
  capture: tuple[str, ...] = ()
  captured: dict | None = dataclasses.field(default=None, compare=False, hash=False)
  shared: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)
  rows: tuple[tuple[int, int], ...] = ()

  def at(self, **changes) -> "Site":
    return dataclasses.replace(self, **changes)

  def image_rows(self) -> int:
    """How many of the rows in `rows` are image tokens: h * w (the last ones) or 0. The image
    tokens end the sequence, and a block computes either all of them or none."""
    n = self.grid[0] * self.grid[1]
    if not self.rows:
      return n
    start, stop = self.rows[-1]
    if stop != self.num_tokens:
      return 0
    if stop - start < n:
      raise ValueError(f"rows {self.rows} of {self.num_tokens} tokens hold part of the {n} "
                       "image tokens: a block computes every image row or none.")
    return n


class NotMergeableError(ValueError):
  """A method whose computation a plain ViT cannot hold was asked to merge."""


@dataclasses.dataclass(frozen=True)
class Method:
  """Base of every method's settings. Fields common to every method dict:

  train_head: the new classification head trains (False freezes it).
  rules: the user's own `(regex, label)` rules, matched before every method's rules.
  """
  name: ClassVar[str] = ""
  family: ClassVar[str] = "parameter"
  summary: ClassVar[str] = ""
  # Hooks of several methods at one site run in increasing `order` (then the config's order).
  order: ClassVar[int] = 50
  mergeable: ClassVar[bool] = True
  # Its block hooks treat each token row on its own (see "Unread token rows" above).
  rowwise: ClassVar[bool] = True
  # Not rowwise, but mixing only the image rows among themselves (see above).
  grid_local: ClassVar[bool] = False

  train_head: bool = True
  rules: tuple = ()

  # ------------------------------------------------------------------ configuration
  def resolve(self, num_layers: int) -> "Method":
    del num_layers
    return self

  def partition_rules(self, num_layers: int) -> tuple[tuple[str, str], ...]:
    del num_layers
    return ()

  def claims(self, num_layers: int) -> dict[str, Any]:
    del num_layers
    return {}

  def discards_prompts(self, layer: int, num_layers: int) -> bool:
    """True when `on_tokens` before block `layer` drops the prompt tokens it receives, so
    block `layer - 1` need not compute their rows."""
    del layer, num_layers
    return False

  # ------------------------------------------------------------------ hooks
  def on_model(self, scope, site: Site):
    return None

  def on_image(self, scope, images, site: Site):
    return images

  def on_patch_embedding(self, scope, x, site: Site):
    return x

  def on_encoder(self, scope, site: Site):
    return None

  def on_tokens(self, shared, x, site: Site):
    return x

  def on_attention_mask(self, mask, site: Site):
    return mask

  def on_kernel(self, scope, kernel, site: Site):
    return kernel

  def on_projection(self, scope, x, y, site: Site):
    return y

  def on_keys_values(self, scope, k, v, site: Site):
    return k, v

  def on_branch(self, scope, x, z, y, site: Site):
    return y

  def on_norm(self, scope, x, y, site: Site):
    return y

  def on_outputs(self, scope, aux, site: Site):
    return aux

  # ------------------------------------------------------------------ after training
  def merge(self, params: dict) -> dict:
    """Params with this method folded into the backbone (identity: it adds no leaves)."""
    if not self.mergeable:
      raise NotMergeableError(
          f"method {self.name!r} cannot be merged into a plain ViT: it adds computation "
          "(prompts, adapters, ...) that the backbone's weights cannot hold. Keep the model "
          "with its plug-ins (RunCheckpointer checkpoints / export/trainable.npz).")
    return params

  def loss_term(self):
    """The `LossTerm` this method adds to the training loss, or None."""
    return None


def ordered(methods) -> tuple:
  """The methods in hook order: increasing `order`, then as configured."""
  return tuple(sorted(methods, key=lambda m: m.order))
