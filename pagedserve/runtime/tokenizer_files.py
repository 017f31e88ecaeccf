"""The tokenizer files an executor relays, through the scheduler, to gateways that have no model
volume (docs/design.md §1), with the model's config.json, which the tokenizer class depends on:
which names may travel, and the check a gateway makes before it writes any of them to disk. A
name is one of a fixed set of plain file names, never a path, so a relayed file is written only
inside the gateway's temporary directory, whoever sent it."""

from collections.abc import Mapping

TOKENIZER_FILE_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
    "generation_config.json",
    # Its model type can decide the tokenizer class, as in AutoTokenizer (a few KB; the gateway
    # checks the fields it reads: gateway/pagedserve/gateway/tokenizer.py).
    "config.json",
)
# Per file. The largest tokenizer.json of a popular model is tens of MB; every gRPC message is
# capped at 64 MiB in all (runtime/serving.py).
MAX_TOKENIZER_FILE_BYTES = 48 * 2**20


def check_tokenizer_files(files: Mapping[str, bytes]) -> None:
    """Raises ValueError naming the first file that is not a known tokenizer file name or is
    over the size cap."""
    for name, content in files.items():
        if name not in TOKENIZER_FILE_NAMES:
            raise ValueError(f"tokenizer file {name!r} is not one of {list(TOKENIZER_FILE_NAMES)}")
        if len(content) > MAX_TOKENIZER_FILE_BYTES:
            raise ValueError(f"tokenizer file {name!r} is {len(content)} bytes, over "
                             f"{MAX_TOKENIZER_FILE_BYTES}")
