"""The gateway's tokenizer: the class transformers' AutoTokenizer would load for a model
directory, chosen and loaded without torch.

AutoTokenizer itself cannot be used: its module imports transformers' configuration_utils,
which imports torch wherever torch is installed (+300 MB resident, +1.4 s: docs/architecture.md,
"The gateway"). A tokenizer class's own module does not. So the class is chosen here as
transformers 5's AutoTokenizer.from_pretrained chooses it for a local directory
(models/auto/tokenization_auto.py): from tokenizer_config.json's `tokenizer_class` and
config.json's `model_type` and `tokenizer_class`, with transformers' own tables, read from that
file's source rather than copied (importing it would import torch).

Why the name in tokenizer_config.json is not enough: transformers 5 saves any tokenizer built
from a tokenizer.json under its generic class (`TokenizersBackend`), and AutoTokenizer corrects
declared classes for some model types (Qwen2's, Phi-3's, a Llama name over a byte-level
tokenizer). The class decides how text is split before BPE: Qwen2's class splits "\\n    " into
the newline and the indent, the generic one keeps them together (one token in a vocabulary
that has it).

The files may come from an executor, through the scheduler (`tokenizer_from_files`): the names
and sizes are checked before anything is written (runtime/tokenizer_files.py), and the fields
of the JSON files read here are checked before transformers reads them."""

from __future__ import annotations

import ast
import functools
import json
import pathlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from pagedserve.gateway.errors import GatewayError
from pagedserve.runtime.tokenizer_files import check_tokenizer_files

TOKENIZER_CONFIG = "tokenizer_config.json"
MODEL_CONFIG = "config.json"
# AutoTokenizer's generic classes: never a correction of a declared class.
GENERIC_CLASSES = frozenset({"TokenizersBackend", "PythonBackend", "PreTrainedTokenizerFast"})
# The class AutoTokenizer takes for Mistral's own format (tekken.json, with the mistral-common
# package). It falls back to TokenizersBackend without that file, which is never relayed.
MISTRAL_COMMON = "MistralCommonBackend"


@dataclass(frozen=True)
class _AutoTokenizerTables:
    """transformers' tables behind AutoTokenizer's choice (models/auto/tokenization_auto.py)."""

    # TOKENIZER_MAPPING_NAMES: model type -> its tokenizer class's name (None: its backend is
    # not installed).
    class_by_model_type: Mapping[str, str | None]
    # MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS: model types whose checkpoints declare a wrong
    # tokenizer class; AutoTokenizer takes the model type's own.
    declared_class_wrong: frozenset[str]


def load_tokenizer(directory: pathlib.Path):
    """The tokenizer in `directory`, as AutoTokenizer.from_pretrained loads it."""
    return tokenizer_class(directory).from_pretrained(directory)


def tokenizer_from_files(files: Mapping[str, bytes]):
    """The tokenizer an executor relayed (file name to bytes), written to a temporary directory
    and loaded from it. The files come from another process: a bad name, size or field is a
    500 naming the file."""
    try:
        check_tokenizer_files(files)
        with tempfile.TemporaryDirectory(prefix="pagedserve-tokenizer-") as directory:
            for name, content in files.items():
                (pathlib.Path(directory) / name).write_bytes(content)
            return load_tokenizer(pathlib.Path(directory))
    except ValueError as exc:
        raise GatewayError(500, f"the executor relayed an unusable tokenizer: {exc}",
                           "internal_error") from None


@dataclass(frozen=True)
class _Declared:
    """What a model directory says about its tokenizer: the fields AutoTokenizer reads."""

    tokenizer_config_class: str | None  # tokenizer_config.json's tokenizer_class
    model_config_class: str | None  # config.json's tokenizer_class
    model_type: str | None  # config.json's
    remote_code: bool  # tokenizer_config.json has an auto_map

    @property
    def hub_class(self) -> str | None:
        """The declared class, tokenizer_config.json's first (AutoTokenizer's `_hub_class`)."""
        return self.tokenizer_config_class or self.model_config_class


def tokenizer_class(directory: pathlib.Path) -> type:
    """The class AutoTokenizer.from_pretrained(directory) instantiates (transformers 5), for a
    directory without remote code (an `auto_map` is never run, as AutoTokenizer does not run it
    untrusted) nor Mistral's own format."""
    declared = _read_declared(directory)
    tables = _auto_tokenizer_tables()
    return _corrected_class(directory, declared, tables) or _named_class(declared, tables)


def _read_declared(directory: pathlib.Path) -> _Declared:
    """The fields, checked: a ValueError names the file of one that is not what transformers
    expects, or of a tokenizer_class naming a class that is not a tokenizer (AutoTokenizer would
    instantiate it: a model class loads the weights beside it)."""
    tokenizer_config = _json_object(directory / TOKENIZER_CONFIG)
    model_config = _json_object(directory / MODEL_CONFIG)
    _check_version(model_config)
    return _Declared(tokenizer_config_class=_declared_class(tokenizer_config, TOKENIZER_CONFIG),
                    model_config_class=_declared_class(model_config, MODEL_CONFIG),
                    model_type=_string_field(model_config, "model_type", MODEL_CONFIG),
                    remote_code="auto_map" in tokenizer_config)


