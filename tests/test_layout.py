"""The layout the code promises (docs/architecture.md): layers that point one way, no import
loops, modules and functions of a readable size, and a command line that starts without torch.

Imports are read from the source (inside functions too), so a loop or an upward import hidden in
a function body counts as well."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Low to high: an import may point to its own layer or below, never up.
LAYERS = [
    ("base", ["errors", "progress", "util", "options", "parallel", "version", "significance"]),
    ("data", ["sources", "formats", "remote", "readthrough", "stages", "storefiles", "manifest",
              "store", "checksums", "writing", "conversion", "upload", "verify", "stats"]),
    ("training", ["training"]),
    ("peers", ["peers"]),
    ("frameworks", ["frameworks"]),
    ("bench", ["bench"]),
    ("report", ["report"]),
    ("cli", ["cli", "__main__", ""]),  # "": the package itself (the Python API)
]  # fmt: skip
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def modules(src: Path = SRC) -> dict[str, Path]:
    found = {}
    for path in sorted((src / "loadbench").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The loadbench modules `name` imports anywhere in its file (the longest known prefix)."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from pkg import mod` imports the module; `from mod import name`, the module.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        out.update(t for t in (resolve(t) for t in targets if t.startswith("loadbench")) if t)
    out.discard(name)
    return out


def graph(src: Path = SRC) -> dict[str, set[str]]:
    known = modules(src)
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(module: str) -> int:
    rest = module.removeprefix("loadbench").removeprefix(".")
    head = rest.split(".")[0]
    for rank, (_, tops) in enumerate(LAYERS):
        if head in tops:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs)")


def test_every_module_is_in_a_layer():
    for module in modules():
        layer(module)


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
        for a, targets in edges.items()
        for b in sorted(targets)
        if layer(b) > layer(a)
    ]


def loops(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for start in edges:  # a path from a module back to itself
        seen, stack = set(), [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    found.append(" -> ".join([*path, nxt]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return found


def test_imports_point_down_the_layers():
    assert upward(graph()) == []


def test_no_import_loops():
    assert loops(graph()) == []


def test_the_checks_find_an_upward_import_and_a_loop(tmp_path):
    """A format that imports training inside a function, and training that imports it back."""
    package = tmp_path / "loadbench"
    (package / "formats").mkdir(parents=True)
    (package / "training").mkdir()
    (package / "__init__.py").write_text("")
    (package / "formats" / "__init__.py").write_text(
        "def f():\n    from loadbench.training.loop import run\n"
    )
    (package / "training" / "__init__.py").write_text("")
    (package / "training" / "loop.py").write_text("from loadbench import formats\n")
    edges = graph(tmp_path)
    assert upward(edges) == ["loadbench.formats (data) imports loadbench.training.loop (training)"]
    assert "loadbench.formats -> loadbench.training.loop -> loadbench.formats" in loops(edges)


def test_modules_and_functions_are_a_readable_size():
    long_modules, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert long_modules == [] and long_functions == []


@pytest.mark.parametrize("module", ["loadbench.cli", "loadbench.training.config",
                                    "loadbench.bench.experiment"])  # fmt: skip
def test_declarations_and_the_command_line_load_without_torch(module):
    """`loadbench --help` builds every command's flags from the declarations: none of them may
    import torch (seconds) at import time."""
    code = f"import sys, {module}, loadbench.formats as f; f.list_formats(peers=True); "
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'h5py', 'zarr')))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"
