"""Password sources: the keyring, a command, an environment variable or a private file, as a `Secret`.

The config names where a smarthost password lives (`PasswordSource`); this module fetches it when a session
actually needs to authenticate. The one invariant: the secret never appears in an exception, a log line, a
repr or an argv. It travels wrapped in `Secret`, whose repr and str are masked, and every error here is a
`CredentialError` whose one-line message says what failed and what to do, built only from the source's
reference (which the world-readable config already shows), never from what the source returned.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import stat
import subprocess
from collections.abc import Callable, Mapping
from types import ModuleType

from pymta.errors import EX_UNAVAILABLE, PymtaError
from pymta.privileges import user_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.config.model import PasswordSource

# Seconds a password command may run: `pass` asking gpg-agent is quick; a hung one must not stall a flush.
COMMAND_TIMEOUT = 30.0
# Bytes read from a password file or command: a password or an OAuth2 token (some exceed 2 kB) fits easily.
MAX_SECRET_BYTES = 64 * 1024
# Characters of a failing command's stderr shown in its error: enough for "gpg: decryption failed: ...".
STDERR_EXCERPT = 200

_MASK = "********"


class CredentialError(PymtaError):
    """A password source did not give a password. The message never contains the secret."""

    exit_code = EX_UNAVAILABLE


class Secret:
    """A password or token that hides itself: repr(), str() and format() show asterisks.

    Call `reveal()` at the last moment, where the secret is put on the wire, and keep the result in no
    attribute. Secrets are not picklable, so one cannot end up in a queue file by accident.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{_MASK}')"

    def __str__(self) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


def resolve(source: PasswordSource, *, host: str, username: str | None) -> Secret:
    """The secret `source` gives for the smarthost `host` and `username`.

    Raises CredentialError with a one-line message naming the source and the fix.
    """
    return _RESOLVERS[source.kind](source.reference, host, username)


def keyring_backend_problem() -> str | None:
    """Why the keyring cannot be used here (no backend, as on headless servers), or None when it can."""
    try:
        import keyring
        import keyring.backends.fail
    except ImportError:  # pragma: no cover - keyring is a dependency
        return "the Python keyring package is not installed"
    backend = keyring.get_keyring()
    if isinstance(backend, keyring.backends.fail.Keyring):
        return "no keyring backend is available (as on a server without a desktop session)"
    return None


def keyring_fix(host: str) -> str:
    """What to do when the keyring cannot be used: the two ways out."""
    return (
        "use a file keyring (`pip install keyrings.alt`), or put the password in a file only pymta can read "
        f"and write password: {{file: /etc/pymta/{host}.secret}} in the config"
    )


def store_in_keyring(service: str, username: str, secret: Secret, *, host: str) -> None:
    """Store `secret` under (service, username) in the default keyring; CredentialError when that fails."""
    keyring = _keyring(host)
    try:
        keyring.set_password(service, username, secret.reveal())
    except Exception as error:  # keyring backends raise their own exception types
        raise CredentialError(
            f"cannot store the password for {host} in the keyring ({service}): {_error_text(error)}"
        ) from None


def delete_from_keyring(service: str, username: str, *, host: str) -> bool:
    """Remove the password stored under (service, username); False when there was none."""
    keyring = _keyring(host)
    try:
        if keyring.get_password(service, username) is None:
            return False
        keyring.delete_password(service, username)
    except keyring.errors.PasswordDeleteError:
        return False
    except Exception as error:
        raise CredentialError(
            f"cannot delete the password for {host} from the keyring ({service}): {_error_text(error)}"
        ) from None
    return True


# --- The four sources ---


def _from_keyring(service: str, host: str, username: str | None) -> Secret:
    if not username:
        raise CredentialError(
            f"{host}: password: {{keyring: {service}}} needs a username to look up; add username: to the "
            "smarthost"
        )
    keyring = _keyring(host)
    try:
        password = keyring.get_password(service, username)
    except Exception as error:  # a locked collection, no D-Bus session, a broken backend
        raise CredentialError(
            f"{host}: cannot read the password from the keyring ({service}): {_error_text(error)}; "
            f"unlock the keyring, or {keyring_fix(host)}"
        ) from None
    if password is None:
        raise CredentialError(
            f"{host}: the keyring ({service}) holds no password for {username}; store it with "
            f"`pymta password set {host}`"
        )
    if not password:
        raise CredentialError(
            f"{host}: the keyring ({service}) holds an empty password for {username}; store it again with "
            f"`pymta password set {host}`"
        )
    return Secret(password)


