"""MixA-Q routing in torch: group geometry, importance, ranking, per-block levels (0 high, 1 low, 2 pruned).

Geometry (:func:`block_geometry`), per routed block:

* ViT/DeiT (``tokens``): the patch grid ``gh x gw`` is cut into groups of ``g1 x g2`` patches, row-major;
  ``table[g]`` lists the flat token indices (prefix tokens first in the sequence, so patch ``p`` is token
  ``prefix + p``) of group ``g``. Prefix (class) tokens are always high.
* Swin (``windows``): the stage resolution ``H x W`` in windows of ``wh x ww`` in the block's (shifted) frame,
  ordered like timm's ``window_partition``; ``table[w][t]`` is the flat index ``i * W + j`` (in the *unshifted*
  block input) of token ``t`` of window ``w``. Timm's shifted block computes ``roll(x, -s)`` before partitioning,
  so window position ``(r, c)`` holds token ``((r + s_h) % H, (c + s_w) % W)``: gathering the importance map
  through the table rolls it exactly as the features are rolled.

Importance (:func:`token_importance`, :func:`group_scores`): at the stage's first block input ``x``, per token
``a = mean_c |x|``; per group ``sqrt(sum_t a[table[g, t]]^2)``. Ranking: descending, ties to the lower index
(``torch.sort(stable=True)``, ONNX TopK's rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedError
from ..recipe.mixa import group_table


@dataclass
class BlockGeom:
    block: str                # timm module path of the block
    stage: int
    stage_first: str          # the stage's first block (importance is computed at its input)
    layout: str               # "tokens" (ViT) | "windows" (Swin)
    table: torch.Tensor       # [G, T] int64: flat token indices of each group
    n_tokens: int             # tokens per image in the flat layout (ViT: N incl. prefix; Swin: H * W)
    prefix: int = 0           # ViT prefix tokens (always high)
    shift: tuple[int, int] = (0, 0)
    grid: tuple[int, int] = (0, 0)    # ViT patch grid / Swin stage resolution
    group: tuple[int, int] = (0, 0)   # group / window size

    @property
    def groups(self) -> int:
        return int(self.table.shape[0])


def vit_table(grid: tuple[int, int], group: tuple[int, int], prefix: int) -> torch.Tensor:
    try:
        return torch.from_numpy(group_table("tokens", grid, group, (0, 0), prefix))
    except ValueError as e:
        raise UnsupportedError(f"MixA-Q token groups: {e}") from None


def swin_table(res: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    try:
        return torch.from_numpy(group_table("windows", res, window, shift, 0))
    except ValueError as e:
        raise UnsupportedError(f"MixA-Q windows (padded windows are not supported): {e}") from None


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def block_geometry(model: nn.Module, family: str, group: tuple[int, int] | None = None) -> list[BlockGeom]:
    """The routed blocks of a (prepared) timm model, in forward order."""
    out = []
    if family == "vit":
        if group is None:
            raise UnsupportedError("MixA-Q on ViT/DeiT needs a token group size (e.g. 2x2)")
        grid = _pair(model.patch_embed.grid_size)
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        table = vit_table(grid, _pair(group), prefix)
        n = prefix + grid[0] * grid[1]
        for i in range(len(model.blocks)):
            out.append(BlockGeom(f"blocks.{i}", 0, "blocks.0", "tokens", table, n, prefix, (0, 0), grid,
                                 _pair(group)))
    elif family == "swin":
        from ..exporter.models import transformer_blocks

        firsts: dict[str, str] = {}
        for path, b in transformer_blocks(model)[1]:
            stage_path = path.rsplit(".blocks.", 1)[0]
            s = int(stage_path.rsplit(".", 1)[1])
            first = firsts.setdefault(stage_path, path)
            res = _pair(b.input_resolution if hasattr(b, "input_resolution") else b.feat_size)
            win = _pair(b.window_size)
            shift = _pair(b.shift_size)
            if group is not None and _pair(group) != win:
                raise UnsupportedError(f"MixA-Q windows: group {group} differs from the window size {win} of "
                                       f"{path} (Swin routes its own attention windows)")
            out.append(BlockGeom(path, s, first, "windows", swin_table(res, win, shift), res[0] * res[1], 0, shift,
                                 res, win))
    else:
        raise UnsupportedError(f"MixA-Q: model family {family!r} is not supported")
    return out


def token_importance(x: torch.Tensor) -> torch.Tensor:
    """Per token ``mean_c |x|``, flattened: ViT ``[B, N, C] -> [B, N]``, Swin ``[B, H, W, C] -> [B, H*W]``."""
    a = x.abs().mean(-1)
    return a.reshape(a.shape[0], -1)


def group_scores(a: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``[B, n_tokens]``, ``[G, T]`` -> ``[B, G]``: L2 norm of ``a`` over each group's tokens."""
    g = a[:, table]  # [B, G, T]
    return g.pow(2).sum(-1).sqrt()


def rank_groups(scores: torch.Tensor) -> torch.Tensor:
    """``[B, G]`` -> rank ``[B, G]`` (0 = most important); ties: the lower group index ranks first."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return rank


def group_levels(rank: torch.Tensor, n_high: int, n_low: int) -> torch.Tensor:
    """0 (high) for rank < n_high, 1 (low) for the next n_low ranks, 2 (pruned) for the rest."""
    lvl = torch.full_like(rank, 2)
    lvl[rank < n_high + n_low] = 1
    lvl[rank < n_high] = 0
    return lvl


def token_levels(glevel: torch.Tensor, geom: BlockGeom) -> torch.Tensor:
    """Group levels ``[B, G]`` -> token levels ``[B, n_tokens]`` in the flat (unshifted) layout; prefix tokens 0."""
    B = glevel.shape[0]
    out = torch.zeros(B, geom.n_tokens, dtype=glevel.dtype)
    T = geom.table.shape[1]
    out.scatter_(1, geom.table.reshape(1, -1).expand(B, -1), glevel.repeat_interleave(T, dim=1))
    return out
