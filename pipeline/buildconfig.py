"""Build configs: one YAML file saying what to build, from what, and where it runs.

``h5bank build CONFIG`` reads one (examples in ``configs/builds/``). It holds
Dask config keys, so anything h5bank reads from ``dask.config`` may appear in
it, next to what only a build config says::

    h5bank:
      build:
        bank: pipeline.demo:DemoBank   # a TypedFile subclass, "module:Class"...
        features:                      # ...or the features inline (one of the two)
          pixels: {type: Image, size: [64, 64], mode: RGB}
          labels: DirLabels
        sources: [photos/, "s3://bucket/more/**/*.png"]
        output: photos.h5
        scheduler: slurm               # null/local, threads, sync, tcp://..., slurm
        partition-size: 256
        on-error: skip
      slurm: {jobs: 4}
    jobqueue:
      slurm: {queue: cpu, walltime: "02:00:00"}

The file sits between h5bank's packaged defaults and the user's own Dask
settings: ``~/.config/dask/*.yaml`` and environment variables
(``DASK_H5BANK__BUILD__OUTPUT=/scratch/x.h5``) override it, and command-line
flags (or :func:`load`'s ``overrides``) override everything. (Values a
program set with ``dask.config.set`` before loading do not override the file:
pass them as ``overrides``.) Relative paths
are relative to the current directory, as on any command line.

An inline feature is a built-in feature's name (``Image``), a mapping with
``type`` and the feature's arguments, or ``"module:Class"`` for a feature of
your own; a mapping without ``type`` is a group of features.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.config
import yaml

import features as builtin_features
from features.base import Feature
from pipeline import config
from pipeline.bank.typedfile import TypedFile
from pipeline.errors import ConfigError
from pipeline.run import auto
from pipeline.run.local import local_cluster_size
from pipeline.run.slurm import slurm_job_script, slurm_scaling
from pipeline.schema import Group
from pipeline.terminal import printable
from pipeline.urls import hide_secrets, is_url, redact

# The top-level keys a build applies while it runs.
_APPLIED = ("h5bank", "jobqueue")


@dataclass
class BuildConfig:
    """A build config file resolved against the Dask settings in force."""

    path: str
    bank: type[TypedFile]
    bank_name: str
    sources: list[Any]  # paths, globs, URLs; SourceSpecs when a command listed them
    output: str
    settings: dict[str, Any] = field(repr=False)

    def get(self, key: str) -> Any:
        """The setting ``h5bank.<key>`` as this build sees it."""
        with dask.config.set(self.settings):
            return config.get(key)

    @property
    def scheduler(self) -> str:
        return str(self.get("build.scheduler") or "auto")

    def run(self, mode: str = "w", progress: bool | None = None) -> TypedFile:
        """Build the bank (``mode="a"`` resumes or appends) and return it opened."""
        with dask.config.set(self.settings):
            return self.bank.create(
                self.output,
                self.sources,
                mode=mode,
                # null: the current default client if there is one, else auto
                scheduler=config.get("build.scheduler"),
                progress=progress,
            )

    def describe(self) -> str:
        """What :meth:`run` would do, for ``--dry-run``: nothing is built or submitted.

        Safe to print: URLs show without their credentials, secrets in the
        Slurm job script (``export AWS_SECRET_ACCESS_KEY=...`` in a prologue)
        as ``***``, and control characters in names and sources escaped.
        """

        sources = ", ".join(redact(getattr(s, "id", None) or os.fspath(s)) for s in self.sources)
        output = redact(self.output) if is_url(self.output) else os.path.abspath(self.output)
        lines = [
            f"bank:     {self.bank_name}",
            *(f"          {path}: {feature!r}" for path, feature in self.bank.__schema__.items()),
            f"sources:  {sources}",
            f"output:   {output}",
        ]
        shards = self.get("build.shards")
        if shards not in (None, 1):
            lines.append(
                f"shards:   {shards} (writer chains, each its own shard file beside the bank)"
            )
        with dask.config.set(self.settings):
            scheduler, chosen, where = self.scheduler, "", self.scheduler
            if scheduler == "auto":
                choice = auto.choose(dict(self.bank.__schema__.items()), self.sources)
                scheduler, chosen, where = choice.scheduler, f" (auto: {choice.why})", choice.where
            if scheduler == "slurm":
                scaling, _ = slurm_scaling()
                lines.append(f"runs on:  {scaling}, each submitted with this script:")
                lines.extend(slurm_job_script().rstrip().splitlines())
            elif scheduler == "local":
                lines.append(f"runs on:  {local_cluster_size()}{chosen}")
            else:
                lines.append(f"runs on:  {where}{chosen}")
        return "\n".join(printable(hide_secrets(line)) for line in lines)


def settings(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``h5bank`` and ``jobqueue`` settings in force with the file at ``path`` merged in.

    ``path=None`` merges no file (a build described on the command line).
    ``overrides`` are dotted keys that win over everything:
    ``{"h5bank.build.output": "x.h5", "h5bank.slurm.jobs": 4}``.
    """
    given: dict[str, Any] = {}
    if path is not None:
        shown = os.fspath(path)
        given = _read(shown, require_build=False)
        unknown = sorted(set(given) - set(_APPLIED))
        if unknown:
            raise ConfigError(
                f"{shown}: unknown top-level keys {unknown}; a build config holds 'h5bank' and "
                "'jobqueue' settings"
            )
    config.load_jobqueue_defaults()  # the file may set jobqueue.slurm keys over h5bank's defaults
    merged = copy.deepcopy(dict(dask.config.config))
    dask.config.update(merged, given, priority="new")
    dask.config.update(merged, dask.config.collect(), priority="new")  # the user's own
    if overrides:
        dask.config.set(dict(overrides), config=merged)
    return {key: merged.get(key, {}) for key in _APPLIED}


