"""The package's imports run one way: down the layers, with no circle between files or packages.

Read from the source (ast), function-level imports included, so a new import that runs back up a
layer fails here rather than in a reader's head.
"""

from __future__ import annotations

import pathlib

from testing import imported_modules

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Lowest first: each layer imports only itself and the layers before it (robot_r1_jax/__init__.py).
LAYERS = ("model", "data", "generate", "rl", "train", "stages", "launch", "export")


def _modules() -> dict[str, pathlib.Path]:
  """'robot_r1_jax.data.records' → its file, for every module and package of the project."""
  out = {}
  for path in ROOT.glob("robot_r1_jax/**/*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _graph() -> dict[str, set[str]]:
  """Module → the project modules it imports (`from p import m` counts as m when m is one)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    edges = set()
    for imported in imported_modules(path, modules):
      while imported and imported not in modules:
        imported = imported.rpartition(".")[0]
      if imported and imported != name:
        edges.add(imported)
    graph[name] = edges
  return graph


def _layer(module: str) -> int:
  parts = module.split(".")
  return -1 if len(parts) == 1 else LAYERS.index(parts[1])


def _package(module: str, modules: dict[str, pathlib.Path]) -> str:
  """The (sub)package a module belongs to: itself for a package's __init__."""
  return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One circle of the graph, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_every_package_is_a_layer():
  tops = {p.parent.name for p in ROOT.glob("robot_r1_jax/*/__init__.py")}
  assert tops == set(LAYERS)


def test_imports_only_run_down_the_layers():
  upward = sorted(f"{a} imports {b}" for a, edges in _graph().items() for b in edges
                  if _layer(b) > _layer(a))
  assert upward == []


def test_model_imports_nothing_else_of_the_project_and_rl_only_itself():
  graph = _graph()
  for layer, allowed in (("model", {"model"}), ("rl", {"rl"})):
    outside = sorted(f"{a} imports {b}" for a, edges in graph.items() if _layer(a) ==
                     LAYERS.index(layer) for b in edges if b.split(".")[1] not in allowed)
    assert outside == [], layer


def test_no_circle_between_files():
  assert _cycle(_graph()) is None


def test_no_circle_between_packages():
  modules, graph = _modules(), _graph()
  packages: dict[str, set[str]] = {}
  for a, edges in graph.items():
    pa = _package(a, modules)
    packages.setdefault(pa, set()).update(
        pb for b in edges if (pb := _package(b, modules)) != pa)
  assert _cycle(packages) is None


def test_the_cycle_finder_finds_a_circle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None
