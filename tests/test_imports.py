"""The package structure: models/ and parallel/ never import the trainer (parallel not even the
models), the modules' import graph has no cycle, and imports sit at the top of their module."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("models", "parallel", "trainer")


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def imports(path: pathlib.Path, known) -> list[tuple[str, int, bool]]:
  """(project module imported, line, inside a function?) for each import in the file. `from a
  import b` names module a.b when b is one, else a."""
  tree = ast.parse(path.read_text())
  inner = {id(node) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
           for node in ast.walk(f)}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
               for a in node.names]
    else:
      continue
    for name in names:
      if name.split(".")[0] in PACKAGES:
        found.append((name, node.lineno, id(node) in inner))
  return found


def test_no_upward_imports_and_imports_at_the_top():
  known = modules()
  assert {"trainer.train", "models.decoder", "parallel.rules"} <= set(known)  # the scan works
  problems = []
  for name, path in known.items():
    for target, line, inside in imports(path, known):
      where = f"{path.relative_to(ROOT)}:{line} imports {target}"
      if name.startswith(("models", "parallel")) and target.startswith("trainer"):
        problems.append(f"{where} (models/ and parallel/ never import the trainer)")
      if name.startswith("parallel") and target.startswith("models"):
        problems.append(f"{where} (parallel/ never imports the models)")
      if inside:
        problems.append(f"{where} inside a function (project imports go at the top)")
  assert not problems, "\n".join(problems)


def test_the_import_graph_has_no_cycle():
  known = modules()
  graph = {name: sorted({t for t, _, _ in imports(path, known) if t in known and t != name})
           for name, path in known.items()}
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(node, path):
    state[node] = 1
    for nxt in graph[node]:
      if state.get(nxt) == 1:
        raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 2

  for name in graph:
    if name not in state:
      visit(name, [name])
