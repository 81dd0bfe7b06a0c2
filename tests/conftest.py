"""Shared fixtures: an isolated environment, a spool and config in a temporary directory, and helpers that run
the installed console scripts as real processes.

Nothing here touches the machine's /usr/sbin/sendmail, /etc or /var/spool: every run gets PYMTA_CONFIG
pointing at a config in tmp_path whose spool is in tmp_path too, and HOME/XDG_* point into tmp_path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pymta.queue.entry import QueueEntry
from pymta.queue.spool import Spool

# The real-users install (tests/system_install.py): one per run, its fixtures used by name.
pytest_plugins = ["system_install"]

BIN = Path(sys.executable).parent


def script(name: str) -> str:
    """The installed console script `name` of the environment running the tests."""
    path = BIN / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: install the project first (pip install '.[test]')")
    return str(path)


GUARDED = ("/var/mail", "/var/spool/pymta", "/etc/pymta", "/etc/aliases", "/usr/sbin/sendmail")


def _snapshot() -> dict[str, object]:
    found: dict[str, object] = {}
    for path in GUARDED:
        if os.path.isdir(path):
            found[path] = sorted(
                (entry.name, entry.stat(follow_symlinks=False).st_mtime) for entry in os.scandir(path)
            )
        elif os.path.lexists(path):
            found[path] = os.lstat(path).st_mtime
    return found


@pytest.fixture(scope="session", autouse=True)
def machine_untouched() -> Iterator[None]:
    """Tests never touch the machine's mailboxes, spool, config or sendmail: checked over the whole run."""
    before = _snapshot()
    yield
    after = _snapshot()
    assert after == before, f"the test run changed the machine's own files: {before} -> {after}"


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A developer's own config, spool or XDG dirs can never leak into a test."""
    for name in list(os.environ):
        if name.startswith(("PYMTA_", "XDG_")):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    yield


def local_sandbox(root: Path, text: str = "") -> str:
    """Config lines that keep local delivery and aliases inside `root` (a test's tmp_path), never the
    machine's /var/mail or /etc/aliases; keys that `text` sets itself are left to it."""
    (root / "mail").mkdir(exist_ok=True)
    lines = text.splitlines()
    sandbox = ""
    if not any(line.startswith("local:") for line in lines):
        sandbox += f"local:\n  mailbox: mbox\n  mail_spool: {root / 'mail'}\n  maildir: {root}/Maildir\n"
    if not any(line.startswith("aliases:") for line in lines):
        sandbox += f"aliases: {root / 'aliases'}\n"
    return sandbox


@dataclass
class MtaEnv:
    """A pymta installation in a temporary directory: its config, spool and the environment to run it in."""

    root: Path
    config: Path
    spool: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{BIN}:/usr/bin:/bin",
            "HOME": str(self.root / "home"),
            "PYMTA_CONFIG": str(self.config),
            "LANG": "C.UTF-8",
        }

    @property
    def mail_spool(self) -> Path:
        """Where local mbox deliveries go in tests (never the machine's /var/mail)."""
        return self.root / "mail"

    def write_config(self, text: str) -> None:
        """The config: `text` after the spool, and local delivery and aliases kept inside the test's tmp_path
        (unless `text` sets them itself)."""
        self.config.write_text(f"spool: {self.spool}\n{local_sandbox(self.root, text)}{text}")

    def run(
        self,
        program: str,
        args: Sequence[str] = (),
        input: bytes | None = b"",
        env: dict[str, str] | None = None,
        argv0: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run an installed console script (sendmail, mailq, pymta...) as a real process."""
        executable = script(program)
        argv = [argv0 or executable, *args]
        return subprocess.run(
            argv,
            executable=executable,
            input=input,
            capture_output=True,
            env=self.env if env is None else env,
            timeout=timeout,
        )

    def sendmail(
        self, *args: str, input: bytes = b"", **kwargs: object
    ) -> subprocess.CompletedProcess[bytes]:
        return self.run("sendmail", args, input=input, **kwargs)  # type: ignore[arg-type]

    def entries(self) -> list[QueueEntry]:
        entries, problems = Spool(str(self.spool)).entries()
        assert problems == []
        return entries

    def only_entry(self) -> QueueEntry:
        entries = self.entries()
        assert len(entries) == 1, entries
        return entries[0]

    def message(self, entry: QueueEntry) -> bytes:
        return Spool(str(self.spool)).read_message(entry)


@pytest.fixture
def mta(tmp_path: Path) -> MtaEnv:
    """A fresh config and spool under tmp_path; the spool is created by the first submission."""
    env = MtaEnv(root=tmp_path, config=tmp_path / "pymta.yaml", spool=tmp_path / "spool")
    env.write_config("domain: example.org\nhostname: mx.example.org\ndeliver: queue\n")
    return env


def nested_multipart(depth: int, line_length: int = 1200) -> bytes:
    """A message whose MIME parts nest `depth` deep, with one line of `line_length` octets in the innermost
    text part: fitting its lines for SMTP reaches every level (about 27 KB at 400 deep)."""
    opening = b"".join(
        f'Content-Type: multipart/mixed; boundary="b{level}"\r\n\r\n--b{level}\r\n'.encode()
        for level in range(depth)
    )
    closing = b"".join(f"--b{level}--\r\n".encode() for level in reversed(range(depth)))
    inner = b"Content-Type: text/plain\r\n\r\n" + b"x" * line_length + b"\r\n"
    return b"Subject: deep\r\nMIME-Version: 1.0\r\n" + opening + inner + closing
