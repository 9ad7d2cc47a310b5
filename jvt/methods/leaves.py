"""Regexes of the backbone's leaves, shared by the methods' partition rules."""
from __future__ import annotations

FROZEN = "frozen"

BLOCK = r"Transformer/encoderblock_\d+"
BACKBONE_LEAVES = (
    r"embedding/(kernel|bias)|cls|Transformer/posembed_input/pos_embedding|"
    rf"{BLOCK}/(LayerNorm_[01]/(scale|bias)|"
    r"MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)|"
    r"MlpBlock_0/Dense_[01]/(kernel|bias))|"
    r"Transformer/encoder_norm/(scale|bias)|fc_norm/(scale|bias)|pre_logits/(kernel|bias)")
HEAD_LEAVES = r"head/(kernel|bias)"

# Bias names usable in bitfit's `subset` -> the regex of those biases.
BIAS_SUBSETS = {
    "query": rf"{BLOCK}/MultiHeadDotProductAttention_0/query/bias",
    "key": rf"{BLOCK}/MultiHeadDotProductAttention_0/key/bias",
    "value": rf"{BLOCK}/MultiHeadDotProductAttention_0/value/bias",
    "out": rf"{BLOCK}/MultiHeadDotProductAttention_0/out/bias",
    "mlp_in": rf"{BLOCK}/MlpBlock_0/Dense_0/bias",
    "mlp_out": rf"{BLOCK}/MlpBlock_0/Dense_1/bias",
    "norm1": rf"{BLOCK}/LayerNorm_0/bias",
    "norm2": rf"{BLOCK}/LayerNorm_1/bias",
    "embedding": r"embedding/bias",
    "encoder_norm": r"Transformer/encoder_norm/bias",
    "fc_norm": r"fc_norm/bias",
}
ALL_BIASES = "|".join(f"({p})" for p in BIAS_SUBSETS.values())
