"""The recipe's optional ``mixa`` section (MixA-Q: per token-group / per window activation precision): a typed
object, parsed and validated once when the recipe is read (``Recipe.mixa``), written back by ``Recipe.to_dict``.

Plain data (numpy for the group tables, no torch). Format (schema ``vitq.recipe/1``, key ``mixa``)::

    "mixa": {
      "scheme": "tokens" | "windows",   # tokens: ViT/DeiT patch-grid groups; windows: Swin (shifted) windows
      "group": [gh, gw],                # tokens: group size in patches (e.g. [2, 2]); windows: the window size
      "high_bits": 8, "low_bits": 4,    # activation bits of the two branches (32 = float, no quantizer)
      "routed": ["linear"],             # roles with per-group precision: "linear" (qkv, proj, fc1, fc2) and
                                        # optionally "attn" (the q/k/attn/v matmul operands)
      "base": "w4a8",                   # name of the uniform base recipe the reduction is measured against
      "blocks": [                       # one entry per routed block, forward order
        {"block": "blocks.0", "stage": 0, "shift": [0, 0], "groups": 49, "ratio": 0.5, "n_low": 24,
         "n_prune": 0}, ...],
      "layers": [                       # per routed layer: the two branches' full quantizer specs (LayerSpec);
        {"module": "blocks.0.attn.qkv", "high": {...} | null, "low": {...} | null}, ...]   # null = float
    }

Routing (implemented identically by :mod:`vitq.mixa.routing` and the graph pass
:mod:`vitq.passes.split_windows`): importance is computed once per stage from the stage's first block input
(per token ``a = mean_c |x|``, per group the L2 norm of ``a`` over its tokens); groups are ranked by descending
importance (ties: lower index first, ONNX TopK's rule). In a block with ``G`` groups, ``n_low`` low and ``n_prune``
pruned groups, the first ``G - n_low - n_prune`` ranks run in the high branch, the next ``n_low`` in the low branch,
the rest are skipped (identity). ``n_low = floor(ratio * G)`` (static per block). Ranks are shared within a stage
(for shifted Swin blocks: the importance map rolled like the features), so the high sets are nested.
Prefix tokens (the class token) are always high.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .spec import LayerSpec, RecipeError, _only_keys, _require_obj

SCHEMES = ("tokens", "windows")
ROLES = ("linear", "attn")
FLOAT_BITS = 32
MAX_RATIO = 0.8


def n_low_groups(groups: int, ratio: float) -> int:
    """Groups in the low branch for a ratio: ``floor(ratio * groups)`` (high group: the top ``groups - n_low``)."""
    return int(math.floor(ratio * groups + 1e-9))


def group_table(scheme: str, grid: tuple[int, int], group: tuple[int, int], shift: tuple[int, int] = (0, 0),
                prefix: int = 0):
    """``[G, T]`` int64 numpy table: the flat token indices of each group (see :mod:`vitq.mixa.routing`).

    ``tokens`` (ViT): the ``grid`` of patches (after ``prefix`` tokens) in ``group``-sized blocks, row-major.
    ``windows`` (Swin): the stage resolution ``grid`` in windows of ``group`` in the block's shifted frame
    (``roll(x, -shift)`` then ``window_partition``): window position ``(r, c)`` holds token
    ``((r + s_h) % H, (c + s_w) % W)``."""
    import numpy as np

    H, W = grid
    g1, g2 = group
    if H % g1 or W % g2:
        raise ValueError(f"groups of {g1}x{g2} do not tile the {H}x{W} token grid")
    sh, sw = shift if scheme == "windows" else (0, 0)
    ti = np.arange(g1)[:, None]
    tj = np.arange(g2)[None, :]
    rows = []
    for wi in range(H // g1):
        for wj in range(W // g2):
            r = (wi * g1 + ti + sh) % H
            c = (wj * g2 + tj + sw) % W
            rows.append((prefix + r * W + c).reshape(-1))
    return np.stack(rows).astype(np.int64)


def stage_first(scheme: str, block: str) -> str:
    """The first block of the stage ``block`` belongs to (importance is computed at its input)."""
    return "blocks.0" if scheme == "tokens" else block.rsplit(".", 1)[0] + ".0"


def _unique_path(d: dict, key: str, where: str, seen: set) -> str:
    """``d[key]``: a timm module path not already in ``seen`` (then added to it)."""
    name = d.get(key)
    if not isinstance(name, str) or not name:
        raise _err(f"{where}.{key}: expected a timm module path, got {name!r}")
    if name in seen:
        raise _err(f"{where}.{key}: {name!r} appears twice")
    seen.add(name)
    return name


def _err(msg: str) -> RecipeError:
    return RecipeError(msg)


def _bits(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not (2 <= v <= 8 or v in (16, FLOAT_BITS)):
        raise _err(f"{where}: expected activation bits in 2..8 or 32 (float), got {v!r}")
    return v


@dataclass
class MixaBlock:
    block: str
    stage: int
    groups: int
    ratio: float
    n_low: int
    n_prune: int = 0
    shift: tuple[int, int] = (0, 0)
    grid: tuple[int, int] = (0, 0)  # ViT patch grid / Swin stage resolution (tokens)

    @property
    def n_high(self) -> int:
        return self.groups - self.n_low - self.n_prune

    def to_dict(self) -> dict:
        return {"block": self.block, "stage": self.stage, "grid": list(self.grid), "shift": list(self.shift),
                "groups": self.groups, "ratio": self.ratio, "n_low": self.n_low, "n_prune": self.n_prune}


@dataclass
class MixaLayer:
    module: str
    high: Any  # LayerSpec | None (float)
    low: Any   # LayerSpec | None (float)

    def to_dict(self) -> dict:
        return {"module": self.module, "high": None if self.high is None else self.high.to_dict(),
                "low": None if self.low is None else self.low.to_dict()}


@dataclass
class MixaSpec:
    scheme: str
    group: tuple[int, int]
    high_bits: int
    low_bits: int
    blocks: list[MixaBlock] = field(default_factory=list)
    layers: list[MixaLayer] = field(default_factory=list)
    routed: tuple[str, ...] = ("linear",)
    base: str | None = None
    prefix: int = 0  # ViT prefix (class) tokens, always high
    info: dict = field(default_factory=dict)  # free-form (search trace, bit-op summary): not interpreted

    @property
    def low_quant(self) -> str:
        """``dynamic`` when the low branch's activation quantizers are dynamic per token, else ``static``."""
        for l in self.layers:
            if l.low is not None and any(q.dynamic for q in l.low.quantizers().values()):
                return "dynamic"
        return "static"

    @property
    def low_group(self) -> int:
        """The group size of the dynamic low branch's Linear inputs (0: per token, or no dynamic low branch)."""
        for l in self.layers:
            if l.low is not None and l.low.input is not None and l.low.input.dynamic and l.low.input.group:
                return int(l.low.input.group)
        return 0

    @property
    def low_softmax(self) -> str:
        """``log`` when the low branch's post-softmax operand is on the log-sqrt(2) grid, else ``uniform``."""
        for l in self.layers:
            if l.low is not None and l.low.kind == "attn" and l.low.attn is not None and \
                    l.low.attn.dynamic == "log_sqrt2":
                return "log"
        return "uniform"

    def block(self, name: str) -> MixaBlock | None:
        for b in self.blocks:
            if b.block == name:
                return b
        return None

    def block_of(self, module: str) -> MixaBlock | None:
        """The routed block a module belongs to (longest matching prefix)."""
        best = None
        for b in self.blocks:
            if module.startswith(b.block + ".") and (best is None or len(b.block) > len(best.block)):
                best = b
        return best

    def layer(self, module: str) -> MixaLayer | None:
        for l in self.layers:
            if l.module == module:
                return l
        return None

    def ratios(self) -> dict[str, float]:
        return {b.block: b.ratio for b in self.blocks}

    def with_ratios(self, ratios: dict[str, float], prune: dict[str, float] | None = None) -> "MixaSpec":
        """A copy with new per-block ratios (``n_low`` recomputed); ``prune``: per-block pruned fraction."""
        import copy

        s = copy.copy(self)
        s.blocks = []
        for b in self.blocks:
            r = float(ratios.get(b.block, b.ratio))
            p = float((prune or {}).get(b.block, 0.0))
            nl = n_low_groups(b.groups, r)
            npr = n_low_groups(b.groups, p) if p else 0
            s.blocks.append(MixaBlock(b.block, b.stage, b.groups, r, nl, npr, b.shift, b.grid))
        s.validate()
        return s

    def validate(self, where: str = "mixa") -> None:
        for i, b in enumerate(self.blocks):
            w = f"{where}.blocks[{i}]"
            if not 0.0 <= b.ratio <= MAX_RATIO + 1e-9:
                raise _err(f"{w}.ratio: expected a fraction in [0, {MAX_RATIO}], got {b.ratio!r}")
            if b.n_low != n_low_groups(b.groups, b.ratio):
                raise _err(f"{w}.n_low: {b.n_low} does not match floor(ratio * groups) = "
                           f"{n_low_groups(b.groups, b.ratio)} (ratio {b.ratio}, groups {b.groups})")
            if b.n_prune < 0 or b.n_high < 1:
                raise _err(f"{w}: n_low {b.n_low} + n_prune {b.n_prune} leave no high group out of {b.groups}")

    def to_dict(self) -> dict:
        d = {"scheme": self.scheme, "group": list(self.group), "high_bits": self.high_bits,
             "low_bits": self.low_bits, "routed": list(self.routed), "base": self.base, "prefix": self.prefix,
             "blocks": [b.to_dict() for b in self.blocks], "layers": [l.to_dict() for l in self.layers]}
        if self.info:
            d["info"] = self.info
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "mixa", layers: list | None = None) -> "MixaSpec":
        """Validate and parse; ``layers`` (the recipe's LayerSpecs): every routed module must be one of them."""
        _require_obj(d, where)
        _only_keys(d, where, {"scheme", "group", "high_bits", "low_bits", "routed", "base", "prefix", "blocks",
                              "layers", "info"})
        scheme = d.get("scheme")
        if scheme not in SCHEMES:
            raise _err(f"{where}.scheme: {scheme!r} is not one of {', '.join(SCHEMES)}")
        group = d.get("group")
        if not (isinstance(group, list) and len(group) == 2 and
                all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in group)):
            raise _err(f"{where}.group: expected [height, width] of positive integers, got {group!r}")
        hb = _bits(d.get("high_bits"), f"{where}.high_bits")
        lb = _bits(d.get("low_bits"), f"{where}.low_bits")
        if lb > hb:
            raise _err(f"{where}: low_bits {lb} is above high_bits {hb}")
        routed = d.get("routed", ["linear"])
        if not isinstance(routed, list) or not routed or any(r not in ROLES for r in routed) or \
                len(set(routed)) != len(routed):
            raise _err(f"{where}.routed: expected a non-empty list of distinct roles from {', '.join(ROLES)}, "
                       f"got {routed!r}")
        base = d.get("base")
        if base is not None and not isinstance(base, str):
            raise _err(f"{where}.base: expected a recipe name or null, got {base!r}")
        prefix = d.get("prefix", 0)
        if not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0 or \
                (scheme == "windows" and prefix):
            raise _err(f"{where}.prefix: expected a non-negative integer (0 for windows), got {prefix!r}")
        blocks_d = d.get("blocks")
        if not isinstance(blocks_d, list) or not blocks_d:
            raise _err(f"{where}.blocks: expected a non-empty list of routed blocks")
        blocks, seen = [], set()
        for i, b in enumerate(blocks_d):
            w = f"{where}.blocks[{i}]"
            _require_obj(b, w)
            _only_keys(b, w, {"block", "stage", "grid", "shift", "groups", "ratio", "n_low", "n_prune"})
            name = _unique_path(b, "block", w, seen)
            ints = {}
            for k, lo in (("stage", 0), ("groups", 1), ("n_low", 0), ("n_prune", 0)):
                v = b.get(k, 0 if k in ("stage", "n_prune") else None)
                if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                    raise _err(f"{w}.{k}: expected an integer >= {lo}, got {v!r}")
                ints[k] = v
            r = b.get("ratio")
            if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r):
                raise _err(f"{w}.ratio: expected a number, got {r!r}")
            shift = b.get("shift", [0, 0])
            if not (isinstance(shift, list) and len(shift) == 2 and
                    all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shift)):
                raise _err(f"{w}.shift: expected [sh, sw] of non-negative integers, got {shift!r}")
            grid = b.get("grid")
            if not (isinstance(grid, list) and len(grid) == 2 and
                    all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)):
                raise _err(f"{w}.grid: expected [height, width] in tokens of positive integers, got {grid!r}")
            try:
                table = group_table(scheme, tuple(grid), tuple(group), tuple(shift), prefix)
            except ValueError as e:
                raise _err(f"{w}: {e}") from None
            if table.shape[0] != ints["groups"]:
                raise _err(f"{w}.groups: {ints['groups']} but a {grid[0]}x{grid[1]} grid in {group[0]}x{group[1]} "
                           f"groups has {table.shape[0]}")
            blocks.append(MixaBlock(name, ints["stage"], ints["groups"], float(r), ints["n_low"], ints["n_prune"],
                                    (shift[0], shift[1]), (grid[0], grid[1])))
        layers_d = d.get("layers")
        if not isinstance(layers_d, list) or not layers_d:
            raise _err(f"{where}.layers: expected a non-empty list of routed layers")
        known = {l.module: l for l in layers} if layers is not None else None
        spec = cls(scheme, (group[0], group[1]), hb, lb, blocks, [], tuple(routed), base, prefix,
                   dict(d.get("info") or {}))
        spec.validate(where)
        mods = set()
        for i, l in enumerate(layers_d):
            w = f"{where}.layers[{i}]"
            _require_obj(l, w)
            _only_keys(l, w, {"module", "high", "low"})
            m = _unique_path(l, "module", w, mods)
            if spec.block_of(m) is None:
                raise _err(f"{w}.module: {m!r} is not inside any routed block ({', '.join(b.block for b in blocks)})")
            if known is not None and m not in known:
                raise _err(f"{w}.module: {m!r} is not a layer of the recipe")
            br = {}
            for k in ("high", "low"):
                if k not in l:
                    raise _err(f"{w}.{k}: missing (a LayerSpec object, or null for float)")
                br[k] = None if l[k] is None else LayerSpec.from_dict(l[k], f"{w}.{k}")
                if br[k] is not None and br[k].module != m:
                    raise _err(f"{w}.{k}.module: {br[k].module!r} differs from the entry's module {m!r}")
                if br[k] is not None and known is not None and br[k].kind != known[m].kind:
                    raise _err(f"{w}.{k}.kind: {br[k].kind!r} but the recipe layer is {known[m].kind!r}")
            kind = (br["high"] or br["low"]).kind if (br["high"] or br["low"]) else \
                (known[m].kind if known is not None else "linear")
            role = "attn" if kind == "attn" else "linear"
            if role not in spec.routed:
                raise _err(f"{w}: a {kind} layer is listed but {role!r} is not in {where}.routed")
            spec.layers.append(MixaLayer(m, br["high"], br["low"]))
        return spec
