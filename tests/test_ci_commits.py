""".ci/check_commits.sh: commits newer than BASE have subjects of at most 72 characters."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "check_commits.sh"
LONG = "sampler: " + "a subject that runs on and on" * 3  # 96 characters
ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, env=ENV, check=True, capture_output=True)
    return out.stdout.decode().strip()


def _commit(repo: Path, subject: str) -> str:
    _git(repo, "commit", "-q", "--allow-empty", "-m", subject, "-m", "A body.")
    return _git(repo, "rev-parse", "--short", "HEAD")


def _check(repo: Path, base: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), base], cwd=repo, env=ENV, capture_output=True, text=True
    )


@pytest.fixture
def repo(tmp_path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    _git(r, "init", "-q")
    return r


def test_long_subject_after_base_fails_and_is_named(repo):
    assert len(LONG) > 72
    _commit(repo, LONG)  # before the rule: not judged
    base = _commit(repo, "docs: the last commit before the rule")
    _commit(repo, "ci: a good subject")
    ok = _check(repo, base)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 commits (after" in ok.stdout

    bad = _commit(repo, LONG)
    r = _check(repo, base)
    assert r.returncode == 1
    assert f"subject of {bad} is {len(LONG)} characters" in r.stdout
    assert LONG in r.stdout and "1 of 2 commits" in r.stdout


def test_exactly_72_characters_passes(repo):
    base = _commit(repo, "base")
    subject = "x" * 72
    _commit(repo, subject)
    assert _check(repo, base).returncode == 0
    _commit(repo, subject + "y")
    assert _check(repo, base).returncode == 1


def test_shallow_clone_without_base_checks_what_it_has(repo, tmp_path):
    base = _commit(repo, "base")
    _commit(repo, "ci: a good subject")
    _commit(repo, LONG)
    shallow = tmp_path / "shallow"
    _git(tmp_path, "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow))
    r = _check(shallow, base)
    assert r.returncode == 1 and "shallow clone" in r.stdout and LONG in r.stdout


def test_full_clone_without_base_is_skipped_with_a_note(repo):
    _commit(repo, LONG)
    r = _check(repo, "d521701")
    assert r.returncode == 0 and "not in this repository" in r.stdout
