"""Mutation testing of the modules where a silent bug costs most (`make mutation`).

mutmut (PyPI, pinned in requirements/mutation.txt) plants one small change at a time in a
module (a comparison flipped, a constant moved by one, an argument dropped) and runs the fast
tests that cover the changed function; a change no test notices is a *surviving* mutant: either
a gap in the tests, or an *equivalent* mutant, a change that cannot alter behaviour. The score
of a module is killed / (mutants - equivalent), and each must reach MIN_SCORE.

Why a staging folder: pagedserve is one import namespace spread over a folder per service
(pyproject.toml's package-dir table), which mutmut, copying `source_paths` into `mutants/` and
importing from there, cannot follow. The script assembles the namespace as one plain
`pagedserve/` tree, with `tests/` beside it, under build/mutation/<modules>/ (one folder per
module selection, so runs of different modules can go on side by side), and runs mutmut there;
the checkout itself is never modified. mutmut's progress goes to mutmut.log in that folder, and
the scores to report.json.

The modules and the equivalent mutants (each with the reason it cannot change behaviour) are
in tests/mutation/config.toml; docs/reliability.md ("Mutation testing") has the last results.

    python tests/mutation/run.py [--module pagedserve.scheduler.block_manager ...] [--resume]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = pathlib.Path(__file__).with_name("config.toml")
BUILD = ROOT / "build" / "mutation"
MIN_SCORE = 0.85
# mutmut's statuses (`mutmut results --all true`) that count as a killed mutant: a test
# failed, or the mutant made a test run past its time limit.
KILLED = {"killed", "timeout", "caught by type check", "segfault"}
# A line of `mutmut results`: "    pagedserve.x.y.x_func__mutmut_3: survived"
RESULT_LINE = re.compile(r"^\s*(?P<name>[^\s:]+): (?P<status>.+)$")
# The module part of a mutant's name: everything before ".x_<function>" or ".xǁ<Class>ǁ".
MUTANT_MODULE = re.compile(r"^(?P<module>.+?)\.x(?:_|ǁ)")


@dataclass
class ModuleScore:
    module: str
    statuses: Counter = field(default_factory=Counter)
    survivors: list[str] = field(default_factory=list)  # neither killed nor equivalent
    equivalent: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def killed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status in KILLED)

    @property
    def score(self) -> float:
        counted = self.total - len(self.equivalent)
        return self.killed / counted if counted else 1.0


def package_dirs() -> dict[str, pathlib.Path]:
    """pagedserve's import names -> their folders, from pyproject.toml's package-dir table."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in table["package-dir"].items()}


def source_file(module: str) -> pathlib.Path:
    """The staged path (relative to the staging folder) of a module."""
    return pathlib.Path(*module.split(".")).with_suffix(".py")


def staging_dir(modules: list[str], every_module: bool) -> pathlib.Path:
    return BUILD / ("all" if every_module else "+".join(m.rsplit(".", 1)[1] for m in modules))


def stage(staging: pathlib.Path, modules: list[str], tests: list[str]) -> None:
    """The namespace as one `pagedserve/` tree plus tests/, and a pyproject.toml holding the
    project's pytest settings and mutmut's."""
    if staging.exists():
        shutil.rmtree(staging)
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    dirs = package_dirs()
    shutil.copytree(dirs.pop("pagedserve"), staging / "pagedserve", ignore=ignore)
    for name, folder in dirs.items():
        shutil.copytree(folder, staging / pathlib.Path(*name.split(".")), ignore=ignore,
                        dirs_exist_ok=True)
    shutil.copytree(ROOT / "tests", staging / "tests", ignore=ignore)
    pytest_options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    mutmut = {
        "source_paths": ["pagedserve"],
        "only_mutate": [str(source_file(m)) for m in modules],
        # The fast tests only (the slow ones start processes: minutes per mutant).
        "pytest_add_cli_args": ["-m", "not slow", "-p", "no:cacheprovider"],
        "pytest_add_cli_args_test_selection": tests,
        # grpc and torch are not safe to fork after use: each mutant's test run forks from a
        # server process that has imported them and collected the tests, nothing more.
        "process_isolation": "forkserver",
    }
    (staging / "pyproject.toml").write_text(
        toml_table("tool.pytest.ini_options", pytest_options["ini_options"])
        + toml_table("tool.mutmut", mutmut))


def toml_table(name: str, values: dict) -> str:
    """A TOML table of strings, numbers and lists of strings (JSON writes those alike)."""
    lines = [f"[{name}]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n\n"


def run_mutmut(staging: pathlib.Path, resume: bool) -> None:
    """`mutmut run` in the staging folder, its progress into mutmut.log there."""
    log = staging / "mutmut.log"
    with log.open("a" if resume else "w") as out:
        code = subprocess.run([sys.executable, "-m", "mutmut", "run"], cwd=staging,
                              stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"mutmut run failed ({code}): see {log}")


def results(staging: pathlib.Path) -> dict[str, str]:
    """Every mutant's status, by name."""
    text = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"],
                          cwd=staging, check=True, capture_output=True, text=True).stdout
    return {m["name"]: m["status"] for m in map(RESULT_LINE.match, text.splitlines()) if m}


def scores(statuses: dict[str, str], modules: list[str],
           equivalent: dict[str, str]) -> list[ModuleScore]:
    by_module = {m: ModuleScore(m) for m in modules}
    for name, status in sorted(statuses.items()):
        score = by_module[MUTANT_MODULE.match(name)["module"]]
        score.statuses[status] += 1
        if status not in KILLED:
            (score.equivalent if name in equivalent else score.survivors).append(name)
    return list(by_module.values())


def show(staging: pathlib.Path, name: str) -> str:
    """The mutant's diff, as `mutmut show` prints it."""
    return subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=staging,
                          capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", help="only this module (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the staging folder and test only mutants without a result")
    args = parser.parse_args()
    config = tomllib.loads(CONFIG.read_text())
    modules = args.module or list(config["modules"])
    unknown = set(modules) - set(config["modules"])
    if unknown:
        sys.exit(f"--module: {sorted(unknown)} not in {CONFIG}")
    tests = sorted({t for m in modules for t in config["modules"][m]})
    staging = staging_dir(modules, every_module=not args.module)
    if not args.resume:
        stage(staging, modules, tests)
    run_mutmut(staging, args.resume)
    statuses = results(staging)
    equivalent = config.get("equivalent", {})
    report = scores(statuses, modules, equivalent)
    stale = sorted(name for name in equivalent
                   if statuses.get(name) in KILLED and name.startswith(tuple(modules)))
    print(f"{'module':45} {'mutants':>8} {'killed':>7} {'equiv.':>7} {'survived':>9} "
          f"{'score':>6}")
    for s in report:
        print(f"{s.module:45} {s.total:8} {s.killed:7} {len(s.equivalent):7} "
              f"{len(s.survivors):9} {s.score:6.1%}")
    (staging / "report.json").write_text(json.dumps(
        {s.module: {"mutants": s.total, "statuses": dict(s.statuses), "score": s.score,
                    "survivors": s.survivors, "equivalent": s.equivalent} for s in report},
        indent=1))
    for s in report:
        for name in s.survivors:
            print(f"\nsurvived: {name}\n{show(staging, name)}")
    for name in stale:
        print(f"{CONFIG.name}: {name} is listed as equivalent but a test kills it: remove it")
    failing = [s.module for s in report if s.score < MIN_SCORE]
    if failing or stale:
        sys.exit(f"below {MIN_SCORE:.0%}: {failing}" if failing else "stale equivalents")


if __name__ == "__main__":
    main()
