"""`pip install .` (a wheel, not editable) carries what `geometry demo` needs: the package and data/."""

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True)
    return next(out.glob("geometry-*.whl"))


def test_the_wheel_holds_the_package_and_the_demo_models(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("geometry/cli.py", "geometry/offline/analyze.py", "geometry/capture/recorder.py",
                   "geometry/lab/study.py"):
        assert module in names
    shipped = {p.relative_to(ROOT / "data").as_posix() for p in (ROOT / "data").rglob("*")
               if p.is_file() and p.parent != ROOT / "data"}
    assert shipped >= {"student/model.safetensors", "teacher/model.safetensors", "student/config.json"}
    data = {n.split("/share/geometry/data/", 1)[1] for n in names if "/share/geometry/data/" in n}
    assert data == shipped


def test_an_installed_wheel_finds_its_models_away_from_the_repository(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    _see_these_site_packages(python)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel)], check=True, capture_output=True)
    code = ("from geometry.lab.study import data_dir; from geometry.lab.models import load_model; "
            "d = data_dir(); load_model(d / 'student'); print(d)")
    done = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "GEOMETRY_DATA": ""})
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == env / "share" / "geometry" / "data"


def _see_these_site_packages(python: Path) -> None:
    """Let a new venv import torch & co. from the running interpreter's site-packages, listed in a .pth file.
    ``system_site_packages=True`` would give it the base interpreter's, which lack them when this one is
    itself a venv. Plain path lines: the .pth files found there (an editable install of this repository)
    are not run, so ``geometry`` comes from the wheel alone."""
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]
    Path(purelib, "outer-site-packages.pth").write_text("".join(p + "\n" for p in ours))
