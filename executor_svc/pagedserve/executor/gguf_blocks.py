"""GGUF's block formats as grouped weights: int8 values, float32 scales and offsets per group.

Every format here stores W[n, k] = s * q + o per group of consecutive k, with integer q and
float16 factors (quantization.GroupedWeight has the form). We unpack the values and fold the
factors into one float32 scale and offset per group, exactly (a float16 times a 6-bit integer
needs 17 bits, float32 has 24), so that `GroupedWeight.dequantized` gives the very values of
the `gguf` package's dequantize (tests/test_gguf_native.py checks it on every format):

| format | group | q             | scale     | offset       |
|--------|-------|---------------|-----------|--------------|
| Q8_0   | 32    | int8          | d         | none         |
| Q4_0   | 32    | 0..15         | d         | -8 d         |
| Q4_1   | 32    | 0..15         | d         | m            |
| Q5_0   | 32    | 0..31         | d         | -16 d        |
| Q5_1   | 32    | 0..31         | d         | m            |
| Q2_K   | 16    | 0..3          | d * sc[i] | -dmin * m[i] |
| Q3_K   | 16    | 0..7          | d * sc[i] | -4 d * sc[i] |
| Q4_K   | 32    | 0..15         | d * sc[i] | -dmin * m[i] |
| Q5_K   | 32    | 0..31         | d * sc[i] | -dmin * m[i] |
| Q6_K   | 16    | -32..31       | d * sc[i] | none         |

(The K formats are super-blocks of 256 values with 6-bit or 8-bit sub-block factors, which is
why their groups are the sub-blocks; Q3_K's values are -4..3, held + 4. 5-bit values keep a
byte each: the kernels pack only values of 4 bits and fewer tighter.) A tensor's rows are whole
numbers of blocks, so rows can be permuted and split as the float weights are.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
# (values int8 [rows, K], scales float32 [rows, K / G], offsets float32 [rows, K / G] | None)
Grouped = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _half(raw: np.ndarray) -> np.ndarray:
    """Float16 fields ([..., 2] bytes) as float32 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray, chunk: int) -> np.ndarray:
    """[blocks, n * chunk / 2] bytes -> [blocks, n * chunk] values: each `chunk / 2` bytes hold
    `chunk` values, the low nibbles first, then the high ones."""
    blocks = qs.shape[0]
    pairs = qs.reshape(blocks, -1, 1, chunk // 2) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (pairs & np.uint8(15)).reshape(blocks, -1).astype(np.int8)


def _q8_0(blocks: np.ndarray) -> Grouped:
    d, qs = np.hsplit(blocks, [2])
    return qs.view(np.int8), _half(d)[:, None], None


def _q4_0(blocks: np.ndarray) -> Grouped:
    d, qs = np.hsplit(blocks, [2])
    scale = _half(d)[:, None]
    return _nibbles(qs, 32), scale, -8 * scale


def _q4_1(blocks: np.ndarray) -> Grouped:
    d, m, qs = np.hsplit(blocks, [2, 4])
    return _nibbles(qs, 32), _half(d)[:, None], _half(m)[:, None]


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[blocks, 4] bytes -> the fifth bit of each of 32 values (bit i of the little-endian
    word), shifted into place."""
    return np.unpackbits(qh, axis=1, bitorder="little").astype(np.int8) << 4


def _q5_0(blocks: np.ndarray) -> Grouped:
    d, qh, qs = np.hsplit(blocks, [2, 6])
    scale = _half(d)[:, None]
    return _nibbles(qs, 32) | _fifth_bits(qh), scale, -16 * scale


def _q5_1(blocks: np.ndarray) -> Grouped:
    d, m, qh, qs = np.hsplit(blocks, [2, 4, 8])
    return _nibbles(qs, 32) | _fifth_bits(qh), _half(d)[:, None], _half(m)[:, None]


def _k_factors(d: np.ndarray, dmin: np.ndarray,
               packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's and Q5_K's eight sub-block scales and offsets. 12 bytes hold eight 6-bit scales
    and mins: bytes 0-3 scales 0-3 (low 6 bits) and the top bits of scales 4-7; bytes 4-7 mins
    0-3 and the top bits of mins 4-7; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and
    of mins 4-7 (high nibble)."""
    low_scales, low_mins, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([low_scales & 63, (rest & 15) | ((low_scales >> 6) << 4)], axis=1)
    mins = np.concatenate([low_mins & 63, (rest >> 4) | ((low_mins >> 6) << 4)], axis=1)
    return (_half(d)[:, None] * sc.astype(np.float32),
            -_half(dmin)[:, None] * mins.astype(np.float32))


def _q4_k(blocks: np.ndarray) -> Grouped:
    d, dmin, packed, qs = np.hsplit(blocks, [2, 4, 16])
    return (_nibbles(qs, 64), *_k_factors(d, dmin, packed))


def _q5_k(blocks: np.ndarray) -> Grouped:
    d, dmin, packed, qh, qs = np.hsplit(blocks, [2, 4, 16, 48])
    # Bit j of qh[l] is the fifth bit of value l of sub-block j.
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    values = _nibbles(qs, 64) | (high.reshape(blocks.shape[0], 256).astype(np.int8) << 4)
    return (values, *_k_factors(d, dmin, packed))


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """[blocks, 64] bytes -> 256 2-bit values: each half of 32 bytes holds 128 values, bits
    0-1 of its bytes first, then bits 2-3, 4-5 and 6-7."""
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(qs.shape[0], 2, 1, 32) >> shifts) & 3).reshape(qs.shape[0], 256)


