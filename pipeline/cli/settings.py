"""``h5bank config``: the settings in force."""

from __future__ import annotations

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
    over the ones before. Secret-looking storage options show as ***.
    """
    import dask
    import yaml

    from pipeline import buildconfig, config
    from pipeline.errors import ConfigError

    settings = buildconfig.settings(config_file) if config_file else {}
    config.load_jobqueue_defaults()  # jobqueue.slurm.* has h5bank's defaults, with or without --build
    with dask.config.set(settings):
        if key is None:
            click.echo(config.effective(), nl=False)
            return
        try:
            value = dask.config.get(key)
        except KeyError:
            raise ConfigError(f"no setting {key!r}; `h5bank config` lists them") from None
        if isinstance(value, dict):
            click.echo(config.effective((key,)), nl=False)
        elif config.is_secret(key):
            click.echo("***")
        else:
            click.echo(
                yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
            )
