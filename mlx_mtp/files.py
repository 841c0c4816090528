"""Reading and writing files safely: the one atomic writer, the one JSONL
reader and the one safetensors reader, each checking before it trusts.

Readers raise the caller's error class (a :class:`~mlx_mtp.errors.MTPError`)
with one line naming the file (and the line) and what is wrong; the writer
raises :class:`~mlx_mtp.errors.WriteError` and leaves the old file as it was.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, NamedTuple, Tuple, Type, Union

import mlx.core as mx

from .errors import DataError, MTPError, WriteError, one_line

PathLike = Union[str, Path]


def atomic_write(path: PathLike, write: Callable[[str], None]):
    """Write ``path`` through ``write(tmp)`` on a temporary file in the same
    directory, then rename it over ``path``: readers see the old file or the
    new one, never a partial one. On any failure the temporary file is removed
    and the old file is left as it was; an ``OSError`` (disk full, read-only
    directory) becomes a :class:`WriteError` that says so.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise users
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) or is_write_failure(e):
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            raise WriteError(f"cannot write {path}: {failure_reason(e)} ({kept})", failure_reason(e)) from None
        raise


@contextlib.contextmanager
def atomic_dir(out: PathLike) -> Iterator[Path]:
    """A temporary directory beside ``out`` to write a whole directory into;
    when the block ends without error it is renamed to ``out`` (an earlier
    ``out`` is moved aside first, then removed). On any failure the temporary
    directory is removed and an earlier ``out`` is left as it was; an
    ``OSError`` (disk full, read-only directory) becomes a :class:`WriteError`.
    """
    out = Path(out).absolute()
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        if isinstance(e, OSError) or is_write_failure(e):
            kept = "the previous copy is unchanged" if out.exists() else "nothing was written"
            raise WriteError(f"cannot write {out}: {failure_reason(e)} ({kept})", failure_reason(e)) from None
        raise
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_write_failure(e: BaseException) -> bool:
    """mlx reports a failed file write as a RuntimeError, not an OSError."""
    return isinstance(e, RuntimeError) and any(
        word in str(e).lower() for word in ("write", "no space", "permission", "read-only", "open file")
    )


def failure_reason(e: BaseException) -> str:
    """The one-line reason of a failed read or write."""
    if isinstance(e, WriteError):
        return e.reason
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return one_line(e)


def sha256(path: PathLike) -> str:
    """The hex sha256 digest of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --- reading -----------------------------------------------------------------------


@contextlib.contextmanager
def reading(path: PathLike, error: Type[MTPError], kind: str) -> Iterator[None]:
    """Turn a failure to open or read ``path`` inside the block into one line
    of ``error`` naming the file: missing, a directory (not ``kind``, e.g.
    "a GGUF file"), not UTF-8 text, or unreadable (the system's reason)."""
    try:
        yield
    except FileNotFoundError:
        raise error(f"{path} not found") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory, not {kind}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None


# --- text and JSONL -----------------------------------------------------------------


def read_text(path: PathLike, error: Type[MTPError] = DataError, kind: str = "a text file") -> str:
    """The whole of the UTF-8 text file ``path`` (newlines as ``\\n``).

    Raises ``error`` naming the file when it is missing, a directory (not
    ``kind``), not UTF-8 or cannot be read.
    """
    with reading(path, error, kind):
        return Path(path).read_text(encoding="utf-8")


def read_jsonl(path: PathLike, error: Type[MTPError] = DataError) -> Iterator[Tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of a JSONL file.

    Raises ``error`` (default :class:`DataError`) naming the file, and the
    line where there is one: a file that cannot be read, is not UTF-8 text, or
    holds a line that is not JSON. The whole file is read (and decoded)
    before the first row is yielded, so a caller never acts on half a file.
    """
    path = Path(path)
    rows = []
    for lineno, line in enumerate(read_text(path, error, "a JSONL file").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise error(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise error(f"{path}:{lineno}: invalid JSON (nested too deeply)") from None
    return iter(rows)


# --- safetensors ------------------------------------------------------------------

SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header
MAX_NDIM = 8


class TensorInfo(NamedTuple):
    """One tensor of a safetensors header."""

    dtype: str
    shape: Tuple[int, ...]


def read_safetensors_header(path: PathLike, error: Type[MTPError]) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """The tensors (dtype, shape) and the metadata of a safetensors file,
    checked against the file: a header of sane length that is a JSON object,
    known dtypes, shapes of non-negative ints, and data offsets that lie inside
    the file, match the shapes and cover the data without overlap."""
    path = Path(path)
    with reading(path, error, "a safetensors file"), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{path}: not a safetensors file (truncated: {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise error(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise error(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise error(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings)")
    data = size - 8 - n
    tensors: Dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise error(f"{where}: corrupt header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise error(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
            raise error(f"{where}: invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise error(f"{where}: invalid data offsets {offsets!r}")
        if offsets[1] > data:
            raise error(
                f"{where}: data at bytes {offsets[0]}..{offsets[1]} lies past the end of the file "
                f"({data} bytes of data; truncated?)"
            )
        nbytes = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise error(
                f"{where}: {offsets[1] - offsets[0]} bytes of data for shape {tuple(shape)} {dtype} ({nbytes} bytes)"
            )
        spans.append((offsets[0], offsets[1], name))
        tensors[name] = TensorInfo(dtype, tuple(shape))
    spans.sort()
    for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise error(f"{path}: tensors '{a}' and '{b}' overlap in the file")
    return tensors, metadata


def read_safetensors(
    path: PathLike, error: Type[MTPError], metadata: bool = False
) -> Union[Dict[str, Any], Tuple[Dict[str, Any], Dict[str, str]]]:
    """The tensors of a safetensors file (and its metadata if ``metadata``),
    read with ``mx.load`` once :func:`read_safetensors_header` has checked
    the file. Raises ``error`` naming the file and what is wrong."""
    infos, _ = read_safetensors_header(path, error)
    unreadable = sorted(n for n, t in infos.items() if t.dtype.startswith("F8"))
    if unreadable:
        raise error(f"{path}: tensor '{unreadable[0]}' has dtype {infos[unreadable[0]].dtype}, which mlx cannot read")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise error(f"cannot read {path}: {failure_reason(e)}") from None
    if set(arrays) != set(infos):
        raise error(f"{path}: corrupt safetensors file (mlx read other tensors than its header lists)")
    return (arrays, meta) if metadata else arrays
