"""Aggregates finished runs into result tables (markdown and CSV): VTAB-1k, FGVC or any task.

Each run's workdir holds `final_metrics.json` (written by the trainer: `protocol`, the reported
`test_accuracy` / `val_accuracy` as fractions in [0, 1], `trainable_params`, `methods`), the
run's `config.json`, and, when launched by jvt.sweep, `sweep_overrides.json`. The task comes
from the dataset name ('vtab/dtd', 'fgvc/cub', 'list:<root>/dtd'), the full protocol (see
jvt.protocols) from the trainer's `protocol` plus the benchmark and the dataset splits.

Per row (protocol x method x optional group_by keys) and task: the mean and standard deviation
(numpy's, ddof=0) over seeds. VTAB rows add the three group means (natural, specialized,
structured), the mean of the three group means and the mean of the 19 tasks; FGVC rows add the
mean of the 5 tasks. A mean is shown only when every task it covers is present. Under the
`vtab_tune` protocol each (method, task) keeps the hyper-parameters with the best mean val200
accuracy; they are also written to best_hparams.json for the final sweep.

Runs on any other task (the synthetic set, `folder:` / `list:` / `tfds:` data) form their own
tables, one per epoch selection (`last`, `best_val`, ...): a column per task (the dataset name,
plus `/<dataset.task>` when set, e.g. `jvt_synthetic/count`), mean ± std over seeds of the test
accuracy (the val accuracy for runs without a test split), and the trainable parameters. No
mean over such tasks is computed. E.g. `python -m jvt.results --root=/tmp/jvt_demo
--out=/tmp/jvt_demo/summary` summarises the demo's runs.

  python -m jvt.results --root=DIR --out=DIR [--group_by=key,...]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from jvt import protocols
from jvt import sweep
from jvt.data import fgvc
from jvt.data import vtab

CONFIG_FILE = "config.json"  # the run's config, written by the trainer


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """One finished run."""
  workdir: str
  task: str
  protocol: str
  method: str
  seed: Any
  overrides: Mapping[str, Any]
  metrics: Mapping[str, Any]
  config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def value(self, key: str) -> Any:
    """The run's setting `key` ('optimizer.lr'): its sweep override, else its config.json."""
    return self.overrides[key] if key in self.overrides else _dotted(self.config, key)


@dataclasses.dataclass(frozen=True)
class CellStats:
  """Accuracy of one task in one row (fractions in [0, 1])."""
  mean: float
  std: float
  n: int
  trainable_params: float | None
  hparams: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class RowSummary:
  """One row of a results table."""
  protocol: protocols.Protocol
  method: str
  group: tuple[tuple[str, Any], ...]
  cells: Mapping[str, CellStats]
  group_means: Mapping[str, float | None]
  mean_of_group_means: float | None
  mean_of_tasks: float | None
  trainable_params: float | None

  @property
  def label(self) -> str:
    extra = ",".join(f"{k}={sweep.format_value(v)}" for k, v in self.group)
    return (self.method or "(no method)") + (f" [{extra}]" if extra else "")


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return value


def _dotted(tree: Mapping[str, Any], key: str) -> Any:
  """tree['a']['b'] for key 'a.b'; None when absent."""
  for part in key.split("."):
    if not isinstance(tree, Mapping) or part not in tree:
      return None
    tree = tree[part]
  return tree


def task_from_dataset_name(name: str) -> str:
  """'vtab/dtd' -> 'dtd', 'fgvc/cub' -> 'cub', 'list:/data/vtab-1k/dtd' -> 'dtd',
  'folder:/data/pets' -> 'pets', 'dtd' -> 'dtd'."""
  for prefix in ("list:", "folder:"):
    if name.startswith(prefix):
      return os.path.basename(name[len(prefix):].rstrip("/\\"))
  for prefix in ("vtab/", "fgvc/"):
    if name.startswith(prefix):
      return name[len(prefix):]
  return name


OTHER = "other"  # the benchmark of tasks outside VTAB-1k and FGVC


