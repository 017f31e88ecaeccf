"""Rotary tables: frequencies against transformers' own rope initialisation for every scaled
rope type, and the cos/sin table against its definition."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedserve.executor.models.rope import rotary_cos_sin_cache, rotary_inv_freq

HEAD_DIM = 64
SCALED = [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("params", SCALED, ids=lambda p: p["rope_type"])
def test_scaled_frequencies_match_transformers(params):
    config = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4,
                         max_position_embeddings=512, rope_parameters=params)
    expected, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    # transformers computes in float32.
    torch.testing.assert_close(rotary_inv_freq(params, HEAD_DIM).float(), expected.float(),
                               rtol=1e-6, atol=0)


def test_cos_sin_table_follows_the_definition():
    params = {"rope_type": "default", "rope_theta": 10000.0}
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM)
    angles = torch.arange(512).double()[:, None] * inv_freq
    expected = torch.cat((angles.cos(), angles.sin()), dim=-1).float()
    torch.testing.assert_close(rotary_cos_sin_cache(params, HEAD_DIM, 512), expected)


def test_unknown_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        rotary_cos_sin_cache({"rope_type": "yarn", "rope_theta": 1.0}, 8, 4)
