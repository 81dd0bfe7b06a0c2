"""pymta.delivery.credentials: the four password sources, their errors, and that the secret never shows."""

from __future__ import annotations

import os
import pickle
import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backends.fail
import keyring.errors
import pytest
from keyring.backend import KeyringBackend

from pymta.config.model import PasswordSource
from pymta.delivery import credentials
from pymta.delivery.credentials import CredentialError, Secret, resolve

SECRET = "hünter2-€"
HOST = "smtp.example.org"
USER = "me@example.org"


class MemoryKeyring(KeyringBackend):
    """A keyring that lives in a dict, so no test ever touches a real one."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if (service, username) not in self.entries:
            raise keyring.errors.PasswordDeleteError("no such password")
        del self.entries[(service, username)]


class LockedKeyring(MemoryKeyring):
    def get_password(self, service: str, username: str) -> str | None:
        raise keyring.errors.KeyringLocked("Failed to unlock the collection!")


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


@pytest.fixture
def no_keyring() -> Iterator[None]:
    previous = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())
    yield
    keyring.set_keyring(previous)


def fails(source: PasswordSource, username: str | None = USER) -> str:
    with pytest.raises(CredentialError) as caught:
        resolve(source, host=HOST, username=username)
    message = str(caught.value)
    assert "\n" not in message and SECRET not in message
    assert caught.value.exit_code == 69
    return message


# --- Secret ---


def test_secret_hides_itself() -> None:
    secret = Secret(SECRET)
    assert secret.reveal() == SECRET
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret]), "%s" % (secret,)):  # noqa: UP031
        assert SECRET not in shown and "*" in shown
    assert secret == Secret(SECRET) and secret != Secret("other")
    with pytest.raises(TypeError):
        pickle.dumps(secret)


# --- keyring ---


def test_keyring(memory_keyring: MemoryKeyring) -> None:
    memory_keyring.entries[("pymta", USER)] = SECRET
    assert resolve(PasswordSource("keyring", "pymta"), host=HOST, username=USER).reveal() == SECRET


def test_keyring_without_an_entry_says_how_to_store_one(memory_keyring: MemoryKeyring) -> None:
    message = fails(PasswordSource("keyring", "pymta"))
    assert f"holds no password for {USER}" in message and f"pymta password set {HOST}" in message


def test_keyring_needs_a_username(memory_keyring: MemoryKeyring) -> None:
    assert "needs a username" in fails(PasswordSource("keyring", "pymta"), username=None)


def test_no_keyring_backend_names_the_ways_out(no_keyring: None) -> None:
    message = fails(PasswordSource("keyring", "pymta"))
    assert "no keyring backend is available" in message
    assert "pip install keyrings.alt" in message and "{file: /etc/pymta/smtp.example.org.secret}" in message


def test_locked_keyring() -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(LockedKeyring())
    try:
        message = fails(PasswordSource("keyring", "pymta"))
    finally:
        keyring.set_keyring(previous)
    assert "Failed to unlock the collection" in message and "keyrings.alt" in message


def test_store_and_delete(memory_keyring: MemoryKeyring) -> None:
    credentials.store_in_keyring("pymta", USER, Secret(SECRET), host=HOST)
    assert memory_keyring.entries == {("pymta", USER): SECRET}
    assert credentials.delete_from_keyring("pymta", USER, host=HOST) is True
    assert credentials.delete_from_keyring("pymta", USER, host=HOST) is False


# --- command ---


def test_command_first_line_of_stdout() -> None:
    source = PasswordSource("command", f"printf '%s\\nsecond line\\n' '{SECRET}'")
    assert resolve(source, host=HOST, username=USER).reveal() == SECRET


def test_failing_command_shows_stderr_but_never_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYMTA_OUT", SECRET)
    message = fails(PasswordSource("command", 'echo "$PYMTA_OUT"; echo "gpg: decryption failed" >&2; exit 3'))
    assert "`echo" in message and "exited with status 3: gpg: decryption failed" in message
    assert "run it by hand" in message


def test_command_that_prints_nothing() -> None:
    assert "nothing on its first line" in fails(PasswordSource("command", "true"))


def test_command_timeout_kills_its_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credentials, "COMMAND_TIMEOUT", 0.3)
    started = time.monotonic()
    message = fails(PasswordSource("command", "sleep 30 & sleep 30"))  # a child keeps the pipe open
    assert time.monotonic() - started < 5
    assert "did not finish within 0.3 s" in message


def test_command_killed_by_a_signal() -> None:
    assert "killed by signal 9" in fails(PasswordSource("command", "kill -9 $$"))


# --- env ---


def test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYMTA_SECRET", SECRET)
    assert resolve(PasswordSource("env", "PYMTA_SECRET"), host=HOST, username=USER).reveal() == SECRET


def test_env_unset_or_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYMTA_SECRET", raising=False)
    assert "PYMTA_SECRET is not set" in fails(PasswordSource("env", "PYMTA_SECRET"))
    monkeypatch.setenv("PYMTA_SECRET", "")
    assert "PYMTA_SECRET is empty" in fails(PasswordSource("env", "PYMTA_SECRET"))


# --- file ---


def secret_file(tmp_path: Path, mode: int = 0o600, text: str = f"{SECRET}\nignored\n") -> Path:
    path = tmp_path / "smtp.secret"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_file_first_line(tmp_path: Path) -> None:
    path = secret_file(tmp_path)
    assert resolve(PasswordSource("file", str(path)), host=HOST, username=USER).reveal() == SECRET


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = secret_file(tmp_path, mode)
    message = fails(PasswordSource("file", str(path)))
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert f"chown {user} {path} && chmod 600 {path}" in message and f"mode {mode:04o}" in message


def test_symlink_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "link.secret"
    link.symlink_to(secret_file(tmp_path))
    assert "symbolic link" in fails(PasswordSource("file", str(link)))


def test_fifo_and_directory_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    assert "not a regular file" in fails(PasswordSource("file", str(fifo)))
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    assert "not a regular file" in fails(PasswordSource("file", str(directory)))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    assert "No such file" in fails(PasswordSource("file", str(tmp_path / "missing")))
    empty = secret_file(tmp_path, text="")
    assert "nothing on its first line" in fails(PasswordSource("file", str(empty)))


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.secret"
    path.write_bytes("pässwort\n".encode("latin-1"))
    path.chmod(0o600)
    assert "UTF-8" in fails(PasswordSource("file", str(path)))