def _q2_k(blocks: np.ndarray) -> Grouped:
    factors, qs, d, dmin = np.hsplit(blocks, [16, 80, 82])
    # Each sub-block's byte: its 4-bit scale low, its 4-bit min high.
    return (_crumbs(qs).astype(np.int8), _half(d)[:, None] * (factors & 15).astype(np.float32),
            -_half(dmin)[:, None] * (factors >> 4).astype(np.float32))


def _q3_k(blocks: np.ndarray) -> Grouped:
    hmask, qs, packed, d = np.hsplit(blocks, [32, 96, 108])
    count = blocks.shape[0]
    # Sixteen 6-bit scales, stored minus 32: the low 4 bits in bytes 0-7 (scales 0-7 in the low
    # nibbles, 8-15 in the high ones), the top 2 bits in bytes 8-11 (scale i in bits
    # 2 (i // 4) .. of byte 8 + i % 4).
    low = (packed[:, :8].reshape(count, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)) & 15
    high = (packed[:, 8:].reshape(count, 1, 4)
            >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 3
    sc = (low.reshape(count, 16) | (high.reshape(count, 16) << 4)).astype(np.float32) - 32
    # A value is its 2 low bits, minus 4 where its hmask bit is clear: held + 4, 0..7.
    hbits = (hmask.reshape(count, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    values = _crumbs(qs) | (hbits.reshape(count, 256) << 2)
    scale = _half(d)[:, None] * sc
    return values.astype(np.int8), scale, -4 * scale


def _q6_k(blocks: np.ndarray) -> Grouped:
    ql, qh, sc, d = np.hsplit(blocks, [128, 192, 208])
    count = blocks.shape[0]
    low = _nibbles(ql, 128).reshape(count, 2, 4, 32)  # halves of 128, quarters of 32
    high = (qh.reshape(count, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    values = (low | (high.astype(np.int8) << 4)) - 32
    return (values.reshape(count, 256).astype(np.int8),
            _half(d)[:, None] * sc.view(np.int8).astype(np.float32), None)


_DECODERS: dict[Q, Callable[[np.ndarray], Grouped]] = {
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
GROUPED_FORMATS = tuple(_DECODERS)


def grouped(raw: np.ndarray, qtype: Q, columns: int) -> Grouped:
    """A quantized tensor's bytes ([rows, bytes per row], as GGUFReader gives them) as values
    [rows, columns], scales and offsets [rows, columns / G]."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(-1, type_size)
    values, scales, offsets = _DECODERS[qtype](blocks)
    return (values.reshape(rows, columns), scales.reshape(rows, -1).astype(np.float32),
            None if offsets is None else offsets.reshape(rows, -1).astype(np.float32))
