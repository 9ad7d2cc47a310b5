"""Hyper-parameter sweeps: expand, name, run sequentially (resumable) or print commands.

A sweep is a list of dicts of config overrides ({'lr': 0.1, 'seed': 0, 'data.task': 'dtd'}).
Every run gets a deterministic workdir `<root>/<key=value,...>` (keys sorted), and a run is
finished once its workdir holds `final_metrics.json`, which the trainer writes at the very end.
Rerunning a sweep therefore redoes only the unfinished runs.

  python -m jvt.sweep --config=configs/vpt.py:task=dtd --root=DIR \
      [--sweep='{"lr": [0.1, 1.0], "seed": [0, 1]}'] [--print_commands]

Without --sweep, the config file's `get_sweep(arg)` provides the spec, else the `sweep` field of
its `get_config(arg)` (nested fields whose leaves are lists of values, e.g.
`config.sweep = {"optimizer": {"lr": [0.1, 1.0]}, "seed": [0, 1]}`; see `config_spec`).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import sys
from typing import Any, Callable, Mapping, Sequence

from jvt import config_lib

FINAL_METRICS = "final_metrics.json"
OVERRIDES_FILE = "sweep_overrides.json"
_MAX_NAME_CHARS = 200

RunFn = Callable[[dict, str], Any]  # (config overrides, workdir) -> anything


def _expand_one(spec: Mapping[str, Any]) -> list[dict]:
  if not isinstance(spec, Mapping):
    raise ValueError(f"a sweep entry must be a dict of field -> value(s), got {spec!r}")
  keys = list(spec)
  values = [v if isinstance(v, list) else [v] for v in spec.values()]
  empty = [k for k, v in zip(keys, values) if not v]
  if empty:
    raise ValueError(f"sweep fields {empty} have an empty list of values")
  return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def expand_sweep(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict]:
  """Expands a sweep spec into the list of per-run override dicts.

  spec: a dict field -> list of values (the cartesian product, last field varying fastest; a
  non-list value is a fixed setting, so a list-valued setting is written [[...], [...]]), or a
  list of such dicts whose expansions are concatenated in order.
  """
  entries = [spec] if isinstance(spec, Mapping) else list(spec)
  runs = [run for entry in entries for run in _expand_one(entry)]
  names = [run_name(r) for r in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"the sweep lists the same run more than once: {duplicates}")
  return runs


def format_value(value: Any) -> str:
  """The text of one override value, as used in workdir names and command lines."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  if isinstance(value, dict):
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
  return str(value)


def run_name(overrides: Mapping[str, Any]) -> str:
  """Deterministic directory name of a run: 'key=value,...' with keys sorted.

  Path separators and spaces are replaced by '_'; names longer than 200 characters are cut
  and suffixed with a hash of the full name so they stay unique.
  """
  if not overrides:
    return "base"
  name = ",".join(f"{k}={format_value(overrides[k])}" for k in sorted(overrides))
  name = re.sub(r"[\s/\\]", "_", name)
  if len(name) > _MAX_NAME_CHARS:
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    name = f"{name[:_MAX_NAME_CHARS - 13]}-{digest}"
  return name


def run_workdir(root: str, overrides: Mapping[str, Any]) -> str:
  """<root>/<run_name(overrides)>."""
  return os.path.join(root, run_name(overrides))


def is_finished(workdir: str) -> bool:
  """True when workdir holds a readable final_metrics.json object."""
  path = os.path.join(workdir, FINAL_METRICS)
  try:
    with open(path, encoding="utf-8") as f:
      return isinstance(json.load(f), dict)
  except (OSError, ValueError):
    return False


def accuracy_summary(workdir: str) -> str:
  """'test accuracy 0.812, val 0.790, 1,924 trainable' from a finished run's final_metrics.json."""
  with open(os.path.join(workdir, FINAL_METRICS), encoding="utf-8") as f:
    final = json.load(f)
  parts = [f"{split} {final[f'{split}_accuracy']:.3f}" for split in ("test", "val")
           if isinstance(final.get(f"{split}_accuracy"), (int, float))]
  if isinstance(final.get("trainable_params"), int):
    parts.append(f"{final['trainable_params']:,} trainable")
  return "accuracy " + ", ".join(parts) if parts else "no accuracy recorded"


