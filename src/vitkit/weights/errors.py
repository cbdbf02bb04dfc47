"""The two errors of the weights layer.

Both derive from ValueError so callers that already catch bad-argument errors keep working; the
message always names the file (or "<state dict>"), the offending keys or values, and the fix.
"""

from __future__ import annotations


class WeightsError(ValueError):
    """A weights source that cannot be loaded as asked: unknown format, bad keys, bad shapes, corrupt file."""


class UnsafeCheckpointError(WeightsError):
    """A pickle that would import something other than tensors and plain containers.

    Raised before anything in the file is executed; ``--trust-checkpoint`` (``trust_checkpoint=True``)
    is the only way past it.
    """


def preview(keys: object, limit: int = 8) -> str:
    """A short, sorted listing of keys for error messages: the first few and a count of the rest."""
    items = sorted(str(k) for k in keys)  # type: ignore[union-attr]
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
