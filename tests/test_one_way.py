"""One way each (issue 23): event subjects are parsed by messages/ only
(`messages.subjects.parse_subject` and `Subject`). Checked on the source (ast): a module
outside messages/ (and tests/) that splits a subject string at its dots fails here."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
SPLITS = {"split", "rsplit", "partition", "rpartition"}
ALLOWED = ("messages/", "tests/")  # the parser itself; tests may take subjects apart to check


def project_sources() -> list[Path]:
    """The Python files git tracks, or every one under the checkout when it is not a repo."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        files = [REPO / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in REPO.rglob("*.py") if ".venv" not in p.parts]
    return [p for p in files if p.is_file()]


def subject_splits(source: str) -> list[tuple[int, str]]:
    """(line, code) of each `<expr>.split(".")` (or rsplit, partition, rpartition) whose
    `<expr>` names a subject: any name, attribute or call in it containing "subj"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in SPLITS
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == "."
        ):
            continue
        receiver = node.func.value
        names = [
            n.id if isinstance(n, ast.Name) else n.attr
            for n in ast.walk(receiver)
            if isinstance(n, ast.Name | ast.Attribute)
        ]
        if any("subj" in name.lower() for name in names):
            found.append((node.lineno, ast.unparse(node)))
    return found


@pytest.mark.parametrize(
    "code",
    [
        'kind = msg.subject.split(".")[1]',
        'where = event.subject().split(".", 2)[2]',
        'head, _, rest = subject_text.partition(".")',
        'last = m.subject.rsplit(".", 1)[-1]',
        'acq = self.input_subject.split(".")[2]',
    ],
)
def test_the_rule_finds_a_subject_split(code):
    assert subject_splits(code)


@pytest.mark.parametrize(
    "code",
    [
        'a, _, b = key.partition(".")',  # a bucket key, not a subject
        'servers = url.split(",")',
        'parts = subject.split("/")',
        "kind = parse_subject(msg.subject).kind",
    ],
)
def test_the_rule_leaves_other_splits_alone(code):
    assert not subject_splits(code)


def test_no_module_outside_messages_splits_a_subject():
    offenders = []
    for path in project_sources():
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(ALLOWED):
            continue
        for line, code in subject_splits(path.read_text()):
            offenders.append(f"{rel}:{line}: {code}")
    assert not offenders, "parse subjects with messages.subjects.parse_subject:\n" + "\n".join(
        offenders
    )


def test_no_module_outside_messages_builds_a_subject_from_the_prefix():
    """Subjects and filters are built by messages.subjects (subject, event_filter, acq_filter):
    no module outside messages/ and tests/ imports the prefix to spell one itself."""
    offenders = []
    for path in project_sources():
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "messages.subjects"
                and any(alias.name == "PREFIX" for alias in node.names)
            ):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
