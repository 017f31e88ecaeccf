"""Int8 weights (`--quantization int8` / `w8a8_int8`): the quantizers, the C kernel and the
PyTorch matmul against a float64 product on the dequantized weights (same math), and every
model family quantized against transformers running the same dequantized weights (and, for
W8A8, the same per-token activation quantization)."""

import dataclasses

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from pagedserve.executor.models import load_model
from pagedserve.executor.models.layers import Linear, bind_kernels, quantize_linears, weight_bytes
from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.dispatch import TORCH_KERNELS
from pagedserve.kernels.dispatch import cpu_kernels as cpu_kernel_set
from pagedserve.kernels.quantization import (
    SCHEMES,
    Fp8Weight,
    Int8Weight,
    fp8_linear,
    int8_linear,
    quantize_fp8,
    quantize_int8,
    quantize_per_token,
    scaled_mm,
)
from pagedserve.testing.paged_run import assert_matches_transformers
from pagedserve.testing.tiny_models import (
    save_tiny_llama,
    save_tiny_model,
    tiny_falcon_config,
    tiny_gpt_neox_config,
    tiny_mistral_config,
    tiny_qwen2_config,
)

needs_c = pytest.mark.skipif(not cpu_kernels.available(),
                             reason="no C compiler: the CPU kernels are not built")

# (rows, out features, in features): one to four tokens (W8A16's small-batch path); tails of
# every kind (N not a multiple of 16, K not of 4 or 16); more rows than a tile (6) and than a
# row block (192).
SHAPES = [(1, 64, 64), (2, 40, 36), (3, 17, 8), (4, 100, 128), (5, 33, 20), (7, 100, 36),
          (13, 49, 9), (64, 96, 128), (200, 17, 64)]


def reference(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """The product in float64 on the dequantized weight (and, for W8A8, on the activations as
    quantize_per_token makes them)."""
    rows = x.to(torch.float64)
    if weight.dynamic_activations:
        q, scales = quantize_per_token(x, weight.activation_levels)
        rows = q.to(torch.float64) * scales.to(torch.float64)[:, None]
    y = rows @ (weight.qweight.to(torch.float64) * weight.scales.to(torch.float64)[:, None]).T
    return y if bias is None else y + bias.to(torch.float64)


def assert_close_to(y: torch.Tensor, expected: torch.Tensor) -> None:
    """Within the output dtype's rounding (bfloat16: 8 significant bits) plus float32 sums."""
    rel = 2.0 ** -8 if y.dtype == torch.bfloat16 else 1e-5
    bound = rel * expected.abs() + 1e-5 * expected.abs().max()
    assert ((y.to(torch.float64) - expected).abs() <= bound).all(), \
        ((y.to(torch.float64) - expected).abs() - bound).max()


def test_weights_are_rounded_per_output_channel():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=gen) * torch.logspace(-3, 2, 40)[:, None]
    w[7] = 0
    q = quantize_int8(w, dynamic_activations=False)
    assert q.qweight.dtype == torch.int8 and q.scales.dtype == torch.float32
    torch.testing.assert_close(q.scales, w.abs().amax(dim=1) / 127)
    assert q.qweight.abs().amax(dim=1)[torch.arange(40) != 7].eq(127).all()
    assert q.qweight.min() >= -127
    assert q.qweight[7].eq(0).all() and q.scales[7] == 0
    # Each value within half a step of its channel's scale.
    assert ((q.dequantized(torch.float32) - w).abs() <= q.scales[:, None] / 2 * 1.0001).all()


