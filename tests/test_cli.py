"""The installed `pagedserve` console script and the help of every subcommand."""

import pathlib
import re
import subprocess
import sys

import pytest

from pagedserve.entrypoints.cli import SERVICES

COMMANDS = ["up", *SERVICES]


def pagedserve(*args: str) -> subprocess.CompletedProcess:
    # The console script installed next to this interpreter (PATH may not include the venv).
    executable = pathlib.Path(sys.executable).with_name("pagedserve")
    assert executable.is_file(), "the pagedserve console script is not installed"
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=60)


def test_top_level_help_lists_every_command():
    result = pagedserve("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_documents_every_flag(command):
    result = pagedserve(command, "--help")
    assert result.returncode == 0, result.stderr
    # Option lines start with the flag: "  --max-num-seqs MAX_NUM_SEQS  help text".
    flags = set(re.findall(r"^\s+(--[a-z][a-z-]*)", result.stdout, re.MULTILINE)) - {"--help"}
    assert flags, result.stdout
    for flag in flags:
        assert f"PAGEDSERVE_{flag[2:].replace('-', '_').upper()}" in result.stdout, flag
    assert "--log-level" in result.stdout


def test_unknown_command_is_an_error():
    result = pagedserve("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


WITHOUT_TORCH = ("import sys\n"
                 "for name in ('torch', 'safetensors', 'gguf'):\n"
                 "    sys.modules[name] = None  # as on the control-plane image\n"
                 "from pagedserve.entrypoints.cli import main\n"
                 "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.parametrize("command", [["executor"], ["up"], ["bench", "throughput"]])
def test_model_commands_without_the_executor_extra_say_what_to_install(command):
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *command],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"pagedserve {' '.join(command)}: runs the model, which needs the executor extra (not "
        "installed: torch, safetensors, gguf): pip install 'pagedserve[executor]'")


def test_the_base_install_leaves_the_executor_packages_to_the_extra():
    """The gateway and scheduler image installs the base dependencies only (k8s/docker)."""
    import tomllib

    project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    project = project["project"]

    def names(requirements):
        return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in requirements}
    base, executor = names(project["dependencies"]), names(
        project["optional-dependencies"]["executor"])
    assert {"torch", "triton", "safetensors", "gguf"} <= executor
    assert not base & executor
    assert {"grpcio", "protobuf", "transformers", "structlog", "uvloop", "fastapi"} <= base
