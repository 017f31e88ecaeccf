"""Rotary embedding tables from a Hugging Face config's rope parameters."""

from __future__ import annotations

import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """LLaMA 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp
    between (the formula of Meta's reference code)."""
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rotary_inv_freq(rope_parameters: dict, rotary_dim: int) -> torch.Tensor:
    """[rotary_dim / 2] angle per position of each channel pair (float64)."""
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    base = rope_parameters["rope_theta"]
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    if rope_type == "linear":
        inv_freq = inv_freq / rope_parameters["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_parameters)
    return inv_freq


def rotary_cos_sin_cache(rope_parameters: dict, rotary_dim: int,
                         max_positions: int) -> torch.Tensor:
    """[max_positions, rotary_dim]: cos of every position x frequency, then sin (float32)."""
    inv_freq = rotary_inv_freq(rope_parameters, rotary_dim)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()