def _corrected_class(directory: pathlib.Path, declared: _Declared,
                     tables: _AutoTokenizerTables) -> type | None:
    """AutoTokenizer's corrections of a declared class (None where none applies; never with
    remote code): the generic class for a Llama name over a byte-level tokenizer.json
    (LlamaTokenizer assumes SentencePiece's Metaspace); where the model type has a class of its
    own that differs, that one when the model type's checkpoints are known to declare a wrong
    class, else the declared one, else the generic class where either is generic."""
    import transformers

    hub_class, model_type = declared.hub_class, declared.model_type
    if hub_class is None or declared.remote_code:
        return None
    own_class = (tables.class_by_model_type.get(model_type) or "").removesuffix("Fast")
    generic = transformers.TokenizersBackend
    if (hub_class.removesuffix("Fast") == "LlamaTokenizer" and own_class != MISTRAL_COMMON
            and model_type not in tables.declared_class_wrong
            and generic._tokenizer_json_has_byte_level(directory)):  # AutoTokenizer's test
        return generic
    if not own_class or own_class == hub_class.removesuffix("Fast"):
        return None
    if own_class in GENERIC_CLASSES or own_class == MISTRAL_COMMON:
        return generic
    cls = _transformers_class(own_class if model_type in tables.declared_class_wrong
                              else hub_class)
    return generic if cls is None or cls.__name__ in GENERIC_CLASSES else cls


def _named_class(declared: _Declared, tables: _AutoTokenizerTables) -> type:
    """Without a correction: the class tokenizer_config.json names, else config.json's, else
    the model type's; the generic class where transformers has no such class (or only its
    slow Python base)."""
    import transformers

    generic = transformers.TokenizersBackend
    if declared.tokenizer_config_class:
        base = declared.tokenizer_config_class.removesuffix("Fast")
        cls = _transformers_class(base) or _transformers_class(base + "Fast")
        return generic if cls is None or cls is transformers.PythonBackend else cls
    if declared.model_config_class:
        name = declared.model_config_class
        if "PreTrainedTokenizerFast" not in name:
            name = name.removesuffix("Fast")
        return _transformers_class(name) or generic
    own_class = tables.class_by_model_type.get(declared.model_type or "")
    if own_class and own_class != MISTRAL_COMMON:
        return _transformers_class(own_class) or generic
    return generic


def _transformers_class(name: str) -> type | None:
    """transformers' class of that name; a Fast name falls back to its base (transformers 5
    made the two one class and dropped some Fast names)."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None and name.endswith("Fast"):
        cls = getattr(transformers, name.removesuffix("Fast"), None)
    return cls


def _declared_class(config: dict, file: str) -> str | None:
    """The tokenizer class `file` names, refused when transformers has a class of that name
    that is not a tokenizer class."""
    import transformers

    name = _string_field(config, "tokenizer_class", file)
    cls = _transformers_class(name) if name else None
    if cls is not None and not (isinstance(cls, type)
                                and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        raise ValueError(f"{file}: tokenizer_class {name!r} is not a tokenizer class")
    return name


def _json_object(path: pathlib.Path) -> dict:
    """The JSON object in `path` ({} when there is no such file), or a ValueError naming it."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON; nested too deeply
        raise ValueError(f"{path.name}: not JSON ({type(exc).__name__})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path.name}: expected a JSON object, got {type(content).__name__}")
    return content


def _string_field(config: dict, field: str, file: str) -> str | None:
    value = config.get(field)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{file}: {field} must be a string, got {type(value).__name__}")
    return value or None


def _check_version(model_config: dict) -> None:
    """transformers' tokenizer loading parses config.json's transformers_version (to decide on
    its Mistral regex fix) and fails on one that is not a version."""
    from packaging.version import InvalidVersion, Version

    written_by = _string_field(model_config, "transformers_version", MODEL_CONFIG)
    if written_by is None:
        return
    try:
        Version(written_by)
    except InvalidVersion:
        raise ValueError(f"{MODEL_CONFIG}: transformers_version {written_by!r} is not a "
                         "version") from None


@functools.cache
def _auto_tokenizer_tables() -> _AutoTokenizerTables:
    """The tables as the installed transformers defines them, read from the source of
    models/auto/tokenization_auto.py: each entry is a literal, or a literal chosen by which
    tokenizer backends are installed (`"X" if is_tokenizers_available() else None`)."""
    import transformers

    path = pathlib.Path(transformers.__file__).parent / "models" / "auto" / "tokenization_auto.py"
    values = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name):
                values[target.id] = node.value
    try:
        mapping = {_literal(key): _literal(value) for key, value in
                   (entry.elts for entry in values["TOKENIZER_MAPPING_NAMES"].args[0].elts)}
        wrong = frozenset(_literal(entry)
                          for entry in values["MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS"].elts)
    except (KeyError, AttributeError, IndexError, ValueError) as exc:
        raise RuntimeError(f"{path} (transformers {transformers.__version__}) does not define "
                           f"AutoTokenizer's tables as transformers 5 does: {exc!r}") from None
    # as tokenization_auto.py does after defining them
    for model_type in wrong:
        mapping.setdefault(model_type, "TokenizersBackend")
    return _AutoTokenizerTables(mapping, wrong)


def _literal(node: ast.expr):
    """A table entry's value: a literal, or `A if is_<backend>_available() else B`."""
    from transformers.utils import import_utils

    if isinstance(node, ast.IfExp):
        test = node.test
        if not (isinstance(test, ast.Call) and isinstance(test.func, ast.Name)
                and test.func.id.startswith("is_") and test.func.id.endswith("_available")
                and not test.args and hasattr(import_utils, test.func.id)):
            raise ValueError(f"line {node.lineno}: {ast.unparse(test)} is not a backend check")
        installed = getattr(import_utils, test.func.id)()
        return _literal(node.body if installed else node.orelse)
    return ast.literal_eval(node)