def other_protocol(name: str) -> protocols.Protocol:
  """The protocol 'other_<selection>_<test|val>' of runs on tasks outside VTAB-1k / FGVC."""
  parts = name.split("_")
  selection, split = "_".join(parts[1:-1]), parts[-1]
  if parts[0] != OTHER or selection not in protocols.SELECTIONS or split not in ("test", "val"):
    raise ValueError(f"unknown protocol '{name}'")
  return protocols.Protocol(
      name=name, label=f"Other tasks: {split} accuracy, {selection.replace('_', ' ')} epoch",
      benchmark=OTHER, train_split="", val_split=None,
      test_split="test" if split == "test" else None, selection=selection,
      metric=f"{split}_accuracy", seeds=(), legacy=selection == "legacy_max_test")


def _protocol(name: str) -> protocols.Protocol:
  return other_protocol(name) if name.startswith(OTHER + "_") else protocols.get_protocol(name)


def benchmark_of(task: str) -> str:
  """'vtab' or 'fgvc' for a task name; ValueError otherwise."""
  if task in vtab.VTAB_TASKS:
    return "vtab"
  if task in fgvc.FGVC_TASKS:
    return "fgvc"
  raise ValueError(f"'{task}' is neither a VTAB-1k task ({', '.join(vtab.VTAB_TASKS)}) nor an "
                   f"FGVC task ({', '.join(fgvc.FGVC_TASKS)})")


def _record(workdir: str, task_key: str, method_key: str, seed_key: str) -> RunRecord:
  """One run from its final_metrics.json, sweep_overrides.json and config.json."""
  metrics = _read_json(os.path.join(workdir, sweep.FINAL_METRICS))
  overrides, config = {}, {}
  if os.path.isfile(os.path.join(workdir, sweep.OVERRIDES_FILE)):
    overrides = _read_json(os.path.join(workdir, sweep.OVERRIDES_FILE))
  if os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    config = _read_json(os.path.join(workdir, CONFIG_FILE))

  lookup = RunRecord(workdir, "", "", "", None, overrides, metrics, config).value

  name = metrics.get("task", lookup(task_key))
  if name is None:
    raise ValueError(f"{workdir}: no task in {sweep.FINAL_METRICS} ('task'), "
                     f"{sweep.OVERRIDES_FILE} or {CONFIG_FILE} ('{task_key}'); pass --task_key")
  task = task_from_dataset_name(str(name))
  protocol = metrics.get("protocol")
  if protocol in protocols.SELECTION_ALIASES:
    protocol = protocols.SELECTION_ALIASES[protocol]
  if protocol in protocols.SELECTIONS and task not in vtab.VTAB_TASKS and (
      task not in fgvc.FGVC_TASKS):
    if lookup("dataset.task"):  # a label of a multi-label set, e.g. jvt_synthetic/count
      task = f"{task}/{lookup('dataset.task')}"
    has_test = bool(lookup("dataset.test_split")) or metrics.get("test_accuracy") is not None
    protocol = f"{OTHER}_{protocol}_{'test' if has_test else 'val'}"
  elif protocol in protocols.SELECTIONS:  # the trainer's selection name: add the splits
    try:
      protocol = protocols.infer_protocol(protocol, benchmark_of(task),
                                          lookup("dataset.train_split"),
                                          lookup("dataset.test_split")).name
    except ValueError as e:
      raise ValueError(f"{workdir}: {e}") from e
  elif protocol not in protocols.PROTOCOLS:
    raise ValueError(f"{workdir}/{sweep.FINAL_METRICS}: unknown protocol '{protocol}'; known "
                     f"protocols: {', '.join(protocols.PROTOCOLS)} (or the trainer's "
                     f"{', '.join(protocols.SELECTIONS)} with the dataset splits)")
  method = metrics.get("method", lookup(method_key))
  if method is None:
    method = "+".join(metrics.get("methods", []))
  seed = metrics.get("seed", lookup(seed_key))
  return RunRecord(workdir=workdir, task=task, protocol=protocol, method=str(method), seed=seed,
                   overrides=overrides, metrics=metrics, config=config)


