"""`vitkit train` that signals itself again while its interrupt checkpoint is being written.

usage: python tests/robust_train.py TRAIN_ARGS...

tests/test_robustness.py sends the first SIGTERM from outside. A second signal sent from outside
could land before, during or after the write; here a SIGTERM and a SIGINT are sent from inside the
atomic write itself (the temporary file is open, the final file not yet replaced), so the test
proves what happens when a second signal arrives exactly then.
"""

from __future__ import annotations

import os
import signal
import sys

from vitkit.cli import main as cli
from vitkit.train import callbacks

_original_write = callbacks.atomic_write


def atomic_write(path, write):
    def write_with_second_signals(handle):
        stop = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if isinstance(stop, callbacks.GracefulStop) and stop.received is not None:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            print(f"robust_train: SIGTERM and SIGINT sent while writing {path}", file=sys.stderr, flush=True)
        write(handle)

    _original_write(path, write_with_second_signals)


callbacks.atomic_write = atomic_write

if __name__ == "__main__":
    sys.exit(cli.main(["train", *sys.argv[1:]]))
