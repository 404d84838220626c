"""The shell examples of README.md and docs/*.md run, and what the docs name exists.

A fenced block whose info string is ``bash`` and whose first line is ``# runs in the docs test`` is
*marked*: it runs here with ``bash -e -o pipefail`` and must exit with status 0. Mark only blocks that
run in under a minute on two CPU cores, offline, with nothing but the repository (docs/development.md).

Each marked block runs in its own temporary folder holding links to the repository's top-level files
and folders, so it reads ``configs/...`` as a user in the repository root would, and what it writes
(``runs/``, ``sample/``, ``patches.png``) stays in the temporary folder.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from selfsup.cli import COMMANDS, usage

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = "# runs in the docs test"
#: Fewer marked blocks than this and the test could pass by running next to nothing.
MIN_MARKED = 5
#: A marked block should take under a minute; this only stops a hung one (the machine may be shared).
BLOCK_TIMEOUT_S = 300
#: Top-level entries a block's folder does not link to: its own output and local state stay apart.
NOT_LINKED = {"runs", ".git", ".venv"}
BIN = Path(sys.executable).parent  # the environment running the tests: .venv/bin under `make test`


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    info: str
    text: str

    @property
    def marked(self) -> bool:
        lines = self.text.splitlines()
        return self.info == "bash" and bool(lines) and lines[0].strip() == MARK

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, indented ones (in list items) dedented."""
    blocks: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(.*)$", lines[i])
        if m is None:
            i += 1
            continue
        indent, info, start = len(m.group(1)), m.group(2).strip(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i].lstrip())
            i += 1
        blocks.append(Block(page, start + 1, info, "\n".join(body) + "\n"))
        i += 1
    return blocks


def prose(page: Path) -> str:
    """A page without its fenced blocks."""
    return re.sub(r"^\s*```.*?^\s*```[ \t]*$", "", page.read_text(), flags=re.S | re.M)


#: Fences whose lines are commands (or their output); yaml, python, bibtex blocks are not.
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "text"}


def code_texts() -> list[tuple[str, str]]:
    """(where, code) for every shell block (its comments left out) and every inline code span of every page."""
    out = [
        (b.id, re.sub(r"(^|\s)#.*$", "", b.text, flags=re.M))
        for page in PAGES
        for b in fenced_blocks(page)
        if b.info in SHELL_FENCES
    ]
    for page in PAGES:
        out += [(str(page.relative_to(REPO)), span) for span in re.findall(r"`([^`\n]+)`", prose(page))]
    return out


BLOCKS = [b for page in PAGES for b in fenced_blocks(page)]
MARKED = [b for b in BLOCKS if b.marked]


def test_enough_blocks_are_marked() -> None:
    assert len(PAGES) >= 2, "README.md and docs/*.md"
    assert len(MARKED) >= MIN_MARKED, f"only {len(MARKED)} marked blocks: {[b.id for b in MARKED]}"


@pytest.mark.parametrize("block", MARKED, ids=[b.id for b in MARKED])
def test_marked_block_runs(block: Block, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in NOT_LINKED:
            (work / entry.name).symlink_to(entry)
    script = tmp_path / "block.sh"
    script.write_text(block.text)
    env = {
        **os.environ,  # conftest: WANDB_MODE=offline, WANDB_DIR and SELFSUP_CACHE in this test's folder
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "MPLBACKEND": "Agg",
    }
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", str(script)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert done.returncode == 0, (
        f"{block.id} exited with {done.returncode}:\n{block.text}\n--- stdout (end) ---\n{done.stdout[-3000:]}"
        f"\n--- stderr (end) ---\n{done.stderr[-3000:]}"
    )


def help_choices(capsys: pytest.CaptureFixture[str], *args: str) -> set[str]:
    """The subcommands that ``selfsup [ARGS] --help`` offers in its usage line (``usage: selfsup ... {a,b,c}``),
    read in this process: ``selfsup --help`` prints ``cli.usage()``, ``selfsup data --help`` the data parser's."""
    if args:
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            COMMANDS[args[0]][0]([*args[1:], "--help"])
        assert done.value.code in (0, None)
        text = capsys.readouterr().out
    else:
        text = usage()
    m = re.search(r"usage: selfsup[^{\n]*\{([^}]*)\}", text)
    assert m is not None, text[:2000]
    return set(m.group(1).split(","))


def test_every_selfsup_command_named_exists(capsys: pytest.CaptureFixture[str]) -> None:
    commands, data_commands = help_choices(capsys), help_choices(capsys, "data")
    named: dict[str, set[str]] = {}
    for where, code in code_texts():
        for name in re.findall(r"(?<![\w./-])selfsup[ \t]+([a-z][\w-]*)", code):
            named.setdefault(name, set()).add(where)
        for name in re.findall(r"(?<![\w./-])selfsup[ \t]+data[ \t]+([a-z][\w-]*)", code):
            named.setdefault(f"data {name}", set()).add(where)
    assert {"fit", "pipeline"} <= named.keys()
    unknown = {
        name: sorted(where)
        for name, where in named.items()
        if (name.split()[1] not in data_commands if name.startswith("data ") else name not in commands)
    }
    assert not unknown, f"not commands of `selfsup --help` ({sorted(commands)}): {unknown}"


def test_every_benchmark_named_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    names = importlib.import_module("benchmarks").NAMES
    named = {
        (n, where) for where, code in code_texts() for n in re.findall(r"python -m benchmarks[ \t]+([a-z]\w*)", code)
    }
    assert named, "the docs name no benchmark"
    unknown = sorted((n, where) for n, where in named if n not in names)
    assert not unknown, f"not in benchmarks.NAMES ({sorted(names)}): {unknown}"


def test_every_repository_path_named_exists() -> None:
    path = re.compile(
        r"(?<![\w./-])((?:configs|scripts|benchmarks|tests|src)/[\w./-]*\w\.(?:yaml|py|sh|sbatch|json|md|png|zip))"
    )
    missing = sorted(
        {
            (p, str(page.relative_to(REPO)))
            for page in PAGES
            for p in path.findall(page.read_text())
            if not (REPO / p).exists()
        }
    )
    assert not missing, f"named in the docs, not in the repository: {missing}"


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append((str(page.relative_to(REPO)), target))
    assert not broken, f"links to nothing: {broken}"


def test_no_path_leaves_the_repository() -> None:
    outside = []
    for page in PAGES:
        text = re.sub(r"\]\([^)\s]+\)", "]()", page.read_text())  # relative links may climb out of docs/
        outside += [(str(page.relative_to(REPO)), m) for m in re.findall(r"\S*(?<![\w.])\.\./\S*", text)]
        outside += [(str(page.relative_to(REPO)), m) for m in re.findall(r"\S*runs/\S+/version_\d+\S*", text)]
    assert not outside, f"paths outside the repository or stale run folders: {outside}"
