"""Losses: pure functions of arrays (classification, Proxy-Anchor, distillation)."""
from jvt.losses.classification import accuracy
from jvt.losses.classification import correct_predictions
from jvt.losses.classification import masked_mean
from jvt.losses.classification import softmax_cross_entropy
from jvt.losses.distill import feature_distill_loss
from jvt.losses.distill import kd_loss
from jvt.losses.proxy_anchor import l2_normalize
from jvt.losses.proxy_anchor import log1p_sum_exp
from jvt.losses.proxy_anchor import proxy_anchor_loss
from jvt.losses.da_vpt import da_vpt_terms
