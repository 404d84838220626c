"""Process-wide settings that make CPU work faster, applied once at the start of a command.

glibc's ``malloc`` hands blocks above its mmap threshold (128 kB at first, raised as blocks are
freed, up to 32 MB) straight to and from the kernel, and trims the top of the heap once more than
twice that is free. A batch of images or activations is several MB, so each operation's output
came as fresh pages: every one a page fault, which in a virtual machine costs far more than the
arithmetic (measured here: SimCLR's two views of 512 CIFAR images, 75 ms -> 58 ms; the small
CNN's SimCLR step, 290 -> 350 images/s). Keeping freed blocks in the heap is what jemalloc and
tcmalloc, which PyTorch's CPU tuning guide suggests preloading, do by default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap (glibc's ceiling for the threshold on 64 bits).
MMAP_THRESHOLD = 32 * 2**20
#: Free memory the heap keeps at its top before giving it back to the kernel.
TRIM_THRESHOLD = 256 * 2**20

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks of up to 32 MB for reuse (see the module's docstring).

    Once per process, inherited by forked DataLoader workers (each may then keep up to 256 MB
    of freed memory); ``SELFSUP_MALLOC=system`` leaves the allocator as it is. Returns whether the
    settings were applied (False off Linux/glibc, with another allocator preloaded, or when
    switched off)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("SELFSUP_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False  # the user chose an allocator: leave it alone
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl and others have no mallopt
        return False
    mapped = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    trimmed = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _done = mapped or trimmed  # either changes the allocator
    return _done


def native_bf16(accelerator: str = "cpu") -> bool:
    """Whether ``accelerator`` ("cpu" or "gpu"/"cuda") computes in bfloat16 natively: a CUDA
    device with bf16 support (Ampere on), or a CPU with AVX512-BF16 or AMX tiles (oneDNN's
    bf16 kernels; elsewhere bf16 is emulated and slower than fp32)."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            return False
        try:  # emulated bf16 (before Ampere) is slower than fp32
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.4
            return torch.cuda.is_bf16_supported()
    try:  # private helpers of torch.cpu (2.1 on); without them, assume emulation
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def fast_precision(accelerator: str = "cpu") -> str:
    """Lightning's ``precision`` for the fastest sound training on ``accelerator``: bf16 autocast
    where bf16 is native (weights, optimizer and loss stay fp32), else full fp32."""
    return "bf16-mixed" if native_bf16(accelerator) else "32-true"
