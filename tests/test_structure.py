"""The shape of the package, read from its source (AST): short functions, and imports that point one
way, from the commands down to templates and models; and `ochat bench X` loading only X's module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ochat"
MAX_FUNCTION_LINES = 80

# Layers, bottom first. A package imports only from lower layers (never from one on its own level, so
# no two packages import each other); `ochat/cli.py`, `ochat/bench.py`, each package's `cli.py` and the
# seed's `python -m` module paths (argv shims over ochat/compat) wire the commands together and sit on
# top of everything.
ENTRY_POINTS = {"serving/openai_api_server.py", "training_deepspeed/train.py"}
LAYERS = {
    "errors": 0,
    "utils": 1,
    "templates": 2, "synthetic": 2,
    "models": 3,
    "data": 4,
    "training": 5, "serving": 5, "visualization": 5,
    "ui": 6, "evaluation": 6, "quickstart": 6, "compat": 6,
    "training_deepspeed": 7,
}


def modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def test_no_function_over_80_lines():
    long = []
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}() {n} lines")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def _package(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    return rel[0]


def _imports(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) for every `ochat.` import, at the top or inside functions."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("ochat."):
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("ochat.")]
    return out


def test_imports_point_one_way_and_keep_private_names_private():
    assert set(LAYERS) | {"cli", "bench", "__main__", "__init__"} >= {_package(p) for p, _ in modules()}, \
        "a new package: give it a layer in LAYERS"
    wrong = []
    for path, tree in modules():
        src = _package(path)
        wiring = (src in ("cli", "bench", "__main__", "__init__") or path.name == "cli.py"
                  or path.relative_to(PACKAGE).as_posix() in ENTRY_POINTS)
        for line, module, names in _imports(tree):
            dst = module.split(".")[1]
            if dst == src or dst in ("cli", "bench"):
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
            if not wiring and LAYERS.get(dst, 99) >= LAYERS[src]:
                wrong.append(f"{where} ({src}, layer {LAYERS[src]}, may use only layers below it)")
            private = [n for n in module.split(".")[2:] + names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{where}: private name(s) {', '.join(private)} of another package")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_bench_imports_only_the_benchmark_it_runs():
    import subprocess
    import sys

    code = ("import sys\nfrom ochat.cli import main\nmain(['bench', 'data', '--help'])\n"
            "print(sorted(m for m in ('torch', 'uvicorn', 'ochat.data.bench', 'ochat.training.bench', "
            "'ochat.serving.bench', 'ochat.quickstart.bench') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['ochat.data.bench']"
