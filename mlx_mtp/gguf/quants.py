"""ggml tensor types: their block layout, and dequantization in numpy.

:data:`TYPES` names every type the reader accepts with its block size (elements)
and block bytes. :func:`dequantize` turns a tensor's raw bytes into float32 the
way ggml's reference ``dequantize_row_*`` functions do (the same products in
float32, so the values are the ones llama.cpp computes); the ``gguf`` package is
the independent check in the tests. The reader has checked that the bytes are
whole blocks before they get here.
"""

from typing import Dict, NamedTuple

import numpy as np


class TensorType(NamedTuple):
    name: str
    block: int  # elements per block
    block_bytes: int


QK_K = 256  # elements per K-quant super-block

TYPES: Dict[int, TensorType] = {
    0: TensorType("F32", 1, 4),
    1: TensorType("F16", 1, 2),
    2: TensorType("Q4_0", 32, 18),
    3: TensorType("Q4_1", 32, 20),
    6: TensorType("Q5_0", 32, 22),
    7: TensorType("Q5_1", 32, 24),
    8: TensorType("Q8_0", 32, 34),
    12: TensorType("Q4_K", QK_K, 144),
    13: TensorType("Q5_K", QK_K, 176),
    14: TensorType("Q6_K", QK_K, 210),
    30: TensorType("BF16", 1, 2),
}
# The types mx.load reads itself (the quantized ones as MLX affine triples).
MX_LOAD_TYPES = frozenset({0, 1, 2, 3, 8})


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte ``start`` of every block, as float32 (n, 1)."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _low_high(qs: np.ndarray) -> np.ndarray:
    """Packed nibbles: the low halves of a row of bytes, then the high halves."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _q4_0(b):
    return (_low_high(b[:, 2:18]).astype(np.int8) - 8).astype(np.float32) * _f16(b, 0)


def _q4_1(b):
    return _low_high(b[:, 4:20]).astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _q5_bits(b: np.ndarray, qh_at: int) -> np.ndarray:
    """Q5_0/Q5_1 5-bit values (0..31): nibbles plus the fifth bit from ``qh``."""
    qh = b[:, qh_at : qh_at + 4].copy().view("<u4")
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    return _low_high(b[:, qh_at + 4 : qh_at + 20]) | high


def _q5_0(b):
    return (_q5_bits(b, 2).astype(np.int8) - 16).astype(np.float32) * _f16(b, 0)


def _q5_1(b):
    return _q5_bits(b, 4).astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _q8_0(b):
    return b[:, 2:34].copy().view(np.int8).astype(np.float32) * _f16(b, 0)


def _k_scales(b: np.ndarray):
    """Q4_K/Q5_K: the 8 six-bit scales and mins of each super-block (n, 8)."""
    s = b[:, 4:16]
    scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    d = _f16(b, 0) * scales.astype(np.float32)
    m = _f16(b, 2) * mins.astype(np.float32)
    return d[:, :, None], m[:, :, None]


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32): each 32-byte run gives its low nibbles
    (one sub-block) then its high nibbles (the next)."""
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b):
    d, m = _k_scales(b)
    return (d * _k_nibbles(b[:, 16:144]).astype(np.float32) - m).reshape(-1, QK_K)


def _q5_k(b):
    d, m = _k_scales(b)
    qh = b[:, 16:48]  # bit j of qh[l] is the fifth bit of element l of sub-block j
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4
    q = _k_nibbles(b[:, 48:176]) | high
    return (d * q.astype(np.float32) - m).reshape(-1, QK_K)


def _q6_k(b):
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # half, first/second 32 bytes, l
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    scales = b[:, 192:208].copy().view(np.int8).astype(np.float32).reshape(-1, 2, 8)
    d = _f16(b, 208)[:, :, None]
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # (n, 2, 4, 32): q1 q2 q3 q4
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32)  # (n, 2, 4, 32)
    # scale index of element l of run k in a half: 2k + l // 16
    sc = scales.reshape(-1, 2, 4, 2, 1)
    y = (d[:, :, :, None, None] * sc) * q.reshape(-1, 2, 4, 2, 16)
    return y.reshape(-1, QK_K)


_DEQUANTIZE = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}  # fmt: skip


def dequantize(raw: np.ndarray, ttype: int, shape) -> np.ndarray:
    """The float32 (float16 for F16) values of a tensor of type ``ttype`` whose
    bytes are ``raw`` (uint8), in numpy ``shape`` (slowest dimension first)."""
    t = TYPES[ttype]
    if t.name == "F32":
        return raw.view("<f4").reshape(shape)
    if t.name == "F16":
        return raw.view("<f2").reshape(shape)
    if t.name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    blocks = raw.reshape(-1, t.block_bytes)
    return _DEQUANTIZE[t.name](blocks).reshape(shape)
