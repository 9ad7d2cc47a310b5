"""Tuning methods as plug-ins: one module per method (a folder for DA-VPT and distillation).

`registry()` maps names to settings classes; `resolve_tuning` turns configs into resolved
settings + partition rules; `tuning_config(model)` gives a built model's tuning back as method
dicts; `merge(model, params)` folds mergeable methods into a plain ViT. See docs/methods.md
("Write your own method") for the hooks a method can use (`jvt.methods.base`).
"""
from jvt.methods.base import Method, NotMergeableError, Site
from jvt.methods.leaves import BACKBONE_LEAVES, BIAS_SUBSETS, FROZEN, HEAD_LEAVES
from jvt.methods.merge import merge, mergeable
from jvt.methods.registry import (Tuning, find, method_class, method_defaults, registry,
                                  resolve_tuning, tuning_config)
from jvt.methods.terms import CrossEntropy, LossTerm, ObjectiveContext
