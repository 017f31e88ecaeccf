"""GGUF run natively: the block formats unpack to what the `gguf` package dequantizes (exactly),
the grouped kernels against a float64 product on the dequantized weights, and tiny LLaMA GGUFs
of every format run quantized as transformers runs their dequantized conversion."""


import dataclasses

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from pagedserve.executor.gguf_blocks import GROUPED_FORMATS, grouped
from pagedserve.executor.model_files import ModelLoadError, resolve_model
from pagedserve.executor.models import load_model
from pagedserve.executor.models.layers import Linear, bind_kernels, weight_bytes
from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.dispatch import cpu_kernels as cpu_kernel_set
from pagedserve.kernels.dispatch import select_kernels
from pagedserve.kernels.quantization import GroupedWeight, grouped_linear
from pagedserve.testing.gguf_files import QUANTIZABLE, random_blocks, write_gguf
from pagedserve.testing.paged_run import assert_matches_transformers
from pagedserve.testing.tiny_models import byte_level_tokenizer, tiny_llama_config

Q = gguf.GGMLQuantizationType
needs_c = pytest.mark.skipif(not cpu_kernels.available(),
                             reason="no C compiler: the CPU kernels are not built")
PROMPTS = [[5], [7, 8, 9], list(range(20, 27)), list(range(40, 52))]


def grouped_weight(raw: np.ndarray, qtype: Q, columns: int) -> GroupedWeight:
    values, scales, offsets = grouped(raw, qtype, columns)
    return GroupedWeight(torch.from_numpy(values), torch.from_numpy(scales),
                         None if offsets is None else torch.from_numpy(offsets))


VALUE_RANGES = {Q.Q8_0: (-127, 127), Q.Q4_0: (0, 15), Q.Q4_1: (0, 15), Q.Q5_0: (0, 31),
                Q.Q5_1: (0, 31), Q.Q2_K: (0, 3), Q.Q3_K: (0, 7), Q.Q4_K: (0, 15),
                Q.Q5_K: (0, 31), Q.Q6_K: (-32, 31)}


@pytest.mark.parametrize("qtype", GROUPED_FORMATS, ids=lambda q: q.name)
def test_each_format_unpacks_to_the_values_gguf_dequantizes(qtype):
    rows, columns = 5, 512
    if qtype in QUANTIZABLE:
        weights = np.random.default_rng(0).standard_normal((rows, columns)).astype(np.float32)
        raw = gguf.quants.quantize(weights, qtype)
    else:
        raw = random_blocks(rows, columns, qtype, seed=0)
    weight = grouped_weight(raw, qtype, columns)
    expected = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(weight.dequantized(torch.float32).numpy(), expected)
    assert weight.qweight.dtype == torch.int8
    assert weight.group_size == (16 if qtype in (Q.Q2_K, Q.Q3_K, Q.Q6_K) else 32)
    # The values' range (gguf_blocks.py's table): what decides how the kernels pack them.
    low, high = VALUE_RANGES[qtype]
    assert low <= int(weight.qweight.min()) and int(weight.qweight.max()) <= high


