"""The method registry: method dicts -> resolved method settings + partition rules.

A tuning config is a dict / ConfigDict such as `dict(method="vpt", num_prompts=50)`, a list of
such (a composition), or `Method` settings objects. `method` is a registered name (`registry()`)
or a `"package.module:ClassName"` path to a `Method` subclass defined outside jvt (imported when
the config is resolved: nothing is registered globally). `resolve_tuning` validates each
method's fields, refuses a composition where two methods claim one plug-in setting with
different values (the same method twice with equal settings counts once), and collects the
first-match `(regex, label, required)` rules: users' own rules first, then each method's in
list order, then the head, then the frozen backbone.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping, Sequence

from jvt.methods.adapter import Adapter
from jvt.methods.adaptformer import AdaptFormer
from jvt.methods.base import Method
from jvt.methods.bitfit import BitFit
from jvt.methods.da_vpt.settings import DAVPT, DAVPTPlus
from jvt.methods.distill.projection import DistillProj
from jvt.methods.full import Full
from jvt.methods.layernorm import LayerNormTuning
from jvt.methods.leaves import BACKBONE_LEAVES, FROZEN, HEAD_LEAVES
from jvt.methods.linear import Linear
from jvt.methods.lora import LoRA
from jvt.methods.partial import Partial
from jvt.methods.ssf import SSF
from jvt.methods.vpt import VPT

_BUILT_IN = (VPT, DAVPT, DAVPTPlus, Adapter, AdaptFormer, LoRA, BitFit, SSF, LayerNormTuning,
             Linear, Partial, Full, DistillProj)


def registry() -> dict[str, type[Method]]:
  """Method name -> settings class of every built-in method."""
  return {cls.name: cls for cls in _BUILT_IN}


@dataclasses.dataclass(frozen=True)
class Tuning:
  """A resolved tuning: the methods' settings and the partition rules."""
  methods: tuple[Method, ...]
  rules: tuple[tuple[str, str, bool], ...]  # (regex, label, required-to-match)


def method_class(name: Any, index: int = 0) -> type[Method]:
  """The settings class of a method name or a "module:Class" path."""
  known = registry()
  if isinstance(name, str) and name in known:
    return known[name]
  if isinstance(name, str) and ":" in name:
    module, _, attr = name.partition(":")
    try:
      cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
      raise ValueError(f"tuning[{index}].method={name!r}: cannot import it ({err}).") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
      raise ValueError(f"tuning[{index}].method={name!r} is no jvt.methods.Method subclass.")
    return cls
  raise ValueError(f"tuning[{index}].method={name!r}: unknown method; allowed values are "
                   f"{sorted(known)} (or a 'package.module:Class' path to a Method).")


def method_defaults(name: str) -> dict[str, Any]:
  """A method's own fields and their defaults (without the common `train_head`, `rules`)."""
  cls = method_class(name)
  common = {f.name for f in dataclasses.fields(Method)}
  return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in common}


def method_name(method: Method) -> str:
  """The `method` value that names `method`'s class in a config."""
  cls = type(method)
  if registry().get(cls.name) is cls:
    return cls.name
  return f"{cls.__module__}:{cls.__qualname__}"


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, tuple):
    return tuple(_tuples(v) for v in value)
  return value


def _as_items(cfg) -> list:
  if cfg is None:
    return []
  if isinstance(cfg, Method):
    return [cfg]
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
    cfg = cfg.to_dict()
  if isinstance(cfg, Mapping):
    return [dict(cfg)]
  if isinstance(cfg, Sequence) and not isinstance(cfg, str):
    out = []
    for c in cfg:
      out.extend(_as_items(c))
    return out
  raise ValueError(f"tuning config must be a dict, a ConfigDict or a list of them; got {cfg!r}.")


def settings_from_dict(d: Mapping, index: int = 0) -> Method:
  """A method dict -> its (unresolved) settings; unknown fields are an error."""
  cls = method_class(d.get("method"), index)
  allowed = sorted(f.name for f in dataclasses.fields(cls))
  unknown = sorted(set(d) - set(allowed) - {"method"})
  if unknown:
    raise ValueError(f"tuning[{index}] ({cls.name}): unknown field(s) {unknown}; allowed fields "
                     f"are {allowed}.")
  return cls(**{k: _tuples(v) for k, v in d.items() if k != "method"})


def resolve_tuning(cfg, num_layers: int) -> Tuning:
  """Validates a tuning config; returns the resolved methods and the partition rules."""
  methods: list[Method] = []
  claimed: dict[str, tuple[Any, str]] = {}
  user_rules, method_rules = [], []
  train_head = True
  for i, item in enumerate(_as_items(cfg)):
    m = item if isinstance(item, Method) else settings_from_dict(item, i)
    m = m.resolve(num_layers)
    for rule in m.rules:
      if len(rule) != 2:
        raise ValueError(f"tuning[{i}].rules: each rule is (regex, label); got {rule!r}.")
      user_rules.append((str(rule[0]), str(rule[1]), True))
    method_rules.extend((p, label, False) for p, label in m.partition_rules(num_layers))
    train_head = train_head and bool(m.train_head)
    plugin = dataclasses.replace(m, train_head=True, rules=())
    twin = next((j for j, o in enumerate(methods)
                 if dataclasses.replace(o, train_head=True, rules=()) == plugin), None)
    if twin is not None:  # the same method again: one plug-in, both dicts' rules and head
      o = methods[twin]
      methods[twin] = dataclasses.replace(o, train_head=o.train_head and m.train_head,
                                          rules=tuple(o.rules) + tuple(m.rules))
      continue
    for key, value in m.claims(num_layers).items():
      if key in claimed and claimed[key][0] != value:
        raise ValueError(
            f"tuning[{i}] ({m.name}) sets {key}={value!r} but {claimed[key][1]} already set it "
            f"to {claimed[key][0]!r}: a composition may ask for each plug-in setting once.")
      claimed[key] = (value, m.name)
    methods.append(m)
  rules = (user_rules + method_rules
           + [(HEAD_LEAVES, "head" if train_head else FROZEN, False),
              (BACKBONE_LEAVES, FROZEN, False)])
  return Tuning(methods=tuple(methods), rules=tuple(rules))


def _jsonable(value):
  if isinstance(value, tuple):
    return [_jsonable(v) for v in value]
  return value


def tuning_config(model) -> list[dict]:
  """The tuning of a model `jvt.build_model` built, as JSON-able method dicts:
  `build_model(variant, num_classes, tuning=tuning_config(model), **fields)` rebuilds it."""
  out = []
  for m in model.methods:
    d = {"method": method_name(m)}
    d.update({f.name: _jsonable(getattr(m, f.name)) for f in dataclasses.fields(m)})
    out.append(d)
  return out


def find(model, kind) -> Method | None:
  """The first method of `model` that is a `kind` (a settings class or a method name)."""
  for m in model.methods:
    if (isinstance(kind, str) and m.name == kind) or (isinstance(kind, type)
                                                     and isinstance(m, kind)):
      return m
  return None
