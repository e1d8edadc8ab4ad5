"""planrun installs under its one name: the repository's top-level folders are
``planrun.flows``, ``planrun.adapters``, ... and nothing generic lands in site-packages."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

TOP_LEVEL = ("flows", "adapters", "progress_bridge", "plan_schemas")


def test_every_installed_package_is_under_planrun() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(name == "planrun" or name.startswith("planrun.")
               for name in setuptools["packages"])
    assert set(setuptools["package-dir"].values()) >= set(TOP_LEVEL)


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_outside_the_repository_only_the_planrun_names_import(name: str,
                                                              tmp_path: Path) -> None:
    probe = (f"import importlib.util as u; import planrun.{name}; "
             f"print(u.find_spec({name!r}) is None)")
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "True"  # no generic top-level name is importable


def test_no_code_imports_a_top_level_folder_by_its_generic_name() -> None:
    offenders = []
    for path in [*ROOT.glob("*/**/*.py")]:
        if ".venv" in path.parts or path.parts[len(ROOT.parts)] == "planrun" and \
                path.parent.name in TOP_LEVEL:
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) > 1 and words[0] in ("from", "import") and \
                    words[1].split(".")[0] in TOP_LEVEL:
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert offenders == []
