"""The ViT paper's Figure 7 for any model: what the patch embedding, the position embeddings and
the attention heads have learned.

* Left: the first principal components of the patch-embedding filters. The linear projection
  is a bank of D filters on C x p x p patches; its leading components look like plausible basis
  functions for a patch's fine structure.
* Centre: the cosine similarity of each position embedding with every other. Learned embeddings
  end up encoding distance (nearby patches are similar) and the row-column structure.
* Right: the mean attention distance of every head at every depth, the ViT analogue of a CNN's
  receptive field: some heads attend globally already in the lowest layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from vitkit.viz.attention import iter_attention

__all__ = [
    "mean_attention_distance",
    "patch_embedding_components",
    "position_embedding_similarity",
    "save_figure7",
]


def patch_embedding_components(model: nn.Module, n: int = 28) -> Tensor:
    """The first ``n`` principal components of the patch-embedding filters, (n, C, p, p) in [0, 1].

    Each of the D filters (rows of the D x (C*p*p) flattened conv weight) is one sample; the
    components are the top right-singular vectors of the mean-centred filter bank, ordered by
    explained variance. Each is min-max scaled on its own (all channels together, so colour is
    kept) to show as an RGB patch. Fewer than ``n`` come back if the filter bank has lower rank.
    """
    if getattr(model.patch_embed, "backbone", None) is not None:
        raise ValueError(f"this model's stem is {model.config.stem!r}: its patch projection reads the stem's "
                         "features (a hybrid's convolutions, or shifted patches layer-normalised), not a "
                         "patch's pixels, so it has no patch-embedding filters to show")
    weight = model.patch_embed.proj.weight.detach().float().cpu()  # (D, C, p, p)
    d, c, p, _ = weight.shape
    filters = weight.reshape(d, -1)
    filters = filters - filters.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(filters, full_matrices=False)
    n = min(n, vh.shape[0])
    comps = vh[:n]
    low = comps.min(dim=1, keepdim=True).values
    high = comps.max(dim=1, keepdim=True).values
    comps = (comps - low) / (high - low).clamp_min(1e-12)
    return comps.reshape(n, c, p, p)


def _cosine_similarity_grid(pos: Tensor, grid_size: int) -> Tensor:
    """(g*g, D) row-major embeddings -> (g, g, g, g) cosine similarities."""
    unit = torch.nn.functional.normalize(pos.float(), dim=-1)
    return (unit @ unit.T).reshape(grid_size, grid_size, grid_size, grid_size)


def position_embedding_similarity(model: nn.Module) -> Tensor:
    """Cosine similarity of each patch's position embedding with every other, (g, g, g, g).

    ``sim[i, j]`` is the g x g map of how similar the embedding of patch (row i, column j) is to
    each patch's. Prefix tokens (the class token) are left out: they have no position.
    """
    cfg = model.config
    pos = model.pos_embed.detach()[0, cfg.pos_prefix_tokens :].cpu()  # no_embed_class: no prefix slots
    return _cosine_similarity_grid(pos, cfg.grid_size)


def _patch_distances(grid_size: int, patch_size: int, device: torch.device | None = None) -> Tensor:
    """(N, N) Euclidean distance in pixels between patch centres, patches in row-major order."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1).float().to(device)
    return torch.cdist(coords, coords) * patch_size


def mean_attention_distance(
    maps: Sequence[Tensor], grid_size: int, patch_size: int, num_prefix_tokens: int = 1
) -> Tensor:
    """Mean attention distance in pixels of every head at every depth, (depth, heads).

    For each patch query, the distance to every patch key weighted by the attention it pays to
    it, averaged over queries and the batch (the paper's Figure 7, right). Only patch-to-patch
    attention counts: prefix rows and columns are dropped and each row is renormalised, since
    the class token has no position to measure distance to.
    """
    dist = None
    result = []
    for attn in maps:
        a = attn.float()[..., num_prefix_tokens:, num_prefix_tokens:]
        if a.shape[-1] != grid_size * grid_size:
            raise ValueError(
                f"{a.shape[-1]} patch tokens do not form a {grid_size}x{grid_size} grid; "
                "check grid_size and num_prefix_tokens"
            )
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        if dist is None:
            dist = _patch_distances(grid_size, patch_size, a.device)
        per_query = (a * dist).sum(dim=-1)  # (B, heads, N)
        result.append(per_query.mean(dim=(0, 2)))
    return torch.stack(result)


def _attention_distance_over(model: nn.Module, images: Tensor) -> Tensor:
    """Mean attention distance over all ``images``, chunk by chunk, weighting chunks by their size."""
    cfg = model.config
    total, count = None, 0
    for _, maps in iter_attention(model, images):
        mad = mean_attention_distance(maps, cfg.grid_size, cfg.patch_size, cfg.num_prefix_tokens).cpu()
        batch = maps[0].shape[0]
        total = mad * batch if total is None else total + mad * batch
        count += batch
    if total is None:
        raise ValueError("mean attention distance needs at least one image")
    return total / count


