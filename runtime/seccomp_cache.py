"""Docker's default seccomp filter, compiled once per host and kept in the store.

Compiling the default profile takes longer than starting a container, and importing the
compiler longer still, while its result depends only on:

- the compiler and the profile, both code: runtime/seccomp.py and runtime/syscall_table.py,
  taken by the SHA-256 of their source;
- the machine's architecture and kernel release (``minKernel`` rules);
- the capabilities the container keeps (``includes``/``excludes`` by cap).

A cache file holds those inputs in full next to the program and the program's SHA-256.
On read both are checked, so a file from other code, another kernel or another cap set,
a truncated write or a flipped bit is never loaded: the filter is compiled anew and the
file rewritten.
"""

from __future__ import annotations

import os

try:  # OpenSSL's hashlib costs more to import than the whole lookup: CPython's own SHA-256
    from _sha256 import sha256  # Python 3.11
except ImportError:  # pragma: no cover - other Pythons
    try:
        from _sha2 import sha256  # Python >= 3.12
    except ImportError:
        from hashlib import sha256

MAGIC = b"kiln-seccomp-bpf 1\n"
BPF_MAXINSNS = 4096
MAX_FILES = 16  # programs kept: cap sets in use; older kiln versions' and kernels' go
_SOURCES = ("seccomp.py", "syscall_table.py")


def _inputs(capabilities: frozenset[str] | set[str]) -> bytes | None:
    """Everything the compiled default filter depends on, as one byte string."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = sha256()
    for name in _SOURCES:
        try:
            with open(os.path.join(here, name), "rb") as f:
                code.update(f.read())
        except OSError:
            return None  # no source to key on (a zipped or stripped install): no caching
    uname = os.uname()
    return (f"code {code.hexdigest()}\narch {uname.machine}\nkernel {uname.release}\n"
            f"caps {','.join(sorted(capabilities))}\n").encode()


def _load(path: str, inputs: bytes) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(len(MAGIC) + len(inputs) + 65 + BPF_MAXINSNS * 8 + 1)
    except OSError:
        return None
    head = MAGIC + inputs
    if not data.startswith(head):
        return None
    digest, bpf = data[len(head):len(head) + 64], data[len(head) + 65:]
    if data[len(head) + 64:len(head) + 65] != b"\n":
        return None
    if not bpf or len(bpf) % 8 or len(bpf) // 8 > BPF_MAXINSNS:
        return None
    if sha256(bpf).hexdigest().encode() != digest:
        return None
    return bpf


def _store(path: str, inputs: bytes, bpf: bytes) -> None:
    """Best effort: a store we cannot write to just means compiling every time."""
    from store.fsutil import replace_file

    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        _forget_old(os.path.dirname(path))
        replace_file(path, MAGIC + inputs + sha256(bpf).hexdigest().encode() + b"\n" + bpf,
                     mode=0o600)
    except OSError:
        pass


def _forget_old(cache_dir: str) -> None:
    """Past MAX_FILES programs, drop them all: the ones in use come back on their next run."""
    names = [n for n in os.listdir(cache_dir) if n.startswith("seccomp-")]
    if len(names) >= MAX_FILES:
        for name in names:
            try:
                os.unlink(os.path.join(cache_dir, name))
            except OSError:
                pass


def default_filter(capabilities: frozenset[str] | set[str], cache_dir: str | None) -> bytes:
    """Docker's default profile compiled for this host and ``capabilities``.

    Read from ``cache_dir`` when compiled there before from the same inputs, else compiled
    and written there (``cache_dir`` None: always compiled).
    """
    inputs = _inputs(capabilities) if cache_dir is not None else None
    path = ""
    if inputs is not None:
        path = os.path.join(cache_dir, f"seccomp-{sha256(inputs).hexdigest()[:32]}.bpf")
        bpf = _load(path, inputs)
        if bpf is not None:
            return bpf
    from runtime.seccomp import compile_profile, default_profile

    bpf = compile_profile(default_profile(), capabilities=capabilities)
    if inputs is not None:
        _store(path, inputs, bpf)
    return bpf
