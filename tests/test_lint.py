"""The code passes ruff as pyproject.toml configures it (pycodestyle and pyflakes), so CI keeps
it clean: an unused import, an undefined name or a 101-character line fails here."""
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    beside_python = pathlib.Path(sys.executable).parent / "ruff"
    if beside_python.exists():
        return [str(beside_python)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return []


def test_ruff_is_clean():
    result = subprocess.run([*_ruff(), "check", "--no-cache", "."], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_ruff_catches_what_it_is_configured_for(tmp_path):
    """The configuration is the one read (not ruff's defaults): a long line fails."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx = '" + "a" * 100 + "'\n")
    result = subprocess.run([*_ruff(), "check", "--no-cache", "--config",
                             str(REPO / "pyproject.toml"), str(bad)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "F401" in result.stdout and "E501" in result.stdout