def test_activations_are_rounded_per_token_to_nearest_even():
    """127 levels (ours, as vLLM's) in [-127, 127]; 127.5 (compressed-tensors') in [-128, 127]."""
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, 0.0], [-127.0, 3.0, 0, 0, 0], [0.0] * 5])
    q, scales = quantize_per_token(x)
    assert q.tolist() == [[127, 0, 2, -2, 0], [-127, 3, 0, 0, 0], [0] * 5]
    assert scales.tolist() == [1.0, 1.0, 0.0]
    x[:, 0] *= 127.5 / 127  # the largest magnitudes 127.5: scale 1 again
    q, scales = quantize_per_token(x, levels=127.5)
    assert q.tolist() == [[127, 0, 2, -2, 0], [-128, 3, 0, 0, 0], [0] * 5]
    assert scales.tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("dynamic", [False, True], ids=["w8a16", "w8a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_int8_linear_against_float64(dynamic, dtype):
    gen = torch.Generator().manual_seed(1)
    weight = quantize_int8(torch.randn(33, 20, generator=gen), dynamic)
    x = torch.randn(2, 3, 20, generator=gen).to(dtype)
    bias = torch.randn(33, generator=gen).to(dtype)
    y = int8_linear(x, weight, bias)
    assert y.shape == (2, 3, 33) and y.dtype == dtype
    assert_close_to(y.reshape(6, 33), reference(x.reshape(6, 20), weight, bias))


@needs_c
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dynamic, levels", [(False, 127.0), (True, 127.0), (True, 127.5)],
                         ids=["w8a16", "w8a8", "w8a8-compressed-tensors"])
def test_c_int8_linear_against_float64(shape, dtype, dynamic, levels):
    rows, n, k = shape
    gen = torch.Generator().manual_seed(rows * n + k)
    weight = dataclasses.replace(quantize_int8(torch.randn(n, k, generator=gen), dynamic),
                                 activation_levels=levels)
    packed = cpu_kernels.pack_int8_cpu(weight)
    # Strided rows (a view into wider rows, as a q/k/v split leaves them), with and without bias.
    x = torch.randn(rows, k + 8, generator=gen).to(dtype)[:, 3:3 + k]
    bias = torch.randn(n, generator=gen).to(dtype)
    for b in (bias, None):
        y = cpu_kernels.int8_linear_cpu(x, packed, b)
        assert y.shape == (rows, n) and y.dtype == dtype
        assert_close_to(y, reference(x, weight, b))


@needs_c
def test_c_w8a8_sums_exactly_in_integers():
    """Activations that quantize to themselves (integers, and -127.5 as the largest, which
    quantizes to -128 with compressed-tensors' 127.5 levels: scale 1) and unit weight scales:
    the float32 output is the exact integer product, the extreme values of both included."""
    gen = torch.Generator().manual_seed(2)
    qx = torch.randint(-127, 128, (9, 40), generator=gen)
    qw = torch.randint(-128, 128, (21, 40), generator=gen, dtype=torch.int8)
    qw[:, 1] = -128
    x = qx.to(torch.float32)
    x[:, 0] = -127.5
    qx[:, 0] = -128
    packed = cpu_kernels.pack_int8_cpu(Int8Weight(qw, torch.ones(21), dynamic_activations=True,
                                                  activation_levels=127.5))
    y = cpu_kernels.int8_linear_cpu(x, packed, None)
    assert torch.equal(y.to(torch.int64), qx @ qw.to(torch.int64).T)


@needs_c
@pytest.mark.parametrize("k", [22, 24])
def test_packing_keeps_the_weight(k):
    weight = quantize_int8(torch.randn(37, k), dynamic_activations=True)
    packed = cpu_kernels.pack_int8_cpu(weight)
    if cpu_kernels.int8_arithmetic_supported():
        # ceil(37 / 16) groups of 16 channels, ceil(k / 4) k-quads
        assert packed.data.shape == (3, -(-k // 4), 16, 4)
    elif k % 8:
        assert packed is weight  # the grouped kernel takes K in multiples of 8
    else:  # one byte per value, k-major per block of 16 channels
        assert packed.grouped.bits == 8 and packed.grouped.data.shape == (3, k * 16)
    plain = packed.plain()
    assert torch.equal(plain.qweight, weight.qweight) and torch.equal(plain.scales, weight.scales)
    assert plain.dynamic_activations


VOCAB = 300
PROMPTS = [[5], [7, 8, 9], list(range(20, 27)), list(range(40, 52))]
FAMILIES = {
    "llama": None,  # save_tiny_llama (tied LM head)
    "mistral": lambda: tiny_mistral_config(VOCAB, sliding_window=8),
    "qwen2": lambda: tiny_qwen2_config(VOCAB),
    "gpt-neox": lambda: tiny_gpt_neox_config(VOCAB),
    "falcon": lambda: tiny_falcon_config(VOCAB, bias=True, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            directory = tmp_path_factory.mktemp(family)
            config = FAMILIES[family]
            cache[family] = (save_tiny_llama(directory) if config is None
                             else save_tiny_model(directory, config()))
        return cache[family]
    return get


class _QuantizedLinear(nn.Module):
    """transformers' nn.Linear as the quantized layer computes it: the dequantized weight,
    and for W8A8 the activations quantized per token and dequantized."""

    def __init__(self, linear: nn.Linear, dynamic: bool):
        super().__init__()
        self.weight = quantize_int8(linear.weight.data, dynamic)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = reference(rows, self.weight, self.bias).to(x.dtype)
        return y.reshape(*x.shape[:-1], -1)


def quantized_transformers(directory, dynamic: bool) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, _QuantizedLinear(child, dynamic))
    return model


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kernel_set", ["cpu", "torch"])
def test_every_family_quantized_matches_transformers_on_the_same_int8_weights(
        family_dirs, family, scheme, kernel_set):
    if kernel_set == "cpu" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    directory = family_dirs(family)
    model = load_model(directory, torch.float32)
    quantize_linears(model, scheme)
    bind_kernels(model, cpu_kernel_set() if kernel_set == "cpu" else TORCH_KERNELS)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.quantized is not None for m in linears)
    if kernel_set == "cpu":
        packed = cpu_kernels.PackedInt8Weight if cpu_kernels.int8_arithmetic_supported() \
            else cpu_kernels.GroupedInt8Weight
        assert all(isinstance(m.quantized, packed) for m in linears)
    # W8A8: an activation within the last bit of a rounding boundary may round the other way
    # in one of the two paths (their float32 inputs differ in the last bit), moving an output
    # by one quantum, which the layers after it carry on: measured when written, most cases
    # agree within 5e-5, and two differ by 0.035 and 0.061 on logits up to 2.5. The exact
    # arithmetic is the kernel tests' (test_c_int8_linear_against_float64); this test checks
    # the wiring, where a wrong scale or layout is off by far more.
    tol = 1e-1 if SCHEMES[scheme] else 1e-4
    assert_matches_transformers(model, quantized_transformers(directory, SCHEMES[scheme]),
                                PROMPTS, chunk=5, decode_steps=3, tol=tol)


def test_quantized_weights_take_about_a_quarter_of_float32(family_dirs):
    """The weight bytes follow the int8 storage: a model of float32 linears and an untied
    LM head quantizes to about a quarter, embeddings and norms staying float32."""
    directory = family_dirs("mistral")
    model = load_model(directory, torch.float32)
    before = weight_bytes(model)
    embedding = model.model.embed_tokens.weight
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, Linear))
    quantize_linears(model, "int8")
    after = weight_bytes(model)
    assert after < before
    # int8 values (a quarter of float32) plus one float32 scale per output row.
    expected = before - linear_bytes + linear_bytes // 4 + sum(
        m.quantized.scales.numel() * 4 for m in model.modules() if isinstance(m, Linear))
    assert after == expected
    assert embedding.numel() > 0


