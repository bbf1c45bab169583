"""Issue 10, point 4: Containerfiles whose ARG/ENV/LABEL values feed on each other.

Forty lines of ``ARG An=${An-1}${An-1}`` took 23.8 GB of memory and wrote 26 GB of cache
records before the OOM killer stopped kiln. Each build here runs as its own process under
an address-space limit, and must fail at the line that crosses kiln's limit, in seconds,
with a file:line error and no traceback, writing no cache record on the way."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.builder.conftest import build_context
from tests.conftest import PROJECT
from tests.security.tmpfs import tmpfs_store_fixtures

# The store of these builds: on a tmpfs of 512 MiB, which is all a regression could fill
# (the first of these files wrote 26 GB of cache records).
broot, kb = tmpfs_store_fixtures("bombs", "512m")


MEMORY_LIMIT = 3 << 30  # address space of the kiln process: a few GB, far below the 24 GB
SECONDS = 30  # "fails fast": each of these takes well under 5 s on this slow machine


def _records(root: Path) -> dict[Path, bytes]:
    cache = root / "cache"
    return {p: p.read_bytes() for p in cache.glob("??/*.json")} if cache.is_dir() else {}


def _assert_no_record_of(before: dict[Path, bytes], root: Path, failed: str,
                         most: int = 4 << 20) -> None:
    """The failed step has no cache record; the steps before it may have theirs, which
    hold their own history entries only (26 GB of them before the fix), ``most`` bytes."""
    new = {p: data for p, data in _records(root).items() if p not in before}
    assert sum(map(len, new.values())) < most
    assert not [p for p, data in new.items() if failed.encode() in data]


def _limited_build(root: Path, ctx: Path) -> tuple[subprocess.CompletedProcess, float, int]:
    """`kiln build ctx` under MEMORY_LIMIT: (process, seconds, its peak RSS in bytes)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    # the child's peak shows in RUSAGE_CHILDREN only if it beats every earlier child
    r, w = os.pipe()
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", _PEAK_RSS_WRAPPER, str(w), "build", str(ctx)],
                            env={**os.environ, "KILN_ROOT": str(root)}, cwd=PROJECT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit,
                            pass_fds=(w,))
    os.close(w)
    try:
        out, err = proc.communicate(timeout=SECONDS * 4)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        os.close(r)
        pytest.fail(f"kiln build still ran after {SECONDS * 4} s")
    elapsed = time.monotonic() - start
    with os.fdopen(r) as f:
        peak = int(f.read() or 0) * 1024
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    p.out, p.err = out.decode(), err.decode(errors="replace")  # type: ignore[attr-defined]
    return p, elapsed, peak


# Runs kiln's CLI in a child and writes that child's peak RSS (KiB) to the fd in argv[1].
_PEAK_RSS_WRAPPER = """
import os, resource, subprocess, sys
fd = int(sys.argv[1])
p = subprocess.run([sys.executable, "-m", "kiln", *sys.argv[2:]], pass_fds=())
os.write(fd, str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss).encode())
sys.exit(p.returncode)
"""


def _line_of(containerfile: str, text: str) -> int:
    return next(i for i, line in enumerate(containerfile.splitlines(), 1) if line.startswith(text))


def _assert_refused(p, elapsed: float, peak: int, line: int, *reasons: str) -> None:
    assert p.returncode == 125, p.err[-3000:]
    assert "Traceback" not in p.err, p.err[-3000:]
    last = p.err.strip().splitlines()[-1]
    assert last.startswith("kiln: error: ") and f"/Containerfile:{line}: " in last, last[:500]
    for reason in reasons:
        assert reason in last, last[:500]
    assert len(last) < 1000  # the error does not print the megabytes it refused
    assert elapsed < SECONDS, elapsed
    assert peak < 1 << 30, f"peak RSS {peak >> 20} MiB"


def _assert_build_limit_hit(p, elapsed: float, peak: int) -> None:
    """Refused for the build's 64 MiB of text, at whichever line the error names."""
    last = p.err.strip().splitlines()[-1]
    assert "more than 64 MiB" in last, last[:500]
    line = int(last.split("/Containerfile:")[1].split(":")[0])
    _assert_refused(p, elapsed, peak, line)


def _doubling(n: int, first: str = "x" * 64, kind: str = "ARG") -> str:
    lines = [f"{kind} A0={first}"]
    lines += [f"{kind} A{i}=${{A{i - 1}}}${{A{i - 1}}}" for i in range(1, n)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["stage", "global"])
