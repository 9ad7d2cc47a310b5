"""The import graph of `jvt` has no circle: every module's imports, those deferred into
functions included, read from the source (AST), never by importing it."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "jvt"


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module of the package (packages as their name)."""
  out = {}
  for path in sorted((ROOT / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _target(name: str, modules) -> str | None:
  """The module of the package that importing `name` runs last (None: outside)."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports anywhere in its source."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = name.split(".") if is_package else name.split(".")[:-1]
          anchor = anchor[:len(anchor) - (node.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        # `from a import b` imports a.b when it is a module, else reads an attribute of a.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                   for a in node.names]
      else:
        continue
      for t in (_target(x, modules) for x in targets if x.startswith(PACKAGE)):
        if t and t != name:
          edges.add(t)
          edges.update(_packages_run_first(t, name, modules))
    graph[name] = edges
  return graph


def _packages_run_first(target: str, importer: str, modules) -> set[str]:
  """The packages whose `__init__` importing `target` runs first: each parent package of
  `target` that is not already being imported around `importer` (its own ancestors), the root
  package aside. `import jvt.models.vit` runs `jvt/models/__init__.py` before `vit.py`."""
  parts = target.split(".")
  parents = {".".join(parts[:i]) for i in range(2, len(parts))}
  ancestors = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
  return {p for p in parents - ancestors if p in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_a_planted_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_deferred_and_relative_imports():
  graph = import_graph()
  assert "jvt.methods.registry" in graph["jvt.models"]  # deferred, inside build_model
  assert "jvt.methods.distill.teacher" in graph["jvt.methods.distill.objective"]


def test_the_graph_sees_the_package_inits_an_import_runs():
  graph = import_graph()
  # vit.py imports jvt.methods.base, which runs jvt/methods/__init__.py (the registry) first.
  assert "jvt.methods" in graph["jvt.models.vit"]
  # A package's own submodules do not count their package: it is being imported already.
  assert "jvt.methods" not in graph["jvt.methods.registry"]


def test_no_import_circle_in_jvt():
  found = cycles(import_graph())
  assert not found, "import circles (each a set of modules importing each other): " + "; ".join(
      " <-> ".join(c) for c in found)


# The layers of jvt, lowest first; a module may import its own layer and the ones below
# (README, "How it fits together"). The longest matching prefix places a module.
LAYERS = ("library", "training", "evaluation", "applications")
LAYER_OF = {
    # library: backbones, method plug-ins, pretrained formats, data, pure losses, file writing,
    # plotting of metric rows, adapters as files, prediction, the bf16 products and the
    # cotangent barrier and exact GELU, XLA:CPU's scratch-block reuse
    "jvt.models": "library", "jvt.methods": "library", "jvt.checkpoints": "library",
    "jvt.data": "library", "jvt.losses": "library", "jvt.files": "library",
    "jvt.viz": "library", "jvt.prediction": "library", "jvt.distill": "library",
    "jvt.remap": "library", "jvt.precision": "library",
    "jvt.barrier": "library", "jvt.gelu": "library", "jvt.scratch": "library",
    # training: the loop, steps, objectives, run directory and checkpoints, optimizer and
    # partition, the base config and the epoch selection a run reports
    "jvt.train": "training", "jvt.partition": "training", "jvt.config_lib": "training",
    "jvt.protocols": "training", "jvt.adapters": "training",
    # evaluation and benchmark tooling
    "jvt.sweep": "evaluation", "jvt.results": "evaluation",
    # applications
    "jvt.main": "applications", "jvt.demo": "applications", "jvt.distill_demo": "applications",
}


def layer_of(module: str) -> str | None:
  matches = [p for p in LAYER_OF if module == p or module.startswith(p + ".")]
  return LAYER_OF[max(matches, key=len)] if matches else None


def test_every_module_has_a_layer():
  unplaced = sorted(m for m in import_graph() if m != PACKAGE and layer_of(m) is None)
  assert not unplaced, f"modules with no layer in LAYER_OF: {unplaced}"


def test_imports_run_from_applications_down_to_the_library():
  wrong = []
  for module, targets in import_graph().items():
    if module == PACKAGE:  # the public facade re-exports from every layer, lazily
      continue
    for target in targets:
      if target != PACKAGE and LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module)):
        wrong.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
  assert not wrong, "imports against the layers' direction:\n" + "\n".join(sorted(wrong))


def test_the_layer_check_sees_an_upward_import():
  assert layer_of("jvt.methods.lora") == "library"
  assert layer_of("jvt.train.rundir") == "training"
  assert LAYERS.index(layer_of("jvt.sweep")) > LAYERS.index(layer_of("jvt.train.loop"))