def load_records(root: str, task_key: str = "dataset.name", method_key: str = "method",
                 seed_key: str = "seed") -> list[RunRecord]:
  """Reads every workdir below root that holds final_metrics.json (sorted by path).

  Each field comes from final_metrics.json when it has it ('task', 'method', 'seed',
  'protocol'), else from the sweep overrides, else from the run's config.json (task_key,
  method_key, seed_key, the dataset.*_split fields); 'vtab/<task>', 'fgvc/<task>' and
  'list:<root>/<task>' dataset names give the task. The method falls back to the '+'-joined
  `methods` list the trainer writes.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"results root {root} does not exist")
  records = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    if sweep.FINAL_METRICS in filenames:
      records.append(_record(dirpath, task_key, method_key, seed_key))
  return records


def _accuracy(record: RunRecord, metric: str) -> float:
  if record.metrics.get(metric) is None:
    raise ValueError(f"{record.workdir}/{sweep.FINAL_METRICS} has no '{metric}', which protocol "
                     f"{record.protocol} reports")
  value = float(record.metrics[metric])
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{record.workdir}: {metric}={value} is not a fraction in [0, 1]")
  return value


def _hparams(record: RunRecord, keys: Sequence[str]) -> dict:
  return {k: record.value(k) for k in sorted(keys)}


def _canonical(value: Any) -> str:
  return json.dumps(value, sort_keys=True, default=str)


def _cell(runs: Sequence[RunRecord], metric: str, hparams: Mapping[str, Any]) -> CellStats:
  accuracies = np.array([_accuracy(r, metric) for r in runs], np.float64)
  params = [float(r.metrics["trainable_params"]) for r in runs if "trainable_params" in r.metrics]
  return CellStats(mean=float(accuracies.mean()), std=float(accuracies.std()), n=len(runs),
                   trainable_params=float(np.mean(params)) if params else None,
                   hparams=dict(hparams))


def _benchmark_tasks(benchmark: str) -> tuple[str, ...]:
  return tuple(vtab.VTAB_TASKS) if benchmark == "vtab" else tuple(fgvc.FGVC_TASKS)


def _mean_if_complete(cells: Mapping[str, CellStats], tasks: Sequence[str]) -> float | None:
  if all(t in cells for t in tasks):
    return float(np.mean([cells[t].mean for t in tasks]))
  return None


def summarize(records: Sequence[RunRecord], group_by: Sequence[str] = (),
              task_key: str = "dataset.name", method_key: str = "method", seed_key: str = "seed"
              ) -> list[RowSummary]:
  """Groups runs into table rows and computes the per-task and group statistics.

  Within a row, every task's runs must share their hyper-parameters (the settings any of them
  overrides, other than task/method/seed/protocol/splits and group_by, read from the override or
  else the run's config.json) — except under a tuning protocol (val split, no test
  split), where the hyper-parameters with the best mean accuracy are kept.
  """
  ignored = {task_key, method_key, seed_key, "protocol", "dataset.task", *protocols.SPLIT_KEYS,
             *group_by}
  rows: dict[tuple, dict[str, list[RunRecord]]] = {}
  for r in records:
    key = (r.protocol, r.method, tuple((k, r.value(k)) for k in group_by))
    rows.setdefault(key, {}).setdefault(r.task, []).append(r)

  summaries = []
  order = {name: i for i, name in enumerate(protocols.PROTOCOLS)}
  for (protocol_name, method, group), by_task in sorted(
      rows.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][0], kv[0][1],
                                    repr(kv[0][2]))):
    protocol = _protocol(protocol_name)
    known = (sorted(by_task) if protocol.benchmark == OTHER
             else _benchmark_tasks(protocol.benchmark))
    unknown = sorted(set(by_task) - set(known))
    if unknown:
      raise ValueError(f"tasks {unknown} are not {protocol.benchmark} tasks ({', '.join(known)})")
    tuning = protocol.test_split is None
    cells = {}
    for task in known:
      if task not in by_task:
        continue
      # The settings any run of the cell overrides, read for every run (override or config).
      keys = sorted(set().union(*(r.overrides for r in by_task[task])) - ignored)
      by_hparams: dict[str, list[RunRecord]] = {}
      for r in by_task[task]:
        by_hparams.setdefault(_canonical(_hparams(r, keys)), []).append(r)
      if len(by_hparams) > 1 and not tuning:
        variants = [_hparams(runs[0], keys) for runs in by_hparams.values()]
        differing = [k for k in keys if len({_canonical(v[k]) for v in variants}) > 1]
        raise ValueError(
            f"{protocol_name}/{method or '(no method)'}/{task}: runs differ in {differing}; "
            "pass them as group_by to make separate rows")
      candidates = [_cell(runs, protocol.metric, _hparams(runs[0], keys))
                    for _, runs in sorted(by_hparams.items())]
      # Ties: the smaller lr, then the first (VPT's tune_vtab.py rule).
      cells[task] = candidates[protocols.pick_best([(c.mean, c.hparams) for c in candidates])]
    if protocol.benchmark == "vtab":
      group_means = {g: _mean_if_complete(cells, tasks) for g, tasks in vtab.VTAB_GROUPS.items()}
      mean_groups = (float(np.mean(list(group_means.values())))
                     if all(m is not None for m in group_means.values()) else None)
    else:
      group_means, mean_groups = {}, None
    params = [c.trainable_params for c in cells.values() if c.trainable_params is not None]
    mean_tasks = None if protocol.benchmark == OTHER else _mean_if_complete(cells, known)
    summaries.append(RowSummary(
        protocol=protocol, method=method, group=group, cells=cells, group_means=group_means,
        mean_of_group_means=mean_groups, mean_of_tasks=mean_tasks,
        trainable_params=float(np.mean(params)) if params else None))
  return summaries


def best_hparams(rows: Sequence[RowSummary]) -> dict[str, dict[str, dict]]:
  """{row label: {task: hyper-parameters}} of the tuning rows (vtab_tune)."""
  return {row.label: {task: dict(c.hparams) for task, c in row.cells.items()}
          for row in rows if row.protocol.test_split is None}


# ---------------------------------------------------------------------------------------------
# Output.

def _pct(value: float | None) -> str:
  return "–" if value is None else f"{100 * value:.2f}"


def _params(value: float | None) -> str:
  return "–" if value is None else f"{value / 1e6:.3f}"


def _titles(benchmark: str) -> list[tuple[str, str]]:
  tasks = vtab.VTAB_TASKS if benchmark == "vtab" else fgvc.FGVC_TASKS
  return [(name, t.title) for name, t in tasks.items()]


def _other_markdown(protocol: protocols.Protocol, prows: Sequence[RowSummary]) -> list[str]:
  """The table of runs on tasks outside VTAB-1k / FGVC: one column per task found."""
  tasks = sorted(set().union(*(r.cells for r in prows)))
  out = [f"## {protocol.label} (`{protocol.name}`)\n"]
  if protocol.legacy:
    out.append(f"**{protocols.LEGACY_LABEL}: the reported epoch is chosen on the test set.**\n")
  out.append(f"Accuracy (%) of `{protocol.metric}`, mean ± std over seeds (n = runs).\n")
  header = ["Method"] + tasks + ["Trainable params"]
  out.append("| " + " | ".join(header) + " |")
  out.append("|" + "---|" * len(header))
  for row in prows:
    cells = ["–" if row.cells.get(t) is None else
             f"{_pct(row.cells[t].mean)} ± {_pct(row.cells[t].std)} (n={row.cells[t].n})"
             for t in tasks]
    cells.append("–" if row.trainable_params is None else f"{row.trainable_params:,.0f}")
    out.append("| " + " | ".join([row.label] + cells) + " |")
  out.append("")
  return out


def to_markdown(rows: Sequence[RowSummary]) -> str:
  """One table per protocol; cells are 'mean ± std' test (or val) accuracy in percent."""
  out = []
  others = sorted({r.protocol.name for r in rows if r.protocol.benchmark == OTHER})
  for protocol in [*protocols.PROTOCOLS.values(), *map(other_protocol, others)]:
    prows = [r for r in rows if r.protocol.name == protocol.name]
    if not prows:
      continue
    if protocol.benchmark == OTHER:
      out += _other_markdown(protocol, prows)
      continue
    out.append(f"## {protocol.label} (`{protocol.name}`)\n")
    if protocol.legacy:
      out.append(f"**{protocols.LEGACY_LABEL}: the reported epoch is chosen on the test set; "
                 "these numbers are not comparable with last-epoch or best-val results.**\n")
    out.append(f"Accuracy (%) of `{protocol.metric}`, mean ± std over seeds (n = runs).\n")
    titles = _titles(protocol.benchmark)
    header = ["Method"] + [t for _, t in titles]
    if protocol.benchmark == "vtab":
      header += [g.capitalize() for g in vtab.VTAB_GROUPS] + ["Mean (groups)", "Mean (19 tasks)"]
    else:
      header += ["Mean"]
    header += ["Params (M)"]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for row in prows:
      cells = []
      for name, _ in titles:
        c = row.cells.get(name)
        cells.append("–" if c is None else f"{_pct(c.mean)} ± {_pct(c.std)} (n={c.n})")
      if protocol.benchmark == "vtab":
        cells += [_pct(row.group_means[g]) for g in vtab.VTAB_GROUPS]
        cells += [_pct(row.mean_of_group_means), _pct(row.mean_of_tasks)]
      else:
        cells += [_pct(row.mean_of_tasks)]
      cells += [_params(row.trainable_params)]
      out.append("| " + " | ".join([row.label] + cells) + " |")
    out.append("")
    if protocol.test_split is None:
      out.append("Best hyper-parameters per task (by mean val accuracy):\n")
      for row in prows:
        for task, c in row.cells.items():
          out.append(f"- {row.label} / {task}: "
                     f"{_canonical(dict(c.hparams))}")
      out.append("")
  return "\n".join(out)


CSV_COLUMNS = ("protocol", "protocol_label", "method", "group_by", "task", "accuracy_mean_pct",
               "accuracy_std_pct", "n", "trainable_params", "hparams")


def to_csv(rows: Sequence[RowSummary]) -> str:
  """Long format: one line per (row, task), then the group means and overall means."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(CSV_COLUMNS)
  for row in rows:
    prefix = [row.protocol.name, row.protocol.label, row.method,
              _canonical(dict(row.group))]
    for task, c in row.cells.items():
      writer.writerow(prefix + [task, f"{100 * c.mean:.4f}", f"{100 * c.std:.4f}", c.n,
                                "" if c.trainable_params is None else int(c.trainable_params),
                                _canonical(dict(c.hparams))])
    summary = [(f"group:{g}", m) for g, m in row.group_means.items()]
    if row.protocol.benchmark == "vtab":
      summary.append(("mean_of_group_means", row.mean_of_group_means))
    if row.protocol.benchmark != OTHER:
      summary.append(("mean_of_tasks", row.mean_of_tasks))
    for name, value in summary:
      writer.writerow(prefix + [name, "" if value is None else f"{100 * value:.4f}", "", "",
                                "" if row.trainable_params is None else int(row.trainable_params),
                                ""])
  return buffer.getvalue()


