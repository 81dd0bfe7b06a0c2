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

from pymta.spool import QueueEntry, Spool

BIN = Path(sys.executable).parent


def script(name: str) -> str:
    """The installed console script `name` of the environment running the tests."""
    path = BIN / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: install the project first (pip install '.[test]')")
    return str(path)


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

    def write_config(self, text: str) -> None:
        self.config.write_text(f"spool: {self.spool}\n{text}")

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
