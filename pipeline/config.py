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
(or ``$DASK_CONFIG``), which beat these packaged defaults. ``jobqueue.yaml``
is merged when Slurm is first needed (:func:`load_jobqueue_defaults`). Build configs
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
FILES = ("h5bank.yaml", "local-cluster.yaml")  # loaded when pipeline is imported
JOBQUEUE_FILE = "jobqueue.yaml"  # loaded with dask-jobqueue, when Slurm is first needed
_jobqueue: dict[str, Any] | None = None  # h5bank's jobqueue.yaml, once loaded


def defaults_file(name: str = "h5bank.yaml") -> Path:
    """The packaged YAML file ``name`` (one of :data:`FILES` or :data:`JOBQUEUE_FILE`)."""
    for folder in _FOLDERS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"h5bank's default config {name} is missing (looked in {list(map(str, _FOLDERS))})"
    )


def _read(name: str) -> dict[str, Any]:
    with open(defaults_file(name)) as f:
        return yaml.safe_load(f)


def _load_defaults() -> None:
    # update_defaults keeps what the user already set (YAML files and DASK_*
    # variables read when dask was imported, dask.config.set calls) and
    # fills in the rest.
    for name in FILES:
        dask.config.update_defaults(_read(name))


def load_jobqueue_defaults() -> None:
    """Merge h5bank's ``jobqueue.slurm`` defaults over dask-jobqueue's (on first use).

    dask-jobqueue merges its own defaults when it is imported, so it is
    imported first; ours then replace its values wherever the user set
    nothing. Ours also go first in ``dask.config.defaults``, so a later
    ``dask.config.refresh()`` (where the first defaults win) keeps them.
    Deferred to first use: importing dask-jobqueue costs time and writes a
    commented template to ``~/.config/dask/jobqueue.yaml``.
    """
    global _jobqueue
    if _jobqueue is None:
        import dask_jobqueue  # noqa: F401

        ours = _read(JOBQUEUE_FILE)
        dask.config.update_defaults(ours)
        dask.config.defaults.remove(ours)
        dask.config.defaults.insert(0, ours)
        _jobqueue = ours
    # A dask.config.set block that began before the first load takes the whole
    # "jobqueue" key away when it ends: fill in what is missing (nothing set is touched).
    packaged = [d for d in dask.config.defaults if "jobqueue" in d and d is not _jobqueue]
    full = dask.config.merge(*packaged, _jobqueue)
    dask.config.update(dask.config.config, {"jobqueue": full["jobqueue"]}, priority="old")


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


def in_force(keys: tuple[str, ...] = ("h5bank", "jobqueue.slurm")) -> dict[str, Any]:
    """The settings in force under ``keys``, nested (``h5bank config`` prints them).

    Names are spelled as in the packaged files (an environment variable's
    ``max_backoff`` shows as ``max-backoff``). Values are as set, secrets
    included: print them only through ``pipeline.urls.hide_secrets``, as
    ``h5bank config`` does.
    """
    load_jobqueue_defaults()
    shown: dict[str, Any] = {}
    for key in keys:
        node = shown
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = _spelled(dask.config.get(key, None), _default_at(key))
    return shown


def _default_at(key: str) -> Any:
    value: Any = dask.config.merge(*dask.config.defaults)
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _spelled(value: Any, default: Any) -> Any:
    """``value`` with names spelled as in ``default`` (``max_backoff`` as ``max-backoff``)."""
    if not isinstance(value, dict):
        return value
    default = default if isinstance(default, dict) else {}
    out: dict[str, Any] = {}
    for name, child in value.items():
        spelled = str(name).replace("_", "-")
        if spelled in default and name not in default:
            name = spelled
        out[name] = _spelled(child, default.get(name))
    return out


_load_defaults()
