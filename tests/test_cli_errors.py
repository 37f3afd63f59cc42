"""Every bad input an outside fuzz of ``spngd train`` found (issue 10, finding 9), through the real
command line: exit 2, exactly one ``spngd: error:`` line naming the file or key, no traceback, and,
under ``mpirun -np 2``, the line printed once per job."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.mpi_helpers import REPO, mpi_env, run_mpi, skip_unless_runnable

SMOKE = str(REPO / "configs/smoke.yaml")


def _spngd(*args: str) -> subprocess.CompletedProcess[str]:
    """``spngd train ARGS`` from the repository (whose data/ holds the exported bundled dataset)."""
    return subprocess.run([sys.executable, "-m", "app", "train", *args], cwd=REPO, env=mpi_env(None),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a genuine 2-step cifar_resnet8 run on the bundled data."""
    out = tmp_path_factory.mktemp("ckpt")
    res = _spngd("--config", SMOKE, "--set", "train.max_steps=2", "--set", f"output.dir={out}",
                 "--set", "output.name=r8", "--set", "output.plot=false")
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = (out / "r8" / "checkpoints").glob("ckpt-*.pt")
    return path


# After a bad file: were it accepted (the bug), a 1-step run of the smallest model, not ResNet-50 on defaults.
TINY = [a for o in ("model.arch=cifar_resnet8", "data.image_size=28", "data.val_resize=28", "data.workers=0",
                    "train.max_steps=1", "output.plot=false", "output.tensorboard=false") for a in ("--set", o)]


def _file(name: str, content: bytes) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, _ckpt: Path) -> list[str]:
        (tmp / name).write_bytes(content)
        return ["--config", str(tmp / name), *TINY]
    return make


def _sets(*overrides: str) -> Callable[[Path, Path], list[str]]:
    def make(_tmp: Path, _ckpt: Path) -> list[str]:
        return ["--config", SMOKE, *[a for o in overrides for a in ("--set", o)]]
    return make


def _other_arch(_tmp: Path, ckpt: Path) -> list[str]:
    return ["--config", SMOKE, "--set", "model.arch=cifar_resnet20", "--resume", str(ckpt)]


def _more_classes(_tmp: Path, ckpt: Path) -> list[str]:
    return ["--config", SMOKE, "--set", "model.num_classes=12", "--resume", str(ckpt)]


