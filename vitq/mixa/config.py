"""``MixaConfig``: what ``vitq compile --mixa ... [--mixa-*]`` asks for, as one validated object.

Built once from the command line (:meth:`MixaConfig.from_args`) or by a library caller; every value is checked on
construction (:class:`~vitq.errors.InputError`, exit 2, naming the flag), and :meth:`MixaConfig.resolve` checks it
against the deployment target and takes the target's defaults. The recipe-dependent defaults (the branch bits
from the recipe's activation bits; the low branch's quantizers from its bits and the model's Linear widths) are
resolved by :mod:`vitq.mixa.compile` once the recipe exists. Torch-free: the command line imports it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..recipe.mixa import FLOAT_BITS
from ..recipe.spec import SOFTMAX_GRIDS

LOW_QUANT = ("static", "dynamic")
LOW_SOFTMAX = SOFTMAX_GRIDS
ROUTED = ("linear+attn", "linear")
#: the default group of the dynamic low branch's Linear inputs (features per grid), where the target and every
#: Linear allow it
DEFAULT_LOW_GROUP = 32
DEFAULT_TOKEN_GROUP = "2x2"
_TARGET = re.compile(r"^(\d+(?:\.\d+)?)x?$")
_NEEDS_MIXA = "(a recipe file's mixa section already fixes its quantizers)"


def parse_mixa_arg(arg: str) -> tuple[str, object]:
    """``--mixa``: ``("target", 1.35)`` or ``("ratios", {...})``."""
    m = _TARGET.match(arg.strip())
    if m:
        t = float(m.group(1))
        if t < 1.0:
            raise InputError(f"--mixa {arg}: the bit-operation reduction target must be >= 1 (e.g. 1.35x)")
        return "target", t
    p = Path(arg)
    if not p.is_file():
        raise InputError(f"--mixa {arg!r}: expected a reduction target like 1.35x or a ratios .json file")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"--mixa {p}: not valid JSON: line {e.lineno}: {e.msg}") from None
    if not isinstance(d, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and
                                          0 <= v <= 0.8 for v in d.values()):
        raise InputError(f"--mixa {p}: expected an object of block -> ratio in [0, 0.8]")
    return "ratios", {str(k): float(v) for k, v in d.items()}


def _parse_bits(arg: str) -> tuple[int, int]:
    m = re.match(r"^(fp32|\d+)/(\d+)$", arg.strip())
    if not m:
        raise InputError(f"--mixa-bits {arg!r}: expected HIGH/LOW, e.g. 8/4 or fp32/8")
    hi = FLOAT_BITS if m.group(1) == "fp32" else int(m.group(1))
    lo = int(m.group(2))
    for b in (hi, lo):
        if not (2 <= b <= 8 or b == FLOAT_BITS):
            raise InputError(f"--mixa-bits {arg}: bits must be 2..8 (or 32/fp32 for a float high branch)")
    if lo > hi:
        raise InputError(f"--mixa-bits {arg}: the low branch has more bits than the high one")
    return hi, lo


def parse_bits_arg(arg: str | None, recipe) -> tuple[int, int]:
    """``--mixa-bits HIGH/LOW``; without it the recipe's uniform activation bits / 4."""
    if arg is None:
        base = recipe.defaults.get("act_bits")
        if not isinstance(base, int):
            raise InputError("--mixa needs --mixa-bits H/L for a recipe without uniform activation bits")
        return base, 4
    return _parse_bits(arg)


def _parse_group(arg: str) -> tuple[int, int]:
    try:
        group = tuple(int(v) for v in arg.lower().split("x"))
        assert len(group) == 2
    except (ValueError, AssertionError):
        raise InputError(f"--mixa-group {arg!r}: expected HxW, e.g. 2x2") from None
    return group


def _choice(flag: str, v: str | None, choices: tuple[str, ...]) -> str | None:
    if v is not None and v not in choices:
        raise InputError(f"{flag} {v!r}: expected {' or '.join(choices)}")
    return v


