"""The package reads as the pipeline: every import (those inside functions included) goes
from a later stage to an earlier one, modules import each other without a cycle, the
code is ruff-clean and the typed configuration mypy-clean. docs/architecture.md
describes the same order."""

from __future__ import annotations

import ast
import graphlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# The stages in pipeline order: a package may import only those before it.
LAYERS = ["common", "config", "data", "model", "packing", "adapters", "objectives", "eval",
          "train", "export", "report", "bench", "cli", "__main__"]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The leantune modules ``path`` imports anywhere in its body (relative imports
    resolved; ``from a import b`` counts ``a.b`` when that is a module)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    paths = list((SRC / "leantune").rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def stage(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_modules_import_each_other_without_a_cycle():
    edges = graph()
    try:
        list(graphlib.TopologicalSorter(edges).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_every_import_goes_to_an_earlier_stage():
    edges = graph()
    stages = {stage(m) for m in edges} - {""}
    assert stages == set(LAYERS), "a package or root module outside the documented stages"
    upward = [f"{m} -> {t}" for m, ts in edges.items() for t in ts
              if stage(t) and stage(m) and LAYERS.index(stage(t)) > LAYERS.index(stage(m))]
    assert not upward, "imports against the pipeline order:\n" + "\n".join(sorted(upward))


def test_the_architecture_doc_lists_the_stages_in_order():
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed = re.findall(r"^\| `(\w+)/?` \|", text, flags=re.M)
    assert [s for s in listed if s in LAYERS] == [s for s in LAYERS if s != "__main__"]


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    result = subprocess.run([ruff, "check", "src", "tests", "benchmarks"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_the_typed_config_passes_mypy():
    mypy = shutil.which("mypy")
    if mypy is None:
        pytest.skip("mypy is not installed (pip install -e '.[test]' brings it)")
    result = subprocess.run([mypy], cwd=ROOT, capture_output=True, text=True)  # [tool.mypy]
    assert result.returncode == 0, result.stdout[-3000:]