def reference(x: torch.Tensor, weight: GroupedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.to(torch.float64) @ weight.dequantized(torch.float64).T
    return y if bias is None else y + bias.to(torch.float64)


# The values' range of each width the C kernel packs (quantization.value_bits), bounds
# included: 4 and 5 bits unsigned (GGUF's Q4 and Q5 formats), 6 signed (Q6_K).
BIT_RANGES = {4: (0, 15), 5: (0, 31), 6: (-32, 31), 8: (-128, 127)}


def strips(rows: int, bits: int, dtype: torch.dtype) -> bool:
    """Whether the C kernel dequantizes strips to bfloat16 for these rows (int8_linear.c: more
    than 4 rows of 8-bit values, more than 8 of narrower ones, bfloat16 x)."""
    return dtype == torch.bfloat16 and rows > (4 if bits == 8 else 8)


def random_grouped(n: int, k: int, group: int, bits: int, offsets: bool, seed: int,
                   half_factors: bool = False) -> GroupedWeight:
    """Random values of `bits` bits (their range's ends included) and factors;
    `half_factors`: factors that float16 holds exactly (as GGUF's Q8_0, Q4_0 and Q4_1 store
    them), else float32 ones it does not."""
    gen = torch.Generator().manual_seed(seed)
    low, high = BIT_RANGES[bits]
    factors = [torch.rand(n, k // group, generator=gen) / 16,
               torch.randn(n, k // group, generator=gen) / 8 if offsets else None]
    if half_factors:
        factors = [None if f is None else f.half().float() for f in factors]
    values = torch.randint(low, high + 1, (n, k), generator=gen, dtype=torch.int8)
    values[0, :2] = torch.tensor([low, high])
    return GroupedWeight(values, *factors)


def assert_close_to(y: torch.Tensor, expected: torch.Tensor, weights_in_bf16: bool) -> None:
    """Within float32 sums, or bfloat16's rounding where the output (and, on the kernel's path
    for many bf16 rows, `strips`, the dequantized weights) are bfloat16."""
    rel = 2.0 ** -7 if weights_in_bf16 else 2.0 ** -8 if y.dtype == torch.bfloat16 else 1e-5
    scale = expected.abs().max()
    assert ((y.to(torch.float64) - expected).abs() <= rel * (expected.abs() + scale)).all()


@needs_c
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits, offsets, group, half", [
    (4, True, 32, True), (4, True, 32, False), (8, False, 32, True), (6, False, 16, False),
    (4, False, 128, False), (8, True, 8, False), (5, True, 32, True), (5, True, 32, False),
    (6, True, 8, False)],
    ids=["q4_1", "q4-offsets", "q8_0", "q6_k", "q4-g128", "q8-offsets-g8", "q5_1", "q5_k",
         "q6-offsets-g8"])
def test_c_grouped_linear_against_float64(rows, dtype, bits, offsets, group, half):
    n, k = 37, 256  # N not a multiple of 16
    weight = random_grouped(n, k, group, bits, offsets, seed=rows * group,
                            half_factors=half)
    packed = cpu_kernels.pack_grouped_cpu(weight)
    assert packed.bits == bits
    # The values in `bits` bits each, channels padded to blocks of 16.
    assert packed.data.numel() == -(-n // 16) * 16 * k * bits // 8
    assert packed.scales.dtype == (torch.float16 if half else torch.float32)
    plain = packed.plain()
    assert torch.equal(plain.qweight, weight.qweight)
    assert torch.equal(plain.scales, weight.scales)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k + 8, generator=gen).to(dtype)[:, 3:3 + k]  # strided rows
    bias = torch.randn(n, generator=gen).to(dtype)
    for b in (bias, None):
        y = cpu_kernels.quantized_linear_cpu(x, packed, b)
        assert y.shape == (rows, n) and y.dtype == dtype
        assert_close_to(y, reference(x, weight, b), weights_in_bf16=strips(rows, bits, dtype))
    # The PyTorch set's matmul, for every device.
    assert_close_to(grouped_linear(x, weight, bias), reference(x, weight, bias), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, group, offsets, bits", [
    (1, 16, False, 6), (5, 32, True, 4), (17, 128, True, 4), (2, 32, True, 5),
    (3, 256, False, 8)])
def test_triton_grouped_linear_against_float64(rows, group, offsets, bits, dtype):
    """Under TRITON_INTERPRET=1 here (float16: its interpreter gets bfloat16 products wrong);
    compiled on a GPU. Values of 4 to 6 bits held in their bits (NarrowWeight), 8-bit ones a
    byte each; group 256 is one group per row: a weight-only Int8Weight's case."""
    from pagedserve.kernels.triton_quantization import (
        NarrowWeight,
        pack_quantized_triton,
        quantized_linear_triton,
    )

    n, k = 70, 256  # N not a multiple of the 64-channel tile
    weight = random_grouped(n, k, group, bits=bits, offsets=offsets, seed=rows)
    packed = pack_quantized_triton(weight)
    if bits == 8:
        assert packed is weight
    else:
        assert isinstance(packed, NarrowWeight) and packed.bits == bits
        factors = weight.nbytes - weight.qweight.numel()
        assert packed.nbytes == factors + n * k * bits // 8
        assert torch.equal(packed.plain().qweight, weight.qweight)
        ids = torch.tensor([69, 0, 33])
        assert torch.equal(packed.rows(ids, torch.float32), weight.rows(ids, torch.float32))
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k + 8, generator=gen).to(dtype)[:, 3:3 + k]
    bias = torch.randn(n, generator=gen).to(dtype)
    y = quantized_linear_triton(x, packed, bias)
    assert y.shape == (rows, n) and y.dtype == dtype
    expected = reference(x, weight, bias)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    else:  # the dequantized weights and the output rounded to float16
        assert ((y.double() - expected).abs() <= 2e-3 * expected.abs().max()).all()


