"""h5bank's settings, in ``dask.config``.

Defaults come from the YAML files of ``configs/`` (shipped inside the wheel
as ``pipeline/configs/``), in Dask's own conventions:

| file | key | what |
| --- | --- | --- |
| ``h5bank.yaml`` | ``h5bank`` | builds, fetching, reading, Slurm job counts |
| ``local-cluster.yaml`` | ``h5bank.local-cluster`` | the embedded ``LocalCluster`` |
| ``jobqueue.yaml`` | ``jobqueue.slurm`` | dask-jobqueue's ``SLURMCluster`` (h5bank's defaults over dask-jobqueue's) |

They are merged the way dask-jobqueue merges its ``jobqueue.yaml``: a
function argument beats ``dask.config.set``, which beats environment variables
(``DASK_H5BANK__BUILD__PARTITION_SIZE``) and YAML files in ``~/.config/dask``
(or ``$DASK_CONFIG``), which beat these packaged defaults. Build configs
(``configs/builds/``) are not defaults: ``pipeline.buildconfig`` reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dask.config
import yaml

_HERE = Path(__file__).resolve().parent
# Installed wheel first, then the source checkout (editable installs).
_FOLDERS = (_HERE / "configs", _HERE.parent / "configs")
FILES = ("h5bank.yaml", "local-cluster.yaml", "jobqueue.yaml")


def defaults_file(name: str = "h5bank.yaml") -> Path:
    """The packaged YAML file ``name`` (one of :data:`FILES`)."""
    for folder in _FOLDERS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"h5bank's default config {name} is missing (looked in {list(map(str, _FOLDERS))})"
    )


def _load_defaults() -> None:
    # dask-jobqueue merges its own defaults when imported; imported later, they
    # would replace h5bank's jobqueue.slurm defaults, so import it first.
    import dask_jobqueue  # noqa: F401

    for name in FILES:
        with open(defaults_file(name)) as f:
            dask.config.update_defaults(yaml.safe_load(f))
    # update_defaults keeps what the user set, but only where it differs from
    # the old defaults; apply the user's YAML files and environment variables
    # again so they win in every case. (dask.config.refresh() would not do:
    # it lets the first-loaded defaults win, i.e. dask-jobqueue's over h5bank's.)
    dask.config.update(dask.config.config, dask.config.collect(), priority="new")


def get(key: str, override: Any = None) -> Any:
    """The setting ``h5bank.<key>``, or ``override`` when it is not ``None``."""
    return override if override is not None else dask.config.get(f"h5bank.{key}")


def section(key: str) -> dict[str, Any]:
    """The settings under ``h5bank.<key>`` as a dict with h5bank's spelling of their names.

    Environment variables cannot hold dashes, so ``DASK_H5BANK__FETCH__MAX_BACKOFF``
    arrives as ``max_backoff``; ``dask.config.get`` finds either spelling,
    and this gives the dashed one so ``section("fetch")["max-backoff"]`` does too.
    """
    value = dask.config.get(f"h5bank.{key}")
    return {str(k).replace("_", "-"): v for k, v in dict(value or {}).items()}


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


def effective(keys: tuple[str, ...] = ("h5bank", "jobqueue.slurm")) -> str:
    """The settings in force under ``keys``, as YAML (``h5bank config`` prints it)."""
    shown: dict[str, Any] = {}
    for key in keys:
        node = shown
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = dask.config.get(key, None)
    return yaml.safe_dump(shown, sort_keys=False, default_flow_style=False)


_load_defaults()
