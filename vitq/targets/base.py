"""The contract of a deployment target: what the compiler asks a target, so that nothing else branches on its name.

A target owns its graph pass list, its checks of the graphs it is handed, its packaging (engine, bundle) and its
capability questions (e.g. which activation group sizes its kernels run). Its options come from one option group
(``options_type``: ``add_args`` / ``from_args`` / ``given`` / ``to_dict``), validated when the options object is
built. Module imports stay light (the command line builds its parser from these classes); the passes, onnx-ir and
the TensorRT helpers are imported when a method needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..errors import InputError


@dataclass
class PackageJob:
    """What packaging needs: the staging folder (renamed to ``out`` when the compile succeeds), the deployable
    model in it, and the model's description."""

    stage: Path
    out: Path
    model_path: Path
    model_name: str
    recipe_name: str
    preprocess: dict
    num_classes: int
    step: Callable[[str], Any]  # context manager factory timing one step (the compiler's log)
    echo: Callable[[str], None] = print


@dataclass
class Packaged:
    """Report sections the packaging adds, and what must run after ``report.json`` is written (a bundle manifest
    that hashes every file, the report included)."""

    report: dict[str, Any] = field(default_factory=dict)
    finalize: Callable[[Path], Any] | None = None


class Target:
    """One deployment target. Subclasses set ``name``, ``options_type`` and ``base_passes``."""

    name: ClassVar[str]
    options_type: ClassVar[type]
    #: what ``--target`` help says about it
    summary: ClassVar[str] = ""
    #: dynamic low-bit activation group size used when the option is not given and every Linear allows it
    #: (0: one grid per token)
    default_act_group: ClassVar[int] = 0
    #: 4-bit Linear weights: one scale per this many input features (0: one per output channel)
    default_weight_group: ClassVar[int] = 0

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.options_type()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    # ---- capabilities ----
    def act_groups(self) -> tuple[int, ...] | None:
        """Group sizes (features per grid; 0 = per token) its dynamic low-bit activations run with; None: any."""
        return None

    def check_act_group(self, group: int, flag: str) -> None:
        """Raise :class:`InputError` naming ``flag`` when this target cannot run activation groups of ``group``."""
        ok = self.act_groups()
        if ok is not None and group not in ok:
            raise InputError(f"{flag} {group} with --target {self.name}: {self._act_group_reason(ok)}")

    def _act_group_reason(self, ok: tuple[int, ...]) -> str:
        return f"expected one of {', '.join(map(str, ok))}"

    def resolve_recipe(self, request):
        """A preset request as this target compiles it (a preset name means the best measured form for the
        target): ``(request, reason)``; the reason is None when the request is kept as asked."""
        return request, None

    # ---- graph passes ----
    def passes(self, recipe) -> list:
        """The pass list turning the float export into this target's deployable graph; a recipe with a MixA-Q
        section gets the routed two-precision subgraphs around ``insert_qdq``."""
        if recipe.mixa is not None:
            from ..passes.split_windows import mixa_passes

            return mixa_passes(recipe, self.name, lambda r, _name: self.base_passes(r))
        return self.base_passes(recipe)

    def base_passes(self, recipe) -> list:
        raise NotImplementedError

    # ---- checks of the graphs it is handed ----
    def check_float_graph(self, model_path: Path, echo: Callable[[str], None]) -> dict | None:
        """The float (fp32 recipe) deployable model: a passes report section, or None when nothing is checked.
        Raises when the target cannot run the graph."""
        return None

    def check_lowered(self, pass_report: dict, echo: Callable[[str], None]) -> list[str]:
        """After the passes: raise when the target cannot run the graph; return notes for the user."""
        return []

    def verify_optimization(self) -> str:
        """The ONNX Runtime optimization level at which the compiler verifies the lowered graph on this machine."""
        return "auto"

    # ---- packaging ----
    def package(self, job: PackageJob) -> Packaged:
        return Packaged()

    def output_files(self, report: dict) -> list[str]:
        """Files besides model.onnx, model.fp32.onnx and report.json that the compile wrote."""
        return []

    def next_steps(self, out: Path) -> list[str]:
        return []

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options.to_dict()}
