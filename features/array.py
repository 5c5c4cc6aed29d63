"""Arrays from ``.npy`` files, and the default feature for data added on the fly."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from features import records
from features.base import Feature
from features.errors import DecodeError


class Array(Feature):
    """An n-dimensional array per source.

    Parameters
    ----------
    flat
        Store arrays of varying shape raveled, with a shape table (each comes
        back in its own shape). By default arrays are concatenated along axis 0
        and must share their trailing shape (logs, time series, embeddings).
    item
        Every source has one array of the same shape (a thumbnail, an
        embedding): store them stacked, ``(n, *shape)``, so ``to_dask()``
        has one row per source.
    dtype
        Cast every array to this dtype; by default the first array written
        fixes it and later arrays must cast to it safely.
    **options
        See :class:`features.base.Feature`.
    """

    __re__ = r"(?i)\.npy$"
    recorded_params = {
        **Feature.recorded_params,
        "flat": records.boolean,
        "item": records.boolean,
        "dtype": records.numeric_dtype,
    }

    def __init__(
        self, flat: bool = False, dtype: str | None = None, item: bool = False, **options: Any
    ) -> None:
        super().__init__(**options)
        if flat and item:
            raise ValueError("Array: choose flat=True (varying shapes) or item=True (one shape)")
        self.flat = bool(flat)
        self.item = bool(item)
        self.dtype = None if dtype is None else str(np.dtype(dtype))

    @property
    def storage(self) -> str:  # type: ignore[override]
        return "flat" if self.flat else "item" if self.item else "rows"

    @property
    def attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"flat": self.flat, "dtype": self.dtype}
        if self.item:  # only when set: banks written before it existed keep matching
            attrs["item"] = True
        return attrs

    def load(self, source: Any) -> np.ndarray:
        array = source if isinstance(source, np.ndarray) else self.decode(source.read(), source.id)
        return array if self.dtype is None else array.astype(self.dtype, copy=False)

    def decode(self, data: bytes, name: str = "") -> np.ndarray:
        if not data:
            raise DecodeError("empty file (0 bytes)")
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as error:
            raise DecodeError(
                f"not a .npy array: {error} (first bytes: {data[:8].hex(' ')})"
            ) from None
