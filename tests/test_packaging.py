"""pyproject.toml: `pip install .` gives an importable lib_dynfuse, without the checkout on sys.path, with the
version of lib_dynfuse/__init__.py, the declared dependencies and the `guidance` extra, and none of the WebUI or
test parts. Offline: the venv's own setuptools builds it (no build isolation, no index)."""
import email
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version():
    with open(os.path.join(ROOT, "lib_dynfuse", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="70.1",
                        reason="setuptools >= 70.1, the build backend pyproject.toml names, is not installed")
    base = tmp_path_factory.mktemp("pkg")
    src, target = base / "src", base / "target"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "lib_dynfuse"), src / "lib_dynfuse",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # a copy, so the build's egg-info and build/ folders stay out of the checkout
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "--disable-pip-version-check", "--target", str(target), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return target


def test_the_installed_package_imports_without_the_checkout(installed, tmp_path):
    code = ("import sys, lib_dynfuse, lib_dynfuse.guidance, lib_dynfuse.hosts.common; "
            "print(lib_dynfuse.__file__); print(lib_dynfuse.__version__); "
            "print(any(p and p.rstrip('/') == sys.argv[1] for p in sys.path))")
    env = dict(os.environ, PYTHONPATH=str(installed))
    done = subprocess.run([sys.executable, "-s", "-c", code, ROOT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    path, version, root_on_path = done.stdout.split()
    assert path.startswith(str(installed)) and version == _version() and root_on_path == "False"


def test_only_the_library_is_installed_with_its_dependencies_and_extra(installed):
    assert sorted(os.listdir(installed)) == ["lib_dynfuse", f"lib_dynfuse-{_version()}.dist-info"]
    assert os.path.isfile(installed / "lib_dynfuse" / "guidance" / "step.py")
    assert os.path.isfile(installed / "lib_dynfuse" / "hosts" / "forge.py")
    (meta_path,) = glob.glob(str(installed / "*.dist-info" / "METADATA"))
    with open(meta_path) as f:
        meta = email.message_from_file(f)
    assert meta["Name"] == "lib_dynfuse" and meta["Version"] == _version()
    requires = [r.replace(" ", "") for r in meta.get_all("Requires-Dist")]
    for dep in ("torch>=2.0", "safetensors>=0.3", "numpy", "pillow"):
        assert dep in requires
    assert meta.get_all("Provides-Extra") == ["guidance"]
    assert {r.split(";")[0] for r in requires if 'extra=="guidance"' in r} == {"open_clip_torch>=2.20",
                                                                               "transformers>=4.30"}