@dataclass
class MixaConfig:
    """``--mixa TARGET|RATIOS.json`` and its options; None fields take the defaults described in ``add_args``."""

    mixa: str
    bits: str | None = None
    group: str | None = None
    routed: str | None = None
    low_quant: str | None = None
    low_group: int | None = None
    low_softmax: str | None = None

    #: field -> flag, in the order the flags are checked
    FLAGS = {"bits": "--mixa-bits", "group": "--mixa-group", "routed": "--mixa-routed",
             "low_quant": "--mixa-low-quant", "low_group": "--mixa-low-group", "low_softmax": "--mixa-low-softmax"}

    def __post_init__(self):
        self.kind, self.value = parse_mixa_arg(self.mixa)
        if self.bits is not None:
            _parse_bits(self.bits)
        self.token_group = _parse_group(self.group or DEFAULT_TOKEN_GROUP)
        self.routed_roles = tuple((_choice("--mixa-routed", self.routed, ROUTED) or ROUTED[0]).split("+"))
        _choice("--mixa-low-quant", self.low_quant, LOW_QUANT)
        if self.low_group is not None:
            if self.low_quant == "static":
                raise InputError("--mixa-low-group needs the dynamic low branch (groups split a token's dynamic "
                                 "grid): drop --mixa-low-quant static")
            if self.low_group == 1 or self.low_group < 0:
                raise InputError(f"--mixa-low-group {self.low_group}: expected a group size >= 2 (e.g. 32), or 0 "
                                 f"for one grid per token")
        if self.low_softmax is not None:
            _choice("--mixa-low-softmax", self.low_softmax, LOW_SOFTMAX)
            if self.low_quant == "static":
                raise InputError("--mixa-low-softmax needs the dynamic low branch (the grid is per query row, "
                                 "computed at run time): drop --mixa-low-quant static")
        self.default_low_group = DEFAULT_LOW_GROUP

    def resolve(self, target) -> "MixaConfig":
        """Check the options against ``target`` (a :class:`vitq.targets.Target`) and take its default low-branch
        grouping; returns ``self``."""
        if self.low_group is not None:
            target.check_act_group(self.low_group, "--mixa-low-group")
        self.default_low_group = target.default_act_group
        return self

    def branch_bits(self, recipe) -> tuple[int, int]:
        return parse_bits_arg(self.bits, recipe)

    @staticmethod
    def add_args(parser) -> None:
        g = parser.add_argument_group("MixA-Q (mixed-precision activations)")
        g.add_argument("--mixa", metavar="TARGET|RATIOS.json",
                       help="a bit-operation reduction vs the recipe's uniform base (e.g. 1.35x, ratios searched) "
                            "or a JSON of per-block low-bit ratios")
        g.add_argument("--mixa-bits", metavar="HIGH/LOW", help="activation bits of the two branches (default: "
                       "the recipe's / 4; fp32/8 = float high branch)")
        g.add_argument("--mixa-group", metavar="HxW", help=f"token group on ViT/DeiT (default {DEFAULT_TOKEN_GROUP})")
        g.add_argument("--mixa-routed", metavar="{" + ",".join(ROUTED) + "}",
                       help="route the attention operands too (default linear+attn)")
        g.add_argument("--mixa-low-quant", metavar="{" + ",".join(LOW_QUANT) + "}",
                       help="low branch's activation quantizers: dynamic scales per token computed at run time "
                            "(default at 4 low bits: the accurate one; on TensorRT the QuantLinearA4 plugin's "
                            "dynamic mode) or static scales calibrated on the branch's own tokens (the paper's; "
                            "default at 8 low bits, which ONNX Runtime runs natively)")
        g.add_argument("--mixa-low-group", metavar="G", type=int,
                       help="dynamic low branch: one grid per G consecutive features of a token (0: one per "
                            f"token). Default {DEFAULT_LOW_GROUP} on --target ort where every Linear allows it, else "
                            "per token (the TensorRT plugin takes 32, 64, 128 or 256; its grouped mode has not run "
                            "on a GPU yet)")
        g.add_argument("--mixa-low-softmax", metavar="{" + ",".join(LOW_SOFTMAX) + "}",
                       help="dynamic low branch's post-softmax grid per query row: log-sqrt(2) relative to the row "
                            "max (default at 4 bits: lower error, same bits) or uniform")

    @classmethod
    def from_args(cls, args: Any) -> "MixaConfig | None":
        """From an argparse namespace; None without ``--mixa`` (its options then are an error)."""
        vals = {f: getattr(args, "mixa_" + f, None) for f in cls.FLAGS}
        if getattr(args, "mixa", None) is None:
            given = [cls.FLAGS[f] for f, v in vals.items() if v is not None]
            if given:
                raise InputError(f"{given[0]} needs --mixa {_NEEDS_MIXA}")
            return None
        return cls(args.mixa, **vals)

    def to_dict(self) -> dict[str, Any]:
        return {"mixa": self.mixa, **{f: getattr(self, f) for f in self.FLAGS}}
