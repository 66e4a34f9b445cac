"""The layers of docs/architecture.md hold: each module imports only its own layer and the layers below, no
modules import each other in a circle (imports inside functions count), the merge core loads no workflow and
no transformers, and modelfuse modules are imported at the top of files outside the CLI and the public face."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "modelfuse"
# Bottom to top; a module may import modules of its own layer and of the layers before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("_version", "_gc", "errors", "units", "params", "architecture", "devices", "options", "settings")),
    ("io", ("io",)),
    ("kernels, methods", ("kernels", "methods")),
    ("plan", ("recipe", "mergekit_compat", "compat", "plan")),
    ("engine", ("engine",)),
    ("runtime", ("runtime",)),
    ("workflows", ("lora", "calibrate", "learn", "evaluation", "analysis", "compress", "extract", "demo", "render",
                   "examples", "fusion", "moe", "search", "align")),
    ("cli", ("cli",)),
]
# The runtime sits beside the merge core, not on it: it may use io and foundation only.
RUNTIME_MAY_USE = {"foundation", "io", "runtime"}
WORKFLOWS = ("calibrate", "evaluation", "learn", "lora", "analysis", "runtime", "fusion", "moe", "search", "align")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str], package: bool) -> list[tuple[str, int, bool]]:
    """(imported modelfuse module, line, at module level) for every import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    here = module_name(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = here.split(".") if package else here.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("modelfuse") and target != here:
                found.append((target, node.lineno, id(node) in top_level))
    return found


def layer_of(module: str) -> int:
    if module == "modelfuse":
        return len(LAYERS) - 1  # the public face may reach everything (lazily)
    first = module.split(".")[1]
    for index, (_, members) in enumerate(LAYERS):
        if first in members:
            return index
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py (add it, and to docs/architecture.md)")


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = modules()
    names = set(known)
    return {name: imports(path, names, path.name == "__init__.py") for name, path in known.items()}


def test_every_module_imports_only_its_layer_and_below() -> None:
    wrong = []
    for module, targets in graph().items():
        mine = layer_of(module)
        for target, line, _ in targets:
            theirs = layer_of(target)
            if LAYERS[mine][0] == "runtime" and LAYERS[theirs][0] not in RUNTIME_MAY_USE:
                wrong.append(f"{module}:{line} -> {target} (the runtime uses foundation and io only)")
            elif theirs > mine:
                wrong.append(f"{module}:{line} -> {target} ({LAYERS[mine][0]} must not import {LAYERS[theirs][0]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles() -> None:
    """Tarjan's strongly connected components over all imports, those inside functions included."""
    edges = {module: sorted({target for target, _, _ in targets}) for module, targets in graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_modelfuse_imports_sit_at_the_top_of_files() -> None:
    """Only the CLI (commands load their workflow on demand) and the package face (``merge`` loads the engine
    when called) import modelfuse modules inside functions; optional heavy libraries may be imported anywhere."""
    local = [f"{module}:{line} imports {target}" for module, targets in graph().items()
             if not module.startswith("modelfuse.cli") and module != "modelfuse"
             for target, line, top in targets if not top]
    assert not local, "\n".join(local)


@pytest.mark.parametrize("core", ["modelfuse.plan", "modelfuse.engine", "modelfuse"])
def test_the_merge_core_loads_no_workflow_and_no_transformers(core: str) -> None:
    code = f"import json, sys, {core}; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    forbidden = [name for name in loaded if name.split(".")[0] == "transformers"
                 or (name.startswith("modelfuse.") and name.split(".")[1] in WORKFLOWS)]
    assert not forbidden, f"import {core} loads {forbidden}"


def test_models_are_loaded_only_by_the_runtime() -> None:
    """Outside ``runtime/`` no module calls ``from_pretrained`` (the GGUF converter rebuilds a model with
    ``from_config`` after the runtime loaded it); ``io/vocabulary`` loads tokenizers only (files, no model),
    to build a merge's output vocabulary."""
    callers = [f"{module_name(path)}:{node.lineno}" for path in PACKAGE.rglob("*.py")
               if "runtime" not in path.relative_to(PACKAGE).parts
               and path.relative_to(PACKAGE).as_posix() != "io/vocabulary.py"
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, ast.Attribute) and node.attr == "from_pretrained"]
    assert not callers, callers
