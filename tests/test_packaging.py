"""The install layout: one import package, three top-level folders mapped into it."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("pipelines", "rewards", "train")

LIST_MODULES = """
import importlib, importlib.util, json, pkgutil, sys
import diffalign
mapped = json.loads(sys.argv[1])
packages = ["diffalign"] + ["diffalign." + n for n in mapped]
report = {
    "diffalign": diffalign.__file__,
    "subpackages": {n: importlib.import_module("diffalign." + n).__file__ for n in mapped},
    "bare": {n: importlib.util.find_spec(n) is not None for n in mapped if n != "assets"},
    "modules": sorted({
        name
        for pkg in packages
        for name in [pkg] + [m.name for m in pkgutil.walk_packages(
            importlib.import_module(pkg).__path__, pkg + ".")]
    }),
}
print(json.dumps(report))
"""


def list_modules(cwd, extra_path=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = str(extra_path)
    result = subprocess.run(
        [sys.executable, "-c", LIST_MODULES, json.dumps(SUBPACKAGES + ("assets",))],
        cwd=cwd, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_editable_install_maps_top_level_folders(tmp_path):
    report = list_modules(cwd=tmp_path)  # not the repo root: only the installed finder can help
    for name in SUBPACKAGES:
        assert Path(report["subpackages"][name]) == REPO / name / "__init__.py"
        assert not report["bare"][name], f"a bare '{name}' module is importable"
    assert Path(report["subpackages"]["assets"]) == REPO / "assets" / "__init__.py"


@pytest.mark.slow
def test_wheel_install_gives_the_same_imports(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = wheels.glob("diffalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in SUBPACKAGES:
        assert f"diffalign/{name}/__init__.py" in names
        assert not any(n.startswith(f"{name}/") for n in names)
    assert "diffalign/assets/README.md" in names
    subprocess.run(
        pip + ["install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300
    )
    installed = list_modules(cwd=tmp_path, extra_path=target)
    assert Path(installed["diffalign"]).is_relative_to(target)
    for name in SUBPACKAGES:
        assert Path(installed["subpackages"][name]).is_relative_to(target / "diffalign" / name)
        assert not installed["bare"][name]
    assert installed["modules"] == list_modules(cwd=tmp_path)["modules"]


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = next(
        line.split("=", 1)[1].strip().strip("'\"")
        for line in ci.splitlines()
        if line.startswith("TEST_COMMAND=")
    )
    assert command in readme
