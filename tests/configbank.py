"""A bank type and a feature of the tests' own, for build configs that name them as
``"module:Class"`` (``configbank:Pictures``, ``configbank:Corner``).

Importable wherever ``tests/`` is on the path: this process under pytest, and the worker
processes of a local cluster it starts (they inherit its ``sys.path``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from features import DirLabels, Image
from pipeline import TypedFile


class Corner(Image):
    """The top-left ``size`` (height, width) corner of each image, as RGB: one array of one
    shape per source, stacked."""

    def __init__(self, size: Any = (8, 8), **options: Any) -> None:
        super().__init__(mode="RGB", **options)
        self.corner = size  # kept as given: a build config's lists must arrive as tuples

    @property
    def storage(self) -> str:  # type: ignore[override]
        return "item"

    @property
    def attrs(self) -> dict[str, Any]:
        return {**super().attrs, "corner": list(self.corner)}

    def decode(self, data: bytes, name: str = "") -> np.ndarray:
        height, width = self.corner
        return np.ascontiguousarray(super().decode(data, name)[:height, :width])


class Pictures(TypedFile):
    pixels = Image(size=(16, 16), mode="RGB")
    labels = DirLabels()
