"""The import rules of DESIGN.md §1: the services talk only through `pagedserve.v1`; the scheduler
never imports torch; `kernels` imports nothing of the services. Checked on the source (every
import statement, including those inside functions) and, for torch, on a real import."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SERVICES = ("gateway", "scheduler_svc", "executor_svc")
PACKAGE_DIRS = {"gateway": ROOT / "gateway", "scheduler_svc": ROOT / "scheduler_svc",
                "executor_svc": ROOT / "executor_svc", "kernels": ROOT / "kernels",
                "pagedserve": ROOT / "proto" / "pagedserve"}
# The command line starts any service, and the offline API wires a scheduler to an in-process
# executor (DESIGN.md §1's one exception); nothing else in the core may import a service.
CORE_MODULES_THAT_START_SERVICES = {"cli.py", "launcher.py", "offline.py"}


def imported_top_levels(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def source_files(package: str) -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE_DIRS[package].rglob("*.py")
                  if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


def forbidden_imports(package: str) -> set[str]:
    if package == "kernels":
        return {*SERVICES, "pagedserve"}
    if package == "pagedserve":
        return set(SERVICES)
    forbidden = set(SERVICES) - {package}
    if package == "scheduler_svc":
        forbidden |= {"torch", "triton", "kernels"}
    return forbidden


@pytest.mark.parametrize("package", sorted(PACKAGE_DIRS))
def test_packages_import_only_what_the_design_allows(package):
    assert source_files(package), f"no sources found for {package}"
    violations = []
    for path in source_files(package):
        if package == "pagedserve" and path.name in CORE_MODULES_THAT_START_SERVICES:
            continue
        bad = imported_top_levels(path) & forbidden_imports(package)
        violations += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(bad)]
    assert not violations, "\n".join(violations)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from executor_svc.model_files import x\n    import torch.nn\n")
    assert imported_top_levels(module) == {"executor_svc", "torch"}


@pytest.mark.parametrize("package", ["scheduler_svc", "gateway"])
def test_light_services_do_not_load_torch(package):
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts)
               for p in source_files(package)]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m.removesuffix('.__init__'))\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False", f"importing {package} loaded torch"
