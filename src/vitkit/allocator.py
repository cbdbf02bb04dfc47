"""Keep freed CPU memory in the process, as PyTorch's CUDA caching allocator keeps its blocks.

PyTorch allocates CPU tensors with the C library's malloc. glibc hands heap memory back to the
kernel whenever the free space at the heap's top passes a threshold (twice the largest block it
has mmapped so far, at most 64 MB). A ViT's backward pass frees more than that at once, so each
step gives back its activations and faults them in again on the next, tens of thousands of page
faults a step; with the settings below the next step reuses them.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("vitkit")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit systems: blocks up to this size come from the
# heap and are reused; larger ones are still mapped and unmapped one by one.
_MMAP_THRESHOLD_MAX = 32 * 2**20


def keep_freed_memory() -> bool:
    """Tell glibc's malloc never to trim the heap and to serve blocks up to 32 MB from it.

    Process-wide and lasting: the process keeps its peak heap, which the next step reuses. The
    command line calls it before every command; from Python, call
    `vitkit.allocator.keep_freed_memory()` before training. Returns False, changing
    nothing, where the C library is not glibc (macOS, musl).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the symbols the process has loaded, the C library's among them
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # Fixing the mmap threshold also stops glibc from moving either threshold on its own; a trim
    # threshold of -1 turns trimming off (mallopt(3)).
    done = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if not done:
        log.debug("mallopt refused the allocator settings; glibc's defaults stay")
    return done
