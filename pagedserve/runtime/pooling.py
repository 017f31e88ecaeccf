"""Embeddings' pooling (docs/embeddings.md): vLLM's pooler config ({"pooling_type": "LAST" or
"MEAN", "normalize": bool}) as the contract's Pooling, for the gateway's --pooler-config and the
offline `LLM.embed`."""

from __future__ import annotations

from collections.abc import Mapping

from pagedserve.v1 import common_pb2

POOLING_TYPES = {"LAST": common_pb2.Pooling.TYPE_LAST, "MEAN": common_pb2.Pooling.TYPE_MEAN}


def pooling_from_config(config: Mapping | None) -> common_pb2.Pooling:
    """The Pooling of a pooler config (None: vLLM's default for decoder models, the last
    token's hidden state, normalized); ValueError naming the key it cannot honour."""
    config = config or {}
    unknown = set(config) - {"pooling_type", "normalize"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown (pooling_type and normalize are read)")
    kind = config.get("pooling_type", "LAST")
    if kind not in POOLING_TYPES:
        raise ValueError(f"pooling_type: {kind!r}; LAST or MEAN")
    normalize = config.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize: {normalize!r}; true or false")
    return common_pb2.Pooling(type=POOLING_TYPES[kind], normalize=normalize)


def embedding_sampling(pooling: common_pb2.Pooling) -> common_pb2.SamplingParams:
    """What an embedding is submitted with: the prompt computed as for one greedy token, which
    carries the vector and is then dropped; no speculation (nothing to verify)."""
    return common_pb2.SamplingParams(max_tokens=1, temperature=0.0, disable_spec_decode=True,
                                     pooling=pooling)
