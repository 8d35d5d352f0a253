"""The Bazel BUILD file mirrors the package and the tests (parsed, not executed)."""

from __future__ import annotations

import ast
from pathlib import Path

from testing import imported_modules

ROOT = Path(__file__).resolve().parents[1]


def _targets():
  """{name: {"kind", "srcs", "deps"}} from the BUILD file's top-level rule calls."""
  tree = ast.parse((ROOT / "BUILD").read_text(), filename="BUILD")
  targets = {}
  for node in tree.body:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
      continue
    call = node.value
    kind = call.func.id
    if kind not in ("py_library", "py_test", "py_binary"):
      continue
    kw = {k.arg: k.value for k in call.keywords}
    lit = lambda key: ast.literal_eval(kw[key]) if key in kw and not isinstance(
        kw[key], ast.Call) else []
    name = ast.literal_eval(kw["name"])
    assert name not in targets, f"duplicate target {name}"
    targets[name] = {"kind": kind, "srcs": lit("srcs"), "deps": [d.lstrip(":") for d in lit("deps")]}
  return targets


def _package_of(module: str) -> str | None:
  """The py_library that owns an imported `robot_r1_jax…` module (one library per subpackage)."""
  parts = module.split(".")
  if (ROOT / "tests" / f"{parts[0]}.py").exists():  # shared test helpers, e.g. hf_reference
    return "test_helpers"
  if parts[0] != "robot_r1_jax":
    return None
  for depth in (3, 2):
    candidate = ROOT.joinpath(*parts[:depth])
    if candidate.is_dir() and (candidate / "__init__.py").exists():
      return "_".join(parts[:depth])
  return "robot_r1_jax"


def _project_imports(path: Path) -> set[str]:
  return {lib for m in imported_modules(path) if (lib := _package_of(m))}


def test_every_source_file_has_exactly_one_target():
  targets = _targets()
  listed = [s for t in targets.values() for s in t["srcs"]]
  assert len(listed) == len(set(listed)), "a file is listed twice"
  on_disk = {str(p.relative_to(ROOT)) for p in ROOT.glob("robot_r1_jax/**/*.py")}
  on_disk |= {str(p.relative_to(ROOT)) for p in ROOT.glob("tests/**/*.py")
              if p.name != "conftest.py"}
  on_disk |= {str(p.relative_to(ROOT)) for p in ROOT.glob("bench/*.py")}
  assert sorted(on_disk - set(listed)) == [], "files missing from BUILD"
  assert sorted(set(listed) - on_disk) == [], "BUILD lists files that do not exist"


def test_each_test_file_is_its_own_py_test():
  for name, t in _targets().items():
    if t["kind"] == "py_test":
      assert len(t["srcs"]) == 1 and Path(t["srcs"][0]).name.startswith("test_"), name


def test_deps_cover_project_imports():
  targets = _targets()
  for name, t in targets.items():
    needed = set()
    for src in t["srcs"]:
      needed |= _project_imports(ROOT / src)
    needed.discard(name)
    missing = sorted(needed - set(t["deps"]))
    assert not missing, f"{name} imports {missing} but does not depend on them"
    unknown = sorted(set(t["deps"]) - set(targets))
    assert not unknown, f"{name} depends on unknown targets {unknown}"


def test_libraries_mirror_subpackages():
  targets = _targets()
  for init in ROOT.glob("robot_r1_jax/**/__init__.py"):
    lib = "_".join(init.parent.relative_to(ROOT).parts)
    assert targets.get(lib, {}).get("kind") == "py_library", f"no py_library {lib}"
    srcs = targets[lib]["srcs"]
    assert all(Path(s).parent == init.parent.relative_to(ROOT) for s in srcs), lib


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  command = next(line.split("&&")[-1].split("#")[0].strip() for line in readme.splitlines()
                 if "pytest" in line)
  assert command in (ROOT / ".ci" / "run").read_text()
