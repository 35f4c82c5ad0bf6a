"""What a non-editable install carries: the demo configs travel inside the package, so
``python -m sacpo_jax.train`` with no arguments finds the demo from any directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sacpo_jax import train
from sacpo_jax.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_the_default_config_is_the_packaged_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    path = Path(train.config_path(None))
    assert path == Path(train.__file__).parent / "configs" / "demo.yaml"
    assert load_config(str(path)).name == "demo"
    assert Path(train.config_path("caid_demo.yaml")).parent == path.parent
    # configs/ at the top of the checkout is the same folder, for users to copy from.
    assert (ROOT / "configs").resolve() == path.parent.resolve()


@pytest.mark.slow
def test_the_wheel_ships_every_config(tmp_path):
    source = tmp_path / "source"  # built from a copy: the checkout gets no build/ folder
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "sacpo_jax", source / "sacpo_jax", ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", tmp_path]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("sacpo_jax-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("sacpo_jax/configs/")}
    expected = {f"sacpo_jax/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert "sacpo_jax/configs/demo.yaml" in expected and shipped == expected