def _pickle(tmp: Path, _ckpt: Path) -> list[str]:
    """A checkpoint with an intact sidecar whose content needs full unpickling (could run code)."""
    path = tmp / "pickled.pt"
    torch.save({"model": {}, "evil": Path("/")}, path)
    (tmp / "pickled.pt.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    return ["--config", SMOKE, "--resume", str(path)]


def _no_sidecar(tmp: Path, ckpt: Path) -> list[str]:
    shutil.copy(ckpt, tmp / "copied.pt")
    return ["--config", SMOKE, "--resume", str(tmp / "copied.pt")]


def _file_as_dir(tmp: Path, _ckpt: Path) -> list[str]:
    (tmp / "plain-file").write_text("x")
    return ["--config", SMOKE, "--set", f"output.dir={tmp}/plain-file/runs"]


CASES: dict[str, tuple[Callable[[Path, Path], list[str]], tuple[str, ...]]] = {
    "yaml-list": (_file("list.yaml", b"- optim\n- data\n"), ("list.yaml", "must be a mapping", "not a list")),
    "yaml-string": (_file("str.yaml", b"just words\n"), ("str.yaml", "must be a mapping", "not a str")),
    "non-utf8": (_file("bin.yaml", b"optim:\n  lr: 0.1\xff\n"), ("bin.yaml", "not UTF-8", "line 2")),
    "empty": (_file("empty.yaml", b""), ("empty.yaml", "is empty")),
    "comments-only": (_file("blank.yaml", b"# nothing yet\n\n"), ("blank.yaml", "is empty")),
    "duplicate-top": (_file("dup1.yaml", b"optim:\n  lr: 0.1\ntrain:\n  seed: 1\noptim:\n  lr: 0.2\n"),
                      ("dup1.yaml", "sets optim twice", "lines 1 and 5")),
    "duplicate-nested": (_file("dup2.yaml", b"optim:\n  lr: 0.1\n  momentum: 0.8\n  lr: 0.2\n"),
                         ("dup2.yaml", "sets optim.lr twice", "lines 2 and 4")),
    "bad-date": (_file("date.yaml", b"output:\n  name: 2026-13-45\n"), ("date.yaml", "cannot convert")),
    "lr-1e300": (_sets("optim.lr=1e300"), ("optim.lr=1e+300", "out of range")),
    "lr-int-beyond-float": (_sets("optim.lr=1" + "0" * 400), ("optim.lr=", "is not a number")),
    "seed-2**70": (_sets(f"train.seed={2**70}"), (f"train.seed={2**70}", "out of range")),
    "int-beyond-int32": (_sets(f"data.workers={2**40}"), ("data.workers", "out of range")),
    "float-beyond-limit": (_sets("kfac.damping=1e12"), ("kfac.damping", "out of range")),
    "num-classes-3": (_sets("model.num_classes=3"), ("model.num_classes=3", "10 classes")),
    "output-dir-under-file": (_file_as_dir, ("output.dir", "plain-file", "cannot be created")),
    "output-name-300": (_sets("output.name=" + "n" * 300), ("output.name", "300 bytes", "255")),
    "output-name-slash": (_sets("output.name=../escape"), ("output.name", "plain directory name")),
    "resume-other-arch": (_other_arch, ("ckpt-", "model.arch=cifar_resnet8", "model.arch=cifar_resnet20")),
    "resume-other-classes": (_more_classes, ("ckpt-", "fc.weight", "[10, 64] there, [12, 64] here")),
    "resume-pickle": (_pickle, ("pickled.pt", "cannot be read safely")),
    "resume-no-sidecar": (_no_sidecar, ("copied.pt", "copied.pt.sha256")),
}


def _assert_one_line(res_rc: int, stderr: str, expected: tuple[str, ...]) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("spngd: error")]
    assert res_rc == 2, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith("spngd: error: ")
    for part in expected:
        assert part in errors[0], errors[0]
    assert "Traceback" not in stderr and "weights_only" not in stderr, stderr[-3000:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case: str, tmp_path: Path, real_checkpoint: Path) -> None:
    make, expected = CASES[case]
    args = make(tmp_path, real_checkpoint)
    if not any(a.startswith("output.dir=") for a in args):
        args += ["--set", f"output.dir={tmp_path}/runs"]
    res = _spngd(*args)
    _assert_one_line(res.returncode, res.stderr, expected)
    assert res.stdout == ""
    if "--resume" not in args:  # refused before a run directory was made
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("case", ["yaml-list", "num-classes-3", "resume-other-arch"])
def test_bad_input_is_reported_once_per_job(case: str, tmp_path: Path, real_checkpoint: Path) -> None:
    """Before init_comm (YAML), after it (num_classes: the data is known), and while resuming."""
    skip_unless_runnable()
    make, expected = CASES[case]
    args = make(tmp_path, real_checkpoint) + ["--set", f"output.dir={tmp_path}/runs"]
    rc, out = run_mpi(2, "-m", "app", "train", *args, timeout=180)
    _assert_one_line(rc, out, expected)


def test_rank0_reports_even_when_it_is_the_slowest(tmp_path: Path) -> None:
    """mpirun kills the job at the first non-zero exit: a rank 0 six seconds late (a loaded node) must
    still print the line, so the other ranks wait for it instead of exiting first."""
    skip_unless_runnable()
    (tmp_path / "list.yaml").write_text("- optim\n")
    line = (f'[ "$OMPI_COMM_WORLD_RANK" = 0 ] && sleep 6; exec {sys.executable} -m app train '
            f'--config {tmp_path}/list.yaml --set output.dir={tmp_path}/runs')
    rc, out = run_mpi(2, "-c", line, python="sh", timeout=120)
    _assert_one_line(rc, out, ("list.yaml", "must be a mapping"))