def run_sweep(runs: Sequence[Mapping[str, Any]], root: str, run_fn: RunFn,
              keep_going: bool = False, log: Callable[[str], None] = print) -> list[str]:
  """Runs the unfinished runs one after the other; returns the workdirs of failed runs.

  Before a run starts its overrides are written to <workdir>/sweep_overrides.json (the results
  aggregator reads them). A run_fn that returns without writing final_metrics.json is a failure.
  With keep_going=False the first failure propagates (rerun the sweep to resume); with
  keep_going=True failures are logged and the sweep goes on.
  """
  failed = []
  for i, overrides in enumerate(runs):
    workdir = run_workdir(root, overrides)
    if is_finished(workdir):
      log(f"[{i + 1}/{len(runs)}] finished already: {workdir}: {accuracy_summary(workdir)}")
      continue
    log(f"[{i + 1}/{len(runs)}] running: {workdir}")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, OVERRIDES_FILE), "w", encoding="utf-8") as f:
      json.dump(dict(overrides), f, indent=2, sort_keys=True)
    try:
      run_fn(dict(overrides), workdir)
      if not is_finished(workdir):
        raise RuntimeError(f"the run returned without writing {FINAL_METRICS} in {workdir}")
      log(f"[{i + 1}/{len(runs)}] done: {workdir}: {accuracy_summary(workdir)}")
    except Exception as e:  # pylint: disable=broad-except
      if not keep_going:
        raise
      log(f"[{i + 1}/{len(runs)}] FAILED: {workdir}: {type(e).__name__}: {e}")
      failed.append(workdir)
  return failed


def sweep_commands(runs: Sequence[Mapping[str, Any]], root: str, config: str) -> list[str]:
  """One `python -m jvt.main ...` command line per unfinished run (for a cluster scheduler)."""
  commands = []
  for overrides in runs:
    workdir = run_workdir(root, overrides)
    if is_finished(workdir):
      continue
    args = [f"--config={config}", f"--workdir={workdir}"]
    args += [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]
    commands.append(" ".join(["python", "-m", "jvt.main"] + [shlex.quote(a) for a in args]))
  return commands


def split_config_arg(config: str) -> tuple[str, str | None]:
  """'configs/x.py:arg' -> ('configs/x.py', 'arg'); no ':' -> (path, None)."""
  return config_lib.split_spec(config)


def load_config_module(path: str):
  """Imports a config file by path (`jvt.config_lib.load_config_module`)."""
  return config_lib.load_config_module(path)


def apply_overrides(config, overrides: Mapping[str, Any]):
  """Sets dotted keys ('optim.lr') on a (locked) ConfigDict; a typo raises. Returns config."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def default_run_fn(config: str) -> RunFn:
  """run_fn that builds the config from its file, applies the overrides and trains."""

  def run(overrides: dict, workdir: str) -> None:
    from jvt import train  # pylint: disable=g-import-not-at-top  # heavy; only when training

    train.train_and_evaluate(apply_overrides(config_lib.load_config(config), overrides), workdir)

  return run


def config_spec(config) -> dict | None:
  """The `sweep` field of a config as a spec for `expand_sweep`; None when it has none.

  Nested fields become dotted keys ({"optimizer": {"lr": [...]}} -> {"optimizer.lr": [...]});
  a list or tuple leaf is the list of values of that key, any other leaf a fixed setting.
  """
  field = config.get("sweep") if hasattr(config, "get") else None
  if field is None:
    return None
  spec = {}

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, f"{prefix}{key}.")
      else:
        spec[f"{prefix}{key}"] = list(value) if isinstance(value, (list, tuple)) else value

  walk(field.to_dict() if hasattr(field, "to_dict") else field, "")
  return spec


def load_spec(sweep: str | None, config: str):
  """The sweep spec: --sweep JSON (or @file.json), else get_sweep(arg) of the config file, else
  the `sweep` field of its get_config(arg) (`config_spec`)."""
  if sweep:
    text = sweep
    if sweep.startswith("@"):
      with open(sweep[1:], encoding="utf-8") as f:
        text = f.read()
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"--sweep is not valid JSON: {e}") from e
  path, arg = split_config_arg(config)
  module = load_config_module(path)
  if hasattr(module, "get_sweep"):
    return module.get_sweep(arg)
  spec = None
  if hasattr(module, "get_config"):
    spec = config_spec(module.get_config(arg) if arg is not None else module.get_config())
  if spec is None:
    raise ValueError(f"no sweep given: pass --sweep=JSON, define get_sweep(arg) in {path}, or "
                     "give the config of its get_config(arg) a `sweep` field")
  return spec


def main(argv: Sequence[str] | None = None, run_fn: RunFn | None = None) -> int:
  """CLI entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m jvt.sweep", description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="configs/x.py[:arg]")
  parser.add_argument("--root", required=True, help="folder holding one workdir per run")
  parser.add_argument("--sweep", default=None, help="JSON spec, or @file.json")
  parser.add_argument("--print_commands", action="store_true",
                      help="print one command per unfinished run instead of running")
  parser.add_argument("--keep_going", action="store_true", help="go on after a failed run")
  args = parser.parse_args(argv)
  try:
    runs = expand_sweep(load_spec(args.sweep, args.config))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_commands:
    commands = sweep_commands(runs, args.root, args.config)
    print(f"# {len(runs) - len(commands)} of {len(runs)} runs finished; "
          f"{len(commands)} to run", file=sys.stderr)
    print("\n".join(commands))
    return 0
  failed = run_sweep(runs, args.root, run_fn or default_run_fn(args.config),
                     keep_going=args.keep_going)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
