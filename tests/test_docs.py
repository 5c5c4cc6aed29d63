"""Every example in README.md and docs/ runs, the way a user runs it; the site builds strictly.

How a page's code blocks are run (docs/contributing.md says the same, for writers):

- ```` ```python ```` blocks run as script files (``python NN.py``), ```` ```bash ```` blocks
  with ``bash -euo pipefail``, in the order of the page, in one fresh copy of the repository per
  page (what one block writes, the next finds; ``configs/``, ``benchmarks/`` are there as in a
  clone). ``h5bank`` and ``python`` are the ones of this interpreter.
- A block whose first line is ``# file: NAME`` is written to ``NAME`` instead of run (a
  module later blocks import, a build config a command reads).
- Blocks of other languages (``text`` for output, ``yaml``, ``toml``...) are shown, not run.
- ``<!-- docs-test: needs s3 -->`` (or ``slurm``) anywhere in a page starts that service for
  it: a moto S3 server whose endpoint and credentials are in the environment
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, as a user's shell
  would have them), or the single-node Slurm of ``tests/slurm.sh`` (``SLURM_CONF``). Locally a
  service that cannot run skips the page; on CI the page fails.
- ``<!-- docs-test: skip REASON -->`` just before a block leaves it out; only the README's two
  commands use it, and the tests below run or check those another way.

Processes a page leaves running (a server started in the background) are stopped by PID after
it: each carries a marker in its environment, looked for in ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import marked_processes

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
RUN = {"python": "python", "bash": "bash"}
SHOWN = {"text", "yaml", "toml", "json", "ini", "console", ""}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<info>[^`\n]*)$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None  # the reason, for a block marked to be left out

    @property
    def file(self) -> str | None:
        first = self.code.split("\n", 1)[0].strip()
        match = re.fullmatch(r"# file: (\S+)", first)
        return match.group(1) if match else None

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, with their language and any skip marker."""
    lines = page.read_text().split("\n")
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match.group("indent"), match.group("fence")
        language = match.group("info").strip().split(" ")[0].strip("{}.").lower()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^{re.escape(indent)}{fence}\s*$", lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        skip = re.search(r"<!-- docs-test: skip (.+?) -->", previous)
        code = textwrap.dedent("\n".join(body)) + "\n"
        found.append(Block(page, i + 1, language, code, skip.group(1) if skip else None))
        i = j + 1
    return found


def needs(page: Path) -> set[str]:
    return {
        word
        for match in re.finditer(r"<!-- docs-test: needs ([\w ]+) -->", page.read_text())
        for word in match.group(1).split()
    }


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


# -- what the examples need --------------------------------------------------------------------


