"""What the engine and its backends share: the I/O tensor description and the backend protocol (a module of its own
so that :mod:`vitq.runtime.engine` imports its backends lazily and no backend imports the engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (ints for static dims, strings for symbolic ones) and numpy dtype of an engine I/O tensor."""

    name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype)}


class Backend(Protocol):
    name: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    metadata: dict[str, str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...