def _from_command(command: str, host: str, username: str | None) -> Secret:
    what = f"{host}: the password command `{command}`"
    try:
        process = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills the command's children too
        )
    except OSError as error:
        raise CredentialError(f"{what} cannot be started: {error.strerror or error}") from None
    try:
        stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.communicate()
        raise CredentialError(
            f"{what} did not finish within {COMMAND_TIMEOUT:g} s; check that it runs without a terminal "
            "(a gpg agent may be waiting for a passphrase)"
        ) from None
    if process.returncode != 0:
        # stderr is shown (it explains the failure); stdout never is: it may hold the secret.
        excerpt = _excerpt(stderr)
        status = (
            f"was killed by signal {-process.returncode}"
            if process.returncode < 0
            else f"exited with status {process.returncode}"
        )
        detail = f": {excerpt}" if excerpt else ""
        raise CredentialError(f"{what} {status}{detail}; run it by hand as the user that runs pymta flush")
    return Secret(_first_line(stdout[:MAX_SECRET_BYTES], f"{what} printed"))


def _from_env(name: str, host: str, username: str | None) -> Secret:
    value = os.environ.get(name)
    if not value:
        state = "is empty" if value == "" else "is not set"
        raise CredentialError(
            f"{host}: the environment variable {name} {state}; set it where pymta flush runs "
            "(e.g. Environment= in the systemd unit), or use another password source"
        )
    what = f"{host}: the environment variable {name} has"
    return Secret(_first_line(value.encode("utf-8", "surrogateescape"), what))


def _from_file(path: str, host: str, username: str | None) -> Secret:
    what = f"{host}: the password file {path}"
    try:
        # O_NOFOLLOW: a symlink is refused, so nobody can point pymta at another file; O_NONBLOCK: a FIFO
        # does not block the open (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if os.path.islink(path):
            raise CredentialError(
                f"{what} is a symbolic link, which pymta refuses; name the real file in the config"
            ) from None
        fix = f"; {_owner_fix(path)}" if error.errno == errno.EACCES else ""
        raise CredentialError(f"{what} cannot be opened: {error.strerror or error}{fix}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CredentialError(f"{what} is not a regular file; name a plain file holding the password")
        if info.st_mode & 0o077:
            raise CredentialError(
                f"{what} can be read or changed by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"{_owner_fix(path)}"
            )
        data = os.read(fd, MAX_SECRET_BYTES)
    finally:
        os.close(fd)
    return Secret(_first_line(data, f"{what} holds"))


def _owner_fix(path: str) -> str:
    """How to give a password file to the user who reads it (this process's: the flush's, `pymta` in system
    mode) and to nobody else. A file in a directory another user (not root) keeps to themselves is that
    user's to read, as `pymta setup` makes /etc/pymta/secrets for `pymta`: a user who runs `pymta test` is
    told to run it as root (it reads the password as that user), never to take the file."""
    quoted = shlex.quote(path)
    try:
        keeper = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        keeper = None
    if keeper is not None and keeper.st_uid not in (0, os.geteuid()) and not keeper.st_mode & 0o001:
        directory = shlex.quote(os.path.dirname(os.path.abspath(path)))
        return (
            f"only {user_name(keeper.st_uid)} (and root) may enter {directory}: check it with sudo pymta "
            "test, which reads the password as the spool's owner, as the flush does"
        )
    user = user_name(os.geteuid())
    return f"the flush reads it as {user}: run chown {user} {quoted} && chmod 600 {quoted}"


_RESOLVERS: Mapping[str, Callable[[str, str, str | None], Secret]] = {
    "keyring": _from_keyring,
    "command": _from_command,
    "env": _from_env,
    "file": _from_file,
}


# --- Helpers ---


def _keyring(host: str) -> ModuleType:
    """The keyring module, once we know a backend is there; CredentialError (naming the way out) when not."""
    problem = keyring_backend_problem()
    if problem:
        raise CredentialError(f"{host}: {problem}; {keyring_fix(host)}")
    import keyring
    import keyring.errors

    return keyring


def _first_line(data: bytes, what: str) -> str:
    """The first line of `data` as text; CredentialError when there is none. Never quotes the data."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialError(f"{what} no UTF-8 text; the password must be UTF-8") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise CredentialError(f"{what} nothing on its first line; the password goes on the first line")
    return lines[0]


def _excerpt(stderr: bytes) -> str:
    """The end of a command's stderr on one line, shortened: where the explanation usually is."""
    text = " ".join(stderr.decode("utf-8", "replace").split())
    text = "".join(char if char.isprintable() else "?" for char in text)
    return text if len(text) <= STDERR_EXCERPT else "..." + text[-STDERR_EXCERPT:]


def _error_text(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:STDERR_EXCERPT]


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


__all__ = [
    "COMMAND_TIMEOUT",
    "CredentialError",
    "Secret",
    "delete_from_keyring",
    "keyring_backend_problem",
    "keyring_fix",
    "resolve",
    "store_in_keyring",
]
