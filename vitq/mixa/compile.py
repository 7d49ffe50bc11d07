"""``vitq compile ... --mixa 1.35x|ratios.json [--mixa-bits 8/4]``: build the recipe's ``mixa`` section inside
the compile pipeline and report it (the options: :class:`vitq.mixa.config.MixaConfig`).

* ``--mixa 1.35x`` (or ``1.35``): a target bit-operation reduction against the recipe's uniform base; ratios are
  searched (:func:`vitq.mixa.search.search_ratios`) on the first ``SEARCH_IMAGES`` calibration images.
* ``--mixa ratios.json``: explicit ratios, ``{"blocks.3": 0.5, ...}`` (ViT blocks, Swin blocks; a Swin pair may be
  given as ``"layers.0.blocks.0+1"``) or ``{"default": 0.5}``; blocks not listed get ``default`` (0 if absent).
* ``--mixa-bits H/L``: high/low activation bits (``32``/``fp32`` = float high branch); default: the recipe's
  activation bits / 4.
* ``--mixa-low-quant static|dynamic``: the low branch's activation quantizers calibrated on its own tokens
  (default) or dynamic per token (:func:`vitq.mixa.calib.dynamic_branch`; TensorRT through the plugin's per-row mode).
* a recipe file that already has a ``mixa`` section is used as is (without ``--mixa``).

Adds ``report["mixa"]``: ``bitops_reduction`` (float, vs the uniform base), ``ratios`` (per block / pair),
``groups`` (per block: groups, n_high, n_low), bits, scheme, the search summary.
"""

from __future__ import annotations

from ..errors import InputError
from .config import MixaConfig

SEARCH_IMAGES = 16
CALIB_IMAGES = 32


def _explicit_ratios(spec, given: dict) -> dict:
    out = {}
    known = {b.block for b in spec.blocks}
    for k, v in given.items():
        if k == "default":
            continue
        if "+" in k:  # Swin pair "layers.0.blocks.0+1"
            first, second = k.split("+", 1)
            names = [first, first.rsplit(".", 1)[0] + "." + second]
        else:
            names = [k]
        for n in names:
            if n not in known:
                raise InputError(f"--mixa ratios: {n!r} is not a routed block of this model "
                                 f"({', '.join(sorted(known)[:4])}, ...)")
            out[n] = v
    d = given.get("default", 0.0)
    return {b.block: out.get(b.block, d) for b in spec.blocks}


def low_branch_defaults(config: MixaConfig, low_bits: int, rec, sim) -> tuple[str, int, str]:
    """(low_quant, low_group, low_softmax) of ``--mixa``: the options given, else the measured-best defaults.

    At 4 low bits the low branch is dynamic (the paper's static per-tensor scales lose 1.2 top-1 and 3 agreement
    points at 1.35x on DeiT-Tiny; dynamic, grouped by 32, with the log-sqrt(2) post-softmax grid: 0.2 and 0.15,
    docs/mixa.md), grouped by the target's default group (``config.default_low_group``, :meth:`MixaConfig.resolve`)
    where every quantized Linear's input allows it, else per token, with the log-sqrt(2) softmax grid. At 8 low
    bits (e.g. the ORT-native fp32/8 pair) static int8, which ONNX Runtime runs natively.
    ``--mixa-low-group`` / ``--mixa-low-softmax`` imply the dynamic branch."""
    lq, lg, ls = config.low_quant, config.low_group, config.low_softmax
    if lq is None:
        lq = "dynamic" if low_bits == 4 or lg is not None or ls is not None else "static"
    if lq != "dynamic":
        return lq, 0, "uniform"
    if lg is None:
        ks = [int(w.float_weight.shape[1]) for name, w in getattr(sim, "wrappers", {}).items()
              if rec.layer(name) is not None and rec.layer(name).kind == "linear"]
        d = config.default_low_group
        lg = d if d and ks and all(k % d == 0 for k in ks) else 0
    if ls is None:
        ls = "log" if low_bits == 4 else "uniform"
    return lq, lg, ls


def apply_mixa(config: MixaConfig | None, rec, prepared, sim, lm, calib, cfg, report: dict, log, echo, *,
               seed: int = 0, skip_bad: bool = False):
    """Build the recipe's ``mixa`` section for ``config`` (resolved against the target), or use the recipe file's
    (``config`` None). Returns ``(recipe with mixa, MixaSim)``; fills ``report["mixa"]``."""
    import torch

    from .bitops import mixa_bitops
    from .calib import attach, build_mixa_spec
    from .search import search_ratios, units_of, unit_name
    from .sim import MixaSim
    info = None
    if config is None:  # recipe file with a mixa section
        spec = rec.mixa
        msim = MixaSim(sim, spec)
    else:
        if rec.mixa is not None:
            raise InputError("--mixa given, but the recipe file already has a mixa section (drop one of them)")
        kind, val = config.kind, config.value
        hi, lo = config.branch_bits(rec)
        if calib is None:
            raise InputError("--mixa needs calibration images for the branch quantizers: pass --calib DIR")
        from ..data import load_array

        n = max(CALIB_IMAGES, SEARCH_IMAGES)
        x, _ = load_array(calib.subset(min(n, len(calib)), seed=seed), cfg, skip_bad=skip_bad)
        group = config.token_group if lm.family == "vit" else None
        routed = config.routed_roles
        low_quant, low_group, low_softmax = low_branch_defaults(config, lo, rec, sim)
        with log.step("MixA-Q: calibrating the branch quantizers on their own tokens/windows"):
            spec = build_mixa_spec(prepared, sim, rec, x[:CALIB_IMAGES], group=group, high_bits=hi, low_bits=lo,
                                   routed=routed, ratios=0.0, calib_ratios=0.6, low_quant=low_quant,
                                   low_group=low_group, low_softmax=low_softmax)
            msim = MixaSim(sim, spec)
        if kind == "target":
            with log.step(f"MixA-Q: ratio search for {val:g}x fewer bit-operations"):
                spec, info = search_ratios(msim, rec, torch.from_numpy(x[:SEARCH_IMAGES]), val)
        else:
            spec = msim.set_ratios(_explicit_ratios(spec, val))
        rec = attach(rec, spec)
    bo = mixa_bitops(rec, spec)
    units = units_of(spec)
    report["mixa"] = {
        "scheme": spec.scheme, "group": list(spec.group), "high_bits": spec.high_bits, "low_bits": spec.low_bits,
        "routed": list(spec.routed), "base": spec.base,
        "low_quant": spec.low_quant, "low_group": spec.low_group, "low_softmax": spec.low_softmax,
        "bitops_reduction": float(bo["reduction"]),
        "bitops": {"base_total": bo["base_total"], "total": bo["total"]},
        "ratios": {unit_name(u): spec.block(u[0]).ratio for u in units},
        "groups": {b.block: {"stage": b.stage, "groups": b.groups, "n_high": b.n_high, "n_low": b.n_low}
                   for b in spec.blocks},
        "search": None if info is None else {k: v for k, v in info.items() if k not in ("sensitivity", "trace")},
    }
    echo(f"[vitq] MixA-Q: {bo['reduction']:.3f}x fewer bit-operations than uniform {spec.base} "
         f"(high a{spec.high_bits} / low a{spec.low_bits}"
         f"{' dynamic per token' if report['mixa']['low_quant'] == 'dynamic' else ''}"
         f"{f' per {spec.low_group} features' if spec.low_group else ''}"
         f"{', log-sqrt2 softmax' if spec.low_softmax == 'log' else ''}, {spec.scheme})")
    return rec, msim

