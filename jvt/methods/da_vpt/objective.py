"""DA-VPT's loss term: `patch_weight * L_ML(X, P) + cls_weight * L_ML(P, x_cls)` (added to the
task loss), with the class -> prompt mapping as its state.

State (under the method's name in the train state; checkpointed, replicated over devices):
  mapping [C] int32     class -> proxy prompt, an argument of the jitted step (never retraced)
  centroids [M, D]      the k-means centroids behind the mapping (warm start for the next)
  class_sums [C, D]     sums of the normalised final [CLS] of the prompted model this epoch,
  class_counts [C]      accumulated inside the train step over the global batch (segment_sum)

The initial mapping clusters class means of the frozen pretrained model (no prompts) over
`mapping_images_per_class` training images per class. After every epoch the sums restart from
zero; at the end of the e-th epoch (e = 1, 2, ...) with e >= `refresh_from_epoch` (0: never),
the epoch's class means are re-clustered warm-started from the previous centroids. The released
code's `dynamic_kmeans = d` (0-based epochs, 0 = never) is `refresh_from_epoch = d + 1`.
"""
from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jvt.losses import da_vpt as da_vpt_loss
from jvt.losses.proxy_anchor import l2_normalize
from jvt.methods.da_vpt.mapping import (accumulate_class_sums, class_means, compute_mapping,
                                        finalize_class_means)
from jvt.methods.leaves import BACKBONE_LEAVES, HEAD_LEAVES
from jvt.methods.terms import LossTerm, chunked_apply

log = logging.getLogger("jvt.da_vpt")


def pretrained_backbone_params(params: dict) -> dict:
  """The backbone + head leaves of a tuned tree (plug-ins dropped)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  keep = {k: v for k, v in flat.items()
          if re.fullmatch(BACKBONE_LEAVES, k) or re.fullmatch(HEAD_LEAVES, k)}
  return traverse_util.unflatten_dict(keep, sep="/")


def check_surplus_prompts(spec, num_classes: int) -> None:
  """More proxy prompts than classes needs an explicit `surplus_prompts` policy."""
  if spec.num_proxy_prompts > num_classes and spec.surplus_prompts != "unused":
    raise ValueError(
        f"da_vpt.num_proxy_prompts={spec.num_proxy_prompts} is more than the {num_classes} "
        "classes: set num_proxy_prompts <= num_classes (the released code shrinks it to the "
        "class count), or surplus_prompts='unused' to map class c to prompt c and keep the "
        "other prompts as negatives only.")


def initial_mapping(model, params, images, labels, num_classes: int, spec, seed: int = 0,
                    apply_fn=chunked_apply):
  """Mapping [C] and centroids [M, D] from the frozen model's class means of final [CLS].

  images [N, S, S, 3] and labels [N] int in [0, num_classes) are a few training images per
  class; the forward (`apply_fn(model, params, images)`, e.g. `ObjectiveContext.apply_fn`)
  runs the plain backbone with the backbone and head leaves of `params` (no prompts).
  """
  labels = np.asarray(labels)
  if labels.shape != (len(images),):
    raise ValueError(f"DA-VPT mapping: expected one label per image; got labels of shape "
                     f"{labels.shape} for {len(images)} images.")
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(f"DA-VPT mapping: labels {sorted(set(bad.tolist()))[:5]} are outside "
                     f"[0, num_classes={num_classes}): check the label feature / num_classes.")
  plain = model.clone(methods=(), partition_rules=())
  feats = apply_fn(plain, pretrained_backbone_params(params), images)[1]["cls"]  # [N, D]
  means, counts = class_means(jnp.asarray(feats), jnp.asarray(labels), num_classes)
  return compute_mapping(np.asarray(means), np.asarray(counts), spec.num_proxy_prompts,
                         seed=seed, layer_norm=spec.kmeans_layer_norm)


class DAVPTLoss(LossTerm):
  """DA-VPT's two weighted metric terms and the class -> prompt mapping state."""

  def __init__(self, spec):
    if spec.refresh_from_epoch < 0:
      raise ValueError(f"da_vpt.refresh_from_epoch={spec.refresh_from_epoch}: must be >= 0 "
                       "(0: never refresh the mapping).")
    self.spec = spec
    self.capture = da_vpt_loss.capture_keys(spec)
    self.capture_layers = tuple(spec.proxy_layers)
    self.seed = 0

  def init_state(self, ctx) -> dict:
    spec, c = self.spec, ctx.num_classes
    check_surplus_prompts(spec, c)
    self.seed = int(ctx.config.get("seed", 0))
    if ctx.class_examples is None:
      raise ValueError(
          "DA-VPT builds its class -> prompt mapping from training images, and none were "
          "given: pass class_examples to jvt.train.setup, a function (images per class K) -> "
          "(images [N, S, S, 3] float32, labels [N] int32) of up to K preprocessed training "
          "images per class (jvt.train.train_and_evaluate builds one from config.dataset).")
    images, labels = ctx.class_examples(spec.mapping_images_per_class)
    # The forward over every class example is set-up's one long step on a CPU (about 4 images/s
    # for ViT-B/16 on two cores): say what it is before it starts.
    log.info("DA-VPT: building the class -> prompt mapping from the frozen backbone's [CLS] of %d "
             "training images (%d classes, up to %d each)", len(images), c,
             spec.mapping_images_per_class)
    mapping, centroids = initial_mapping(ctx.model, ctx.params, images, labels, c, spec,
                                         seed=self.seed, apply_fn=ctx.apply_fn)
    log.info("DA-VPT initial mapping (class -> prompt): %s", mapping.tolist())
    d = centroids.shape[1]
    return {"mapping": np.asarray(mapping, np.int32),
            "centroids": np.asarray(centroids, np.float32),
            "class_sums": np.zeros((c, d), np.float32),
            "class_counts": np.zeros((c,), np.float32)}

  def loss(self, logits, aux, batch, state):
    del logits
    terms = da_vpt_loss.metric_terms(aux, batch["label"], state["mapping"], self.spec)
    total = self.spec.patch_weight * terms["patch"] + self.spec.cls_weight * terms["cls"]
    feats = jax.lax.stop_gradient(l2_normalize(aux["cls"]))  # [B, D]
    sums, counts = accumulate_class_sums(state["class_sums"], state["class_counts"], feats,
                                         batch["label"])
    state = dict(state, class_sums=sums, class_counts=counts)
    return total, {"patch_loss": terms["patch"], "cls_loss": terms["cls"]}, state

  def end_of_epoch(self, state: dict, epoch: int) -> dict:
    """After the `epoch`-th epoch (1-based): maybe re-cluster, always restart the sums."""
    spec = self.spec
    fresh = {"class_sums": np.zeros_like(state["class_sums"]),
             "class_counts": np.zeros_like(state["class_counts"])}
    refresh = 0 < spec.refresh_from_epoch <= epoch
    if not refresh or not np.any(np.asarray(state["class_counts"]) > 0):
      return dict(state, **fresh)
    means = np.asarray(finalize_class_means(jnp.asarray(state["class_sums"]),
                                            jnp.asarray(state["class_counts"])))
    mapping, centroids = compute_mapping(
        means, np.asarray(state["class_counts"]), spec.num_proxy_prompts, seed=self.seed,
        init_centroids=np.asarray(state["centroids"]), layer_norm=spec.kmeans_layer_norm)
    return {"mapping": np.asarray(mapping, np.int32),
            "centroids": np.asarray(centroids, np.float32), **fresh}
