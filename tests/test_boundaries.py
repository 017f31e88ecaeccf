"""The import rules of docs/design.md §1 and of the one `pagedserve` namespace, checked on the
source (every import statement, including those inside functions) and, for torch, on a real
import.

Each home (a package under `pagedserve.`, found through pyproject's package-dir table, so a new
file is checked without being listed here) may import only the homes its rule names: the
services talk only through the contract, the scheduler never imports torch, the kernels import
nothing of the services, the contract and the shared runtime import no service, and only
`pagedserve.entrypoints` wires services together. Benchmarks import nothing from tests/, and
nothing run from the repository root can shadow another distribution's top-level package.
"""

import ast
import importlib.metadata
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {name: ROOT / folder for name, folder in tomllib.loads(
    (ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].items()}

# home -> the other pagedserve homes it may import (its own modules are always allowed).
ALLOWED = {
    "pagedserve.v1": set(),
    "pagedserve.runtime": {"pagedserve.v1"},
    "pagedserve.kernels": set(),
    "pagedserve.scheduler": {"pagedserve.v1", "pagedserve.runtime"},
    "pagedserve.gateway": {"pagedserve.v1", "pagedserve.runtime"},
    "pagedserve.executor": {"pagedserve.v1", "pagedserve.runtime", "pagedserve.kernels"},
    "pagedserve.entrypoints": {"pagedserve.v1", "pagedserve.runtime", "pagedserve.gateway",
                               "pagedserve.scheduler", "pagedserve.executor"},
    "pagedserve.bench": {"pagedserve.v1", "pagedserve.runtime", "pagedserve.entrypoints"},
    "pagedserve.testing": {"pagedserve.v1", "pagedserve.runtime", "pagedserve.gateway",
                           "pagedserve.scheduler", "pagedserve.executor", "pagedserve.kernels",
                           "pagedserve.entrypoints"},
    "pagedserve": {"pagedserve.v1", "pagedserve.entrypoints"},  # __main__, the lazy exports
}
# Third-party packages a home must never import: the light services and the shared runtime stay
# free of the accelerator stack.
FORBIDDEN_THIRD_PARTY = {
    "pagedserve.scheduler": {"torch", "triton"},
    "pagedserve.runtime": {"torch", "triton"},
    "pagedserve.v1": {"torch", "triton"},
}
HOMES = sorted(ALLOWED, key=len, reverse=True)


def home_of(module: str) -> str | None:
    """The home a dotted module name belongs to (the longest matching home)."""
    return next((h for h in HOMES if module == h or module.startswith(h + ".")), None)


def imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # `from pagedserve import gateway` imports pagedserve.gateway.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import; write the module's full name")
    return names


def home_folder(home: str) -> pathlib.Path:
    return PACKAGE_DIRS.get(home, ROOT / "pagedserve" / home.removeprefix("pagedserve."))


def test_every_home_has_a_rule_and_every_rule_a_home():
    under_root_folder = {f"pagedserve.{p.name}" for p in (ROOT / "pagedserve").iterdir()
                         if (p / "__init__.py").exists()}
    assert set(ALLOWED) == set(PACKAGE_DIRS) | under_root_folder


@pytest.mark.parametrize("home", sorted(ALLOWED))
def test_homes_import_only_what_their_rule_allows(home):
    folder = home_folder(home)
    files = (sorted(folder.glob("*.py")) if home == "pagedserve"
             else sorted(p for p in folder.rglob("*.py")
                         if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))))
    assert files, f"no sources found for {home}"
    violations = []
    for path in files:
        for module in sorted(imported_modules(path)):
            target = home_of(module)
            top = module.split(".")[0]
            if target is not None and target != home and target not in ALLOWED[home]:
                violations.append(f"{path.relative_to(ROOT)} imports {module}")
            if top in FORBIDDEN_THIRD_PARTY.get(home, ()):
                violations.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not violations, "\n".join(violations)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pagedserve.executor.model_files import x\n"
                      "    import torch.nn\n")
    assert imported_modules(module) == {"pagedserve.executor.model_files",
                                        "pagedserve.executor.model_files.x", "torch.nn"}
    assert home_of("pagedserve.executor.model_files") == "pagedserve.executor"
    assert home_of("pagedserve.v1.common_pb2") == "pagedserve.v1"


@pytest.mark.parametrize("home", ["pagedserve.scheduler", "pagedserve.gateway",
                                  "pagedserve.runtime"])
def test_light_homes_do_not_load_torch(home):
    folder = home_folder(home)
    modules = [".".join((home, *p.relative_to(folder).with_suffix("").parts))
               for p in folder.rglob("*.py")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m.removesuffix('.__init__'))\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == "False", f"importing {home} loaded torch"


def test_benchmarks_import_nothing_from_tests():
    offenders = [f"{p.relative_to(ROOT)} imports {m}"
                 for p in sorted((ROOT / "benchmarks").rglob("*.py"))
                 for m in imported_modules(p) if m.split(".")[0] in {"tests", "conftest"}]
    assert not offenders, "\n".join(offenders)


def importable_names(folder: pathlib.Path) -> set[str]:
    """The top-level names `import` finds in a folder on sys.path (regular packages and
    modules; a folder without __init__.py is only a namespace portion, which any regular
    package elsewhere on the path wins over)."""
    return ({p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
            | {p.stem for p in folder.glob("*.py")})


def test_the_repository_root_provides_only_pagedserve():
    # `python -m ...` and `python -m pytest` from the root put it first on sys.path.
    assert importable_names(ROOT) == {"pagedserve"}


@pytest.mark.parametrize("folder", ["benchmarks", "benchmarks/peers", "benchmarks/workloads",
                                    "proto", "tests"])
def test_script_folders_shadow_no_installed_distribution(folder):
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path (likewise proto/generate.py,
    and pytest's conftest folder): none of their names may be another distribution's."""
    installed = {name for name, dists in importlib.metadata.packages_distributions().items()
                 if dists != ["pagedserve"]}
    clashes = importable_names(ROOT / folder) & installed
    assert not clashes, f"{folder}/ would shadow installed packages: {sorted(clashes)}"


def test_card_folders_hold_only_their_part_of_the_namespace():
    """gateway/, scheduler_svc/, executor_svc/, kernels/ and proto/ each hold a `pagedserve/`
    folder with their package (as mapped in pyproject), never a package of their own name."""
    for name, folder in PACKAGE_DIRS.items():
        if name == "pagedserve":
            continue
        card_folder = folder.relative_to(ROOT).parts[0]
        assert folder.relative_to(ROOT / card_folder).parts == ("pagedserve",
                                                                name.split(".")[1]), name
        assert not (ROOT / card_folder / "__init__.py").exists()
        assert not (ROOT / card_folder / "pagedserve" / "__init__.py").exists()


def module_files() -> dict[str, pathlib.Path]:
    """Every pagedserve module, by dotted name, from pyproject's package-dir table."""
    modules = {}
    for home, folder in PACKAGE_DIRS.items():
        nested = [f for h, f in PACKAGE_DIRS.items() if h != home and f.is_relative_to(folder)]
        for path in folder.rglob("*.py"):
            if any(path.is_relative_to(n) for n in nested):
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            modules[".".join((home, *parts)).removesuffix(".__init__")] = path
    return modules


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


def test_no_import_cycles():
    """Every import statement counts, those inside functions and under TYPE_CHECKING too: a
    cycle broken only by importing late is still two modules that cannot be read apart."""
    modules = module_files()
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name}
             for name, path in modules.items()}
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"} - {"e"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
