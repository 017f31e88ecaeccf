"""The gateway's tokenizer loading (gateway/pagedserve/gateway/scheduler_client.py
`load_tokenizer`): the class the tokenizer's own config names, so that a gateway never imports
torch, and the same encodings, decodings and chat prompts as transformers' AutoTokenizer;
AutoTokenizer where the config names no tokenizer class."""

import json
import shutil
import subprocess
import sys
import tempfile

import pytest
from transformers import AutoTokenizer

from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.scheduler_client import load_tokenizer, tokenizer_from_files
from pagedserve.runtime import tokenizer_files

TEXTS = ["Hello world", " leading space", "émoji 🙂 and ünïcode", "<|im_start|>user\nhi<|im_end|>"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.fixture(params=["tiny", "default"])
def tokenizer_dir(request, tiny_llama_dir, default_model):
    return tiny_llama_dir if request.param == "tiny" else default_model.path


def test_it_matches_auto_tokenizer(tokenizer_dir):
    ours, reference = load_tokenizer(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    assert ours.is_fast and reference.is_fast  # the Fast class, as AutoTokenizer picks
    for text in TEXTS:
        ids = reference(text).input_ids
        assert ours(text).input_ids == ids
        assert ours.decode(ids, skip_special_tokens=True) == \
            reference.decode(ids, skip_special_tokens=True)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == \
        reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)


def test_a_gateway_loads_its_tokenizer_without_torch(default_model):
    code = ("import sys, pathlib\nfrom pagedserve.gateway.scheduler_client import load_tokenizer\n"
            f"load_tokenizer(pathlib.Path({str(default_model.path)!r}))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _with_tokenizer_class(source, target, tokenizer_class):
    directory = shutil.copytree(source, target)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("tokenizer_class", None)
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    config_path.write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("tokenizer_class", [None, "NoSuchTokenizer"])
def test_a_config_naming_no_known_class_falls_back_to_auto(tmp_path, tiny_llama_dir,
                                                           tokenizer_class, monkeypatch):
    directory = _with_tokenizer_class(tiny_llama_dir, tmp_path / "model", tokenizer_class)
    expected = AutoTokenizer.from_pretrained(tiny_llama_dir)("Hello world").input_ids
    loaded_by_auto = []
    from_pretrained = AutoTokenizer.from_pretrained

    def recording(path, *args, **kwargs):
        loaded_by_auto.append(path)
        return from_pretrained(path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recording)
    assert load_tokenizer(directory)("Hello world").input_ids == expected
    assert loaded_by_auto == [directory]  # the fallback was taken


def test_a_config_naming_another_kind_of_class_is_refused(tmp_path, tiny_llama_dir):
    """AutoTokenizer would instantiate it (a model class loads the weights beside it)."""
    directory = _with_tokenizer_class(tiny_llama_dir, tmp_path / "model",
                                      "AutoModelForCausalLM")
    with pytest.raises(ValueError, match="tokenizer_class 'AutoModelForCausalLM' is not a "
                                         "tokenizer class"):
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