def _plot_components(comps: Tensor, path: Path) -> Path:
    from vitkit.viz._plotting import new_figure, save_figure

    n, c = comps.shape[:2]
    cols = min(n, 7)
    rows = math.ceil(n / cols)
    fig = new_figure(8, 5.2)
    fig.suptitle(f"Patch-embedding filters: first {n} principal components", fontsize=13)
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        comp = comps[i].numpy()
        if c == 3:
            ax.imshow(np.transpose(comp, (1, 2, 0)), interpolation="nearest")
        else:  # not RGB: show the channel mean as grey
            ax.imshow(comp.mean(axis=0), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"PC {i + 1}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def _similarity_mosaic(sim: np.ndarray) -> np.ndarray:
    """(g, g, g, g) -> one (g*g + g - 1)-square image of g x g tiles, NaN gaps between tiles.

    One imshow of a mosaic draws as fast for g = 24 as for g = 8, where g*g small axes would not.
    """
    g = sim.shape[0]
    side = g * g + (g - 1)
    mosaic = np.full((side, side), np.nan, dtype=np.float32)
    for i in range(g):
        for j in range(g):
            top, left = i * (g + 1), j * (g + 1)
            mosaic[top : top + g, left : left + g] = sim[i, j]
    return mosaic


def _plot_similarity(sim: Tensor, path: Path) -> Path:
    from vitkit.viz._plotting import colormap, new_figure, save_figure

    g = sim.shape[0]
    fig = new_figure(7, 6)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(_similarity_mosaic(sim.numpy()), cmap=colormap("viridis", bad="white"), vmin=-1, vmax=1,
                      interpolation="nearest")
    step = max(1, math.ceil(g / 14))  # at most ~14 labelled ticks per axis
    ticks = list(range(0, g, step))
    centres = [i * (g + 1) + (g - 1) / 2 for i in ticks]
    ax.set_xticks(centres, [str(i + 1) for i in ticks])
    ax.set_yticks(centres, [str(i + 1) for i in ticks])
    ax.tick_params(length=0)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    ax.set_title("Position embedding similarity\n(each tile: one patch's embedding vs. every patch)", fontsize=12)
    fig.colorbar(image, ax=ax, shrink=0.85, label="Cosine similarity")
    return save_figure(fig, path)


def _plot_distance(mad: Tensor, patch_size: int, img_size: int, num_images: int, path: Path) -> Path:
    from vitkit.viz._plotting import colormap, new_figure, save_figure

    depth, heads = mad.shape
    fig = new_figure(6.5, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormap("viridis" if heads > 10 else "tab10")
    layers = np.arange(1, depth + 1)
    for h in range(heads):
        color = cmap(h / max(heads - 1, 1)) if heads > 10 else cmap(h)
        ax.scatter(layers, mad[:, h].numpy(), s=22, color=color, label=f"head {h + 1}", alpha=0.85)
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_title(f"Mean attention distance per head ({num_images} images, {patch_size}-px patches)", fontsize=11)
    ax.set_xticks(layers if depth <= 24 else layers[:: math.ceil(depth / 24)])
    ax.set_xlim(0.5, depth + 0.5)
    # The largest possible distance is corner to corner; the paper's axis starts at zero.
    top = float(mad.max()) if mad.numel() else 1.0
    ax.set_ylim(0, min(max(top * 1.15, 1.0), img_size * math.sqrt(2)))
    ax.grid(alpha=0.3)
    if heads <= 16:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return save_figure(fig, path)


def save_figure7(model: nn.Module, images: Tensor, out_dir: str | Path) -> list[Path]:
    """Write the three Figure 7 panels for ``model`` into ``out_dir`` and return their paths:
    patch_embedding_pcs.png (the paper's patch stem only), position_embedding_similarity.png,
    mean_attention_distance.png.

    ``images`` is a preprocessed batch (B, C, H, W) for the attention distances; a few dozen real
    images are plenty, since the distance is averaged over every query patch of every image.
    """
    out_dir = Path(out_dir)
    cfg = model.config
    mad = _attention_distance_over(model, images)
    written = []
    if cfg.stem == "patch":  # the other stems have no pixel filters (see patch_embedding_components)
        written.append(_plot_components(patch_embedding_components(model), out_dir / "patch_embedding_pcs.png"))
    written.append(_plot_similarity(position_embedding_similarity(model),
                                    out_dir / "position_embedding_similarity.png"))
    written.append(_plot_distance(mad, cfg.patch_size, cfg.img_size, images.shape[0],
                                  out_dir / "mean_attention_distance.png"))
    return written
