"""Progress bars: tqdm on a terminal (stderr), silent when disabled or when stderr is not a TTY and VITQ_PROGRESS
is unset. Set ``VITQ_PROGRESS=1`` to force bars (e.g. in CI logs) or ``0`` to silence them."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def _enabled(enable: bool | None) -> bool:
    env = os.environ.get("VITQ_PROGRESS")
    if env is not None:
        return env not in ("0", "", "false", "no")
    if enable is not None:
        return enable
    return sys.stderr.isatty()


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", enable: bool | None = None) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not _enabled(enable), file=sys.stderr,
                dynamic_ncols=True, leave=False)
