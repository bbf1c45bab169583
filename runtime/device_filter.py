"""Device access rules on cgroup v2: an eBPF program of type BPF_PROG_TYPE_CGROUP_DEVICE.

cgroup v2 has no devices.deny file; the kernel asks the programs attached to a cgroup (and
to its ancestors) whether an open or mknod of a device node is allowed. kiln's v1 driver
writes devices.deny lines for read-only --device; this module turns the same lines into a
program that answers 0 (refuse) for the denied accesses and 1 for everything else, and
attaches it to the container's cgroup (with BPF_F_ALLOW_MULTI, so programs the service
manager put on parent cgroups still run: the kernel allows only what all of them allow).
The program lives as long as the cgroup: closing our fd after attaching does not detach it.

The context the kernel passes (struct bpf_cgroup_dev_ctx) is three u32: access_type
(access << 16 | type), major, minor; type 1 = block, 2 = char; access 1 = mknod, 2 = read,
4 = write (include/uapi/linux/bpf.h).
"""

from __future__ import annotations

import os
import re
import struct

from runtime import syscalls

_TYPE = {"b": 1, "c": 2}
_ACCESS = {"m": 1, "r": 2, "w": 4}
_RULE = re.compile(r"^([bc]) (\d+):(\d+) ([rwm]+)$")

# eBPF opcodes (include/uapi/linux/bpf_common.h, bpf.h)
_LDX_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W        dst = *(u32 *)(src + off)
_AND_K = 0x57  # BPF_ALU64 | BPF_AND | BPF_K      dst &= imm
_RSH_K = 0x77  # BPF_ALU64 | BPF_RSH | BPF_K      dst >>= imm
_MOV_K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K      dst = imm
_MOV_X = 0xBF  # BPF_ALU64 | BPF_MOV | BPF_X      dst = src
_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K        if dst != imm: pc += off
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K      if dst & imm: pc += off
_JA = 0x05  # BPF_JMP | BPF_JA                    pc += off
_EXIT = 0x95  # BPF_JMP | BPF_EXIT                return r0


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def parse_rule(rule: str) -> tuple[int, int, int, int]:
    """"c 1:5 w" -> (type, major, minor, access mask), as in a v1 devices.deny line."""
    m = _RULE.match(rule)
    if not m:
        raise ValueError(f"invalid device rule {rule!r} (expected like 'c 1:5 w')")
    access = 0
    for letter in m.group(4):
        access |= _ACCESS[letter]
    return _TYPE[m.group(1)], int(m.group(2)), int(m.group(3)), access


def deny_program(rules: list[str] | tuple[str, ...]) -> bytes:
    """The program refusing each rule's accesses to its device and allowing all else."""
    code = [
        _insn(_LDX_W, dst=2, src=1, off=0),  # r2 = access_type
        _insn(_MOV_X, dst=3, src=2),
        _insn(_AND_K, dst=3, imm=0xFFFF),  # r3 = type
        _insn(_RSH_K, dst=2, imm=16),  # r2 = access
        _insn(_LDX_W, dst=4, src=1, off=4),  # r4 = major
        _insn(_LDX_W, dst=5, src=1, off=8),  # r5 = minor
    ]
    for rule in rules:
        kind, major, minor, access = parse_rule(rule)
        code += [  # seven instructions: on no match fall through to the next rule
            _insn(_JNE_K, dst=3, off=6, imm=kind),
            _insn(_JNE_K, dst=4, off=5, imm=major),
            _insn(_JNE_K, dst=5, off=4, imm=minor),
            _insn(_JSET_K, dst=2, off=1, imm=access),
            _insn(_JA, off=2),
            _insn(_MOV_K, dst=0, imm=0),
            _insn(_EXIT),
        ]
    code += [_insn(_MOV_K, dst=0, imm=1), _insn(_EXIT)]
    return b"".join(code)


def attach_deny_rules(cgroup_dir: str, rules: list[str] | tuple[str, ...]) -> None:
    """Load the program for ``rules`` and attach it to the v2 cgroup ``cgroup_dir``."""
    prog = syscalls.bpf_prog_load(syscalls.BPF_PROG_TYPE_CGROUP_DEVICE, deny_program(rules),
                                  license="Apache-2.0", name="kiln_devices",
                                  expected_attach_type=syscalls.BPF_CGROUP_DEVICE)
    try:
        target = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syscalls.bpf_prog_attach(target, prog, syscalls.BPF_CGROUP_DEVICE,
                                     syscalls.BPF_F_ALLOW_MULTI)
        finally:
            os.close(target)
    finally:
        os.close(prog)