def int16_activations_reference(x: torch.Tensor, weight: GroupedWeight) -> torch.Tensor:
    """x W^T with each group of x's rows rounded to int16 by its largest magnitude (float32
    steps: q = round_half_even(x 32767 / amax), dx = amax / 32767), in float64: the sums
    s dx sum(q_w q_x) + o sum(x) that int8_linear.c's grouped_block_a16 takes."""
    rows, group = x.shape[0], weight.group_size
    xg = x.float().reshape(rows, -1, group)
    amax = xg.abs().amax(-1, keepdim=True)
    q = torch.round(xg * torch.where(amax > 0, 32767.0 / amax, 0.0))
    dx = (amax / 32767.0).double()[..., 0]  # [rows, groups]
    values = weight.qweight.double().reshape(weight.qweight.shape[0], -1, group)
    sums = torch.einsum("rgk,ngk->rng", q.double(), values)
    y = (sums * dx[:, None] * weight.scales.double()).sum(-1)
    if weight.offsets is not None:
        y += (xg.double().sum(-1)[:, None] * weight.offsets.double()).sum(-1)
    return y


@needs_c
@pytest.mark.parametrize("rows", [1, 2, 4, 7, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offsets, group, half", [(True, 32, True), (False, 32, True),
                                                  (True, 16, False)],
                         ids=["q4_1", "q4_0", "q4_k-g16"])
def test_c_4_bit_values_by_16_bit_activations(rows, dtype, offsets, group, half):
    """GGUF's 4-bit weights (`int16_activations`) by x rounded per group to int16 where the
    kernels do so (AVX2, up to 8 rows; 7: 4 at a time, then 3): as the float64 sums of those
    integers, and within the rounding's bound of the float product,
    |y - x W^T| <= sum |s q_w| dx / 2. Elsewhere (AVX-512 builds, 9+ rows) by x as it is."""
    n, k = 37, 256
    weight = dataclasses.replace(random_grouped(n, k, group, 4, offsets, seed=rows + group,
                                                half_factors=half), int16_activations=True)
    packed = cpu_kernels.pack_grouped_cpu(weight)
    assert packed.int16_activations and packed.plain().int16_activations
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k + 8, generator=gen).to(dtype)[:, 3:3 + k]  # strided rows
    x[0, :group] *= 1e-3  # a group far smaller than the others: its own scale
    bias = torch.randn(n, generator=gen).to(dtype)
    y = cpu_kernels.quantized_linear_cpu(x, packed, bias)
    exact = reference(x, weight, bias)
    if not (cpu_kernels.int16_activations_supported() and rows <= 8):
        assert_close_to(y, exact, weights_in_bf16=strips(rows, 4, dtype))
        return
    assert_close_to(y, int16_activations_reference(x, weight) + bias.double(),
                    weights_in_bf16=False)
    xg = x.double().reshape(rows, -1, group)
    dx = xg.abs().amax(-1) / 32767  # [rows, groups]
    weights = (weight.scales.double()[:, :, None]
               * weight.qweight.double().reshape(n, -1, group)).abs().sum(-1)  # [n, groups]
    bound = (dx @ weights.T) / 2
    rounding = 1e-5 if dtype == torch.float32 else 2.0 ** -8  # assert_close_to's
    error = (y.double() - exact).abs()
    assert (error <= bound + rounding * (exact.abs() + exact.abs().max())).all()


