"""The wheel is one namespace, `pagedserve`, and lives beside PyPI's `kernels` (which
transformers >= 5.25 imports): built from this tree, installed into a fresh virtual environment
next to `kernels`, both import, neither shares a file with the other, and uninstalling one
leaves the other working. Also: the wheel carries every source file pyproject maps (a package
missing from its list would install an engine without it), and a source tree runs without
being installed."""

import importlib.metadata
import json
import pathlib
import site
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"]

SOURCE_PATH = [".", "proto", "gateway", "scheduler_svc", "executor_svc", "kernels"]


def test_a_source_tree_runs_without_installing(tmp_path):
    """As benchmarks run on a machine that installs nothing: the folders on PYTHONPATH, no
    site-packages processing (so no editable finder), the dependencies found after them."""
    path = [str(ROOT / folder) for folder in SOURCE_PATH] + site.getsitepackages()
    code = ("import pagedserve.v1.common_pb2, pagedserve.kernels.attention, "
            "pagedserve.executor.runner, pagedserve.gateway.http_api, pagedserve.scheduler.server, "
            "pagedserve.entrypoints.offline\n"
            "print(pagedserve.kernels.attention.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": ":".join(path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ROOT / "kernels/pagedserve/kernels/attention.py")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the build uses this environment's setuptools, offline.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(out), str(ROOT)], check=True, cwd=out,
                   capture_output=True)
    (path,) = out.glob("pagedserve-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_has_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"pagedserve"}


@pytest.mark.slow
def test_the_wheel_carries_every_mapped_source_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        nested = [ROOT / f for p, f in PACKAGE_DIRS.items() if p.startswith(package + ".")]
        for path in base.rglob("*"):
            if (path.suffix in {".py", ".proto", ".pyi", ".c", ".h"} and "__pycache__" not in
                    path.parts and not any(path.is_relative_to(n) for n in nested)):
                expected.add("/".join((*package.split("."), *path.relative_to(base).parts)))
    assert expected - names == set()


def run_in(venv: pathlib.Path, code: str, cwd: pathlib.Path) -> dict:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_installed_beside_pypi_kernels(wheel, tmp_path):
    kernels_version = importlib.metadata.version("kernels")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "--quiet"]
    subprocess.run([*pip, "install", "--no-deps", str(wheel), f"kernels=={kernels_version}"],
                   check=True, capture_output=True)
    fresh_site = next((venv / "lib").glob("python3*/site-packages"))
    # The dependencies (torch, transformers, grpc, ...) come from this environment's
    # site-packages, after the fresh one's: pagedserve and kernels are the fresh copies.
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    code = ("import json, kernels, transformers.activations, pagedserve\n"
            "import pagedserve.kernels.attention, pagedserve.executor.runner\n"
            "import pagedserve.gateway.http_api, pagedserve.scheduler.server\n"
            "from pagedserve import LLM\n"
            "print(json.dumps({'kernels': kernels.__file__, 'pagedserve': pagedserve.__file__,"
            " 'ours': pagedserve.kernels.__file__,"
            " 'theirs_api': hasattr(kernels, 'get_kernel')}))")
    found = run_in(venv, code, tmp_path)
    assert found["kernels"].startswith(str(fresh_site))
    assert found["pagedserve"].startswith(str(fresh_site / "pagedserve"))
    assert found["ours"].startswith(str(fresh_site / "pagedserve" / "kernels"))
    assert found["theirs_api"], "the kernels that imported is not PyPI's"

    records = {dist: {line.split(",")[0] for line in
                      next(fresh_site.glob(f"{dist}-*.dist-info/RECORD")).read_text().split()}
               for dist in ("pagedserve", "kernels")}
    shared = {f for f in records["pagedserve"] & records["kernels"]
              if not f.startswith("../")}
    assert not shared

    subprocess.run([*pip, "uninstall", "--yes", "kernels"], check=True, capture_output=True)
    code = ("import json, pagedserve.kernels.attention, pagedserve.executor.runner\n"
            "print(json.dumps({'ok': True}))")
    assert run_in(venv, code, tmp_path) == {"ok": True}
    help_text = subprocess.run([str(venv / "bin" / "pagedserve"), "--help"], capture_output=True,
                               text=True, check=True, cwd=tmp_path).stdout
    assert "up" in help_text
