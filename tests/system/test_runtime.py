"""The allocator setting of selfsup.runtime, observed in fresh processes through glibc's own
accounting (mallinfo2): an 8 MB tensor comes from the heap, not from a fresh mapping."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, torch
from selfsup.runtime import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = keep_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.ones(2 * 2**20)  # 8 MB
print(applied, (libc.mallinfo2().hblkhd - before) / 2**20)
"""


def mapped_mb(env: dict[str, str]) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, mb = out.stdout.split()
    return applied, float(mb)


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc 2.33 on
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc 2.33 or later only")
def test_large_blocks_come_from_the_heap_unless_switched_off() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SELFSUP_MALLOC"}
    applied, mb = mapped_mb(env)
    assert applied == "True" and mb < 1  # from the heap: no new mapping
    applied, mb = mapped_mb({**env, "SELFSUP_MALLOC": "system"})
    assert applied == "False" and mb >= 8  # glibc's default: a fresh mapping of its own
