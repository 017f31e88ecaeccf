"""Command-line flags with environment-variable equivalents.

Every long option `--some-flag` can also be set as `PAGEDSERVE_SOME_FLAG`; a flag given on the
command line wins over the environment, which wins over the built-in default. `--help` shows the
variable and the default of every flag.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

ENV_PREFIX = "PAGEDSERVE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# Options whose values are credentials: --help says a value is set (e.g. from the environment),
# never the value, so that it shows up in no terminal or log.
SECRET_OPTIONS = frozenset({"--api-key", "--internal-secret"})


def env_var(option: str) -> str:
    """`--max-num-seqs` -> `PAGEDSERVE_MAX_NUM_SEQS`."""
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose long options take their defaults from PAGEDSERVE_* variables."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        option = next((n for n in names if n.startswith("--")), None)
        if option is None or kwargs.get("action") in ("help", "version"):
            return super().add_argument(*names, **kwargs)
        var = env_var(option)
        if var in os.environ:
            kwargs["default"] = self._env_default(var, os.environ[var], kwargs)
        default = kwargs.get("default")
        shown = "" if default in (None, argparse.SUPPRESS) or kwargs.get("action") == "store_true" \
            else " (default: set)" if option in SECRET_OPTIONS else f" (default: {default})"
        kwargs["help"] = f"{kwargs.get('help', '')}{shown} [env: {var}]"
        return super().add_argument(*names, **kwargs)

    def _env_default(self, var: str, raw: str, kwargs: dict):
        if kwargs.get("action") == "store_true":
            if raw.strip().lower() not in _TRUE | _FALSE:
                self.error(f"{var}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")
            return raw.strip().lower() in _TRUE
        convert = kwargs.get("type", str)
        try:
            value = convert(raw)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            self.error(f"{var}={raw!r}: {exc}")
        choices = kwargs.get("choices")
        if choices is not None and value not in choices:
            self.error(f"{var}={raw!r}: expected one of {', '.join(map(str, choices))}")
        return value


def positive_float(raw: str) -> float:
    """argparse type: a finite number > 0 (seconds, sizes)."""
    value = float(raw)
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {raw!r}")
    return value


def long_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> option string of every flag `parser` defines (--help excluded)."""
    return {action.dest: action.option_strings[0] for action in parser._actions
            if action.option_strings and action.dest != "help"}


def passed_on(args: object, *adders: Callable[[argparse.ArgumentParser], None]) -> list[str]:
    """The flags the `adders` define, as `args` (a parsed namespace, or any object with an
    attribute per flag, such as the executor's EngineConfig) has them, as the argv of a child
    process that takes the same flags (`pagedserve up`'s services, tensor-parallel ranks).
    Flags whose value is None, and switches that are off, are left out: the child takes its own
    default."""
    parser = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(parser)
    flags = []
    for dest, option in long_options(parser).items():
        value = getattr(args, dest)
        if isinstance(value, bool):  # a switch: present or not
            flags += [option] if value else []
        elif value is not None:
            flags += [option, str(value)]
    return flags


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every service takes."""
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="lowest level of log lines to print")
    parser.add_argument("--log-format", default="auto", choices=["auto", "json", "console"],
                        help="auto: readable on a terminal, one JSON object per line otherwise")
    add_tls_flags(parser)
    parser.add_argument("--internal-secret", default=None,
                        help="random value (at least 32 characters) shared by every process "
                             "of the deployment, proving a caller's role on internal gRPC; set "
                             "it in the environment, not on a command line that `ps` shows. "
                             "`pagedserve up` makes one per run when unset")


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """Certificate files (serving.TlsConfig); `pagedserve up` passes them to every process."""
    parser.add_argument("--tls-cert-file", default=None,
                        help="PEM certificate of this process: its gRPC (and the gateway's "
                             "HTTP) servers use TLS, and it is the client certificate it "
                             "presents when it dials; needs --tls-key-file")
    parser.add_argument("--tls-key-file", default=None,
                        help="PEM private key of --tls-cert-file")
    parser.add_argument("--tls-ca-file", default=None,
                        help="PEM CA that peers' certificates must chain to; given, internal "
                             "gRPC servers (scheduler, executor) require client certificates "
                             "(mTLS) and every internal channel verifies its server with it")
