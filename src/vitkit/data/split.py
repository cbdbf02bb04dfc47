"""The deterministic validation holdout, for sources that ship no validation split.

Per class, so that the holdout has the class balance of the training data even for small or skewed
classes; seeded, so that a run and its evaluation, or two runs compared with each other, hold out
exactly the same images.
"""

from __future__ import annotations

import torch


def holdout_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (train, val), holding out ``fraction`` of every class; both sorted, never overlapping.

    Each class with at least two images keeps at least one image on each side; a class with a single
    image stays in train. The same labels, fraction and seed always give the same split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction={fraction}: must be in [0, 1), e.g. 0.1 to hold out 10% of each class")
    labels = torch.as_tensor(labels).cpu()
    if fraction == 0.0 or len(labels) == 0:
        return torch.arange(len(labels)), torch.zeros(0, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    val_parts = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        count = len(members)
        n_val = min(max(round(fraction * count), 1), count - 1)
        order = torch.randperm(count, generator=generator)
        val_parts.append(members[order[:n_val]])
    val = torch.sort(torch.cat(val_parts)).values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val
