"""Reading a GGUF file: the header is parsed and checked in full before any
tensor is read, so a truncated or hostile file ends in one
:class:`~mlx_mtp.errors.ConversionError` naming the file and what is wrong,
never in a crash, a hang or a huge allocation.

Checked: the magic and version; every count (metadata entries, array
lengths, string lengths, tensors) against the bytes left in the file; value
types; tensor names (unique, UTF-8), dimensions (1..4, positive, a whole
number of quantization blocks), types (those of :data:`.quants.TYPES`), and
data offsets (aligned, inside the file, not overlapping).

A file whose tensors are all of types ``mx.load`` reads exactly (F32, F16,
Q4_0, Q4_1, Q8_0) is read by ``mx.load``, the quantized tensors as MLX affine
triples; any other file is read here, every tensor dequantized to float32 by
:func:`.quants.dequantize` (``mx.load`` refuses such files).
"""

import os
import struct
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Tuple, Union

import mlx.core as mx
import numpy as np

from ..errors import ConversionError
from ..files import reading
from .quants import MX_LOAD_TYPES, TYPES, dequantize

# The names of ggml tensor types the reader refuses, for the message.
OTHER_TYPES = {
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
            10: "Q", 11: "q", 12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 40  # per tensor; a bound far above any model, below int64 overflow
DEFAULT_ALIGNMENT = 32


class TensorInfo(NamedTuple):
    """One entry of a GGUF tensor table (dims in ggml order: fastest first)."""

    name: str
    dims: Tuple[int, ...]
    type: int
    offset: int
    nbytes: int


class GGUFHeader(NamedTuple):
    """A checked GGUF header: metadata (plain Python values, arrays as lists) and tensors."""

    version: int
    metadata: Dict[str, Any]
    tensors: Dict[str, TensorInfo]
    data_start: int


class _Reader:
    """Bounded reads of a file's header: every read checks the bytes left."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def fail(self, what: str):
        raise ConversionError(f"{self.path}: {what}")

    def left(self) -> int:
        return self.size - self.f.tell()

    def read(self, n: int, what: str) -> bytes:
        if n > self.left():
            self.fail(f"truncated GGUF file ({what} needs {n} bytes, {self.left()} left)")
        return self.f.read(n)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> bytes:
        return self.read(self.unpack("Q", f"the length of {what}"), what)

    def value(self, vtype: int, key: str) -> Any:
        """A scalar, string or array (a list) value."""
        if vtype == _STRING:
            return self.string(f"the value of {key}").decode("utf-8", errors="replace")
        if vtype == _ARRAY:
            itype = self.unpack("I", f"the item type of {key}")
            count = self.unpack("Q", f"the length of {key}")
            if itype in _SCALARS:
                fmt = "<" + _SCALARS[itype]
                data = self.read(count * struct.calcsize(fmt), f"the items of {key}")
                return np.frombuffer(data, dtype=np.dtype(fmt)).tolist()
            if itype == _STRING:
                if count * 8 > self.left():
                    self.fail(f"truncated GGUF file ({key} claims {count} strings)")
                return [self.string(f"an item of {key}").decode("utf-8", errors="replace") for _ in range(count)]
            self.fail(f"metadata {key}: unsupported array item type {itype}")
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], f"the value of {key}")
        self.fail(f"metadata {key}: unknown GGUF value type {vtype}")


def _name(raw: bytes, r: _Reader, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        r.fail(f"{what} {raw[:40]!r} is not UTF-8")


def read_header(path: Union[str, Path]) -> GGUFHeader:
    """The checked header of the GGUF file ``path``.

    Raises :class:`ConversionError` naming the file and the first problem.
    """
    path = Path(path)
    with reading(path, ConversionError, "a GGUF file"):
        f = open(path, "rb")
    with f:
        r = _Reader(f, path, os.fstat(f.fileno()).st_size)
        if f.read(4) != b"GGUF":
            raise ConversionError(f"{path} is not a GGUF file")
        version = r.unpack("I", "the version")
        if version not in (2, 3):
            r.fail(f"unsupported GGUF version {version}")
        n_tensors = r.unpack("Q", "the tensor count")
        n_kv = r.unpack("Q", "the metadata count")
        # each entry takes at least a key length, a type and 1 byte of value
        if n_kv * 13 > r.left():
            r.fail(f"truncated GGUF file (it claims {n_kv} metadata entries)")
        metadata: Dict[str, Any] = {}
        for _ in range(n_kv):
            key = _name(r.string("a metadata key"), r, "metadata key")
            if key in metadata:
                r.fail(f"metadata key {key!r} appears twice")
            metadata[key] = r.value(r.unpack("I", f"the type of {key}"), key)
        # each tensor entry takes at least 8 + 4 + 8 + 4 + 8 bytes
        if n_tensors * 32 > r.left():
            r.fail(f"truncated GGUF file (it claims {n_tensors} tensors)")
        entries: List[Tuple[str, Tuple[int, ...], int, int]] = []
        seen = set()
        for _ in range(n_tensors):
            name = _name(r.string("a tensor name"), r, "tensor name")
            if name in seen:
                r.fail(f"tensor {name!r} appears twice")
            seen.add(name)
            n_dims = r.unpack("I", f"the dimensions of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                r.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} supported)")
            dims = tuple(r.unpack("Q", f"the shape of {name}") for _ in range(n_dims))
            ttype = r.unpack("I", f"the type of {name}")
            offset = r.unpack("Q", f"the offset of {name}")
            entries.append((name, dims, ttype, offset))
        data_start = f.tell()
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ConversionError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_start += -data_start % alignment
    data_size = r.size - data_start
    tensors: Dict[str, TensorInfo] = {}
    bad_types: Dict[str, List[str]] = {}
    for name, dims, ttype, offset in entries:
        if ttype not in TYPES:
            bad_types.setdefault(OTHER_TYPES.get(ttype, f"type {ttype}"), []).append(name)
            continue
        tname, block, block_bytes = TYPES[ttype]
        elements = 1
        for d in dims:
            elements *= d
        if min(dims) < 1 or elements > MAX_ELEMENTS:
            raise ConversionError(f"{path}: tensor {name!r} has shape {list(dims)}")
        if dims[0] % block:
            raise ConversionError(f"{path}: tensor {name!r} ({tname}) has rows of {dims[0]}, not a multiple of {block}")
        nbytes = elements // block * block_bytes
        if offset % alignment:
            raise ConversionError(f"{path}: tensor {name!r} has offset {offset}, not a multiple of {alignment}")
        if offset + nbytes > data_size:
            raise ConversionError(
                f"{path}: tensor {name!r} lies past the end of the file (bytes {offset}..{offset + nbytes} "
                f"of {max(data_size, 0)}; truncated?)"
            )
        tensors[name] = TensorInfo(name, dims, ttype, offset, nbytes)
    if bad_types:
        found = ", ".join(f"{k} ({len(v)} tensors, e.g. {v[0]})" for k, v in bad_types.items())
        raise ConversionError(
            f"{path}: unsupported GGUF tensor types: {found}; supported: "
            f"{', '.join(t.name for t in TYPES.values())} (re-quantize the model, "
            "e.g. llama-quantize --allow-requantize ... Q4_K_M or Q8_0)"
        )
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ConversionError(f"{path}: tensors {a!r} and {b!r} overlap")
    if not tensors:
        raise ConversionError(f"{path}: the GGUF file holds no tensors")
    return GGUFHeader(version, metadata, tensors, data_start)


def read_gguf(path: Union[str, Path]) -> Tuple[GGUFHeader, Dict[str, mx.array]]:
    """Check a GGUF file's header, then read its tensors: with ``mx.load`` if
    it reads every one exactly, else here (dequantized to float32).
    Returns (header, tensors by GGUF name)."""
    path = Path(path)
    header = read_header(path)
    if all(t.type in MX_LOAD_TYPES for t in header.tensors.values()):
        try:
            return header, mx.load(str(path), format="gguf")
        except (RuntimeError, ValueError, OSError) as e:
            raise ConversionError(f"mx.load could not read {path}: {e}") from None
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror}") from None
    weights = {}
    for t in header.tensors.values():
        start = header.data_start + t.offset
        weights[t.name] = mx.array(dequantize(data[start : start + t.nbytes], t.type, t.dims[::-1]))
    return header, weights


def value(metadata: dict, key: str, default: Any = None) -> Any:
    """A metadata value (``default`` if it is absent)."""
    return metadata.get(key, default)


def require(metadata: dict, key: str) -> Any:
    """A metadata value that must be there."""
    v = value(metadata, key)
    if v is None:
        raise ConversionError(f"the GGUF metadata lacks {key!r}")
    return v
