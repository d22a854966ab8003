"""The package layout README's architecture map promises, checked on the source.

Imports flow one way: jobs -> pipeline -> workers -> decoding, and jobs -> training -> decoding.
A package may import the packages below it (jobs may use workers directly), never one above or
beside it; nothing imports jobs. Every import counts, including those inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests import REPO_ROOT

PACKAGES = ("decoding", "workers", "pipeline", "training", "jobs")
ALLOWED = {
    "decoding": {"decoding"},
    "workers": {"workers", "decoding"},
    "training": {"training", "decoding"},
    "pipeline": {"pipeline", "workers", "decoding"},
    "jobs": {"jobs", "pipeline", "workers", "training", "decoding"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(absolute module name, line) for every import statement in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from pkg import mod` imports pkg.mod when mod is a submodule; the package is what counts here
            found.append((name, node.lineno))
    return found


def violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        source_pkg = path.relative_to(REPO_ROOT).parts[0]
        module = module_name(path)
        for name, line in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            target_pkg = name.split(".")[0]
            if target_pkg in PACKAGES and target_pkg not in ALLOWED[source_pkg]:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{line}: {source_pkg} imports {name} "
                           f"({source_pkg} may import only {', '.join(sorted(ALLOWED[source_pkg]))})")
    return bad


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO_ROOT / pkg).rglob("*.py"))


def test_every_package_exists_and_has_modules():
    for pkg in PACKAGES:
        assert (REPO_ROOT / pkg / "__init__.py").is_file(), pkg


def test_imports_flow_one_way():
    bad = violations(project_files())
    assert not bad, "imports against the layout rule:\n" + "\n".join(bad)


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker names file and line of an edge against the rule (so the test above can fail)."""
    import tests.test_architecture as arch

    fake_root = tmp_path
    for pkg in PACKAGES:
        (fake_root / pkg).mkdir()
        (fake_root / pkg / "__init__.py").write_text("")
    (fake_root / "workers" / "bad.py").write_text("import os\n\ndef f():\n    from pipeline.run import run_caption\n")
    (fake_root / "training" / "worse.py").write_text("from jobs.common import UserError\n")
    (fake_root / "decoding" / "fine.py").write_text("from .tree import TreeConfig\n")
    monkeypatch.setattr(arch, "REPO_ROOT", fake_root)
    bad = arch.violations(sorted(fake_root.rglob("*.py")))
    assert any(b.startswith("workers/bad.py:4: workers imports pipeline.run") for b in bad), bad
    assert any(b.startswith("training/worse.py:1: training imports jobs.common") for b in bad), bad
    assert len(bad) == 2, bad


def test_no_import_cycles_between_modules():
    """No module imports one that (directly or not) imports it back: e.g. caption <-> submit."""
    modules = {module_name(p): p for p in project_files()}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for name, _ in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            if name in modules and name != module:
                edges.add(name)
        graph[module] = edges
    cycles = []

    def visit(node, stack, on_stack, done):
        on_stack.add(node)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [], set(), done)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_jobs_holds_commands_not_training_loops():
    """No module in jobs/ runs an optimiser: training code lives in training/."""
    for path in sorted((REPO_ROOT / "jobs").rglob("*.py")):
        text = path.read_text()
        for marker in ("torch.optim", ".backward(", "optimizer.step"):
            assert marker not in text, f"{path.relative_to(REPO_ROOT)} contains {marker!r}"
