"""The import graph of vcjax/: no cycle among module-level imports, and the layers import downwards only.

Every module under vcjax/ is parsed with `ast` (nothing is imported); an import inside a function is
recorded separately (it runs only when called, so it may reach up a layer: e.g. the sampling loop's
VideoMaker step) and is held only to the torch rule. Two subprocesses check that `import vcjax` and
`import vcjax.pipeline` import no torch.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vcjax")

# Layers, lowest first: a module may import, at module level, only modules of its own layer or of the ones
# below. (A layer is a package under vcjax/ or a top-level module.)
LAYERS = (
    ("vcjax.compiler", "vcjax.parallel", "vcjax.media"),  # stdlib/JAX utilities every layer may use
    ("vcjax.nn",),  # attention, layers, LoRA adapters
    ("vcjax.models",),  # UNet3D, VAE, CLIP, ...: built from vcjax.nn
    # Reading and writing PyTorch files: maps them onto vcjax modules (keymaps fills an nnx module, export
    # reads one, lora_files attaches through vcjax.nn.lora), so it sits above the modules it maps; the
    # modules never read files.
    ("vcjax.weights",),
    ("vcjax.diffusion", "vcjax.data"),  # schedulers + sampling loop, data
    ("vcjax.loading", "vcjax.conversion", "vcjax.testing"),  # weights -> modules; the random-model maker
    # What scripts call. The methods sit here, beside the loop: each owns its training task (a
    # vcjax.train.task.Task); the sampling loop reaches their reference frame inside a function.
    ("vcjax.pipeline", "vcjax.train", "vcjax.methods", "vcjax.eval", "vcjax.world"),
    ("vcjax",),  # the package's __init__
)
# Module-level imports that break the layer order on purpose: (importer, imported) -> why. Keep it short.
ALLOWED = {}


def layer_of(module: str) -> int:
  best, rank = None, None
  for i, names in enumerate(LAYERS):
    for name in names:
      if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best)):
        best, rank = name, i
  if rank is None:
    raise AssertionError(f"{module}: in no layer of tests/test_imports.py; add it to LAYERS")
  return rank


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _targets(node, module: str, is_package: bool, known: set[str]) -> list[str]:
  """The vcjax modules an import statement names (a `from pkg import sub` names pkg.sub when it is one)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.split(".")[0] == "vcjax"]
  if node.level:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    source = ".".join(base + ([node.module] if node.module else []))
  else:
    source = node.module or ""
  if source.split(".")[0] != "vcjax":
    return []
  subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in known]
  return subs or [source]


def import_graph():
  """({module: {imported at module level}}, {module: {imported inside functions}}, {module: top-level
  third-party roots})."""
  paths = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        paths[module_name(os.path.join(root, f))] = os.path.join(root, f)
  known = set(paths)
  top, late, external = {}, {}, {}
  for module, path in paths.items():
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = path.endswith("__init__.py")
    top[module], late[module], external[module] = set(), set(), set()

    def visit(node, in_function: bool):
      for child in ast.iter_child_nodes(node):
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, (ast.Import, ast.ImportFrom)):
          names = _targets(child, module, is_package, known)
          (late if inner else top)[module].update(n for n in names if n != module)
          if not inner and not names:
            roots = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
            external[module].update(r.split(".")[0] for r in roots if not getattr(child, "level", 0))
        visit(child, inner)

    visit(tree, False)
  return top, late, external


def find_cycle(graph):
  """One cycle of `graph` as a list of modules, or None."""
  state, stack = {}, []

  def dfs(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = dfs(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = dfs(node)
      if found:
        return found
  return None


def test_no_import_cycle_at_module_level():
  top, _, _ = import_graph()
  assert len(top) > 50  # really parsed the package
  cycle = find_cycle(top)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_downwards_only():
  top, _, _ = import_graph()
  bad = []
  for module, imported in sorted(top.items()):
    for other in sorted(imported):
      # the parent package (run first by Python anyway) and the package's own __init__ do not count
      if module.startswith(other + ".") or (module, other) in ALLOWED:
        continue
      if layer_of(other) > layer_of(module):
        bad.append(f"{module} imports {other} (a higher layer)")
  assert not bad, "\n".join(bad)


def test_nn_and_models_never_import_weights_or_above():
  top, late, _ = import_graph()
  for module in top:
    if module.startswith(("vcjax.nn", "vcjax.models")):
      up = sorted(m for m in top[module] | late[module]
                  if m.startswith(("vcjax.weights", "vcjax.loading", "vcjax.conversion", "vcjax.diffusion",
                                   "vcjax.train", "vcjax.pipeline", "vcjax.methods", "vcjax.eval")))
      assert not up, f"{module} imports {up} (even inside a function)"


def test_no_torch_at_module_level():
  _, _, external = import_graph()
  found = sorted(m for m, roots in external.items() if roots & {"torch", "diffusers", "transformers", "peft"})
  assert not found, f"modules importing torch/diffusers/transformers at import time: {found}"


@pytest.mark.parametrize("module", ["vcjax", "vcjax.pipeline", "vcjax.testing"])
def test_import_loads_no_torch(module):
  code = (f"import sys, {module}\n"
          "bad = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules)\n"
          "print(','.join(bad))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "", f"import {module} loaded {out.stdout.strip()}"
