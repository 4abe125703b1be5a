"""Every shipped data file is declared as package data, so a non-editable install carries it."""

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_every_data_file_is_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]
    for package, folder in (("tmcgraph", "tmcgraph/datasets/data"), ("apg", "apg/checkpoints")):
        files = [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.name != "__init__.py"]
        assert files, folder
        for f in files:
            relative = str(f.relative_to(ROOT / package))
            assert any(fnmatch.fnmatch(relative, g) for g in globs.get(package, [])), (
                f"{f.relative_to(ROOT)} is not covered by [tool.setuptools.package-data] {package} = "
                f"{globs.get(package)}")