def _read(shown: str, require_build: bool) -> dict[str, Any]:
    try:
        with open(shown) as f:
            given = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())  # the parser's message spans lines
        raise ConfigError(f"{shown} is not valid YAML: {reason}") from None
    if not isinstance(given, dict) or not isinstance(
        given.get("h5bank", {} if not require_build else None), dict
    ):
        raise ConfigError(
            f"{shown}: a build config is a mapping with an 'h5bank' key (h5bank: build: bank:, "
            "sources:, output: ...); see configs/builds/"
        )
    return given


def load(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> BuildConfig:
    """Read the build config at ``path``: what to build, from what, where (see :func:`settings`)."""
    shown = os.fspath(path)
    _read(shown, require_build=True)
    applied = settings(shown, overrides)
    with dask.config.set(applied):
        build = config.section("build")
    bank, bank_name = _bank_type(shown, build.get("bank"), build.get("features"))
    sources = build.get("sources")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources or not all(isinstance(s, (str, os.PathLike)) for s in sources):
        raise ConfigError(
            f"{shown}: h5bank.build.sources must list the files, folders, globs or URLs to build, "
            f"got {sources!r}"
        )
    output = build.get("output")
    if not isinstance(output, (str, os.PathLike)) or not os.fspath(output):
        raise ConfigError(f"{shown}: h5bank.build.output must be the bank's path, got {output!r}")
    return BuildConfig(
        path=shown,
        bank=bank,
        bank_name=bank_name,
        sources=[os.fspath(s) for s in sources],
        output=os.fspath(output),
        settings=applied,
    )


def _bank_type(shown: str, bank: Any, inline: Any) -> tuple[type[TypedFile], str]:
    if (bank is None) == (inline is None):
        raise ConfigError(
            f"{shown}: give exactly one of h5bank.build.bank (a TypedFile subclass as "
            "'module:Class') and h5bank.build.features (the features inline)"
        )
    if bank is not None:
        cls = _import(shown, "h5bank.build.bank", str(bank))
        if not (isinstance(cls, type) and issubclass(cls, TypedFile)):
            raise ConfigError(f"{shown}: h5bank.build.bank {bank!r} is not a TypedFile subclass")
        return cls, str(bank)
    name = re.sub(r"\W", "", Path(shown).stem.title()) or "Config"
    return inline_bank(inline, f"{name}Bank", shown), f"inline features of {shown}"


def inline_bank(
    features: Any, name: str, shown: str, key: str = "h5bank.build.features"
) -> type[TypedFile]:
    """A bank type named ``name`` whose attributes are the inline ``features``.

    ``features`` maps names to what a config's ``h5bank.build.features``
    holds (a feature's name, a mapping with ``type`` and its arguments, or a
    group); Python values such as an hdf5plugin filter may appear as
    arguments. ``shown`` and ``key`` say where the features came from in
    errors (:class:`ConfigError`). The class is made here, not imported, so
    it travels to Dask workers by value, like every inline config's.
    """
    if not isinstance(features, Mapping) or not features:
        raise ConfigError(f"{shown}: {key} must map names to features, got {features!r}")
    members = {name: _member(shown, f"{key}.{name}", v) for name, v in features.items()}
    try:
        return type(name, (TypedFile,), {**members, "__module__": __name__})
    except Exception as error:
        raise ConfigError(f"{shown}: {key}: {error}") from None


def inline(
    features: Mapping[str, Any],
    sources: list[Any],
    output: str,
    name: str,
    shown: str,
    overrides: Mapping[str, Any] | None = None,
) -> BuildConfig:
    """A build of inline ``features`` given without a file (``h5bank image-bank``...).

    The settings in force apply, then ``overrides``, as :func:`load` applies
    a file's; ``sources`` may hold :class:`~pipeline.sources.SourceSpec`\\ s
    already listed. ``shown`` names the build in errors and messages.
    """
    applied = settings(None, overrides)
    return BuildConfig(
        path=shown,
        bank=inline_bank(features, name, shown, key="features"),
        bank_name=name,
        sources=list(sources),
        output=output,
        settings=applied,
    )


def _member(shown: str, key: str, value: Any) -> Feature | Group:
    """One inline feature (a name, or a mapping with ``type``) or group (a mapping without)."""
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{shown}: {key} must be a feature name or a mapping, got {value!r}")
    if "type" not in value:
        children = {name: _member(shown, f"{key}.{name}", v) for name, v in value.items()}
        try:
            return Group(**children)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{shown}: {key}: {error}") from None
    arguments = {k.replace("-", "_"): _tuples(v) for k, v in value.items() if k != "type"}
    kind = str(value["type"])
    cls = _import(shown, key, kind) if ":" in kind else getattr(builtin_features, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, Feature)):
        known = sorted(
            n
            for n in builtin_features.__all__
            if isinstance(getattr(builtin_features, n), type)
            and issubclass(getattr(builtin_features, n), Feature)
            and n != "Feature"
        )
        raise ConfigError(
            f"{shown}: {key}: {kind!r} is not a feature; use one of {known} or 'module:Class'"
        )
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{shown}: {key}: {kind}({arguments}): {error}") from None


def _tuples(value: Any) -> Any:
    """YAML lists as tuples: feature arguments such as ``size`` are tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _import(shown: str, key: str, target: str) -> Any:
    module, _, name = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(
            f"{shown}: {key} {target!r} cannot be imported ({error}); it must be "
            "'module:Class' with the module importable here and on the workers"
        ) from None
