"""See what a model learned: attention maps, the ViT paper's Figure 7 analyses, and run reports.

The math (rollout, class-token maps, patch-embedding components, position-embedding similarity,
mean attention distance) needs only torch; the ``save_*`` and ``write_report`` functions draw
with matplotlib (the "viz" extra), which is imported only when they are called.
"""

from vitkit.viz.attention import (
    attention_rollout,
    cls_attention_maps,
    iter_attention,
    rollout_map,
    save_attention_figures,
)
from vitkit.viz.figure7 import (
    mean_attention_distance,
    patch_embedding_components,
    position_embedding_similarity,
    save_figure7,
)
from vitkit.viz.report import write_report

__all__ = [
    "attention_rollout",
    "cls_attention_maps",
    "iter_attention",
    "mean_attention_distance",
    "patch_embedding_components",
    "position_embedding_similarity",
    "rollout_map",
    "save_attention_figures",
    "save_figure7",
    "write_report",
]