@needs_c
@pytest.mark.parametrize("group", [16, 32, 128])
def test_16_bit_activation_sums_at_their_largest(group):
    """The largest sums 16-bit activations make (values 15, every q_x +-32767) are exact in
    the kernel's int32 sums."""
    n, k = 16, 256
    weight = GroupedWeight(torch.full((n, k), 15, dtype=torch.int8), torch.ones(n, k // group),
                           None, int16_activations=True)
    x = torch.ones(4, k)
    x[1] = -1
    x[2, ::2] = -1  # alternating signs
    x[3] = 0.5
    y = cpu_kernels.quantized_linear_cpu(x, cpu_kernels.pack_grouped_cpu(weight), None)
    torch.testing.assert_close(y.double(), reference(x, weight, None), rtol=1e-7, atol=0)


@needs_c
@pytest.mark.parametrize("bits, k, group, packed_bits", [
    (4, 40, 8, 4),    # 4-bit units span 8 k: five rows of them
    (6, 48, 16, 6),   # 6-bit high bits span 16 k
    (5, 96, 32, 5),   # 5-bit fifth bits span 32 k
    (5, 48, 16, 8),   # K not whole 32-k units of fifth bits: a byte each
    (6, 24, 8, 8)])   # nor 16-k units of 6-bit high bits
def test_narrow_planes_at_the_edges_of_their_units(bits, k, group, packed_bits):
    """K that fills a plane's 16-bit units exactly, with a different count of groups per unit
    each time, and K that does not (packed a byte each instead), through every kernel path."""
    weight = random_grouped(19, k, group, bits, offsets=True, seed=k)
    packed = cpu_kernels.pack_grouped_cpu(weight)
    assert packed.bits == packed_bits
    assert torch.equal(packed.plain().qweight, weight.qweight)
    for rows, dtype in [(1, torch.bfloat16), (6, torch.bfloat16), (9, torch.bfloat16),
                        (2, torch.float32)]:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        assert_close_to(cpu_kernels.quantized_linear_cpu(x, packed, None),
                        reference(x, weight, None),
                        weights_in_bf16=strips(rows, packed_bits, dtype))


@needs_c
@pytest.mark.parametrize("bits, group", [(4, 32), (5, 32), (6, 16)])
def test_float32_rows_sum_the_values_themselves(bits, group):
    """Float32 x (the exactness path) sums q x over the values as stored, not over the 128 + q
    the bfloat16 path feeds vdpbf16ps: that base, taken off through the offsets, made the sums
    ten times larger and their rounding with them (1.9e-6 of the output's scale at K = 1536
    against 2e-7; three tensor-parallel ranks then drifted from one by 1.5e-4 in a logprob)."""
    n, k = 64, 1536  # the default model's down projection's K
    weight = random_grouped(n, k, group, bits, offsets=True, seed=bits)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(bits))
    expected = reference(x, weight, None)
    y = cpu_kernels.quantized_linear_cpu(x, cpu_kernels.pack_grouped_cpu(weight), None)
    assert ((y.double() - expected).abs() / (expected.abs() + expected.abs().max())).max() < 5e-7


@needs_c
def test_values_pack_in_their_fewest_bits_or_a_byte_each():
    weight = random_grouped(16, 64, 32, bits=5, offsets=True, seed=2)
    for bits in (None, 5, 8):
        packed = cpu_kernels.pack_grouped_cpu(weight, bits)
        assert packed.bits == (bits or 5)
        assert torch.equal(packed.plain().qweight, weight.qweight)
    for bits in (4, 6):  # too few bits, or a signed width for unsigned values
        with pytest.raises(ValueError, match=f"packed in 5 or 8, not {bits}"):
            cpu_kernels.pack_grouped_cpu(weight, bits)


def test_groups_the_kernel_cannot_take_stay_on_the_pytorch_path():
    weight = random_grouped(16, 48, 12, bits=8, offsets=False, seed=0)
    assert cpu_kernels.pack_grouped_cpu(weight) is weight


# Formats per GGUF tensor: one format everywhere, or Q4_K with Q6_K where llama.cpp's Q4_K_M
# puts it (v and the output head), so that one packed q/k/v layer mixes groups of 32 and 16.
def q4_k_m(name: str) -> Q:
    return Q.Q6_K if name.endswith(("attn_v.weight", "output.weight", "token_embd.weight")) \
        else Q.Q4_K


def q5_k_m(name: str) -> Q:
    return Q.Q6_K if name.endswith(("attn_v.weight", "output.weight")) else Q.Q5_K


