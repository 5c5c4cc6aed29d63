"""Integer class labels from folder names."""

from __future__ import annotations

from typing import Any

from features.base import Feature


class DirLabels(Feature):
    """The name of the folder holding a source, stored as an integer label.

    ``"cats/01.png"`` and ``"s3://b/train/cats/01.png"`` both get the label
    of ``"cats"``. The bank records the label names as the ``names``
    attribute: label ``i`` is ``names[i]``. When a build finishes the names
    are sorted and the labels renumbered to match, so they do not depend on
    the order or the parallelism of the build; an append that brings a new
    folder therefore renumbers existing labels. Labels written with ``add`` /
    ``set`` extend ``names`` unsorted. Sources whose id has no folder get no
    label. Never reads the source's bytes.
    """

    storage = "category"
    reads_bytes = False

    def load(self, source: Any) -> str | None:
        parts = source.id.replace("\\", "/").rstrip("/").split("/")
        if len(parts) < 2 or not parts[-2] or parts[-2].endswith(":"):
            return None
        return parts[-2]