def test_arg_doubling_chain_fails_fast_at_the_line_that_passes_a_mib(broot, tmp_path, where):
    chain = _doubling(40)
    cf = "FROM busybox\n" + chain if where == "stage" else \
        chain + "FROM busybox\nRUN echo never\n"
    ctx = build_context(tmp_path, cf)
    before = _records(broot)
    p, elapsed, peak = _limited_build(broot, ctx)
    # 64 characters doubled 14 times is 1 MiB; A15 would be 2 MiB
    _assert_refused(p, elapsed, peak, _line_of(cf, "ARG A15="), "${A14}${A14}",
                    "longer than 1048576 characters")
    _assert_no_record_of(before, broot, "A15=")
    assert "RUN echo never" not in p.err


def test_env_doubling_chain_is_refused_the_same_way(broot, tmp_path):
    cf = "FROM busybox\n" + _doubling(40, kind="ENV")
    ctx = build_context(tmp_path, cf)
    p, elapsed, peak = _limited_build(broot, ctx)
    _assert_refused(p, elapsed, peak, _line_of(cf, "ENV A15="), "longer than 1048576")


@pytest.mark.parametrize("kind", ["ENV", "LABEL", "ARG"])
def test_many_values_just_under_the_word_limit_hit_the_build_limit(broot, tmp_path, kind):
    # A4 is 960,000 characters, under the limit for one word; 300 copies of it are 288 MB
    cf = "FROM busybox\n" + _doubling(5, "x" * 60_000, kind="ARG") + "".join(
        f"{kind} B{i}=${{A4}}\n" for i in range(300))
    ctx = build_context(tmp_path, cf)
    before = _records(broot)
    p, elapsed, peak = _limited_build(broot, ctx)
    last = p.err.strip().splitlines()[-1]
    assert "more than 64 MiB" in last and "kiln's limit" in last, last[:500]
    line = int(last.split("/Containerfile:")[1].split(":")[0])
    assert 10 < line < 60  # some dozens of 1 MB values, not all 300
    _assert_refused(p, elapsed, peak, line)
    # the steps before: about their 32 MB of text, once (it was each step's history so far)
    _assert_no_record_of(before, broot, f"B{line - 7}=", most=48 << 20)


def test_many_words_on_one_line_hit_the_build_limit(broot, tmp_path):
    cf = ("FROM busybox\n" + _doubling(5, "x" * 60_000, kind="ARG")
          + "LABEL " + " ".join(f"l{i}=$A4" for i in range(1000)) + "\n")
    ctx = build_context(tmp_path, cf)
    p, elapsed, peak = _limited_build(broot, ctx)
    _assert_refused(p, elapsed, peak, _line_of(cf, "LABEL "), "more than 64 MiB")


def test_many_stages_each_under_the_limit_hit_it_together(broot, tmp_path):
    # each stage makes 15 MB, as much as any one stage may; 20 of them would hold 300 MB
    stage = _doubling(5, "x" * 60_000) + "".join(f"ENV B{i}=${{A4}}\n" for i in range(5))
    cf = "".join(f"FROM busybox AS s{n}\n{stage}" for n in range(20))
    cf += "FROM busybox\n" + "".join(f"COPY --from=s{n} /bin/true /t{n}\n" for n in range(20))
    ctx = build_context(tmp_path, cf)
    _assert_build_limit_hit(*_limited_build(broot, ctx))


def test_a_replacement_that_multiplies_a_value_is_refused(broot, tmp_path):
    # ${V//} with an empty pattern puts the replacement between every two characters:
    # 60,000 x 60,000 characters
    cf = "FROM busybox\nARG A=" + "x" * 60_000 + "\nARG B=${A///${A}}\n"
    ctx = build_context(tmp_path, cf)
    p, elapsed, peak = _limited_build(broot, ctx)
    _assert_refused(p, elapsed, peak, 3, "longer than 1048576")


def test_global_args_that_grow_hit_the_limit_before_from(broot, tmp_path):
    cf = _doubling(5, "x" * 60_000) + "".join(f"ARG B{i}=${{A4}}\n" for i in range(300)) \
        + "FROM busybox\n"
    ctx = build_context(tmp_path, cf)
    _assert_build_limit_hit(*_limited_build(broot, ctx))


def test_values_under_the_limits_still_build(kb, broot, tmp_path):
    cf = "FROM busybox\n" + _doubling(15) + "ENV BIG=${A14}\nLABEL big=${A13}\n"
    ctx = build_context(tmp_path, cf)
    image_id = kb("build", "-q", str(ctx)).out.strip()
    # over the 4 MiB kiln reads back as a document (inspect would refuse it): read the file
    config = json.loads((broot / "blobs" / "sha256" / image_id.split(":")[1]).read_bytes())
    assert "BIG=" + "x" * (1 << 20) in config["config"]["Env"]
    assert config["config"]["Labels"]["big"] == "x" * (1 << 19)
