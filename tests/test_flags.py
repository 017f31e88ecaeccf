"""Flags with PAGEDSERVE_* environment equivalents: precedence, conversion, clear errors."""

import argparse
import dataclasses
import os
import pathlib

import pytest

from pagedserve.entrypoints.cli import build_parser
from pagedserve.executor.config import (
    EngineConfig,
    add_engine_arguments,
    add_model_arguments,
)
from pagedserve.runtime.flags import FlagParser, env_var, long_options
from pagedserve.runtime.serving import StartupError


def parser_with_flags() -> FlagParser:
    parser = FlagParser(prog="t")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences")
    parser.add_argument("--mode", default="a", choices=["a", "b"], help="mode")
    parser.add_argument("--verbose-stats", action="store_true", help="stats")
    return parser


def test_env_var_name():
    assert env_var("--max-num-seqs") == "PAGEDSERVE_MAX_NUM_SEQS"


def test_default_then_environment_then_command_line(monkeypatch):
    assert parser_with_flags().parse_args([]).max_num_seqs == 256
    monkeypatch.setenv("PAGEDSERVE_MAX_NUM_SEQS", "64")
    assert parser_with_flags().parse_args([]).max_num_seqs == 64
    assert parser_with_flags().parse_args(["--max-num-seqs", "8"]).max_num_seqs == 8


@pytest.mark.parametrize("raw, expected",
                         [("1", True), ("true", True), ("No", False), ("0", False)])
def test_boolean_flags_from_environment(monkeypatch, raw, expected):
    monkeypatch.setenv("PAGEDSERVE_VERBOSE_STATS", raw)
    assert parser_with_flags().parse_args([]).verbose_stats is expected


@pytest.mark.parametrize("var, raw", [("PAGEDSERVE_MAX_NUM_SEQS", "many"),
                                      ("PAGEDSERVE_MODE", "c"),
                                      ("PAGEDSERVE_VERBOSE_STATS", "maybe")])
def test_bad_environment_value_names_the_variable(monkeypatch, capsys, var, raw):
    monkeypatch.setenv(var, raw)
    with pytest.raises(SystemExit) as exit_info:
        parser_with_flags()
    assert exit_info.value.code == 2
    assert var in capsys.readouterr().err


def test_help_names_the_variable_and_default(capsys):
    with pytest.raises(SystemExit):
        parser_with_flags().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "PAGEDSERVE_MAX_NUM_SEQS" in out and "(default: 256)" in out


def test_service_flags_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDSERVE_MODEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PAGEDSERVE_PORT", "6000")
    args = build_parser().parse_args(["executor"])
    assert args.model_cache_dir == pathlib.Path(tmp_path) and args.port == 6000
    assert args.model is None


def test_offline_engine_options_are_the_executor_flags():
    config = EngineConfig.from_options(dtype="bfloat16", kv_cache_gib=1.5)
    assert (config.dtype, config.kv_cache_gib, config.block_size) == ("bfloat16", 1.5, 16)
    with pytest.raises(TypeError, match="unknown engine option.*'kv_cache_gb'"):
        EngineConfig.from_options(kv_cache_gb=1)


def test_every_engine_option_is_a_flag_with_the_fields_default(monkeypatch):
    """One place for each option: the flags are EngineConfig's fields, defaults included."""
    for name in [n for n in os.environ if n.startswith("PAGEDSERVE_")]:
        monkeypatch.delenv(name)  # the test session sets PAGEDSERVE_DTYPE
    args = build_parser().parse_args(["executor"])
    assert EngineConfig.from_args(args) == EngineConfig()
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_engine_arguments(parser)
    assert set(long_options(parser)) == {f.name for f in dataclasses.fields(EngineConfig)}


def test_an_engine_config_survives_the_trip_to_a_child_process(tmp_path):
    config = EngineConfig(model="/models/x", model_cache_dir=tmp_path, dtype="bfloat16",
                          tensor_parallel_size=2, kv_cache_gib=0.5, max_model_len=512)
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_engine_arguments(parser)
    assert EngineConfig.from_args(parser.parse_args(config.to_argv())) == config


def test_up_gives_each_executor_its_own_gpus():
    from pagedserve.entrypoints.launcher import executor_gpus

    args = build_parser().parse_args(["up", "--executors", "2", "--tensor-parallel-size", "2"])
    assert executor_gpus(args, ["0", "1", "2", "3", "4"]) == ["0,1", "2,3"]
    assert executor_gpus(args, []) == []  # no GPU: the executors run on the CPU
    with pytest.raises(StartupError, match=r"--executors 2 x --tensor-parallel-size 2 need 4 "
                                           r"GPUs; 3 visible \(0,2,5\)"):
        executor_gpus(args, ["0", "2", "5"])
    on_cpu = build_parser().parse_args(["up", "--executors", "2", "--device", "cpu"])
    assert executor_gpus(on_cpu, ["0"]) == []


def test_up_passes_model_and_engine_flags_to_executors():
    from pagedserve.entrypoints.launcher import plan_children

    args = build_parser().parse_args(["up", "--dtype", "bfloat16", "--executors", "2"])
    executors = [c.argv for c in plan_children(args) if c.name.startswith("executor")]
    assert len(executors) == 2
    for argv in executors:
        assert argv[argv.index("--dtype") + 1] == "bfloat16"
        assert argv[argv.index("--scheduler-address") + 1] == "127.0.0.1:50052"
        assert "--model" not in argv  # unset flags are not passed: the executor's default


def test_up_passes_client_policy_switches_to_the_gateway_and_the_secret_in_the_environment():
    from pagedserve.entrypoints.launcher import plan_children

    def gateway(*argv: str):
        (child,) = [c for c in plan_children(build_parser().parse_args(["up", *argv]))
                    if c.name == "gateway"]
        return child

    on = gateway("--allow-client-priority", "--cache-salt-per-api-key", "--api-key", "k" * 16)
    assert "--allow-client-priority" in on.argv and "--cache-salt-per-api-key" in on.argv
    off = gateway()
    assert "--allow-client-priority" not in off.argv
    assert "--cache-salt-per-api-key" not in off.argv
    children = plan_children(build_parser().parse_args(["up", "--executors", "2"]))
    secrets = {c.env.get("PAGEDSERVE_INTERNAL_SECRET") for c in children}
    (secret,) = secrets  # one secret, shared by every child
    assert secret and len(secret) >= 32
    assert not any(secret in arg for c in children for arg in c.argv)  # never on a command line
