"""One validator per option value: the parser an options object applies to its own fields doubles as the argparse
``type``, so the command line and library callers get the same check and the same message."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from .errors import InputError


def arg_type(parse: Callable[[str], Any], name: str | None = None) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type``: its :class:`InputError` becomes argparse's usage error (exit 2)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name or getattr(parse, "__name__", "value")
    return convert
