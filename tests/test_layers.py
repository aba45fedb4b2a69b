"""The package's layering, checked on the source: data flows one way (config -> source -> prompt ->
run -> sink), the engine never imports the job wing, and no two modules import each other in a
circle at import time."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "batchgen"

# module prefix -> prefixes it must never import (lazily or not)
FORBIDDEN = {
    "batchgen.engine": ("batchgen.pipeline", "batchgen.slurm", "batchgen.cli", "batchgen.bench", "batchgen.show"),
    "batchgen.pipeline": ("batchgen.slurm", "batchgen.cli", "batchgen.bench", "batchgen.show"),
    "batchgen.pipeline.config": ("batchgen.pipeline.source", "batchgen.pipeline.prompt", "batchgen.pipeline.run",
                                 "batchgen.pipeline.sink", "batchgen.pipeline.parallel"),
    "batchgen.pipeline.source": ("batchgen.pipeline.prompt", "batchgen.pipeline.run", "batchgen.pipeline.sink",
                                 "batchgen.pipeline.parallel"),
    "batchgen.pipeline.prompt": ("batchgen.pipeline.run", "batchgen.pipeline.sink", "batchgen.pipeline.parallel"),
    "batchgen.pipeline.sink": ("batchgen.pipeline.run", "batchgen.pipeline.prompt", "batchgen.pipeline.parallel"),
    # data parallel sits above the run loop: it starts `batchgen run` processes and reads what they write
    "batchgen.pipeline.run": ("batchgen.pipeline.parallel",),
    "batchgen.slurm": ("batchgen.cli",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules `path` imports (relative imports resolved); with top_level_only, only those run at import time."""
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from . import x` imports module x
    return {m for m in found if m.startswith("batchgen")}


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def test_no_import_runs_back_up_a_layer() -> None:
    bad = []
    for mod, path in MODULES.items():
        for prefix, banned in FORBIDDEN.items():
            if mod == prefix or mod.startswith(prefix + "."):
                bad += [f"{mod} imports {m}" for m in imports(path, False) if m.startswith(banned)]
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_circle_at_import_time() -> None:
    graph = {m: {i for i in imports(p, True) if i in MODULES and i != m} for m, p in MODULES.items()}
    # a package's __init__ running its submodule is not a circle: drop edges from a package into itself
    graph = {m: {i for i in deps if not (MODULES[m].name == "__init__.py" and i.startswith(m + "."))}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    circles: list[str] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                circles.append(" -> ".join(stack[stack.index(d):] + [d]) if d in stack else f"{m} -> {d}")
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "\n".join(circles)


def test_pipeline_modules_stay_small() -> None:
    """One job per file: no module of the job wing or the Slurm wing over ~300 lines."""
    big = [f"{m}: {n} lines" for m, p in MODULES.items() if m.startswith(("batchgen.pipeline", "batchgen.slurm"))
           and (n := len(p.read_text().splitlines())) > 320]
    assert not big, "\n".join(big)


def _is_triton_kernel(node: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


def test_no_function_over_sixty_lines() -> None:
    """A function fits on one screen (Triton kernels excepted: a kernel is one launch)."""
    long = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                n = node.end_lineno - node.lineno + 1
                if n > 62:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert not long, "\n".join(long)
