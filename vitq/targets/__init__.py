"""Deployment targets: one object per target (``ort``, ``trt``, ``jetson``) owning its pass list, packaging, option
group and capability questions (:mod:`.base`). The target names are defined here and nowhere else.

* :func:`get_target` / :func:`target_from_args`: a target object with validated options;
* :func:`add_target_args`: the ``--target`` flag and every target's option group for ``vitq compile``;
* :func:`build_deployable`: float export + recipe -> the target's deployable graph and the passes report.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..format import TARGETS as ARTIFACT_TARGETS
from ..options import arg_type
from .base import PackageJob, Packaged, Target
from .ort import OrtOptions, OrtTarget
from .trt import JetsonTarget, TrtTarget

TARGETS: dict[str, type[Target]] = {cls.name: cls for cls in (OrtTarget, TrtTarget, JetsonTarget)}
TARGET_NAMES: tuple[str, ...] = ARTIFACT_TARGETS  # the names, defined once in the artifact format
assert tuple(TARGETS) == TARGET_NAMES, (tuple(TARGETS), TARGET_NAMES)
DEFAULT_TARGET = "ort"

__all__ = ["TARGETS", "TARGET_NAMES", "DEFAULT_TARGET", "Target", "PackageJob", "Packaged", "OrtTarget", "OrtOptions",
           "TrtTarget", "JetsonTarget", "get_target", "target_from_args", "add_target_args", "build_deployable"]


def check_target_name(name: str) -> str:
    if name not in TARGETS:
        raise InputError(f"unknown target {name!r} (expected one of: {', '.join(TARGET_NAMES)})")
    return name


def get_target(target: str | Target, options: Any = None) -> Target:
    """A target object: ``target`` itself when it already is one, else the named target with ``options`` (an
    instance of its ``options_type``; None: defaults)."""
    if isinstance(target, Target):
        return target
    cls = TARGETS[check_target_name(target)]
    if options is not None and not isinstance(options, cls.options_type):
        raise InputError(f"--target {target}: options must be {cls.options_type.__name__}, got "
                         f"{type(options).__name__}")
    return cls(options)


def _option_groups() -> dict[type, list[str]]:
    """Each option group and the targets that take it, in target order."""
    groups: dict[type, list[str]] = {}
    for name, cls in TARGETS.items():
        groups.setdefault(cls.options_type, []).append(name)
    return groups


def add_target_args(parser) -> None:
    """``--target`` (in a ``target`` group) and each target's option group."""
    g = parser.add_argument_group("target")
    g.add_argument("--target", default=DEFAULT_TARGET, type=arg_type(check_target_name, "target"),
                   metavar="{" + ",".join(TARGET_NAMES) + "}",
                   help="deployment target (default ort): " + "; ".join(f"{n}: {c.summary}"
                                                                        for n, c in TARGETS.items()))
    for opt in _option_groups():
        opt.add_args(parser)


def target_from_args(args: Any) -> Target:
    """The target named by ``args.target`` with its option group's values; a flag of another target's group is an
    error (it would be ignored)."""
    cls = TARGETS[check_target_name(getattr(args, "target", None) or DEFAULT_TARGET)]
    for opt, owners in _option_groups().items():
        if opt is cls.options_type:
            continue
        given = opt.given(args)
        if given:
            raise InputError(f"{given[0]} applies to --target {'|'.join(owners)}, not --target {cls.name}")
    return cls(cls.options_type.from_args(args))


def build_deployable(model, recipe, target: str | Target, *, validate: bool = True, sample_inputs=None):
    """Run ``target``'s pass list on the float export ``model`` (a ModelProto or a path; not modified) for
    ``recipe`` (a :class:`~vitq.recipe.schema.Recipe`, its dict, or a path). Returns ``(model_proto, report)``; see
    :func:`vitq.passes.pipeline.run_pipeline` for the report and the checks ``validate`` / ``sample_inputs`` ask."""
    from ..passes.pipeline import load_recipe, run_pipeline

    tgt = get_target(target)
    rec = load_recipe(recipe)
    return run_pipeline(model, rec, tgt.passes(rec), target=tgt.name, validate=validate, sample_inputs=sample_inputs)

