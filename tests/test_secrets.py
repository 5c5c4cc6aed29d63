"""Banks and sources from someone else: nothing h5bank prints or stores shows a secret, a source
folder's links do not reach out of it, and text from a bank cannot drive the terminal.

- URLs lose their credentials wherever they are printed or stored, even URLs ``urlsplit``
  cannot parse (redaction fails closed);
- ``h5bank build --dry-run`` and ``h5bank config`` (``--build``) hide storage options and
  other settings by name and by value, at any depth;
- a directory or glob given as a source lists no file whose real path is outside it;
- provenance records local paths without the folders above them;
- ids, label names, file names and error messages print with control characters escaped.

The commands run as users run them: the installed console script, in a folder of the test's
own, with an environment of the test's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import write_images

from features import Array, DirLabels, Image
from pipeline import TypedFile
from pipeline.format import layout
from pipeline.sources import expand
from pipeline.urls import redact, scrub

ESCAPE = "\x1b]0;pwn\x07"  # an OSC sequence: retitles the terminal window
ESCAPED = "\\x1b]0;pwn\\x07"  # how it must print


def h5bank(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    script = shutil.which("h5bank", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def printed(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


# -- redaction fails closed -------------------------------------------------------------------

UNPARSEABLE = [
    # urlsplit raises ("Invalid IPv6 URL")
    ("https://user:SECRET@[::1/z.png", "https://[::1/z.png"),
    ("https://user:SECRET@[::1/z.png?X-Amz-Signature=SIGVALUE#f", "https://[::1/z.png"),
    # urlsplit cuts the authority short at a "/" or "?" of the password (a port "SE" is no port)
    ("https://user:SE/SECRET@host.example/a.png", "https://host.example/a.png"),
    ("https://user:SE?SECRET@host.example/a.png", "https://host.example/a.png"),
    # "::" in a password is not a chain
    ("https://user:SE::SECRET@host.example/a.png", "https://host.example/a.png"),
]


@pytest.mark.parametrize(("url", "expected"), UNPARSEABLE)
def test_redact_fails_closed_on_a_url_it_cannot_parse(url, expected):
    redacted = redact(url)
    assert redacted == expected
    assert "SECRET" not in redacted and "SIGVALUE" not in redacted and "user" not in redacted
    assert redact(redacted) == redacted  # idempotent


@pytest.mark.parametrize(
    "url",
    [
        "https://host.example/a.png?size=2&page=3",
        "https://host.example/a.png#page=2",
        "s3://bucket/cats/1.png",
        "http://[::1]:9000/bucket/x.png?versionId=7",
        "simplecache::s3://bucket/x.png",
        "zip://a.png::s3://bucket/x.zip",
        "memory://data/cats/1.png",
    ],
)
def test_redact_leaves_urls_without_credentials_as_they_are(url):
    assert redact(url) == url


@pytest.mark.parametrize(
    "name",
    [
        "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "AWSAccessKeyId",
        "Signature", "signature", "sig", "token", "access_token", "id_token", "key", "apikey",
        "api_key", "password", "pwd", "client_secret", "GoogleAccessId", "X-Goog-Signature",
        "X-Goog-Credential", "X%2DAmz%2DSignature",
    ],
)  # fmt: skip
def test_redact_drops_every_credential_query_parameter(name):
    url = f"https://host.example/a.png?size=2&{name}=VALUE&page=3"
    assert redact(url) == "https://host.example/a.png?size=2&page=3"


def test_redact_drops_an_azure_sas_but_its_harmless_fields():
    url = (
        "https://acct.blob.core.windows.net/c/a.png"
        "?sv=2022-11-02&ss=b&srt=o&sp=r&se=2030-01-01&sig=SIGVALUE%3D"
    )
    redacted = redact(url)
    assert "SIGVALUE" not in redacted and "sig=" not in redacted
    assert redacted.startswith("https://acct.blob.core.windows.net/c/a.png")


def test_scrub_redacts_unparseable_urls_quoted_in_text():
    text = "cannot read 'https://user:SECRET@[::1/z.png': ValueError (see https://u:PW@h/x)"
    scrubbed = scrub(text)
    assert "SECRET" not in scrubbed and "PW" not in scrubbed
    assert scrubbed == "cannot read 'https://[::1/z.png': ValueError (see https://h/x)"


# -- secrets hidden from settings -------------------------------------------------------------

STORAGE_OPTIONS = {
    "https": {
        "client_kwargs": {"headers": {"Cookie": "session=xyz", "Accept": "image/png"}},
        "headers": [["X-Api-Key", "APIKEYVALUE"]],
    },
    "s3": {
        "endpoint_url": "http://AKIA:s3cr3tPW@127.0.0.1:9000",
        "key": "AKIAVALUE",
        "secret": "SECRETVALUE",
        "token": {"refresh": "REFRESHVALUE"},
        "anon": False,
    },
    "abfs": {
        "account_name": "lab",
        "connection_string": "DefaultEndpointsProtocol=https;AccountName=lab;AccountKey=abc",
        "conn": "AccountName=lab;AccountKey=abc2",
        "shared": "BlobEndpoint=https://lab.blob.core.windows.net;SharedAccessSignature=sv=1&sig=SAS",
        "query": "sv=2022&sig=SIGVALUE",
        "note": "Bearer BEARERVALUE",
    },
}  # fmt: skip
SECRETS = [
    "session=xyz", "xyz", "APIKEYVALUE", "AKIA:", "s3cr3tPW", "AKIAVALUE", "REFRESHVALUE",
    "SECRETVALUE", "AccountKey=abc", "abc2", "sig=SAS", "SIGVALUE", "BEARERVALUE",
]  # fmt: skip
KEPT = ["127.0.0.1:9000", "image/png", "AccountName=lab", "lab.blob.core.windows.net", "Bearer"]


def test_hide_secrets_hides_by_name_and_by_value_at_any_depth():
    from pipeline.urls import hide_secrets

    shown = yaml.safe_dump(hide_secrets({"storage-options": STORAGE_OPTIONS}))
    for secret in SECRETS:
        assert secret not in shown
    for kept in KEPT:
        assert kept in shown
    hidden = hide_secrets(STORAGE_OPTIONS)
    assert hidden["s3"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert hidden["s3"]["anon"] is False and hidden["s3"]["token"] == "***"
    assert hidden["abfs"]["conn"] == "AccountName=lab;AccountKey=***"
    assert hide_secrets("export AWS_SECRET_ACCESS_KEY=abc\nexport X=1") == (
        "export AWS_SECRET_ACCESS_KEY=***\nexport X=1"
    )
    assert hide_secrets("KeyError: 'x'") == "KeyError: 'x'"  # plain text stays


SOURCES = [
    "https://user:s3cr3tPW@host.example/a/b.png",
    "https://host.example/c.png?X-Amz-Signature=SIGVALUE&X-Amz-Credential=AKIAVALUE",
    "https://user:s3cr3tPW@[::1/z.png",
]


@pytest.fixture
def secret_config(tmp_path) -> Path:
    """A build config whose sources, output, storage options and Slurm job script hold the
    secrets of the issue."""
    build = {
        "bank": "pipeline.demo:DemoBank",
        "sources": SOURCES,
        "output": "s3://AKIA:s3cr3tPW@bucket/out.h5?X-Amz-Signature=SIGVALUE",
        "scheduler": "slurm",
    }
    settings = {
        "h5bank": {"build": build, "storage-options": STORAGE_OPTIONS},
        "jobqueue": {
            "slurm": {"job-script-prologue": ["export AWS_SECRET_ACCESS_KEY=SECRETVALUE"]}
        },
    }
    path = tmp_path / "secrets.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def test_a_dry_run_prints_no_secret(secret_config, tmp_path, env):
    result = h5bank("build", secret_config, "--dry-run", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    for secret in [*SECRETS, "user"]:
        assert secret not in printed(result)
    assert "sources:  https://host.example/a/b.png, https://host.example/c.png, " in result.stdout
    assert "https://[::1/z.png" in result.stdout
    assert "output:   s3://bucket/out.h5\n" in result.stdout
    assert "export AWS_SECRET_ACCESS_KEY=***" in result.stdout  # the job script


def test_config_prints_no_secret(secret_config, tmp_path, env):
    result = h5bank("config", "--build", secret_config, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    for secret in [*SECRETS, "user"]:
        assert secret not in printed(result)
    for kept in KEPT:
        assert kept in result.stdout
    shown = yaml.safe_load(result.stdout)
    options = shown["h5bank"]["storage-options"]
    assert options["https"]["client_kwargs"]["headers"] == {"Cookie": "***", "Accept": "image/png"}
    assert options["s3"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert options["abfs"]["connection_string"] == "***"
    assert shown["h5bank"]["build"]["sources"][0] == "https://host.example/a/b.png"
    assert shown["jobqueue"]["slurm"]["job-script-prologue"] == ["export AWS_SECRET_ACCESS_KEY=***"]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("h5bank.storage-options.https.client_kwargs.headers.Cookie", "***"),
        ("h5bank.storage-options.s3.token.refresh", "***"),  # a secret name on the way
        ("h5bank.storage-options.s3.endpoint_url", "http://127.0.0.1:9000"),
        ("h5bank.storage-options.abfs.conn", "AccountName=lab;AccountKey=***"),
        ("h5bank.build.output", "s3://bucket/out.h5"),
    ],
)
def test_config_of_one_key_prints_no_secret(secret_config, tmp_path, env, key, expected):
    result = h5bank("config", "--build", secret_config, key, cwd=tmp_path, env=env)
    assert (result.returncode, result.stdout) == (0, expected + "\n"), result.stderr


# -- a real build: ids, failures, provenance --------------------------------------------------


def test_a_build_of_urls_with_credentials_stores_and_prints_no_secret(tmp_path, env):
    build = {
        "features": {"pixels": {"type": "Image", "size": [8, 8], "mode": "RGB"}},
        "sources": [
            "https://user:SECRET@[::1/z.png",
            "https://user:SECRET@127.0.0.1:9/y.png?X-Amz-Signature=SIGVALUE",
        ],
        "output": "bank.h5",
        "scheduler": "threads",
    }
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump({"h5bank": {"build": build, "fetch": {"retries": 0}}}))
    result = h5bank("build", config, "--quiet", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "SECRET" not in printed(result) and "SIGVALUE" not in printed(result)
    assert "0 sources ok, 2 failed" in result.stdout
    assert "failed: 'https://[::1/z.png' (feature pixels)" in result.stdout
    raw = (tmp_path / "bank.h5").read_bytes()
    assert b"SECRET" not in raw and b"SIGVALUE" not in raw
    with h5py.File(tmp_path / "bank.h5", "r") as f:
        ids = f[f"{layout.FAILURES}/id"].asstr()[:].tolist()
        errors = f[f"{layout.FAILURES}/error"].asstr()[:].tolist()
        provenance = json.loads(f.attrs[layout.ATTR_PROVENANCE])
    assert ids == ["https://[::1/z.png", "https://127.0.0.1:9/y.png"]
    assert all("SECRET" not in e and "user" not in e for e in errors)
    assert provenance["builds"][0]["sources"] == ids


# -- symbolic links out of a source folder ----------------------------------------------------


class Vectors(TypedFile):
    vectors = Array()


@pytest.fixture
def linked_tree(tmp_path) -> Path:
    """``tree/`` holding a file, a link to it, a link to a file outside the tree, and a link to
    a folder outside the tree."""
    outside = tmp_path / "outside"
    outside.mkdir()
    np.save(outside / "private.npy", np.full(3, 666.0))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    np.save(tree / "sub" / "own.npy", np.arange(3.0))
    (tree / "inside.npy").symlink_to(Path("sub") / "own.npy")  # stays in the tree: kept
    (tree / "sub" / "stolen.npy").symlink_to(outside / "private.npy")
    (tree / "away").symlink_to(outside, target_is_directory=True)
    return tree


def test_a_source_folder_lists_no_link_leading_out_of_it(linked_tree):
    from pipeline.sources import OutsideLinkWarning

    for given, left_out in [
        (str(linked_tree), ["sub/stolen.npy"]),
        (f"{linked_tree}/**/*.npy", ["away/private.npy", "sub/stolen.npy"]),  # "**" follows links
        (f"file://{linked_tree}/", ["sub/stolen.npy"]),
    ]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids = [spec.id for spec in expand(given)]
        assert (
            [i.rsplit("/", 2)[-2:] for i in ids] == [["tree", "inside.npy"], ["sub", "own.npy"]]
            if (given.startswith("file:"))
            else ids == ["inside.npy", "sub/own.npy"]
        ), given
        (warning,) = [w for w in caught if issubclass(w.category, OutsideLinkWarning)]
        for name in left_out:
            assert repr(name) in str(warning.message)
    # A file named explicitly is the user's own choice, wherever it leads.
    assert [s.id for s in expand(str(linked_tree / "sub" / "stolen.npy"))] == [
        str(linked_tree / "sub" / "stolen.npy")
    ]


def test_a_build_of_a_folder_holds_nothing_from_outside_it(linked_tree, tmp_path):
    with pytest.warns(UserWarning, match="sub/stolen.npy"):
        bank = Vectors.create(tmp_path / "bank.h5", linked_tree, scheduler="sync", progress=False)
    with bank:
        assert sorted(bank.ids) == ["inside.npy", "sub/own.npy"]
        assert not bank.failures()
        assert 666.0 not in bank.vectors[:]


# -- provenance without the machine's folders -------------------------------------------------


def test_provenance_records_local_paths_without_the_folders_above_them(
    images, tmp_path, monkeypatch
):
    class Pictures(TypedFile):
        pixels = Image(size=(8, 8), mode="RGB")
        labels = DirLabels()

    given = [f"{images}/cats/*.png", images / "dogs"]
    with Pictures.create(tmp_path / "a.h5", given, scheduler="sync", progress=False):
        pass
    monkeypatch.chdir(tmp_path)  # now the sources are under the current directory
    with Pictures.create("b.h5", [str(images) + "/"], scheduler="sync", progress=False):
        pass
    recorded = []
    for name in ("a.h5", "b.h5"):
        with h5py.File(tmp_path / name, "r") as f:
            recorded.append(json.loads(f.attrs[layout.ATTR_PROVENANCE])["builds"][0]["sources"])
            assert str(tmp_path).encode() not in (tmp_path / name).read_bytes()
    assert recorded == [[".../cats/*.png", ".../dogs"], ["images/"]]


# -- control characters from a bank or a source -----------------------------------------------


def test_control_characters_print_escaped(tmp_path, env):
    """A label (folder) name, a source id, a file name quoted by an error and the bank's name
    hold an OSC escape; every command prints it as ``\\x1b...``, never raw."""
    photos = tmp_path / "photos"
    write_images(photos, classes=(ESCAPE, "dogs"), per_class=2)
    (photos / "dogs" / "broken.png").symlink_to(ESCAPE + ".png")  # dangling, inside the tree
    tree = h5bank("image-bank", photos, "labels.h5", "--size", "8", "--mode", "RGB", cwd=tmp_path, env=env)  # fmt: skip
    assert tree.returncode == 0, tree.stderr
    config = tmp_path / "build.yaml"
    build = {
        "features": {"pixels": {"type": "Image", "size": [8, 8], "mode": "RGB"}},
        "sources": [ESCAPE, str(photos)],
        "output": ESCAPE + ".h5",
        "scheduler": "threads",
    }
    config.write_text(yaml.safe_dump({"h5bank": {"build": build}}))
    dry = h5bank("build", config, "--dry-run", cwd=tmp_path, env=env)
    built = h5bank("build", config, "--quiet", cwd=tmp_path, env=env)
    assert dry.returncode == 0 and built.returncode == 0, dry.stderr + built.stderr
    again = h5bank("build", config, "--quiet", cwd=tmp_path, env=env)
    assert again.returncode == 1
    for result in (tree, dry, built, again):
        assert "\x1b" not in printed(result) and "\x07" not in printed(result), result.args
        assert ESCAPED in printed(result), result.args
    assert f"names={ESCAPED},dogs" in tree.stdout  # the tree's label names
    assert f"broken symbolic link (to {ESCAPED}.png" in printed(tree)  # a file name in an error
    assert f"sources:  {ESCAPED}, " in dry.stdout  # a plain id
    assert f"built {tmp_path}/{ESCAPED}.h5: " in built.stdout  # the summary
    assert again.stderr.startswith(f"h5bank: error: FileExistsError: {tmp_path}/{ESCAPED}.h5 ")
    with TypedFile(tmp_path / "labels.h5") as bank:
        assert "\x1b" not in bank.tree() and "\x1b" not in repr(bank.labels)
        assert any(ESCAPE in i for i in bank.ids)  # stored as given, printed escaped
