"""The built wheel, installed on its own, run from a project that has its own `data/`
and `policy/` packages (issue 15): ours live under `dpstack.`, so theirs never shadow them.

The fresh virtual environment holds only the wheel; its dependencies come from this
interpreter's site-packages through a .pth file, so nothing is downloaded.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "dpstack", "data", "policy", "runtime", "sim", "deploy")
USER_PACKAGES = ("data", "policy", "runtime", "sim", "deploy")


def run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs)
    assert r.returncode == 0, f"{' '.join(map(str, argv))} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel built from this checkout installed in it."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    # setuptools >= 70.1 builds wheels by itself (the dev extra asks for it)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src])
    wheel = next((tmp / "dist").glob("dpstack-*.whl"))
    env = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", env])
    site = next((env / "lib").glob("python*/site-packages"))
    # Their own .pth files are not read from here, so an editable dpstack in them stays inactive.
    (site / "_dependencies.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    run([env / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel])
    return env


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's project whose own packages have our folder names; importing one fails loudly."""
    for name in USER_PACKAGES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user project\\'s own {name} package')\n")
    return tmp_path


def in_project(project: Path, argv: list) -> subprocess.CompletedProcess:
    """Run from the project's folder with the project on PYTHONPATH, as a user working on it would."""
    return run(argv, cwd=project, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(project), "HOME": str(project)})


def test_dpstack_help_and_version_from_a_project_with_its_own_packages(venv, project):
    out = in_project(project, [venv / "bin" / "dpstack", "--help"]).stdout
    assert all(f"    {c} " in out for c in ("data", "train", "serve", "bridge", "bench"))
    from dpstack import __version__
    assert in_project(project, [venv / "bin" / "dpstack", "--version"]).stdout.strip() == f"dpstack {__version__}"


def test_data_info_from_a_project_with_its_own_packages(venv, project, tmp_path_factory):
    from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec
    from dpstack.data.replay_buffer import DatasetAttrs, ReplayBuffer

    store = tmp_path_factory.mktemp("store") / "d.zarr"
    spec = RobotSpec("lift", "Panda", 10.0, (ArraySpec("robot0_eef_pos", (3,)),), ActionSpec(shape=(7,), gripper_dims=(6,)))
    rb = ReplayBuffer.create(store, DatasetAttrs("lift", 10.0, spec, "human"))
    for T in (5, 6):
        rb.add_episode({"robot0_eef_pos": np.zeros((T, 3), np.float32), "action": np.zeros((T, 7), np.float32)})
    out = in_project(project, [venv / "bin" / "dpstack", "data", "info", store]).stdout
    assert "episodes  2" in out and "steps     11" in out


def test_the_runtime_imports_from_the_wheel_without_torch(venv, project):
    code = ("import sys, importlib.resources as res, dpstack, dpstack.runtime, dpstack.runtime.serve_cli, "
            "dpstack.deploy.bridge_cli\n"
            "assert res.files('dpstack.policy').joinpath('configs', 'lift_state_small.yaml').is_file()\n"
            "assert res.files('dpstack.deploy').joinpath('configs', 'sim.yaml').is_file()\n"
            "print(dpstack.__file__)\n"
            "print([m for m in ('torch', 'mujoco', 'robosuite') if m in sys.modules])\n")
    where, heavy = in_project(project, [venv / "bin" / "python", "-c", code]).stdout.split("\n")[:2]
    assert Path(where).is_relative_to(venv), f"dpstack came from {where}, not the wheel"
    assert heavy == "[]"
