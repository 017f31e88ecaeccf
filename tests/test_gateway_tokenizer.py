"""The gateway's tokenizer loading (gateway/pagedserve/gateway/tokenizer.py): the class
transformers' AutoTokenizer picks for a model directory, chosen without torch, so the same
encodings, decodings and chat prompts as AutoTokenizer, for every family the engine serves,
from a local directory or from the files an executor relays."""

import json
import logging
import shutil
import subprocess
import sys
import tempfile

import pytest
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast, TokenizersBackend

from pagedserve.executor.model_files import ModelDirectory
from pagedserve.gateway import tokenizer as gateway_tokenizer
from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.tokenizer import load_tokenizer, tokenizer_from_files
from pagedserve.runtime import tokenizer_files

TEXTS = ["Hello world", " leading space", "émoji 🙂 and ünïcode", "<|im_start|>user\nhi<|im_end|>"]
# Whitespace runs are where tokenizer classes part: Qwen2's splits "\n" from the spaces after it.
TRICKY_TEXTS = TEXTS + ["\n    ", "  a", "a\t\tb", "x\n\n  y", "def f():\n    return 1\n",
                        "\t\n \r\n", " ", "<|im_end|>  <|im_start|>"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
# The model types the engine serves (issue 22 adds the ones after falcon).
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt_neox", "falcon", "gemma", "gemma2",
            "gemma3_text", "phi3", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe"]
# What a tokenizer_config.json may name: transformers 5's generic classes (what it writes for a
# tokenizer built from tokenizer.json), none, family classes (transformers 4 wrote the Fast
# names), and a class transformers does not have.
DECLARED_CLASSES = ["TokenizersBackend", "PreTrainedTokenizerFast", None, "LlamaTokenizerFast",
                    "Qwen2Tokenizer", "GPT2TokenizerFast", "GemmaTokenizerFast",
                    "NoSuchTokenizer"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    """AutoTokenizer warns about the combinations these tests make on purpose."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture(params=["tiny", "default"])
def tokenizer_dir(request, tiny_llama_dir, default_model):
    return tiny_llama_dir if request.param == "tiny" else default_model.path


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer as transformers 5 saves one built from tokenizer.json."""
    from pagedserve.testing.tiny_models import byte_level_tokenizer

    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    byte_level_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def metaspace_tokenizer_dir(tmp_path_factory):
    """A tiny SentencePiece-style (Metaspace, not byte-level) BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "b": 5, "▁a": 6}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], unk_token="<unk>"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    directory = tmp_path_factory.mktemp("metaspace-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)
    return directory


def _model_dir(target, model_type, tokenizer_source, tokenizer_class="TokenizersBackend"):
    """A model directory of `model_type` (transformers' default config) holding the tokenizer
    files of `tokenizer_source`, its tokenizer_config.json naming `tokenizer_class` (None: no
    class)."""
    target.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, target / name)
    AutoConfig.for_model(model_type).save_pretrained(target)
    _set_json(target / "tokenizer_config.json", tokenizer_class=tokenizer_class)
    return target


def _set_json(path, **fields):
    """Sets (None: removes) fields of the JSON object in `path`."""
    content = json.loads(path.read_text())
    for key, value in fields.items():
        content.pop(key, None)
        if value is not None:
            content[key] = value
    path.write_text(json.dumps(content))


def _assert_same(ours, reference, texts=TEXTS):
    assert type(ours) is type(reference)
    for text in texts:
        ids = reference(text).input_ids
        assert ours(text).input_ids == ids, text
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == \
            reference.decode(ids, skip_special_tokens=True)
    if reference.chat_template:
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == \
            reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)


def _relayed(directory):
    """The files an executor serving `directory` relays to gateways."""
    config = json.loads((directory / "config.json").read_text())
    return ModelDirectory(directory, "model", config).tokenizer_files()


def test_it_matches_auto_tokenizer(tokenizer_dir):
    ours, reference = load_tokenizer(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    assert ours.is_fast and reference.is_fast  # the Fast class, as AutoTokenizer picks
    _assert_same(ours, reference, TRICKY_TEXTS)


def test_the_tables_read_from_transformers_source_are_the_ones_it_defines():
    """The gateway reads AutoTokenizer's tables from tokenization_auto.py's source (importing
    it imports torch); here, where torch is allowed, they are compared with the imported ones,
    for every model type transformers knows."""
    from transformers.models.auto import tokenization_auto

    tables = gateway_tokenizer._auto_tokenizer_tables()
    assert tables.class_by_model_type == dict(tokenization_auto.TOKENIZER_MAPPING_NAMES)
    assert tables.declared_class_wrong == \
        tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_tokenizes_as_auto_tokenizer(tmp_path, default_model, family):
    """A real vocabulary (the default model's), saved under transformers 5's generic class,
    in a directory of each family: where AutoTokenizer takes the family's class instead, so
    must the gateway."""
    directory = _model_dir(tmp_path / family, family, default_model.path)
    reference = AutoTokenizer.from_pretrained(directory)
    _assert_same(load_tokenizer(directory), reference, TRICKY_TEXTS)
    _assert_same(tokenizer_from_files(_relayed(directory)), reference, TRICKY_TEXTS)


def test_a_qwen2_directory_splits_a_newline_from_the_indent_after_it(tmp_path, default_model):
    """The issue's case: the generic class encodes "\\n    " as one token, AutoTokenizer (Qwen2's
    class, as Qwen2 checkpoints' declared class is known to be wrong) as "\\n" and "    "."""
    directory = _model_dir(tmp_path / "qwen2", "qwen2", default_model.path)
    reference = AutoTokenizer.from_pretrained(directory)
    assert len(TokenizersBackend.from_pretrained(directory)("\n    ").input_ids) == 1
    assert len(reference("\n    ").input_ids) == 2
    assert load_tokenizer(directory)("\n    ").input_ids == reference("\n    ").input_ids
    relayed = tokenizer_from_files(_relayed(directory))
    assert relayed("\n    ").input_ids == reference("\n    ").input_ids


@pytest.mark.parametrize("declared", DECLARED_CLASSES)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_class_is_auto_tokenizers_for_what_the_config_names(tmp_path, tiny_tokenizer_dir,
                                                                family, declared):
    directory = _model_dir(tmp_path / "model", family, tiny_tokenizer_dir, declared)
    _assert_same(load_tokenizer(directory), AutoTokenizer.from_pretrained(directory))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("declared", ["GPT2TokenizerFast", "PreTrainedTokenizerFast"])
def test_a_class_named_by_config_json_counts_as_auto_tokenizer_counts_it(
        tmp_path, tiny_tokenizer_dir, family, declared):
    directory = _model_dir(tmp_path / "model", family, tiny_tokenizer_dir, None)
    _set_json(directory / "config.json", tokenizer_class=declared)
    _assert_same(load_tokenizer(directory), AutoTokenizer.from_pretrained(directory))


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "mistral"])
def test_a_declared_llama_class_over_a_byte_level_tokenizer_is_the_generic_one(
        tmp_path, tiny_tokenizer_dir, metaspace_tokenizer_dir, family):
    """transformers' LlamaTokenizer assumes SentencePiece's Metaspace: AutoTokenizer loads a
    byte-level tokenizer.json under that name with the generic class instead (a Metaspace one
    with LlamaTokenizer, except where the model type's own class wins)."""
    for source in (tiny_tokenizer_dir, metaspace_tokenizer_dir):
        directory = _model_dir(tmp_path / source.name, family, source, "LlamaTokenizerFast")
        _assert_same(load_tokenizer(directory), AutoTokenizer.from_pretrained(directory),
                     TEXTS + ["a ab  a"])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_remote_code_in_the_config_leaves_the_declared_class(tmp_path, tiny_tokenizer_dir,
                                                             family):
    """With an auto_map (never run by the gateway, nor by AutoTokenizer untrusted),
    AutoTokenizer skips its corrections of the declared class."""
    directory = _model_dir(tmp_path / "model", family, tiny_tokenizer_dir)
    _set_json(directory / "tokenizer_config.json", auto_map={"AutoTokenizer": ["x--Foo", None]})
    _assert_same(load_tokenizer(directory), AutoTokenizer.from_pretrained(directory))


@pytest.mark.parametrize("config", [None, {}, {"model_type": "no_such_model"}])
@pytest.mark.parametrize("declared", [None, "Qwen2Tokenizer"])
def test_without_a_known_model_type_the_tokenizer_config_decides(tmp_path, tiny_tokenizer_dir,
                                                                 config, declared):
    directory = _model_dir(tmp_path / "model", "llama", tiny_tokenizer_dir, declared)
    (directory / "config.json").unlink()
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    _assert_same(load_tokenizer(directory), AutoTokenizer.from_pretrained(directory))


def test_a_gateway_loads_its_tokenizer_without_torch(tmp_path, default_model):
    """Every way the class is chosen (a declared class, the model type's, none declared), from
    a directory and from relayed files, with torch installed and never imported."""
    directories = [default_model.path,
                   _model_dir(tmp_path / "qwen2", "qwen2", default_model.path),
                   _model_dir(tmp_path / "gpt2", "gpt2", default_model.path, None)]
    relayed = tmp_path / "relayed"
    relayed.mkdir()
    for name, content in _relayed(directories[1]).items():
        (relayed / name).write_bytes(content)
    code = ("import pathlib, sys\n"
            "from pagedserve.gateway.tokenizer import load_tokenizer, tokenizer_from_files\n"
            "relayed, *directories = map(pathlib.Path, sys.argv[1:])\n"
            "for directory in directories:\n"
            "    load_tokenizer(directory)\n"
            "files = {path.name: path.read_bytes() for path in relayed.iterdir()}\n"
            "print(type(tokenizer_from_files(files)).__name__)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code, relayed, *directories],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Qwen2Tokenizer"]  # the model type's class was chosen


@pytest.mark.parametrize("file", ["tokenizer_config.json", "config.json"])
def test_a_config_naming_another_kind_of_class_is_refused(tmp_path, tiny_llama_dir, file):
    """AutoTokenizer would instantiate it (a model class loads the weights beside it)."""
    directory = _model_dir(tmp_path / "model", "llama", tiny_llama_dir)
    _set_json(directory / "tokenizer_config.json", tokenizer_class=None)
    _set_json(directory / file, tokenizer_class="AutoModelForCausalLM")
    with pytest.raises(ValueError, match=f"{file}: tokenizer_class 'AutoModelForCausalLM' is "
                                         "not a tokenizer class"):
        load_tokenizer(directory)


@pytest.mark.parametrize("escape", ["absolute", "relative"])
def test_relayed_tokenizer_files_are_written_only_inside_their_directory(tmp_path, monkeypatch,
                                                                          escape):
    """The names come from an executor, through the scheduler: a path is refused before
    anything is written, naming the file."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    target = tmp_path / "owned.json"
    name = str(target) if escape == "absolute" else "../../owned.json"
    with pytest.raises(GatewayError, match="owned.json") as error:
        tokenizer_from_files({name: b"{}"})
    assert error.value.status == 500
    assert not target.exists()


def test_relayed_tokenizer_files_are_size_capped(monkeypatch):
    monkeypatch.setattr(tokenizer_files, "MAX_TOKENIZER_FILE_BYTES", 8)
    tokenizer_files.check_tokenizer_files({"tokenizer.json": b"12345678"})
    with pytest.raises(ValueError, match="'tokenizer.json' is 9 bytes, over 8"):
        tokenizer_files.check_tokenizer_files({"tokenizer.json": b"123456789"})


@pytest.mark.parametrize(("file", "content", "error"), [
    ("config.json", b"{", r"config.json: not JSON"),
    ("config.json", b"\xff\xfe{", r"config.json: not JSON"),
    ("config.json", b"[" * 100_000 + b"]" * 100_000, r"config.json: not JSON"),
    ("config.json", b"[]", r"config.json: expected a JSON object, got list"),
    ("config.json", b'{"model_type": 5}', r"config.json: model_type must be a string, got int"),
    ("config.json", b'{"model_type": ["qwen2"]}',
     r"config.json: model_type must be a string, got list"),
    ("config.json", b'{"tokenizer_class": {}}',
     r"config.json: tokenizer_class must be a string, got dict"),
    ("config.json", b'{"transformers_version": 5}',
     r"config.json: transformers_version must be a string, got int"),
    ("config.json", b'{"transformers_version": "five"}',
     r"config.json: transformers_version 'five' is not a version"),
    ("tokenizer_config.json", b"null", r"tokenizer_config.json: expected a JSON object, got "
                                       r"NoneType"),
    ("tokenizer_config.json", b'{"tokenizer_class": 1}',
     r"tokenizer_config.json: tokenizer_class must be a string, got int"),
])
def test_a_hostile_relayed_config_is_refused_naming_it(tiny_tokenizer_dir, file, content,
                                                        error):
    files = {name: (tiny_tokenizer_dir / name).read_bytes() for name in TOKENIZER_FILES}
    with pytest.raises(GatewayError, match="the executor relayed an unusable tokenizer: "
                                           + error) as refused:
        tokenizer_from_files({**files, file: content})
    assert refused.value.status == 500


def test_a_relayed_model_config_is_size_capped(tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setattr(tokenizer_files, "MAX_TOKENIZER_FILE_BYTES", 64)
    with pytest.raises(GatewayError, match="'config.json' is 65 bytes, over 64"):
        tokenizer_from_files({"config.json": b" " * 63 + b"{}"})
