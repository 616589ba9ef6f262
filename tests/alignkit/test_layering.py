"""The layering DESIGN.md draws, read from the source (every import, in functions too): the core
imports no area except from the CLI, eval imports no stage, rewards import no rollouts, eval or
stages, no modules import each other in a cycle, and an import inside a function says why it is
there (a comment on its line or the line above)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AREAS = ("stages", "eval", "rewards", "rollouts")
#: area -> the areas it must not import
FORBIDDEN = {
    "core": set(AREAS),
    "eval": {"stages"},
    "rewards": {"rollouts", "eval", "stages"},
}


def modules() -> dict[str, Path]:
    """Import name -> file, for the core (``alignkit/``) and every area folder."""
    found = {}
    for folder in ("alignkit", *AREAS):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            parts = parts if parts[0] == "alignkit" else ("alignkit", *parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """The alignkit modules ``name`` imports anywhere in its file, with line numbers."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:  # `from pkg import module` imports the module
                full = f"{base}.{alias.name}"
                out.append((full if full in known else base, node.lineno))
    return [(m, line) for m, line in out if m == "alignkit" or m.startswith("alignkit.")]


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in AREAS else "core"


def test_every_area_imports_only_the_layers_below_it():
    known = modules()
    assert {"alignkit.pipeline", "alignkit.stages.dpo", "alignkit.eval.heldout"} <= known.keys()
    wrong = []
    for name, path in known.items():
        if name == "alignkit.cli":  # the one core module that hands the areas to the runner
            continue
        for target, line in imports(name, path, known):
            if area(target) in FORBIDDEN.get(area(name), ()):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_modules_import_each_other_in_a_cycle():
    known = modules()
    edges = {
        name: {target for target, _ in imports(name, path, known) if target in known}
        for name, path in known.items()
    }
    cycles = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for nxt in sorted(edges[node]):
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in done:
                visit(nxt, [*path, nxt], done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start], done)
    assert not cycles, "\n".join(cycles)


def unexplained_function_imports(path: Path) -> list[str]:
    """Imports inside functions with no comment on their lines or on the line above them (a run
    of imports may share one comment): module level is the default, a lazy import needs a reason
    (startup time, an optional extra, a warning on import)."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    import_lines = {
        line
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for line in range(node.lineno, node.end_lineno + 1)
    }
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            top = node.lineno
            while top - 1 in import_lines and "#" not in lines[top - 1]:
                top -= 1  # up to the first import of the run, or one with its own comment
            own = range(top, node.end_lineno + 1)
            if not any("#" in lines[i - 1] for i in own) and "#" not in lines[top - 2]:
                found.append(
                    f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}"
                )
    return found


def test_every_import_inside_a_function_says_why():
    known = modules()
    found = [
        line for path in sorted(set(known.values())) for line in unexplained_function_imports(path)
    ]
    assert not found, "move to module level, or say why it is lazy:\n" + "\n".join(found)


def test_the_import_check_sees_an_unexplained_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f():\n    import json\n\n\ndef g():\n    # optional extra\n    import csv\n"
        "    import re\n\n\ndef h():\n    import os  # slow\n"
    )
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        assert unexplained_function_imports(sample) == ["sample.py:2: import json"]
    finally:
        ROOT = root
