"""Rotary embedding tables from a Hugging Face config's rope parameters, as transformers
computes them (`transformers.modeling_rope_utils`), for every position the model serves.

One table per model, indexed by position, serves every kernel: the scaling types that change
the angles (linear, llama3, YaRN) or scale cos and sin (YaRN's attention factor) are folded in
once, at load.

Dynamic NTK is the one type whose angles depend on the sequence's length: transformers
recomputes the base for the current length `s` once it exceeds the trained length
`max_position_embeddings`, and keeps the keys it has cached. With a KV cache, each position is
therefore rotated with the base of the length at which it was computed, and that is what the
table holds: position p uses the base for `s = max(p + 1, max_position_embeddings)`. This equals
transformers' token-by-token generation exactly and makes a position's rotation independent
of the batch, the chunking and the prefix cache. (transformers' single forward of a prompt
longer than the trained length rotates all of it with the prompt's base instead, a result that
no KV cache can reproduce; vLLM instead fixes one base for the longest length, which changes
every position, short prompts included.)

The context length (`context_length`) is `max_position_embeddings`, extended where the scaling
type defines itself against the trained length: dynamic NTK to `factor` times it, YaRN to
`factor` times `original_max_position_embeddings`. Linear, llama3 and LongRoPE configs declare
their extended length in `max_position_embeddings` already.

LongRoPE (Phi-3) has two sets of per-channel factors: transformers uses the short ones while a
sequence is within `original_max_position_embeddings` and, once it grows past, recomputes the
whole sequence's KV with the long ones (Phi3ForCausalLM drops its cache at that point). A
paged cache shared through the prefix cache cannot be recomputed per sequence, so the choice
is per model: where it serves past the trained length (`max_position_embeddings` beyond
`original_max_position_embeddings`, as every long-context Phi-3 declares) every position uses
the long factors. That is transformers exactly for every sequence longer than the trained
length, the ones a long-context model is served for; a shorter one is rotated with the long
factors where transformers would use the short ones."""

from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig

from pagedserve.executor.models.layers import UnsupportedArchitectureError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """LLaMA 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp
    between (the formula of Meta's reference code)."""
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(inv_freq: torch.Tensor, params: dict, base: float,
          rotary_dim: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): channels that turn fewer than `beta_slow` times over the trained
    length are interpolated (slowed by `factor`), those that turn more than `beta_fast` times
    are kept, a linear ramp between; cos and sin are scaled by the attention factor."""
    factor = params["factor"]
    trained = params["original_max_position_embeddings"]
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))

    def channel(turns: float) -> float:  # the channel pair that turns `turns` times
        return rotary_dim * math.log(trained / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = channel(params.get("beta_fast") or 32), channel(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention_factor)


def _longrope(inv_freq: torch.Tensor, params: dict,
              max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): each channel pair's wavelength stretched by its own factor, the long
    ones where the model serves past its trained length (module docstring), cos and sin scaled
    by sqrt(1 + ln(factor) / ln(trained length))."""
    trained = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / trained
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(trained)) \
            if factor > 1 else 1.0
    key = "long_factor" if max_position_embeddings > trained else "short_factor"
    factors = torch.tensor(params[key], dtype=torch.float64)
    if factors.shape != inv_freq.shape:
        raise UnsupportedArchitectureError(
            f"rope_parameters.{key} has {factors.numel()} values; the rotary dimension "
            f"{2 * inv_freq.numel()} needs {inv_freq.numel()}")
    return inv_freq / factors, float(attention_factor)


def _rope_type(params: dict) -> str:
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope_parameters.rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return rope_type


def rotary_frequencies(params: dict, rotary_dim: int,
                       max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """[rotary_dim / 2] angle per position of each channel pair (float64), and the factor cos
    and sin are scaled by. Dynamic NTK's are those of its trained length (see the module
    docstring for the longer ones)."""
    rope_type = _rope_type(params)
    base = params["rope_theta"]
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params), 1.0
    if rope_type == "yarn":
        return _yarn(inv_freq, params, base, rotary_dim)
    if rope_type == "longrope":
        return _longrope(inv_freq, params, max_position_embeddings)
    return inv_freq, 1.0


def _dynamic_ntk_angles(params: dict, rotary_dim: int, trained: int,
                        positions: torch.Tensor) -> torch.Tensor:
    """[positions, rotary_dim / 2]: each position rotated with the NTK base of the length at
    which it is computed, `max(p + 1, trained)` (transformers' formula)."""
    factor = params["factor"]
    length = (positions + 1).clamp(min=trained)
    base = params["rope_theta"] * (factor * length / trained - (factor - 1)) \
        ** (rotary_dim / (rotary_dim - 2))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return positions[:, None] / base[:, None] ** exponents


def rope_parameter_sets(config: PretrainedConfig) -> dict[str | None, dict]:
    """The config's rope parameters by layer type (Gemma 3: `full_attention` and
    `sliding_attention` each have their own), or {None: them} where all layers share one set;
    {} for a model without rope."""
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(value, dict) for value in params.values()):
        return dict(params)
    return {None: params} if params else {}


def _extended_length(params: dict, trained: int) -> int:
    rope_type = _rope_type(params)
    if rope_type == "dynamic":
        return int(trained * params["factor"])
    if rope_type == "yarn":
        return max(trained, int(params["original_max_position_embeddings"] * params["factor"]))
    return trained


def context_length(config: PretrainedConfig) -> int:
    """Positions the model serves (module docstring): the longest any of its rope parameter
    sets extends to (a layer type with default rope serves any position)."""
    trained = getattr(config, "max_position_embeddings", None) or 2048
    return max([_extended_length(params, trained)
                for params in rope_parameter_sets(config).values()], default=trained)


def rotary_cos_sin_cache(config: PretrainedConfig, rotary_dim: int,
                         params: dict | None = None) -> torch.Tensor:
    """[context_length, rotary_dim]: cos of every position x frequency, then sin, scaled by the
    attention factor (float32). `params`: one layer type's set (`rope_parameter_sets`); by
    default the config's one set."""
    params = params if params is not None else config.rope_parameters
    positions = torch.arange(context_length(config), dtype=torch.float64)
    inv_freq, scale = rotary_frequencies(params, rotary_dim, config.max_position_embeddings)
    if params.get("rope_type") == "dynamic":
        angles = _dynamic_ntk_angles(params, rotary_dim, config.max_position_embeddings,
                                     positions)
    else:
        angles = positions[:, None] * inv_freq
    return (torch.cat((angles.cos(), angles.sin()), dim=-1) * scale).float()
