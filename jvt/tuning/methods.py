"""The method registry: users' tuning configs -> model plug-ins (`TuningSpec`) + partition rules.

A tuning config is a dict / ConfigDict such as `dict(method="vpt", num_prompts=50, deep=True)`
or a list of such (a composition). Each method names its fields and defaults; `resolve_tuning`
validates them, merges the plug-in settings of a composition (a setting asked for twice with
different values is an error) and collects the first-match `(regex, label, required)` rules:
users' own rules first, then each method's, then the head, then the frozen backbone.

Every method trains the new head unless a method dict says `train_head=False`. Any method dict
may add `rules=((regex, label), ...)`, e.g. `(("cls", "cls"),)` to also train the [CLS] token.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from jvt.models.spec import ADAPTER_POSITIONS, LORA_TARGETS, PROMPT_INITS, DAVPTSpec, TuningSpec

FROZEN = "frozen"

_BLOCK = r"Transformer/encoderblock_\d+"
BACKBONE_LEAVES = (
    r"embedding/(kernel|bias)|cls|Transformer/posembed_input/pos_embedding|"
    rf"{_BLOCK}/(LayerNorm_[01]/(scale|bias)|"
    r"MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)|"
    r"MlpBlock_0/Dense_[01]/(kernel|bias))|"
    r"Transformer/encoder_norm/(scale|bias)|fc_norm/(scale|bias)|pre_logits/(kernel|bias)")
HEAD_LEAVES = r"head/(kernel|bias)"

# Bias names usable in bitfit's `subset` -> the regex of those biases.
BIAS_SUBSETS = {
    "query": rf"{_BLOCK}/MultiHeadDotProductAttention_0/query/bias",
    "key": rf"{_BLOCK}/MultiHeadDotProductAttention_0/key/bias",
    "value": rf"{_BLOCK}/MultiHeadDotProductAttention_0/value/bias",
    "out": rf"{_BLOCK}/MultiHeadDotProductAttention_0/out/bias",
    "mlp_in": rf"{_BLOCK}/MlpBlock_0/Dense_0/bias",
    "mlp_out": rf"{_BLOCK}/MlpBlock_0/Dense_1/bias",
    "norm1": rf"{_BLOCK}/LayerNorm_0/bias",
    "norm2": rf"{_BLOCK}/LayerNorm_1/bias",
    "embedding": r"embedding/bias",
    "encoder_norm": r"Transformer/encoder_norm/bias",
    "fc_norm": r"fc_norm/bias",
}
ALL_BIASES = "|".join(f"({p})" for p in BIAS_SUBSETS.values())

DAVPT_PRESETS = ("code", "paper")
# DA-VPT+ bias sets. paper: K and V biases and [CLS]; released code: K, V, attention-out, fc2
# and norm2 biases, all of norm1, [CLS], and the patch-embedding bias (its `proj.bias` name
# matches the released code's attention-out switch too).
DAVPT_PLUS_RULES = {
    "paper": ((BIAS_SUBSETS["key"], "bias"), (BIAS_SUBSETS["value"], "bias"), ("cls", "cls")),
    "code": ((BIAS_SUBSETS["key"], "bias"), (BIAS_SUBSETS["value"], "bias"),
             (BIAS_SUBSETS["out"], "bias"), (BIAS_SUBSETS["mlp_out"], "bias"),
             (BIAS_SUBSETS["norm2"], "bias"), (rf"{_BLOCK}/LayerNorm_0/(scale|bias)", "bias"),
             (BIAS_SUBSETS["embedding"], "bias"), ("cls", "cls")),
}

COMMON_FIELDS = {"train_head": True, "rules": ()}


@dataclasses.dataclass(frozen=True)
class Tuning:
  """The resolved tuning of a model: plug-ins, partition rules and method losses."""
  spec: TuningSpec
  rules: tuple[tuple[str, str, bool], ...]  # (regex, label, required-to-match)
  methods: tuple[str, ...]


def _vpt(f, num_layers):
  if f["num_prompts"] < 0:
    raise ValueError(f"vpt.num_prompts={f['num_prompts']}: must be >= 0.")
  if f["init"] not in PROMPT_INITS:
    raise ValueError(f"vpt.init={f['init']!r}; allowed: {PROMPT_INITS}.")
  if f["prompts_per_block"] is not None:
    tokens = tuple(int(m) for m in f["prompts_per_block"])
    if len(tokens) != num_layers:
      raise ValueError(f"vpt.prompts_per_block has {len(tokens)} entries; the model has "
                       f"{num_layers} blocks.")
  elif f["deep"]:
    tokens = (f["num_prompts"],) * num_layers
  else:
    tokens = (f["num_prompts"],) + (0,) * (num_layers - 1)
  spec = dict(prompt_tokens=tokens, deep_prompts=bool(f["deep"]),
              prompt_dropout=float(f["dropout"]), prompt_init=f["init"],
              prompt_proj_dim=f["proj_dim"], prompt_l2norm=bool(f["l2norm"]))
  return spec, ((r"Transformer/prompts/.*", "prompt"),)


def _davpt_common(f, num_layers, plus):
  preset = f["preset"]
  if preset not in DAVPT_PRESETS:
    raise ValueError(f"{f['method']}.preset={preset!r}; allowed: {DAVPT_PRESETS}.")
  layers = tuple(int(l) for l in f["proxy_layers"])
  if not layers:
    raise ValueError(f"{f['method']}.proxy_layers is empty: give at least one block index.")
  for l in layers:
    if not -num_layers <= l < num_layers:
      raise ValueError(f"{f['method']}.proxy_layers contains {l}: the model has {num_layers} "
                       f"blocks (valid: 0..{num_layers - 1} or negative from the end).")
  layers = tuple(sorted({l % num_layers for l in layers}))
  for name in ("patch_weight", "cls_weight"):
    if f[name] < 0:
      raise ValueError(f"{f['method']}.{name}={f[name]}: must be >= 0.")
  if f["num_prompts"] < 0:
    raise ValueError(f"{f['method']}.num_prompts={f['num_prompts']}: must be >= 0.")
  if f["num_proxy_prompts"] <= 0:
    raise ValueError(f"{f['method']}.num_proxy_prompts={f['num_proxy_prompts']}: must be > 0.")
  paper = preset == "paper"
  pick = lambda key, paper_value, code_value: (
      f[key] if f[key] is not None else (paper_value if paper else code_value))
  tokens = tuple(f["num_proxy_prompts"] if i in layers else f["num_prompts"]
                 for i in range(num_layers))
  davpt_spec = DAVPTSpec(
      proxy_layers=layers,
      patch_feature=pick("patch_feature", "attn_out_mean", "input_patch_mean"),
      prompt_query=bool(pick("prompt_query", True, False)),
      cls_query=bool(pick("cls_query", False, True)),
      preset=preset, num_proxy_prompts=int(f["num_proxy_prompts"]),
      patch_weight=float(f["patch_weight"]), cls_weight=float(f["cls_weight"]),
      scale_ratio=float(f["scale_ratio"]), alpha=float(f["alpha"]),
      delta_pos=float(f["delta_pos"]), delta_neg=float(f["delta_neg"]),
      normalize_positives=pick("normalize_positives", "with_positives", "all"),
      mapping_images_per_class=int(f["mapping_images_per_class"]),
      refresh_from_epoch=int(f["refresh_from_epoch"]),
      kmeans_layer_norm=bool(pick("kmeans_layer_norm", False, True)),
      surplus_prompts=str(f["surplus_prompts"] or ""))
  if davpt_spec.surplus_prompts not in ("", "unused"):
    raise ValueError(f"{f['method']}.surplus_prompts={davpt_spec.surplus_prompts!r}; allowed: "
                     "'' (more proxy prompts than classes is an error), 'unused'.")
  if davpt_spec.patch_feature not in ("attn_out_mean", "input_patch_mean"):
    raise ValueError(f"{f['method']}.patch_feature={davpt_spec.patch_feature!r}; allowed: "
                     "'attn_out_mean' (paper), 'input_patch_mean' (released code).")
  if davpt_spec.normalize_positives not in ("with_positives", "all"):
    raise ValueError(f"{f['method']}.normalize_positives={davpt_spec.normalize_positives!r}; "
                     "allowed: 'with_positives' (paper), 'all' (released code).")
  spec = dict(prompt_tokens=tokens, deep_prompts=True, prompt_dropout=float(f["dropout"]),
              prompt_init=pick("init", "vpt", "xavier8"),
              prompt_l2norm=bool(pick("l2norm", False, False)),
              prompt_attention_mask=bool(pick("attention_mask", False, False)),
              davpt=davpt_spec)
  rules = ((r"Transformer/prompts/.*", "prompt"),)
  if plus:
    rules = rules + DAVPT_PLUS_RULES[preset]
  return spec, rules


def _adapter(f, num_layers):
  del num_layers
  if f["dim"] <= 0:
    raise ValueError(f"adapter.dim={f['dim']}: must be > 0.")
  bad = set(f["positions"]) - set(ADAPTER_POSITIONS)
  if bad or not f["positions"]:
    raise ValueError(f"adapter.positions={tuple(f['positions'])}: allowed values are "
                     f"{ADAPTER_POSITIONS} (at least one).")
  return (dict(adapter_dim=int(f["dim"]), adapter_positions=tuple(f["positions"])),
          ((rf"{_BLOCK}/adapter_(attn|mlp)/.*", "adapter"),))


def _adaptformer(f, num_layers):
  del num_layers
  if f["dim"] <= 0:
    raise ValueError(f"adaptformer.dim={f['dim']}: must be > 0.")
  return (dict(adaptformer_dim=int(f["dim"]), adaptformer_scale=float(f["scale"])),
          ((rf"{_BLOCK}/adaptformer/.*", "adapter"),))


def _lora(f, num_layers):
  del num_layers
  if f["rank"] <= 0:
    raise ValueError(f"lora.rank={f['rank']}: must be a positive integer.")
  targets = tuple(f["targets"])
  bad = [t for t in targets if t not in LORA_TARGETS]
  if bad or not targets:
    raise ValueError(f"lora.targets={targets}: unknown {bad}; allowed values are "
                     f"{LORA_TARGETS} (at least one).")
  return (dict(lora_rank=int(f["rank"]), lora_alpha=float(f["alpha"]), lora_targets=targets),
          ((r".*/lora_(a|b)", "lora"),))


def _bitfit(f, num_layers):
  del num_layers
  if f["subset"] is None:
    return {}, ((ALL_BIASES, "bias"),)
  bad = [s for s in f["subset"] if s not in BIAS_SUBSETS]
  if bad or not f["subset"]:
    raise ValueError(f"bitfit.subset={tuple(f['subset'])}: unknown {bad}; allowed values are "
                     f"{tuple(BIAS_SUBSETS)} (or subset=None for every bias).")
  return {}, tuple((BIAS_SUBSETS[s], "bias") for s in f["subset"])


def _ssf(f, num_layers):
  del f, num_layers
  return dict(ssf=True), ((r"(.*/)?ssf_(scale|shift)", "ssf"),)


def _layernorm(f, num_layers):
  del f, num_layers
  return {}, ((rf"({_BLOCK}/LayerNorm_[01]|Transformer/encoder_norm|fc_norm)/(scale|bias)",
               "norm"),)


def _linear(f, num_layers):
  del f, num_layers
  return {}, ()


def _partial(f, num_layers):
  k = f["k"]
  if not 0 < k <= num_layers:
    raise ValueError(f"partial.k={k}: must be in 1..{num_layers} (the model's blocks).")
  blocks = "|".join(str(i) for i in range(num_layers - k, num_layers))
  return {}, ((rf"Transformer/encoderblock_({blocks})/.*", "backbone"),
              (r"(Transformer/encoder_norm|fc_norm)/(scale|bias)", "backbone"))


def _full(f, num_layers):
  del f, num_layers
  return {}, ((BACKBONE_LEAVES, "backbone"),)


def _distill_proj(f, num_layers):
  del num_layers
  if f["dim"] <= 0 or f["num"] <= 0:
    raise ValueError(f"distill_proj.dim={f['dim']} and num={f['num']}: both must be > 0 (dim = "
                     "the teacher's width, num = the number of matched layers).")
  return (dict(distill_proj_dim=int(f["dim"]), distill_proj_num=int(f["num"])),
          ((r"distill_proj/(kernel|bias)", "distill"),))


_DAVPT_FIELDS = dict(
    preset="code", num_prompts=10, num_proxy_prompts=10, proxy_layers=(-1,), patch_weight=0.05,
    cls_weight=0.05, scale_ratio=1.0, dropout=0.0, alpha=32.0, delta_pos=0.1, delta_neg=-0.1,
    normalize_positives=None, patch_feature=None, prompt_query=None, cls_query=None, init=None,
    l2norm=None, attention_mask=None, mapping_images_per_class=10, refresh_from_epoch=1,
    kmeans_layer_norm=None, surplus_prompts="")


@dataclasses.dataclass(frozen=True)
class MethodDef:
  family: str
  fields: Mapping[str, Any]
  build: Callable
  summary: str


METHODS: dict[str, MethodDef] = {
    "vpt": MethodDef("prompt", dict(num_prompts=50, deep=True, dropout=0.0, proj_dim=None,
                                    init="vpt", prompts_per_block=None, l2norm=False), _vpt,
                     "VPT shallow/deep prompts (+ head)"),
    "da_vpt": MethodDef("prompt", _DAVPT_FIELDS,
                        lambda f, n: _davpt_common(f, n, plus=False),
                        "DA-VPT: VPT-Deep + metric losses with prompts as class proxies"),
    "da_vpt_plus": MethodDef("prompt", _DAVPT_FIELDS,
                             lambda f, n: _davpt_common(f, n, plus=True),
                             "DA-VPT+: DA-VPT + bias tuning (+ [CLS])"),
    "adapter": MethodDef("adapter", dict(dim=8, positions=("attn", "mlp")), _adapter,
                         "sequential bottleneck adapters"),
    "adaptformer": MethodDef("adapter", dict(dim=8, scale=0.1), _adaptformer,
                             "AdaptFormer parallel adapter beside the MLP"),
    "lora": MethodDef("parameter", dict(rank=8, alpha=8.0, targets=("query", "value")), _lora,
                      "low-rank updates of chosen projections"),
    "bitfit": MethodDef("parameter", dict(subset=None), _bitfit, "bias terms only"),
    "ssf": MethodDef("parameter", {}, _ssf, "scale and shift of every operation's output"),
    "layernorm": MethodDef("parameter", {}, _layernorm, "layer-norm scales and biases"),
    "linear": MethodDef("parameter", {}, _linear, "linear probe: the head only"),
    "partial": MethodDef("parameter", dict(k=1), _partial, "last k blocks + final norm + head"),
    "full": MethodDef("baseline", {}, _full, "full fine-tuning"),
    "distill_proj": MethodDef("remapping", dict(dim=0, num=1), _distill_proj,
                              "feature distillation's learned projections (with jvt.distill)"),
}


def _as_dicts(cfg) -> list[dict]:
  if cfg is None:
    return []
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
    cfg = cfg.to_dict()
  if isinstance(cfg, Mapping):
    return [dict(cfg)]
  if isinstance(cfg, Sequence) and not isinstance(cfg, str):
    out = []
    for c in cfg:
      out.extend(_as_dicts(c))
    return out
  raise ValueError(f"tuning config must be a dict, a ConfigDict or a list of them; got {cfg!r}.")


def _method_fields(d: dict, index: int) -> tuple[str, dict]:
  name = d.get("method")
  if name not in METHODS:
    raise ValueError(f"tuning[{index}].method={name!r}: unknown method; allowed values are "
                     f"{sorted(METHODS)}.")
  defaults = {**COMMON_FIELDS, **METHODS[name].fields}
  unknown = sorted(set(d) - set(defaults) - {"method"})
  if unknown:
    raise ValueError(f"tuning[{index}] ({name}): unknown field(s) {unknown}; allowed fields are "
                     f"{sorted(defaults)}.")
  fields = {**defaults, **d}
  for key in ("targets", "positions", "subset", "proxy_layers", "prompts_per_block", "rules"):
    if key in fields and isinstance(fields[key], list):
      fields[key] = tuple(tuple(r) if isinstance(r, list) else r for r in fields[key])
  return name, fields


def resolve_tuning(cfg, num_layers: int) -> Tuning:
  """Validates a tuning config and returns the model plug-ins, partition rules and losses."""
  spec_fields: dict[str, Any] = {}
  spec_owner: dict[str, str] = {}
  user_rules, method_rules, names = [], [], []
  train_head = True
  for i, d in enumerate(_as_dicts(cfg)):
    name, f = _method_fields(d, i)
    spec, rules = METHODS[name].build(f, num_layers)
    for key, value in spec.items():
      if key in spec_fields and spec_fields[key] != value:
        raise ValueError(
            f"tuning[{i}] ({name}) sets {key}={value!r} but {spec_owner[key]} already set it to "
            f"{spec_fields[key]!r}: a composition may ask for each plug-in setting once.")
      spec_fields[key], spec_owner[key] = value, f"{name}"
    for rule in f["rules"]:
      if len(rule) != 2:
        raise ValueError(f"tuning[{i}].rules: each rule is (regex, label); got {rule!r}.")
      user_rules.append((str(rule[0]), str(rule[1]), True))
    method_rules.extend((pattern, label, False) for pattern, label in rules)
    train_head = train_head and bool(f["train_head"])
    names.append(name)
  rules = (user_rules + method_rules
           + [(HEAD_LEAVES, "head" if train_head else FROZEN, False),
              (BACKBONE_LEAVES, FROZEN, False)])
  return Tuning(spec=TuningSpec(**spec_fields), rules=tuple(rules), methods=tuple(names))
