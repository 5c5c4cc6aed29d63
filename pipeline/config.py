"""h5bank's settings, in ``dask.config`` under the ``h5bank`` key.

Defaults come from ``configs/h5bank.yaml`` (shipped inside the wheel as
``pipeline/configs/h5bank.yaml``) and are merged the way dask-jobqueue merges
``jobqueue.yaml``: a function argument beats ``dask.config.set``, which beats
environment variables (``DASK_H5BANK__BUILD__PARTITION_SIZE``) and YAML files
in ``~/.config/dask``, which beat the packaged defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dask.config
import yaml

_HERE = Path(__file__).resolve().parent
# Installed wheel first, then the source checkout (editable installs).
_DEFAULTS = (_HERE / "configs" / "h5bank.yaml", _HERE.parent / "configs" / "h5bank.yaml")


def defaults_file() -> Path:
    """The YAML file h5bank's defaults are read from."""
    for path in _DEFAULTS:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"h5bank's default config is missing (looked at {list(map(str, _DEFAULTS))})"
    )


def _load_defaults() -> None:
    with open(defaults_file()) as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)
    # update_defaults does not re-read the environment; pick up DASK_H5BANK__* now.
    dask.config.refresh()


def get(key: str, override: Any = None) -> Any:
    """The setting ``h5bank.<key>``, or ``override`` when it is not ``None``."""
    return override if override is not None else dask.config.get(f"h5bank.{key}")


def storage_options(given: Any = None) -> dict[str, Any]:
    """``given`` fsspec options, else ``h5bank.storage-options`` from the config (YAML, env)."""
    if given is not None:
        return dict(given)
    value = dask.config.get("h5bank.storage-options", None) or {}
    if isinstance(
        value, str
    ):  # from the environment, where Dask keeps what is not a Python literal
        value = json.loads(value)
    if not isinstance(value, dict):
        raise TypeError(f"h5bank.storage-options must be a mapping, got {value!r}")
    return dict(value)


_load_defaults()
