"""Build configs: one YAML file says which bank to build, from which sources, where to, and
where it runs; ``pipeline.buildconfig.load`` reads it, ``BuildConfig.run`` builds it."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import dask
import numpy as np
import pytest
import yaml
from configbank import Corner, Pictures
from conftest import assert_same_contents
from distributed import Client

from features import DirLabels, Image
from pipeline import ConfigError, Group, SourceError, TypedFile, buildconfig
from pipeline.demo import DemoBank

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_settings(monkeypatch):
    """Only what a test sets: no DASK_H5BANK__* / DASK_JOBQUEUE__* / SLURM_* from outside, and
    no Dask YAML files of the user's (``load`` collects them again, over the build file)."""
    for name in list(os.environ):
        if name.startswith(("DASK_H5BANK__", "DASK_JOBQUEUE__", "SLURM_")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(dask.config, "collect", functools.partial(dask.config.collect, paths=[]))


def write_config(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def build_config(path: Path, *, jobqueue: dict | None = None, **build) -> Path:
    """A build config file whose ``h5bank.build`` holds ``build`` (keys as in the YAML)."""
    settings: dict = {"h5bank": {"build": {k.replace("_", "-"): v for k, v in build.items()}}}
    if jobqueue is not None:
        settings["jobqueue"] = jobqueue
    return write_config(path, settings)


# -- what a config says ------------------------------------------------------------------


def test_a_config_names_the_bank_type_its_sources_and_output(images, tmp_path):
    path = build_config(
        tmp_path / "pictures.yaml", bank="configbank:Pictures", sources=[str(images)], output="b.h5"
    )
    config = buildconfig.load(path)
    assert config.bank is Pictures
    assert config.bank_name == "configbank:Pictures"
    assert config.sources == [str(images)]
    assert config.output == "b.h5"  # as given: relative to the current directory when used
    assert config.scheduler == "auto"  # nothing said: threads or the embedded local cluster
    assert config.path == str(path)


def test_a_bank_type_may_be_dotted_and_one_source_need_not_be_a_list(tmp_path):
    path = build_config(
        tmp_path / "demo.yaml", bank="pipeline.demo.DemoBank", sources="samples", output="d.h5"
    )
    config = buildconfig.load(path)
    assert config.bank is DemoBank
    assert config.sources == ["samples"]


def test_the_example_configs_load(monkeypatch):
    monkeypatch.chdir(REPO)
    demo = buildconfig.load("configs/builds/demo.yaml")
    assert demo.bank is DemoBank
    assert demo.sources == ["h5bank-demo/samples/images", "h5bank-demo/samples/sounds"]
    assert demo.scheduler == "auto"
    inline = buildconfig.load("configs/builds/images-inline.yaml")
    assert list(inline.bank.__schema__) == ["images/pixels", "images/labels"]
    assert inline.get("build.partition-size") == 32
    assert inline.bank.__name__ == "ImagesInlineBank"


# -- inline features -----------------------------------------------------------------------


def test_inline_features_groups_and_shorthand_names(tmp_path):
    path = build_config(
        tmp_path / "inline.yaml",
        features={
            "images": {  # no `type`: a group
                "pixels": {"type": "Image", "size": [32, 32], "mode": "L", "max-pixels": 5000},
                "labels": "DirLabels",  # a name alone: the feature with no arguments
            },
            "deep": {"er": {"labels": {"type": "DirLabels"}}},  # groups nest
        },
        sources="photos",
        output="b.h5",
    )
    schema = buildconfig.load(path).bank.__schema__
    assert list(schema) == ["images/pixels", "images/labels", "deep/er/labels"]
    pixels = schema["images/pixels"]
    assert type(pixels) is Image
    assert (pixels.size, pixels.mode) == ((32, 32), "L")
    assert pixels.max_pixels == 5000  # max-pixels: YAML's dashes are the argument's underscores
    assert type(schema["images/labels"]) is DirLabels
    assert type(schema["deep/er/labels"]) is DirLabels


def test_yaml_lists_reach_features_as_tuples(tmp_path):
    path = build_config(
        tmp_path / "corner.yaml",
        features={"corner": {"type": "configbank:Corner", "size": [4, 6]}},
        sources="photos",
        output="b.h5",
    )
    corner = buildconfig.load(path).bank.__schema__["corner"]
    assert type(corner) is Corner  # a feature of one's own, as module:Class
    assert corner.corner == (4, 6)
    assert isinstance(corner.corner, tuple)


def test_a_custom_feature_builds(images, tmp_path, chdir):
    path = build_config(
        tmp_path / "corner.yaml",
        features={"corner": {"type": "configbank:Corner", "size": [4, 6]}, "labels": "DirLabels"},
        sources=str(images),
        output="corners.h5",
        scheduler="threads",
    )
    with buildconfig.load(path).run(progress=False) as bank:
        assert bank.corner.shape == (12, 4, 6, 3)
        for id_ in bank.ids:
            expected = Image(mode="RGB").decode((images / id_).read_bytes(), id_)[:4, :6]
            np.testing.assert_array_equal(bank.corner.get(id_), expected)


# -- running it ----------------------------------------------------------------------------


class Expected(TypedFile):
    """What ``inline_config``'s features describe, written as a class."""

    images = Group(pixels=Image(size=(16, 16), mode="RGB"), labels=DirLabels())
    corner = Corner(size=(4, 6))


def inline_config(path: Path, images: Path, settings: dict | None = None, **build) -> Path:
    """A config of inline features (a group, a built-in name, a feature of the tests' own)
    building ``images``, with ``build`` keys and other ``h5bank`` ``settings``."""
    features = {
        "images": {
            "pixels": {"type": "Image", "size": [16, 16], "mode": "RGB"},
            "labels": "DirLabels",
        },
        "corner": {"type": "configbank:Corner", "size": [4, 6]},
    }
    build = {"features": features, "sources": str(images), **build}
    h5bank = {"build": {k.replace("_", "-"): v for k, v in build.items()}, **(settings or {})}
    return write_config(path, {"h5bank": h5bank})


def test_run_on_threads_builds_what_create_builds(images, tmp_path, monkeypatch):
    path = inline_config(tmp_path / "inline.yaml", images, output="built.h5", scheduler="threads")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with buildconfig.load(path).run(progress=False) as bank:
        assert bank.summary.writer_pid == os.getpid()  # the threaded scheduler, here
        assert len(bank) == 12
        assert bank.images.pixels.shape == (12, 16, 16, 3)
    Expected.create(tmp_path / "expected.h5", images, scheduler="threads", progress=False).close()
    # The relative output is relative to the current directory, not to the config file.
    assert not (tmp_path / "built.h5").exists()
    assert_same_contents(tmp_path / "work" / "built.h5", tmp_path / "expected.h5")


def test_run_on_the_embedded_local_cluster_builds_what_create_builds(images, tmp_path, chdir):
    import multiprocessing

    path = inline_config(
        tmp_path / "local.yaml",
        images,
        {"local-cluster": {"n-workers": 2}},  # the file sizes the embedded cluster
        output="local.h5",
        scheduler="local",
    )
    before = {p.pid for p in multiprocessing.active_children()}
    with buildconfig.load(path).run(progress=False) as bank:
        # The writer ran in a worker process of a cluster of the build's own, which
        # imported configbank:Corner by its name.
        assert bank.summary.writer_pid not in {os.getpid(), *before}
        assert len(bank) == 12
    assert {p.pid for p in multiprocessing.active_children()} <= before  # and closed it
    Expected.create(tmp_path / "expected.h5", images, scheduler="threads", progress=False).close()
    assert_same_contents(tmp_path / "local.h5", tmp_path / "expected.h5")


def test_the_configs_settings_apply_while_it_runs_and_mode_a_resumes(images, tmp_path, chdir):
    broken = images / "dogs" / "zz_broken.png"
    broken.write_bytes(b"not a png")
    path = inline_config(
        tmp_path / "b.yaml", images, output="b.h5", scheduler="threads", on_error="raise"
    )
    config = buildconfig.load(path)
    assert dask.config.get("h5bank.build.on-error") != "raise"  # loading it changed nothing
    with pytest.raises(SourceError, match="zz_broken"):
        config.run(progress=False)  # on-error: raise, from the file
    assert (chdir / "b.h5.partial").exists() and not (chdir / "b.h5").exists()
    broken.unlink()
    with config.run(mode="a", progress=False) as bank:  # resumes the stopped build
        assert len(bank) == 12 and bank.failures() == []
    assert not (chdir / "b.h5.partial").exists()


def test_the_environment_overrides_the_file_and_overrides_override_everything(
    tmp_path, monkeypatch
):
    path = build_config(
        tmp_path / "p.yaml",
        bank="configbank:Pictures",
        sources="photos",
        output="from-file.h5",
        partition_size=32,
        on_error="raise",
        jobqueue={"slurm": {"queue": "from-file", "walltime": "02:00:00"}},
    )
    walltime = dask.config.get("jobqueue.slurm.walltime")
    monkeypatch.setenv("DASK_H5BANK__BUILD__PARTITION_SIZE", "7")
    monkeypatch.setenv("DASK_H5BANK__BUILD__OUTPUT", "/scratch/from-env.h5")
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__QUEUE", "from-env")
    config = buildconfig.load(path)
    assert config.get("build.partition-size") == 7  # the environment over the file
    assert config.output == "/scratch/from-env.h5"
    assert config.get("build.on-error") == "raise"  # the file over the packaged default
    assert config.get("build.chunk-bytes") == 1048576  # packaged defaults fill the rest
    slurm = dask.config.get("jobqueue.slurm", config=config.settings)
    assert (slurm["queue"], slurm["walltime"]) == ("from-env", "02:00:00")

    flags = {
        "h5bank.build.partition-size": 3,
        "h5bank.build.output": "from-flag.h5",
        "jobqueue.slurm.queue": "from-flag",
    }
    config = buildconfig.load(path, flags)
    assert config.get("build.partition-size") == 3
    assert config.output == "from-flag.h5"
    assert dask.config.get("jobqueue.slurm.queue", config=config.settings) == "from-flag"
    # Loading a config sets nothing in this process's Dask config.
    assert dask.config.get("h5bank.build.on-error") != "raise"
    assert dask.config.get("jobqueue.slurm.walltime") == walltime


def test_the_scheduler_setting_picks_where_a_build_runs_when_a_call_names_none(images, tmp_path):
    from pipeline.run.runner import runner_for

    with dask.config.set({"h5bank.build.scheduler": "sync"}):
        with runner_for() as runner:
            assert (runner.client, runner.local) == (None, "sync")
        bank = Pictures.create(tmp_path / "b.h5", images, progress=False)
        assert bank.summary.writer_pid == os.getpid()  # no cluster was started
        bank.close()


# -- describing it (--dry-run) -------------------------------------------------------------


def test_describe_says_what_would_run_and_builds_nothing(images, tmp_path, chdir):
    path = inline_config(tmp_path / "d.yaml", images, output="out/d.h5", scheduler="threads")
    text = buildconfig.load(path).describe()
    assert text.splitlines() == [
        f"bank:     inline features of {path}",
        "          images/pixels: Image(size=[16, 16], mode='RGB', draft=True)",
        "          images/labels: DirLabels()",
        "          corner: Corner(size=None, mode='RGB', corner=[4, 6])",
        f"sources:  {images}",
        f"output:   {chdir / 'out' / 'd.h5'}",  # absolute
        "runs on:  threads",
    ]
    assert not (chdir / "out").exists()


def test_describe_a_local_build_gives_the_clusters_size(images, tmp_path):
    path = inline_config(
        tmp_path / "d.yaml", images, {"local-cluster": {"n-workers": 3}}, output="d.h5"
    )
    text = buildconfig.load(path).describe()
    assert text.splitlines()[-1] == (  # auto, with the reason it gives
        "runs on:  threads in this process (auto: 12 local files: fewer than a cluster's "
        "start-up pays for)"
    )
    with dask.config.set({"h5bank.build.scheduler": "local"}):
        text = buildconfig.load(path).describe()
    assert text.splitlines()[-1] == "runs on:  a local cluster of 3 worker processes"


def test_describe_a_slurm_build_prints_the_job_script(images, tmp_path):
    path = build_config(
        tmp_path / "s.yaml",
        bank="configbank:Pictures",
        sources=str(images),
        output="s.h5",
        scheduler="slurm",
        jobqueue={"slurm": {"queue": "cpu", "cores": 2, "job-extra-directives": ["--qos=short"]}},
    )
    queue = dask.config.get("jobqueue.slurm.queue")
    text = buildconfig.load(path, {"h5bank.slurm.jobs": 3}).describe()
    assert "runs on:  3 Slurm jobs of 2 cores, each submitted with this script:" in text
    script = text.split("each submitted with this script:\n", 1)[1]
    assert script.startswith("#!/usr/bin/env bash")
    for line in ("#SBATCH -p cpu", "#SBATCH --cpus-per-task=2", "#SBATCH --qos=short"):
        assert line in script.splitlines(), line
    assert dask.config.get("jobqueue.slurm.queue") == queue  # the file's, for this build only


# -- mistakes ------------------------------------------------------------------------------

BUILD = "  build:\n    sources: photos\n    output: b.h5\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("h5bank: [build\n", "is not valid YAML"),
        ("", "a build config is a mapping with an 'h5bank' key"),
        ("- h5bank\n", "a build config is a mapping with an 'h5bank' key"),
        ("h5bank: 3\n", "a build config is a mapping with an 'h5bank' key"),
        (f"h5bank:\n{BUILD}    bank: configbank:Pictures\ndistributed: {{}}\n",
         "unknown top-level keys ['distributed']"),
        (f"h5bank:\n{BUILD}", "give exactly one of h5bank.build.bank"),
        (f"h5bank:\n{BUILD}    bank: configbank:Pictures\n    features: {{x: Image}}\n",
         "give exactly one of h5bank.build.bank"),
        (f"h5bank:\n{BUILD}    bank: configbank:Nope\n",
         "h5bank.build.bank 'configbank:Nope' cannot be imported"),
        (f"h5bank:\n{BUILD}    bank: no_such_module:Bank\n",
         "h5bank.build.bank 'no_such_module:Bank' cannot be imported"),
        (f"h5bank:\n{BUILD}    bank: pipeline.demo:make_samples\n",
         "'pipeline.demo:make_samples' is not a TypedFile subclass"),
        (f"h5bank:\n{BUILD}    features: [Image]\n",
         "h5bank.build.features must map names to features"),
        (f"h5bank:\n{BUILD}    features: {{}}\n",
         "h5bank.build.features must map names to features"),
        (f"h5bank:\n{BUILD}    features: {{x: 3}}\n",
         "h5bank.build.features.x must be a feature name or a mapping, got 3"),
        (f"h5bank:\n{BUILD}    features: {{x: Picture}}\n",
         "h5bank.build.features.x: 'Picture' is not a feature; use one of ['Array', 'Bytes', "
         "'DirLabels', 'Image', 'Sound', 'String']"),
        (f"h5bank:\n{BUILD}    features: {{x: 'os:getcwd'}}\n", "'os:getcwd' is not a feature"),
        (f"h5bank:\n{BUILD}    features: {{x: {{type: Image, mode: CMYK}}}}\n",
         "h5bank.build.features.x: Image({'mode': 'CMYK'}): Image mode must be one of"),
        (f"h5bank:\n{BUILD}    features: {{x: {{type: Image, colour: red}}}}\n",
         "unexpected keyword argument 'colour'"),
        (f"h5bank:\n{BUILD}    features: {{ids: Image}}\n", "['ids'] would hide TypedFile's own"),
        ("h5bank:\n  build:\n    bank: configbank:Pictures\n    output: b.h5\n",
         "h5bank.build.sources must list the files, folders, globs or URLs to build, got None"),
        ("h5bank:\n  build:\n    bank: configbank:Pictures\n    output: b.h5\n    sources: [1]\n",
         "h5bank.build.sources must list"),
        ("h5bank:\n  build:\n    bank: configbank:Pictures\n    sources: photos\n",
         "h5bank.build.output must be the bank's path, got None"),
        ("h5bank:\n  build:\n    bank: configbank:Pictures\n    sources: photos\n    output: ''\n",
         "h5bank.build.output must be the bank's path, got ''"),
    ],
    ids=[
        "yaml", "empty", "list", "no-mapping", "top-level", "neither", "both", "no-class",
        "no-module", "not-a-bank", "features-list", "features-empty", "feature-number",
        "unknown-feature", "not-a-feature", "bad-argument", "unknown-argument", "name-clash",
        "no-sources", "bad-sources", "no-output", "empty-output",
    ],
)  # fmt: skip
def test_a_wrong_config_is_a_config_error_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "wrong.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        buildconfig.load(path)
    assert str(raised.value).startswith(str(path))
    assert message in str(raised.value)


def test_a_bad_name_inside_an_inline_group_is_a_config_error(tmp_path):
    path = tmp_path / "group.yaml"
    path.write_text(f"h5bank:\n{BUILD}    features: {{images: {{__x: Image}}}}\n")
    with pytest.raises(ConfigError, match=f"^{path}: h5bank.build.features"):
        buildconfig.load(path)


def test_run_uses_the_current_client_when_the_config_names_no_scheduler(
    images, tmp_path, chdir, cluster
):
    # (With the bug, the embedded cluster it starts instead is kept small.)
    path = inline_config(
        tmp_path / "c.yaml", images, {"local-cluster": {"n-workers": 1}}, output="c.h5"
    )
    config = buildconfig.load(path)
    with Client(cluster) as default, config.run(progress=False) as bank:  # default client
        assert bank.summary.writer_pid in default.run(os.getpid).values()
