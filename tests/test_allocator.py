"""The allocator settings the command line applies: freed activations stay in the process."""

import subprocess
import sys
import textwrap

import pytest

# A step's worth of activations, allocated, written and all freed at once, four times over; prints
# the page faults of the last two rounds (the first two grow the heap).
STEPS = textwrap.dedent("""
    import resource, sys
    import torch
    from vitkit.allocator import keep_freed_memory
    if sys.argv[1] == "keep" and not keep_freed_memory():
        print("unsupported"); sys.exit()
    for round in range(4):
        if round == 2:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.empty(5 * 2**20).fill_(1.0) for _ in range(8)]  # 8 x 20 MB
        del blocks
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
""")


def page_faults(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept = page_faults("keep")
    if kept == "unsupported":
        pytest.skip("the C library is not glibc; keep_freed_memory changes nothing here")
    default = int(page_faults("default"))
    # glibc's default trims the 160 MB freed at the heap's top each round (40,960 pages to fault in
    # again); kept, the next round reuses them.
    assert int(kept) * 10 < default, (kept, default)
