"""A forwarding shim: a tiny ELF shared object, written in Python, whose
exported functions jump to functions of the same name with a prefix.

Why: the fast BLAS that PyPI ships self-contained for Linux (the
``scipy-openblas32`` wheel, the OpenBLAS NumPy and SciPy build against)
exports its functions with a prefix (``scipy_cblas_sgemm``) so that it never
clashes with a system BLAS, while MLX binds the plain ``cblas_sgemm``. Loaded
with ``RTLD_GLOBAL`` before MLX, the shim makes ``cblas_sgemm`` (and the
other names MLX imports) resolve to the prefixed functions, with no compiler
on the user's machine and no change to either library.

The object has no code but one indirect jump per function (``jmp
*slot(%rip)``); each slot is filled by the dynamic linker at load time
(``R_X86_64_GLOB_DAT`` against the prefixed name, looked up in the library
named by the shim's ``DT_NEEDED``). An unresolvable name fails the load,
never a later call. x86_64 only: the one machine it can be tested on here.
"""

import struct
from dataclasses import dataclass
from typing import Dict, List, Sequence

# ELF constants (System V ABI, x86_64 supplement)
_ET_DYN, _EM_X86_64 = 3, 62
_PT_LOAD, _PT_DYNAMIC, _PT_GNU_STACK = 1, 2, 0x6474E551
_PF_X, _PF_W, _PF_R = 1, 2, 4
_DT = {"NULL": 0, "NEEDED": 1, "HASH": 4, "STRTAB": 5, "SYMTAB": 6, "RELA": 7, "RELASZ": 8, "RELAENT": 9}
_DT.update({"STRSZ": 10, "SYMENT": 11, "SONAME": 14, "FLAGS": 30})
_DF_BIND_NOW = 0x8
_STB_GLOBAL, _STT_FUNC = 1, 2
_SHN_TEXT = 1  # any defined section index: the dynamic linker reads no section headers
_R_X86_64_GLOB_DAT = 6
_PAGE = 0x1000
_STUB = 8  # bytes per stub: jmp *rel32(%rip) (6) + two int3


class ShimError(ValueError):
    """A shim that cannot be written for these names or this machine."""


@dataclass
class _Strings:
    """A dynamic string table: offsets of the names added so far."""

    data: bytearray
    offsets: Dict[str, int]

    @classmethod
    def new(cls) -> "_Strings":
        return cls(bytearray(b"\0"), {})

    def add(self, name: str) -> int:
        if name not in self.offsets:
            self.offsets[name] = len(self.data)
            self.data += name.encode() + b"\0"
        return self.offsets[name]


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def forwarding_shim(names: Sequence[str], prefix: str, needed: str, soname: str = "libmlx_mtp_shim.so") -> bytes:
    """The bytes of an x86_64 ELF shared object that exports each of
    ``names`` as a function jumping to ``prefix + name``.

    Args:
        names: the functions to export (e.g. ``["cblas_sgemm"]``).
        prefix: what the target library puts before each name (``"scipy_"``).
        needed: the target library, as ``DT_NEEDED`` (a path is loaded as is).
        soname: the shim's own ``DT_SONAME``.

    Returns:
        The file's bytes; load them with ``ctypes.CDLL(path, RTLD_GLOBAL)``.
    """
    names = list(dict.fromkeys(names))
    if not names or not all(n and n.isascii() and "\0" not in n for n in names + [prefix]):
        raise ShimError("a forwarding shim needs at least one plain ASCII name")
    n = len(names)
    strings = _Strings.new()
    needed_at, soname_at = strings.add(needed), strings.add(soname)
    exports = [strings.add(name) for name in names]
    imports = [strings.add(prefix + name) for name in names]

    # the read-only, executable segment: headers, hash, symbols, strings, relocations, stubs
    phnum = 4
    hash_off = 64 + 56 * phnum
    nsyms = 1 + 2 * n  # the null symbol, the exports, then the imports
    hash_size = 4 * (2 + 1 + nsyms)  # one bucket chaining every symbol
    dynsym_off = _align(hash_off + hash_size, 8)
    dynstr_off = dynsym_off + 24 * nsyms
    rela_off = _align(dynstr_off + len(strings.data), 8)
    text_off = _align(rela_off + 24 * n, 16)
    text_end = text_off + _STUB * n
    # the writable segment, a page further: the dynamic section, then the slots
    dyn_off = _align(text_end, _PAGE)
    dynamic = [
        ("NEEDED", needed_at),
        ("SONAME", soname_at),
        ("HASH", hash_off),
        ("STRTAB", dynstr_off),
        ("SYMTAB", dynsym_off),
        ("STRSZ", len(strings.data)),
        ("SYMENT", 24),
        ("RELA", rela_off),
        ("RELASZ", 24 * n),
        ("RELAENT", 24),
        ("FLAGS", _DF_BIND_NOW),
        ("NULL", 0),
    ]
    got_off = dyn_off + 16 * len(dynamic)
    end = got_off + 8 * n

    out = bytearray(end)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, version 1, System V
    out[0:64] = ident + struct.pack("<HHIQQQIHHHHHH", _ET_DYN, _EM_X86_64, 1, 0, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    phdrs = [
        (_PT_LOAD, _PF_R | _PF_X, 0, text_end, _PAGE),
        (_PT_LOAD, _PF_R | _PF_W, dyn_off, end - dyn_off, _PAGE),
        (_PT_DYNAMIC, _PF_R | _PF_W, dyn_off, 16 * len(dynamic), 8),
        (_PT_GNU_STACK, _PF_R | _PF_W, 0, 0, 16),  # no executable stack
    ]
    for i, (kind, flags, off, size, align) in enumerate(phdrs):
        struct.pack_into("<IIQQQQQQ", out, 64 + 56 * i, kind, flags, off, off, off, size, size, align)
    chain = [i + 1 if 0 < i < nsyms - 1 else 0 for i in range(nsyms)]
    struct.pack_into(f"<II I {nsyms}I", out, hash_off, 1, nsyms, 1 if nsyms > 1 else 0, *chain)
    symbols: List[tuple] = [(0, 0, 0, 0, 0, 0)]
    symbols += [(exports[i], _STB_GLOBAL << 4 | _STT_FUNC, 0, _SHN_TEXT, text_off + _STUB * i, _STUB) for i in range(n)]
    symbols += [(imports[i], _STB_GLOBAL << 4 | _STT_FUNC, 0, 0, 0, 0) for i in range(n)]
    for i, sym in enumerate(symbols):
        struct.pack_into("<IBBHQQ", out, dynsym_off + 24 * i, *sym)
    out[dynstr_off : dynstr_off + len(strings.data)] = strings.data
    for i in range(n):
        slot, stub = got_off + 8 * i, text_off + _STUB * i
        struct.pack_into("<QQq", out, rela_off + 24 * i, slot, (1 + n + i) << 32 | _R_X86_64_GLOB_DAT, 0)
        out[stub : stub + _STUB] = b"\xff\x25" + struct.pack("<i", slot - (stub + 6)) + b"\xcc\xcc"
    for i, (tag, value) in enumerate(dynamic):
        struct.pack_into("<qQ", out, dyn_off + 16 * i, _DT[tag], value)
    return bytes(out)
