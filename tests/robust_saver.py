"""Checkpoint writer for tests/test_robustness.py, to be killed with SIGKILL mid-save.

usage: python tests/robust_saver.py PATH

Reads a marker number per line on stdin. For each, it forks a child that saves checkpoints to PATH
through the trainer's own ``AtomicCheckpointIO`` in an endless loop, marker, marker + 1, ...; every
save holds its marker in an int and in each element of a 4 MB tensor, and the child prints
``saved N`` once save N has returned. This process prints ``child PID`` when the child starts and
``gone PID`` when it died (the test kills it). Forking keeps the slow import of Lightning to one
per test instead of one per kill.
"""

from __future__ import annotations

import os
import sys

import torch

from vitkit.train.callbacks import AtomicCheckpointIO


def checkpoint(marker: int) -> dict:
    return {
        "state_dict": {"model.weight": torch.full((1024, 1024), float(marker)), "model.bias": torch.zeros(16)},
        "global_step": marker,
        "marker": marker,
    }


def save_forever(path: str, marker: int) -> None:
    writer = AtomicCheckpointIO()
    while True:
        writer.save_checkpoint(checkpoint(marker), path)
        print(f"saved {marker}", flush=True)
        marker += 1


def main() -> None:
    path = sys.argv[1]
    for line in sys.stdin:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                save_forever(path, int(line))
            finally:
                os._exit(1)
        print(f"child {pid}", flush=True)
        os.waitpid(pid, 0)
        print(f"gone {pid}", flush=True)


if __name__ == "__main__":
    main()