def test_a_tied_embedding_keeps_its_float_weight(family_dirs):
    model = load_model(family_dirs("llama"), torch.float32)
    embedding = model.model.embed_tokens.weight.clone()
    quantize_linears(model, "w8a8_int8")
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.lm_head.quantized is not None


def test_an_unknown_scheme_is_refused_by_name(family_dirs):
    model = load_model(family_dirs("llama"), torch.float32)
    with pytest.raises(ValueError, match="quantization 'int4' is not one of int8, w8a8_int8"):
        quantize_linears(model, "int4")


def test_the_engine_option_quantizes_what_it_serves(family_dirs):
    """`LLM(..., quantization="int8")` (the executor's --quantization) serves the int8 model:
    its greedy tokens are transformers' on the same dequantized weights."""
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.v1.common_pb2 import SamplingParams

    directory = family_dirs("llama")
    prompt = [5, 9, 23, 40]
    hf = quantized_transformers(directory, dynamic=False)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                               pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    with LLM(str(directory), dtype="float32", quantization="int8", kv_cache_gib=0.01) as llm:
        assert all(m.quantized is not None for m in llm._runner.model.modules()
                   if isinstance(m, Linear))
        out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0,
                                                     ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected


def test_metrics_show_what_sizes_each_executors_memory():
    """/metrics (the gateway's, from the scheduler's stats): weight and KV pool bytes per
    executor, and the quantization and cache dtype that size them."""
    from pagedserve.gateway.metrics import GatewayMetrics
    from pagedserve.v1 import scheduler_pb2

    stats = scheduler_pb2.SchedulerStats(executors=[
        scheduler_pb2.ExecutorStats(executor_id="a", total_blocks=10, weight_bytes=1234,
                                    kv_cache_bytes=20480, quantization="w8a8_int8",
                                    kv_cache_dtype="float8_e4m3fn"),
        scheduler_pb2.ExecutorStats(executor_id="b", total_blocks=5, kv_cache_dtype="bfloat16")])
    text = GatewayMetrics().exposition(stats).decode()
    assert 'pagedserve_weight_bytes{executor="a"} 1234.0' in text
    assert 'pagedserve_kv_cache_bytes{executor="a"} 20480.0' in text
    assert ('pagedserve_executor_info{executor="a",kv_cache_dtype="float8_e4m3fn",'
            'quantization="w8a8_int8"} 1.0') in text
    assert ('pagedserve_executor_info{executor="b",kv_cache_dtype="bfloat16",'
            'quantization="none"} 1.0') in text


