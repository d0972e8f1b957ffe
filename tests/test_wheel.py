"""`pip install .` (a wheel, not editable) carries what `geometry demo` needs: the package and data/."""

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
    venv.create(env, system_site_packages=True, with_pip=False)  # torch & co. from this interpreter
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel)], check=True, capture_output=True)
    code = ("from geometry.lab.study import data_dir; from geometry.lab.models import load_model; "
            "d = data_dir(); load_model(d / 'student'); print(d)")
    done = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "GEOMETRY_DATA": ""})
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == env / "share" / "geometry" / "data"
