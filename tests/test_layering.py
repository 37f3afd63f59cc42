"""Layers point one way (issue 10, finding 13): every module imports on its own (no import cycle), the
command line lives in ``app/cli.py`` only, and ``app/errors.py`` stands on nothing of ours."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app"
CLI_LAYER = {"app.cli", "app.__main__"}
# Bottom to top, as in docs/architecture.md: a module may import its own layer and those below it.
LAYERS = (
    ("app.errors",),
    ("app.config", "app.checkpoint", "app.preempt", "app.storage"),
    ("app.comm",),
    ("app.launch", "app.kfac", "app.bayes", "app.analysis", "app.data", "app.models", "app.optim", "app.metrics"),
    ("app.train",),
    ("app.bench", "app.submit", "app.gradcheck", "app.study"),
    tuple(CLI_LAYER),
)
# print() below the CLI, each with why it is not a user-facing message that belongs in the CLI.
PRINT_ALLOWED = {
    "app.launch": "a failing rank's one line just before MPI_Abort, on plain stderr whatever logging is set to",
    "app.metrics": "the progress-line sink, writing to the stream it was given",
}
# Imports each module with every app module evicted first, so nothing imported earlier can hide a cycle;
# third-party packages stay loaded (torch once, not 40 times). A module whose optional third-party
# package is absent (horovod before docker/build_horovod.sh) is reported as such, not as a failure.
_PROBE = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
        out[name] = "ok"
    except ModuleNotFoundError as exc:
        out[name] = f"missing {exc.name}" if exc.name and exc.name.split(".")[0] != "app" else repr(exc)
    except Exception as exc:
        out[name] = repr(exc)
print(json.dumps(out))
"""


def _modules() -> dict[str, Path]:
    """Every module under app/, by dotted name."""
    out = {}
    for path in sorted(APP.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(tree: ast.AST) -> set[str]:
    """Dotted names of the modules a module imports anywhere (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _layer(module: str) -> int:
    """The layer of a module (a package's submodules are in the package's layer)."""
    return next(i for i, layer in enumerate(LAYERS) for top in layer if module == top or module.startswith(top + "."))


def _calls_print(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
               for n in ast.walk(tree))


def test_every_module_imports_on_its_own() -> None:
    names = [n for n in _modules() if n != "app.__main__"]  # __main__ runs the CLI when imported
    res = subprocess.run([sys.executable, "-c", _PROBE, *names], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(results) == set(names)
    failed = {n: r for n, r in results.items() if r != "ok" and not r.startswith("missing ")}
    assert not failed, failed
    missing = {n: r for n, r in results.items() if r.startswith("missing ")}
    assert set(missing) <= {"app.comm.horovod_backend"}, missing  # only an optional build may be absent


def test_command_line_code_only_in_the_cli_layer() -> None:
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in _modules().items()}
    offenders = []
    for name, tree in trees.items():
        if name in CLI_LAYER:
            continue
        imports = _imports(tree)
        if "argparse" in imports:
            offenders.append(f"{name} imports argparse")
        if any(i == "app.cli" or i.startswith("app.cli.") for i in imports):
            offenders.append(f"{name} imports app.cli (an upward import)")
        if _calls_print(tree) != (name in PRINT_ALLOWED):
            offenders.append(f"{name} {'calls' if name not in PRINT_ALLOWED else 'no longer calls'} print()")
    assert not offenders, offenders


def test_imports_point_down_the_layers() -> None:
    modules = _modules()
    upward = []
    for name, path in modules.items():
        if name == "app":
            continue
        for imported in _imports(ast.parse(path.read_text(), str(path))):
            target = max((m for m in modules if m != "app" and (imported == m or imported.startswith(m + "."))),
                         key=len, default=None)
            if target is not None and _layer(target) > _layer(name):
                upward.append(f"{name} imports {target}")
    assert not upward, sorted(set(upward))


def test_errors_module_stands_on_nothing_of_ours() -> None:
    tree = ast.parse((APP / "errors.py").read_text())
    assert {i for i in _imports(tree) if i == "app" or i.startswith("app.")} == set()
    res = subprocess.run([sys.executable, "-c", "import sys, app.errors; print(sorted(m for m in sys.modules "
                          "if m.startswith('app')))"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0 and res.stdout.split() == ["['app',", "'app.errors']"], res


def test_every_user_error_type_is_one_catchable_base() -> None:
    """The CLI catches UserError alone: each layer's error type must be one, with its old builtin base."""
    from app import errors

    for cls, base in [(errors.ConfigError, ValueError), (errors.DataError, ValueError),
                      (errors.LaunchError, RuntimeError), (errors.CheckpointError, RuntimeError)]:
        assert issubclass(cls, errors.UserError) and issubclass(cls, base)
