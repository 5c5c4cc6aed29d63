"""``h5bank build CONFIG``, ``h5bank config`` and ``h5bank demo --samples-only``, run as users
run them: the installed console script, in a folder of the test's own, with an environment
of the test's own (no DASK_* or SLURM_* from outside, an empty Dask config folder, and a
PATH on which every Slurm command only records that it was called)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import assert_same_contents, write_images
from slowbank import QuickBank

from pipeline import TypedFile
from pipeline.format.partial import partial_path

REPO = Path(__file__).resolve().parents[1]
SLURM_COMMANDS = ("sbatch", "scancel", "scontrol", "squeue", "srun", "salloc", "sinfo")


@pytest.fixture
def env(tmp_path):
    """The environment ``h5bank`` runs in; tests add variables to it."""
    home, dask_config, fake_bin = tmp_path / "home", tmp_path / "dask-config", tmp_path / "bin"
    for folder in (home, dask_config, fake_bin):
        folder.mkdir()
    for name in SLURM_COMMANDS:  # any of them called leaves its name in slurm-calls
        command = fake_bin / name
        command.write_text(f'#!/bin/sh\necho {name} "$@" >> "{tmp_path}/slurm-calls"\nexit 1\n')
        command.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "SLURM_"))}
    return {
        **clean,
        "HOME": str(home),  # no ~/.config/dask of the user's
        "DASK_CONFIG": str(dask_config),
        "SLURM_CONF": str(tmp_path / "no-slurm.conf"),  # no Slurm reachable
        "PATH": os.pathsep.join([str(fake_bin), clean.get("PATH", "")]),
    }


def h5bank(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    script = shutil.which("h5bank", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed on stderr."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


FEATURES = {"pixels": {"type": "Image", "mode": "RGB"}, "labels": "DirLabels"}


@pytest.fixture
def config(images, tmp_path) -> Path:
    """``pictures.yaml``: the ``images`` folder into ``pictures.h5``, both relative to
    ``tmp_path`` (where the commands run), on the threaded scheduler."""
    build = {
        "features": FEATURES,
        "sources": "images",
        "output": "pictures.h5",
        "scheduler": "threads",
    }
    path = tmp_path / "pictures.yaml"
    path.write_text(yaml.safe_dump({"h5bank": {"build": build}}, sort_keys=False))
    return path


def ids_of(path: Path) -> list[str]:
    with TypedFile(path) as bank:
        return bank.ids


# -- building ------------------------------------------------------------------------------


def test_build_writes_a_new_bank(config, tmp_path, env):
    result = h5bank("build", config, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # the progress bar and the summary go to stderr
    assert "12/12" in result.stderr
    assert f"built {tmp_path / 'pictures.h5'}: 12 sources ok, 0 failed" in result.stderr
    assert len(ids_of(tmp_path / "pictures.h5")) == 12
    assert not Path(partial_path(tmp_path / "pictures.h5")).exists()


def test_quiet_prints_the_summary_on_stdout_only(config, tmp_path, env):
    result = h5bank("build", config, "--quiet", "--output", "elsewhere.h5", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"built {tmp_path / 'elsewhere.h5'}: 12 sources ok")
    assert not (tmp_path / "pictures.h5").exists()  # --output won over the config's


def test_an_existing_bank_is_refused_without_resume_or_overwrite(config, tmp_path, env):
    assert h5bank("build", config, "--quiet", cwd=tmp_path, env=env).returncode == 0
    before = (tmp_path / "pictures.h5").read_bytes()
    result = h5bank("build", config, cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert error_line(result) == (
        f"h5bank: error: FileExistsError: {tmp_path / 'pictures.h5'} exists: --resume adds the "
        "sources it lacks, --overwrite builds it again"
    )
    assert (tmp_path / "pictures.h5").read_bytes() == before


def test_a_stopped_build_is_refused_verified_and_resumed(config, images, tmp_path, env):
    broken = images / "dogs" / "zz_broken.png"
    broken.write_bytes(b"not a png")
    env = {**env, "DASK_H5BANK__BUILD__ON_ERROR": "raise"}  # the environment over the config
    result = h5bank("build", config, "--quiet", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert error_line(result).startswith("h5bank: error: SourceError: 'dogs/zz_broken.png'")
    partial = Path(partial_path(tmp_path / "pictures.h5"))
    assert partial.exists() and not (tmp_path / "pictures.h5").exists()

    result = h5bank("build", config, cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert error_line(result) == (
        f"h5bank: error: FileExistsError: {partial} holds a build that stopped: "
        "--resume continues it, --overwrite starts again"
    )

    result = h5bank("verify", partial.name, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "ok: pictures.h5.partial: 12 sources committed by a stopped build (resumable)"
    )

    broken.unlink()
    result = h5bank("build", config, "--resume", "--quiet", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "12 already in the bank; 12 in the bank" in result.stdout
    assert not partial.exists()
    assert h5bank("verify", "pictures.h5", cwd=tmp_path, env=env).returncode == 0


def test_resume_adds_the_sources_the_bank_lacks(config, images, tmp_path, env):
    assert h5bank("build", config, "--quiet", cwd=tmp_path, env=env).returncode == 0
    first = ids_of(tmp_path / "pictures.h5")
    write_images(images, classes=("birds",), per_class=3, seed=1)
    result = h5bank("build", config, "--resume", "--quiet", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "3 sources ok, 0 failed, 12 already in the bank; 15 in the bank" in result.stdout
    assert ids_of(tmp_path / "pictures.h5") == [
        *first,
        "birds/birds_000.png",
        "birds/birds_001.png",
        "birds/birds_002.png",
    ]


def test_overwrite_builds_the_bank_again(config, images, tmp_path, env):
    assert h5bank("build", config, "--quiet", cwd=tmp_path, env=env).returncode == 0
    shutil.rmtree(images / "dogs")
    result = h5bank("build", config, "--overwrite", "--quiet", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert ids_of(tmp_path / "pictures.h5") == [f"cats/cats_{i:03d}.png" for i in range(6)]


def test_the_example_inline_config_builds_the_demo_samples(tmp_path, env):
    result = h5bank("demo", "--samples-only", "--out", "h5bank-demo", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    example = REPO / "configs" / "builds" / "images-inline.yaml"
    result = h5bank("build", example, "--scheduler", "threads", "--quiet", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    with TypedFile(tmp_path / "h5bank-demo" / "images-inline.h5") as bank:
        assert bank.images.pixels.shape == (120, 32, 32)  # 32x32 grayscale, as the file says
        assert bank.images.labels.names == ["circles", "squares", "stripes"]


# -- --dry-run -----------------------------------------------------------------------------


def test_dry_run_prints_the_bank_sources_and_absolute_output(config, tmp_path, env):
    result = h5bank("build", config, "--dry-run", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"h5bank build {config}: dry run, nothing is built or submitted",
        f"bank:     inline features of {config}",
        "          pixels: Image(size=None, mode='RGB')",
        "          labels: DirLabels()",
        "sources:  images",
        f"output:   {tmp_path / 'pictures.h5'}",
        "runs on:  threads",
    ]
    assert not (tmp_path / "pictures.h5").exists()
    assert not Path(partial_path(tmp_path / "pictures.h5")).exists()


def test_dry_run_on_slurm_prints_the_job_script_and_submits_nothing(config, tmp_path, env):
    (tmp_path / "dask-config" / "mine.yaml").write_text(  # the user's own Dask config
        "jobqueue:\n  slurm:\n    walltime: '00:20:00'\n    job-extra-directives: [--qos=low]\n"
    )
    env = {
        **env,
        "DASK_JOBQUEUE__SLURM__QUEUE": "gpu",
        "DASK_JOBQUEUE__SLURM__ACCOUNT": "lab42",
        "DASK_JOBQUEUE__SLURM__MEMORY": "6GB",
    }
    result = h5bank(
        "build", config, "--scheduler", "slurm", "--jobs", "4", "--dry-run", cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    head, script = result.stdout.split("runs on:  ", 1)
    assert f"output:   {tmp_path / 'pictures.h5'}" in head.splitlines()
    lines = script.splitlines()
    assert lines[0] == "4 Slurm jobs of 1 core, each submitted with this script:"
    assert lines[1] == "#!/usr/bin/env bash"
    directives = [line for line in lines if line.startswith("#SBATCH")]
    for expected in (
        "#SBATCH -J h5bank-worker",  # h5bank's packaged jobqueue.yaml
        "#SBATCH -p gpu",  # DASK_JOBQUEUE__SLURM__QUEUE
        "#SBATCH -A lab42",  # DASK_JOBQUEUE__SLURM__ACCOUNT
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=6G",  # DASK_JOBQUEUE__SLURM__MEMORY
        "#SBATCH -t 00:20:00",  # the user's YAML
        "#SBATCH --qos=low",
    ):
        assert expected in directives, (expected, directives)
    assert not (tmp_path / "slurm-calls").exists()  # no Slurm command ran
    assert not (tmp_path / "pictures.h5").exists()


def test_dry_run_with_adaptive_jobs(config, tmp_path, env):
    result = h5bank(
        "build", config, "--scheduler", "slurm", "--jobs", "2:8", "--dry-run", cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "runs on:  adaptive, 2 to 8 Slurm jobs of 1 core" in result.stdout
    assert not (tmp_path / "slurm-calls").exists()


def test_dry_run_inside_a_slurm_job_sizes_the_local_cluster_to_it(config, tmp_path, env):
    env = {
        **env,
        "SLURM_JOB_ID": "99",
        "SLURM_CPUS_PER_TASK": "3",
        "SLURM_MEM_PER_NODE": "3072",
    }
    result = h5bank("build", config, "--scheduler", "local", "--dry-run", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "runs on:  a local cluster of 3 worker processes, 0.9 GiB each (inside Slurm job 99: "
        "SLURM_CPUS_PER_TASK=3, SLURM_MEM_PER_NODE=3072)"
    )


def test_settings_precedence_file_then_user_config_then_environment_then_flags(tmp_path, env):
    config = tmp_path / "p.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "h5bank": {
                    "build": {
                        "features": FEATURES,
                        "sources": "images",
                        "output": "from-file.h5",
                        "scheduler": "sync",
                    }
                }
            }
        )
    )

    def output(*flags: str, env: dict) -> str:
        result = h5bank("build", config, "--dry-run", *flags, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        (line,) = (line for line in result.stdout.splitlines() if line.startswith("output:"))
        return line.split()[1]

    assert output(env=env) == str(tmp_path / "from-file.h5")
    (tmp_path / "dask-config" / "mine.yaml").write_text("h5bank: {build: {output: from-user.h5}}\n")
    assert output(env=env) == str(tmp_path / "from-user.h5")
    env = {**env, "DASK_H5BANK__BUILD__OUTPUT": "from-env.h5"}
    assert output(env=env) == str(tmp_path / "from-env.h5")
    assert output("-o", "from-flag.h5", env=env) == str(tmp_path / "from-flag.h5")


# -- usage errors: exit 2, nothing built -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--scheduler", "slurm", "--jobs", "0"), "'0': give a number of jobs (4) or adaptive"),
        (("--scheduler", "slurm", "--jobs", "-2"), "'-2': give a number of jobs"),
        (("--scheduler", "slurm", "--jobs", "four"), "'four': give a number of jobs"),
        (("--scheduler", "slurm", "--jobs", "8:2"), "'8:2': give a number of jobs"),
        (("--scheduler", "slurm", "--jobs", "0:0"), "'0:0': give a number of jobs"),
        (("--scheduler", "slurm", "--jobs", "2:"), "'2:': give a number of jobs"),
        (("--jobs", "4"), "--jobs applies to --scheduler slurm, not 'threads'"),
        (("--scheduler", "local", "--jobs", "4"), "applies to --scheduler slurm, not 'local'"),
        (("--resume", "--overwrite"), "--resume and --overwrite exclude each other"),
    ],
    ids=[
        "zero", "negative", "word", "reversed", "zero-max", "half", "threads", "local",
        "resume-overwrite",
    ],
)  # fmt: skip
def test_usage_errors_exit_2(config, tmp_path, env, args, message):
    result = h5bank("build", config, *args, "--dry-run", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "slurm-calls").exists()


def test_a_missing_config_is_a_usage_error(tmp_path, env):
    assert h5bank("build", "nope.yaml", cwd=tmp_path, env=env).returncode == 2


def test_a_wrong_config_fails_with_its_reason(config, tmp_path, env):
    config.write_text(
        "h5bank:\n  build:\n    features: {x: Picture}\n    sources: a\n    output: b\n"
    )
    result = h5bank("build", config, cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert error_line(result).startswith(
        f"h5bank: error: ConfigError: {config}: h5bank.build.features.x: 'Picture' is not a feature"
    )


def test_a_config_that_is_not_yaml_fails_with_one_line(tmp_path, env):
    config = tmp_path / "c.yaml"
    config.write_text("h5bank: [x\n")
    result = h5bank("build", config, cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert error_line(result).startswith(f"h5bank: error: ConfigError: {config} is not valid YAML")


# -- h5bank config -------------------------------------------------------------------------


def test_config_prints_the_settings_in_force_as_yaml(tmp_path, env):
    result = h5bank("config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert list(shown) == ["h5bank", "jobqueue"]
    assert shown["h5bank"]["build"]["chunk-bytes"] == 1048576
    assert shown["h5bank"]["slurm"]["jobs"] == 1
    assert shown["h5bank"]["local-cluster"]["threads-per-worker"] == 1
    slurm = shown["jobqueue"]["slurm"]
    assert (slurm["cores"], slurm["memory"], slurm["name"]) == (1, "4GB", "h5bank-worker")
    # h5bank's defaults, not dask-jobqueue's own (which leave cores and memory unset).
    import dask_jobqueue

    with open(Path(dask_jobqueue.__file__).with_name("jobqueue.yaml")) as f:
        theirs = yaml.safe_load(f)["jobqueue"]["slurm"]
    assert (theirs["cores"], theirs["memory"]) == (None, None)


def test_config_environment_variables_win(tmp_path, env):
    env = {**env, "DASK_JOBQUEUE__SLURM__CORES": "3", "DASK_H5BANK__SLURM__JOBS": "6"}
    shown = yaml.safe_load(h5bank("config", cwd=tmp_path, env=env).stdout)
    assert shown["jobqueue"]["slurm"]["cores"] == 3
    assert shown["h5bank"]["slurm"]["jobs"] == 6
    result = h5bank("config", "jobqueue.slurm.cores", cwd=tmp_path, env=env)
    assert result.stdout == "3\n"


def test_config_key_prints_one_value_or_one_subtree(tmp_path, env):
    result = h5bank("config", "h5bank.slurm.jobs", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\n"
    result = h5bank("config", "h5bank.slurm", cwd=tmp_path, env=env)
    assert yaml.safe_load(result.stdout) == {
        "h5bank": {
            "slurm": {
                "jobs": 1,
                "minimum-jobs": None,
                "maximum-jobs": None,
                "wait-timeout": 600,
                "test-submit": True,
            }
        }
    }


def test_config_key_of_a_jobqueue_default_and_of_a_secret(tmp_path, env):
    result = h5bank("config", "jobqueue.slurm.memory", cwd=tmp_path, env=env)
    assert (result.returncode, result.stdout) == (0, "4GB\n"), result.stderr  # h5bank's default
    folder = tmp_path / "dask"
    folder.mkdir()
    (folder / "h5bank.yaml").write_text(
        "h5bank: {storage-options: {s3: {secret: shh, endpoint_url: 'http://e'}}}\n"
    )
    env = {**env, "DASK_CONFIG": str(folder)}
    for key in ("h5bank.storage-options", "h5bank.storage-options.s3.secret"):
        result = h5bank("config", key, cwd=tmp_path, env=env)
        assert result.returncode == 0 and "shh" not in result.stdout and "***" in result.stdout
    shown = h5bank("config", "h5bank.storage-options.s3.endpoint_url", cwd=tmp_path, env=env)
    assert shown.stdout == "http://e\n"


def test_config_with_a_build_file_shows_its_values(tmp_path, env):
    build = tmp_path / "b.yaml"
    build.write_text(
        yaml.safe_dump(
            {
                "h5bank": {
                    "build": {
                        "bank": "pipeline.demo:DemoBank",
                        "sources": "x",
                        "output": "y",
                        "partition-size": 32,
                    }
                },
                "jobqueue": {"slurm": {"queue": "from-file", "walltime": "03:00:00"}},
            }
        )
    )
    result = h5bank(
        "config", "--build", build, "h5bank.build.partition-size", cwd=tmp_path, env=env
    )
    assert result.stdout == "32\n"
    env = {**env, "DASK_JOBQUEUE__SLURM__QUEUE": "from-env"}
    shown = yaml.safe_load(h5bank("config", "--build", build, cwd=tmp_path, env=env).stdout)
    assert shown["h5bank"]["build"]["partition-size"] == 32
    assert shown["jobqueue"]["slurm"]["walltime"] == "03:00:00"
    assert shown["jobqueue"]["slurm"]["queue"] == "from-env"  # the environment over the file
    # Without --build, the file changes nothing.
    shown = yaml.safe_load(h5bank("config", "h5bank.build", cwd=tmp_path, env=env).stdout)
    assert shown["h5bank"]["build"]["partition-size"] is None


def test_config_unknown_key_exits_1(tmp_path, env):
    result = h5bank("config", "h5bank.no-such-setting", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "no setting 'h5bank.no-such-setting'" in error_line(result)
    assert result.stdout == ""


# -- h5bank demo --samples-only ------------------------------------------------------------


def test_demo_samples_only_writes_the_samples_and_builds_nothing(tmp_path, env):
    result = h5bank("demo", "--samples-only", "--out", tmp_path / "d", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'd' / 'samples'}\n"
    images = sorted((tmp_path / "d" / "samples" / "images").rglob("*.*"))
    sounds = sorted((tmp_path / "d" / "samples" / "sounds").rglob("*.*"))
    assert (len(images), len(sounds)) == (120, 18)
    assert {p.parent.name for p in images} == {"circles", "squares", "stripes"}
    assert not list((tmp_path / "d").rglob("*.h5"))


# -- stopping a build: SIGTERM (scancel, a time limit) and Ctrl-C -------------------------


@pytest.mark.parametrize(
    ("sig", "scheduler"), [(signal.SIGTERM, "local"), (signal.SIGINT, "threads")]
)
def test_a_signal_stops_the_build_keeping_what_it_committed(tmp_path, env, sig, scheduler):
    images = tmp_path / "images"
    write_images(images, per_class=60)  # 120 sources, 0.05 s each
    config = tmp_path / "slow.yaml"
    build = {"bank": "slowbank:SlowBank", "sources": "images", "output": "slow.h5",
             "scheduler": scheduler, "partition-size": 4}  # fmt: skip
    config.write_text(yaml.safe_dump({"h5bank": {"build": build}}))
    env = {**env, "PYTHONPATH": str(Path(__file__).parent), "H5BANK_TEST_DELAY": "0.05"}
    script = shutil.which("h5bank", path=str(Path(sys.executable).parent))
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [script, "build", str(config)], cwd=tmp_path, env=env, stderr=stderr,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    try:  # wait until the progress bar shows a few partitions written
        deadline, done = time.monotonic() + 120, 0
        while time.monotonic() < deadline and process.poll() is None and done < 8:
            counts = re.findall(r"(\d+)/120", log.read_text())
            done = int(counts[-1]) if counts else 0
            time.sleep(0.05)
        assert 8 <= done < 120, f"not caught midway ({done}/120)"
        process.send_signal(sig)
        process.wait(timeout=120)
    finally:
        process.kill()
    err = log.read_text()
    assert process.returncode == 128 + sig, err
    partial = tmp_path / "slow.h5.partial"
    last = err.strip().splitlines()[-1]
    assert last == (
        f"h5bank: error: stopped by {signal.Signals(sig).name} before the build finished; "
        f"{partial} keeps every source committed so far: resume with "
        f"`h5bank build {config} --resume`"
    )
    assert "Traceback" not in err
    assert not (tmp_path / "slow.h5").exists()

    check = h5bank("verify", partial, cwd=tmp_path, env=env)
    assert check.returncode == 0, check.stderr
    committed = int(re.search(r"(\d+) sources committed by a stopped build", check.stdout)[1])
    assert 0 < committed < 120
    resumed = h5bank("build", config, "--resume", "--quiet", cwd=tmp_path,
                     env={**env, "H5BANK_TEST_DELAY": "0"})  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"{120 - committed} sources ok, 0 failed, {committed} already in the bank" in (
        resumed.stdout
    )
    QuickBank.create(tmp_path / "quick.h5", images, scheduler="threads", progress=False).close()
    assert_same_contents(tmp_path / "slow.h5", tmp_path / "quick.h5")