def fp8_reference(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """The product in float64 of the e4m3 operands as the scheme makes them: x quantized per
    token (amax / 448), W per channel."""
    rows = quantize_fp8(x).dequantized(torch.float64)  # per row, as a weight's
    y = rows @ weight.dequantized(torch.float64).T
    return y if bias is None else y + bias.to(torch.float64)


def test_fp8_weights_are_e4m3_per_output_channel():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, 32, generator=gen) * torch.logspace(-3, 2, 40)[:, None]
    w[3] = 0
    q = quantize_fp8(w)
    assert q.qweight.dtype == torch.float8_e4m3fn and q.scales.dtype == torch.float32
    torch.testing.assert_close(q.scales, w.abs().amax(dim=1) / 448)
    assert q.qweight.to(torch.float32).abs().amax(dim=1)[torch.arange(40) != 3].eq(448).all()
    assert q.qweight[3].to(torch.float32).eq(0).all() and q.scales[3] == 0
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself (relative), or the
    # subnormal step.
    error = (q.dequantized(torch.float32) - w).abs()
    assert (error <= w.abs() * 2.0 ** -4 + q.scales[:, None] * 2.0 ** -9).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_against_float64(dtype):
    """The PyTorch path off a GPU: the scheme's quantized operands, dequantized."""
    gen = torch.Generator().manual_seed(3)
    weight = quantize_fp8(torch.randn(40, 36, generator=gen))
    x = torch.randn(5, 36, generator=gen).to(dtype)
    bias = torch.randn(40, generator=gen).to(dtype)
    y = fp8_linear(x, weight, bias)
    assert y.shape == (5, 40) and y.dtype == dtype
    assert_close_to(y, fp8_reference(x.float(), weight, bias))


def test_scaled_mm_takes_the_scales_per_token_and_per_channel():
    """What a GPU runs (`scaled_mm`: torch._scaled_mm on fp8 tensor cores), here on the CPU's
    reference implementation, which rounds the scaled operands to bfloat16: within that, the
    product of the dequantized operands (a wrong layout or scale would be off by the values
    themselves)."""
    gen = torch.Generator().manual_seed(4)
    weight = quantize_fp8(torch.randn(48, 64, generator=gen) * torch.logspace(-2, 1, 48)[:, None])
    x = torch.randn(3, 64, generator=gen) * torch.tensor([[0.01], [1.0], [30.0]])
    q, token_scales = quantize_fp8(x).qweight, quantize_fp8(x).scales
    y = scaled_mm(q, token_scales, weight)
    expected = fp8_reference(x, weight, None)
    bound = 2.0 ** -6 * expected.abs().amax(dim=1, keepdim=True)  # per token's magnitude
    assert ((y.double() - expected).abs() <= bound).all()


class _Fp8Linear(nn.Module):
    """transformers' nn.Linear as `--quantization fp8` computes it (float64 reference)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = quantize_fp8(linear.weight.data)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return fp8_reference(rows, self.weight, self.bias).to(x.dtype).reshape(
            *x.shape[:-1], -1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_in_fp8_matches_transformers_on_the_same_fp8_operands(family_dirs, family):
    """The PyTorch set (the scheme's math on any device; a GPU runs the same _scaled_mm on its
    fp8 tensor cores). As for W8A8, an activation at a rounding boundary may round the other
    way in one of the two paths, moving an output by one e4m3 step: hence the tolerance."""
    directory = family_dirs(family)
    model = load_model(directory, torch.float32)
    quantize_linears(model, "fp8")
    bind_kernels(model, cpu_kernel_set() if cpu_kernels.available() else TORCH_KERNELS)
    assert all(isinstance(m.quantized, Fp8Weight) for m in model.modules()
               if isinstance(m, Linear))
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for module in list(hf.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, _Fp8Linear(child))
    assert_matches_transformers(model, hf, PROMPTS, chunk=5, decode_steps=3, tol=1e-1)


def test_fp8_is_refused_where_no_fp8_tensor_cores_are(family_dirs):
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.runtime.serving import StartupError

    with pytest.raises(StartupError, match=r"--quantization fp8 needs a CUDA GPU with fp8 "
                                           r"tensor cores .* cpu has none: use int8"):
        LLM(str(family_dirs("llama")), quantization="fp8", device="cpu", kv_cache_gib=0.01)