def environment(marker: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DASK_"))}
    env.pop("PYTHONPATH", None)  # a user's shell: the installed package, not the test helpers
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["H5BANK_DOCS_RUN"] = marker
    env["NO_MKDOCS_2_WARNING"] = "1"  # Material's banner about a future MkDocs, on stderr
    env.update(extra)
    return env


def services(page: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """Start what the page declares it needs; the environment variables that reach it."""
    env: dict[str, str] = {}
    wanted = needs(page)
    unknown = wanted - {"s3", "slurm"}
    assert not unknown, f"{page_id(page)} needs unknown services {unknown}"
    if "s3" in wanted:
        server = request.getfixturevalue("moto")
        env.update(
            AWS_ENDPOINT_URL=server.url,
            AWS_ACCESS_KEY_ID="docs",
            AWS_SECRET_ACCESS_KEY="docs-secret",
            AWS_DEFAULT_REGION="us-east-1",
        )
    if "slurm" in wanted:
        env["SLURM_CONF"] = request.getfixturevalue("slurm")
    return env


def leftovers(marker: str) -> list[int]:
    return marked_processes("H5BANK_DOCS_RUN", marker)


def stop_leftovers(marker: str) -> list[int]:
    """Stop (SIGTERM, then SIGKILL) the processes a page left running; their pids."""
    pids = leftovers(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while leftovers(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
    return pids


def copy_of_repository(folder: Path) -> Path:
    """The repository's files (tracked, and new ones git does not ignore) copied to ``folder``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    return folder


def run_block(block: Block, folder: Path, index: int, env: dict[str, str]) -> None:
    if block.file:
        target = folder / block.file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.code)
        return
    suffix = {"python": "py", "bash": "sh"}[block.language]
    script = folder / f"example_{index:02d}.{suffix}"
    script.write_text(block.code)
    argv = [sys.executable, script.name] if block.language == "python" else [
        "bash", "-euo", "pipefail", script.name,
    ]  # fmt: skip
    result = subprocess.run(
        argv, cwd=folder, env=env, capture_output=True, text=True, timeout=900,
        start_new_session=True,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.fail(
            f"the example at {block.where()} ({block.language}) exited {result.returncode}\n"
            f"--- code ---\n{block.code}--- stdout ---\n{result.stdout[-4000:]}\n"
            f"--- stderr ---\n{result.stderr[-6000:]}",
            pytrace=False,
        )


# -- the tests -----------------------------------------------------------------------------------


def runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language in RUN and b.skip is None]


# Pages with examples (the API reference, made from docstrings, has none: the site build checks it)
@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=page_id)
def test_every_example_of_the_page_runs(page, tmp_path, request):
    env_extra = services(page, request)
    marker = uuid.uuid4().hex
    env = environment(marker, env_extra)
    folder = copy_of_repository(tmp_path / "page")
    try:
        for index, block in enumerate(runnable(page)):
            run_block(block, folder, index, env)
    finally:
        left = stop_leftovers(marker)
    assert not left, f"{page_id(page)} left processes running: {left} (stop them in the page)"


def test_examples_are_in_languages_that_run_or_are_only_shown():
    odd = [
        f"{b.where()}: ```{b.language}"
        for page in PAGES
        for b in blocks(page)
        if b.language not in RUN and b.language not in SHOWN
    ]
    assert not odd, "use ```python or ```bash (run), or ```text (shown):\n" + "\n".join(odd)


def test_no_example_installs_into_the_environment_the_tests_run_in():
    # pip install -e . run in a page's copy would point the test environment at that copy,
    # which is deleted after the page: say how to install in prose, or use a venv of its own.
    installing = [
        b.where()
        for page in PAGES
        for b in blocks(page)
        if b.language in RUN
        and b.skip is None
        and re.search(r"^[^#]*\bpip3? install\b", b.code, re.MULTILINE)  # comments may say it
    ]
    assert not installing, installing


def test_only_the_readme_commands_are_left_out():
    skipped = [(b.where(), b.skip) for page in PAGES for b in blocks(page) if b.skip]
    assert {where.split(":")[0] for where, _ in skipped} <= {"README.md"}, skipped
    assert len(skipped) == 2, skipped


def readme_command(kind: str) -> str:
    """The README's demo or test command (the blocks left out of the page run)."""
    commands = [b.code.strip() for b in blocks(REPO / "README.md") if b.skip]
    (command,) = [c for c in commands if ("[dev]" in c) == (kind == "test")]
    return command


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    command = readme_command("test")
    assert command in ci.splitlines(), f".ci/run does not run the README's test command {command!r}"


def test_the_readme_demo_command_works_in_a_fresh_copy(tmp_path):
    """The README's first command, in a copy of the repository with no environment yet."""
    copy = copy_of_repository(tmp_path / "h5bank")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_command("demo")], cwd=copy, env=env,
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "138 sources ok, 0 failed" in result.stderr + result.stdout
    assert (copy / "h5bank-demo" / "demo.h5").is_file()


def test_the_site_builds_with_no_warning(tmp_path):
    pytest.importorskip("mkdocs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-6000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "index.html").is_file()
