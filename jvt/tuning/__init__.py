"""Tuning methods: the registry (config vocabulary -> plug-ins + rules) and weight merging."""
from jvt.tuning.merge import merge_lora, merge_ssf, unmerge_lora
from jvt.tuning.methods import (BACKBONE_LEAVES, BIAS_SUBSETS, FROZEN, HEAD_LEAVES, METHODS,
                                Tuning, resolve_tuning)