def write_results(root: str, out: str, group_by: Sequence[str] = (),
                  task_key: str = "dataset.name",
                  method_key: str = "method", seed_key: str = "seed") -> list[RowSummary]:
  """Writes out/results.md, out/results.csv and (with tuning runs) out/best_hparams.json."""
  records = load_records(root, task_key, method_key, seed_key)
  if not records:
    raise FileNotFoundError(f"no {sweep.FINAL_METRICS} below {root}")
  rows = summarize(records, group_by, task_key, method_key, seed_key)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
    f.write(to_markdown(rows))
  with open(os.path.join(out, "results.csv"), "w", encoding="utf-8") as f:
    f.write(to_csv(rows))
  best = best_hparams(rows)
  if best:
    with open(os.path.join(out, "best_hparams.json"), "w", encoding="utf-8") as f:
      json.dump(best, f, indent=2, sort_keys=True, default=str)
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m jvt.results",
                                   description="Aggregate run workdirs into result tables.")
  parser.add_argument("--root", required=True, help="folder searched for final_metrics.json")
  parser.add_argument("--out", required=True, help="folder for results.md/.csv")
  parser.add_argument("--group_by", default="", help="comma-separated override keys that "
                      "split rows (e.g. a hyper-parameter varied on purpose)")
  parser.add_argument("--task_key", default="dataset.name")
  parser.add_argument("--method_key", default="method")
  parser.add_argument("--seed_key", default="seed")
  args = parser.parse_args(argv)
  group_by = [k for k in args.group_by.split(",") if k]
  try:
    rows = write_results(args.root, args.out, group_by, args.task_key, args.method_key,
                         args.seed_key)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(to_markdown(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
