"""``h5bank config``: the settings in force, secrets hidden."""

from __future__ import annotations

from typing import Any

import click

from pipeline.cli.main import main


@main.command(name="config")
@click.argument("key", required=False)
@click.option(
    "--build",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="A build config to show merged in.",
)
def show_config(key: str | None, config_file: str | None) -> None:
    """Print the settings in force (h5bank and jobqueue.slurm), or the one at KEY.

    Packaged defaults (configs/*.yaml), then CONFIG's settings (with --build),
    then ~/.config/dask/*.yaml and DASK_* environment variables: each wins
    over the ones before. Secrets show as ***: settings whose names look
    secret (key, token, password, Cookie, connection_string...), at any depth,
    and secret-looking values (AccountKey=..., Bearer ...); URLs show without
    their credentials.
    """
    import dask
    import yaml

    from pipeline import buildconfig, config
    from pipeline.errors import ConfigError
    from pipeline.urls import HIDDEN

    settings = buildconfig.settings(config_file) if config_file else {}
    config.load_jobqueue_defaults()  # jobqueue.slurm.* has h5bank's defaults, with or without --build
    with dask.config.set(settings):
        if key is None:
            click.echo(_yaml(config.in_force()), nl=False)
            return
        try:
            value = dask.config.get(key)
        except KeyError:
            raise ConfigError(f"no setting {key!r}; `h5bank config` lists them") from None
        if isinstance(value, dict):
            click.echo(_yaml(config.in_force((key,))), nl=False)
        else:
            shown = _hidden_at(key, value)
            if shown == HIDDEN:
                click.echo(HIDDEN)
                return
            click.echo(
                yaml.safe_dump(shown, default_flow_style=True).removesuffix("\n...\n").strip()
            )


def _yaml(settings: dict[str, Any]) -> str:
    """``settings`` as YAML, secrets hidden (YAML escapes control characters itself)."""
    import yaml

    from pipeline.urls import hide_secrets

    return yaml.safe_dump(hide_secrets(settings), sort_keys=False, default_flow_style=False)


def _hidden_at(key: str, value: Any) -> Any:
    """The value at the dotted ``key``, hidden as it would be in the whole tree (a secret
    name anywhere on the way hides it)."""
    from pipeline.urls import hide_secrets

    parts = key.split(".")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    shown = hide_secrets(nested)
    for part in parts:
        shown = shown[part] if isinstance(shown, dict) else shown
    return shown
