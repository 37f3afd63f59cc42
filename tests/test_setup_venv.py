"""``docker/setup_venv.sh`` (the first step of ``make demo`` and ``make test``) for every extras combination.

The script runs for real, against a stand-in ``$VENV/bin/python`` that records each pip command instead
of installing; the editable requirement it passed is then parsed by this pip's own requirement parser,
which is what rejected ``.[]`` on a fresh machine (issue 10, finding 1).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from pip._internal.exceptions import InstallationError
from pip._internal.req.constructors import install_req_from_editable

REPO = Path(__file__).resolve().parents[1]
TORCH_SPEC = "torch==2.13.0"
FAKE_PYTHON = '#!/bin/sh\nprintf "%s\\n" "$*" >> "$(dirname "$0")/../calls"\n'


def _fake_venv(root: Path, installed: str | None = None) -> Path:
    """A venv whose torch and MPI steps are done (stamps), so only the app step runs."""
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (venv / ".stamps").mkdir()
    (venv / ".stamps" / "torch").write_text(TORCH_SPEC + "\n")
    (venv / ".stamps" / "mpi").touch()
    if installed is not None:
        (venv / ".stamps" / "app").write_text(installed)
    return venv


def _setup(venv: Path, extras: str) -> list[str]:
    """Run the script; the editable requirement of each ``pip install -e`` it ran."""
    env = {**os.environ, "VENV": str(venv), "SPNGD_EXTRAS": extras, "TORCH_SPEC": TORCH_SPEC}
    res = subprocess.run(["bash", str(REPO / "docker" / "setup_venv.sh")], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    calls = (venv / "calls").read_text().splitlines() if (venv / "calls").exists() else []
    editables = []
    for call in calls:
        argv = shlex.split(call)
        if "-e" in argv:
            editables.append(argv[argv.index("-e") + 1])
    return editables


@pytest.mark.parametrize("extras, requirement", [
    ("", "."), ("test", ".[test]"), ("dali", ".[dali]"), ("test,dali", ".[dali,test]"), (",test,", ".[test]"),
])
def test_every_extras_combination_is_a_valid_editable_requirement(tmp_path: Path, extras: str,
                                                                  requirement: str) -> None:
    assert _setup(_fake_venv(tmp_path), extras) == [requirement]
    install_req_from_editable(requirement)  # raises InstallationError for what pip would refuse


def test_parser_refuses_the_empty_extras_list() -> None:
    """The check above can fail: this pip refuses the requirement the old script built."""
    with pytest.raises(InstallationError, match="not a valid editable requirement"):
        install_req_from_editable(".[]")


def test_installed_extras_are_kept_and_nothing_is_reinstalled_without_cause(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path)
    assert _setup(venv, "test") == [".[test]"]
    assert _setup(venv, "") == [".[test]"]  # no change: the step is skipped (the call log is unchanged)
    assert _setup(venv, "dali") == [".[test]", ".[dali,test]"]  # a new extra: installed with the old ones
    assert (venv / ".stamps" / "app").read_text().split() == ["dali", "test"]


def _fake_make(root: Path, fail: str = "") -> Path:
    """A ``make`` that records its targets and fails on ``fail``."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    make = bin_dir / "make"
    make.write_text(f'#!/bin/sh\necho "$*" >> "{root}/targets"\n[ "$1" != "{fail}" ]\n')
    make.chmod(0o755)
    return bin_dir


def test_ci_runs_the_readme_commands_in_order_and_stops_on_failure(tmp_path: Path) -> None:
    for fail, code, targets in [("", 0, ["demo", "test"]), ("demo", 1, ["demo"]), ("test", 1, ["demo", "test"])]:
        root = tmp_path / (fail or "pass")
        root.mkdir()
        env = {**os.environ, "PATH": f"{_fake_make(root, fail)}{os.pathsep}{os.environ['PATH']}"}
        res = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True,
                             timeout=60, check=False)
        assert res.returncode == code, res.stderr
        assert (root / "targets").read_text().split() == targets


def test_make_test_runs_the_lint_gate_before_any_test() -> None:
    res = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    ruff = next(i for i, line in enumerate(lines) if "-m ruff check app tests experiments" in line)
    mypy = next(i for i, line in enumerate(lines) if line.endswith("-m mypy"))
    pytest_line = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert ruff < pytest_line and mypy < pytest_line


def test_lint_gate_settings_reject_new_errors(tmp_path: Path) -> None:
    """The pinned settings in pyproject.toml catch what the project forbids (so weakening them fails here)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f(x):\n    return x + '" + "y" * 120 + "'\n")
    bin_dir = Path(sys.executable).parent
    ruff = subprocess.run([str(bin_dir / "ruff"), "check", "--config", str(REPO / "pyproject.toml"), "--no-cache",
                           "--output-format", "concise", str(bad)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert ruff.returncode == 1 and "F401" in ruff.stdout and "E501" in ruff.stdout, ruff.stdout + ruff.stderr
    mypy = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                           "--cache-dir", str(tmp_path / "cache"), str(bad)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert mypy.returncode == 1 and "Function is missing a type annotation" in mypy.stdout, mypy.stdout