def q3_k_m(name: str) -> Q:
    return Q.Q4_K if name.endswith("attn_v.weight") else Q.Q6_K \
        if name.endswith("token_embd.weight") else Q.Q3_K


FORMATS = {"Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1, "Q5_0": Q.Q5_0, "Q5_1": Q.Q5_1,
           "Q2_K": Q.Q2_K, "Q3_K_M": q3_k_m, "Q4_K_M": q4_k_m, "Q5_K_M": q5_k_m}


def tiny_gguf(tmp_path, fmt: str, tie: bool):
    """A tiny LLaMA as a GGUF of `fmt`, and the directories of its two conversions."""
    k_format = "_K" in fmt  # K formats' super-blocks need rows of 256
    sizes = dict(hidden_size=256, intermediate_size=512, head_dim=64) if k_format else {}
    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_llama_config(len(byte_level_tokenizer()),
                                               tie_word_embeddings=tie, **sizes)).eval()
    path = tmp_path / f"tiny-{fmt}.gguf"
    write_gguf(model, byte_level_tokenizer(), path, quant=FORMATS[fmt])
    native = resolve_model(str(path), tmp_path / "cache")
    dequantized = resolve_model(str(path), tmp_path / "cache", gguf_dequantize=True)
    return native, dequantized


@pytest.mark.parametrize("kernel_set", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("fmt, tie", [("Q8_0", True), ("Q4_0", False), ("Q4_1", True),
                                      ("Q5_0", True), ("Q5_1", False), ("Q2_K", False),
                                      ("Q3_K_M", True), ("Q4_K_M", False), ("Q5_K_M", True)])
def test_a_native_gguf_runs_as_transformers_runs_its_dequantized_conversion(
        tmp_path, fmt, tie, kernel_set):
    if kernel_set == "cpu" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    native, dequantized = tiny_gguf(tmp_path, fmt, tie)
    assert native.path != dequantized.path
    assert native.config["quantization_config"] == {"quant_method": "gguf"}
    model = load_model(native.path, torch.float32)
    assert model.quantization == "gguf"
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    # GGUF's weights may take 16-bit activations (checked below and by
    # test_c_4_bit_values_by_16_bit_activations); off first, so that the layout is checked exactly.
    assert all(m.quantized.int16_activations for m in linears)
    for m in linears:
        m.quantized = dataclasses.replace(m.quantized, int16_activations=False)
    bind_kernels(model, select_kernels(kernel_set, torch.device("cpu")))
    # Every linear layer quantized, the LM head too (a tied one gets its own copy), and their
    # float weights released.
    assert linears and all(m.quantized is not None and m.weight.numel() == 0 for m in linears)
    # A layer mixing formats (q4_k_m's q/k/v) packs in its widest values' bits.
    bits = {"Q8_0": {8}, "Q4_0": {4}, "Q4_1": {4}, "Q5_0": {5}, "Q5_1": {5}, "Q2_K": {4},
            "Q3_K_M": {4, 6}, "Q4_K_M": {4, 6}, "Q5_K_M": {5, 6}}[fmt]
    if kernel_set == "cpu":
        assert {type(m.quantized) for m in linears} == {cpu_kernels.PackedGroupedWeight}
        assert {m.quantized.bits for m in linears} == bits
    elif kernel_set == "triton":  # values of 4 to 6 bits held in them, 8-bit ones a byte
        from pagedserve.kernels.triton_quantization import NarrowWeight

        assert {getattr(m.quantized, "bits", 8) for m in linears} == bits
        assert {type(m.quantized) for m in linears} == (
            {GroupedWeight} if bits == {8} else {NarrowWeight})
    if fmt == "Q4_K_M":  # q and k in groups of 32, v of 16: the layer holds groups of 16
        qkv = model.model.layers[0].self_attn.qkv_proj.quantized.plain()
        assert qkv.group_size == 16
    hf = AutoModelForCausalLM.from_pretrained(dequantized.path, dtype=torch.float32).eval()
    assert_matches_transformers(model, hf, PROMPTS, chunk=5, decode_steps=3, tol=1e-4)
    if kernel_set == "cpu":  # as loaded: activations rounded to 16 bits (where built)
        for m in linears:
            m.quantized = dataclasses.replace(m.quantized, int16_activations=True)
        assert_matches_transformers(model, hf, PROMPTS, chunk=5, decode_steps=3, tol=1e-3)


@pytest.mark.parametrize("tie", [True, False])
def test_native_weights_take_what_the_formats_hold(tmp_path, tie):
    """Int8 values (one byte each; 4-bit ones packed two to a byte by the CPU kernels) with two
    float32 factors per group of 32, in place of every float32 matrix, the embedding's
    included: a tied head and its embedding hold one weight."""
    native, dequantized = tiny_gguf(tmp_path, "Q4_1", tie)
    float_bytes = weight_bytes(load_model(dequantized.path, torch.float32))
    model = load_model(native.path, torch.float32)
    embedding = model.model.embed_tokens
    assert embedding.weight.numel() == 0
    assert (embedding.tied_head is model.lm_head) == tie
    assert (embedding.quantized is None) == tie
    weights = {id(m.quantized): m.quantized for m in model.modules()
               if getattr(m, "quantized", None) is not None}
    values = sum(w.qweight.numel() for w in weights.values())
    assert weight_bytes(model) == float_bytes - values * 4 + values + values // 32 * 8
    if cpu_kernels.available():  # the Linears' values two to a byte, channels padded to 16
        linears = [m.quantized.qweight.shape for m in model.modules() if isinstance(m, Linear)]
        before = weight_bytes(model)
        bind_kernels(model, cpu_kernel_set())
        # Q4_1's factors are float16 in the file: two bytes each once packed.
        padded = sum(-(-n // 16) * 16 * (k // 2 + k // 32 * 4) - n * k // 32 * 8
                     for n, k in linears)
        assert weight_bytes(model) == before - sum(n * k for n, k in linears) + padded
        # The embedding reads its rows from the packed head.
        ids = torch.tensor([0, 5, 17, 200])
        hf = AutoModelForCausalLM.from_pretrained(dequantized.path, dtype=torch.float32)
        torch.testing.assert_close(embedding(ids), hf.model.embed_tokens(ids), rtol=0, atol=0)


def test_a_format_that_does_not_run_natively_is_refused_by_name(tmp_path):
    model = LlamaForCausalLM(tiny_llama_config(len(byte_level_tokenizer()), hidden_size=256,
                                               intermediate_size=512, head_dim=64)).eval()
    path = tmp_path / "tiny.gguf"
    write_gguf(model, byte_level_tokenizer(), path, quant=Q.TQ2_0)
    with pytest.raises(ModelLoadError, match=r"token_embd\.weight: GGUF format TQ2_0 does not "
                                             r"run natively .*--gguf-dequantize loads it"):
        resolve_model(str(path), tmp_path / "cache")
    assert resolve_model(str(path), tmp_path / "cache", gguf_dequantize=True).config.get(
        "quantization_config") is None


def test_row_parallel_ranks_take_their_columns_of_the_groups():
    """A row-parallel rank loads its column slice of the values and of the group scales and
    offsets, and the ranks' partial sums add up to the whole layer."""
    from pagedserve.executor.models.layers import RowParallelLinear
    from pagedserve.executor.parallel import TensorParallel

    weight = random_grouped(5, 128, 32, bits=4, offsets=True, seed=1)
    x = torch.randn(3, 128)
    total = 0
    for rank in range(2):
        layer = RowParallelLinear(128, [5], False, torch.float32,
                                  TensorParallel(rank=rank, size=2), reduce=False)
        layer.checkpoint_w8a8 = False
        layer.load_part(0, "weight", weight.qweight)
        layer.load_part(0, "weight_scale", weight.scales)
        layer.load_part(0, "weight_offset", weight.offsets)
        columns = slice(rank * 64, (rank + 1) * 64)
        assert torch.equal(layer.quantized.qweight, weight.qweight[:, columns])
        assert torch.equal(layer.quantized.scales, weight.scales[:, rank * 2:(rank + 1) * 2])
        assert torch.equal(layer.quantized.offsets, weight.offsets[:, rank * 2:(rank + 1) * 2])
        total = total + layer(x[:, columns])
    torch.testing.assert_close(total, x @ weight.dequantized(torch.float32).T)
