"""`pymta import`: another relay's configuration as pymta.yaml, checked, and with `--write` installed.

The text is rendered from an `Imported` (`pymta.setup.foreign`): the notes on what did not carry over
come first as comments, then the keys. Before anything is written the text goes through the same loader
as `pymta config check`; a config that loader refuses is never installed.

Writing: every password found in plain text goes to its own file in the secrets directory beside the
config (/etc/pymta/secrets, made 0700 for `pymta` by `pymta setup`; a user's ~/.config/pymta/secrets),
0600, owned by that directory's owner; then the config, 0644. Each file is built beside its place and
renamed (or, without `--force`, linked, which fails rather than replace a file that appeared meanwhile).
Nothing existing is replaced without `--force`, and the secrets are checked and written before the config
that names them.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from typing import Any

import yaml

from pymta.config import paths
from pymta.config.load import loads
from pymta.config.model import Config
from pymta.errors import WriteError
from pymta.setup import foreign, msmtprc
from pymta.setup.files import Owner, owner_of, write_file
from pymta.setup.install import CONFIG_MODE, DEFAULT_USER

SECRET_FILE_MODE = 0o600  # the password files: their owner (pymta, or the user) alone


@dataclass(frozen=True)
class Written:
    """What `install` wrote: the config and each password file."""

    config: str
    secrets: tuple[str, ...]


def target_path(explicit: str | None = None) -> str:
    """Where `--write` installs: -C FILE, else $PYMTA_CONFIG, else /etc/pymta/pymta.yaml for root, else
    the user's ~/.config/pymta/pymta.yaml."""
    candidates = paths.config_candidates(explicit)
    if explicit or os.environ.get(paths.ENV_CONFIG):
        return candidates[0]
    return candidates[0] if os.geteuid() == 0 else candidates[-1]


def secrets_dir(config_path: str) -> str:
    """The directory for password files: `secrets/` beside the config."""
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), "secrets")


def read(relay: str, source: str | None, config_path: str) -> foreign.Imported:
    """The configuration of `relay` (nullmailer, msmtp, ssmtp) from `source` or its usual place."""
    where = secrets_dir(config_path)
    if relay == "nullmailer":
        return foreign.read_nullmailer(source or foreign.NULLMAILER_DIR, where)
    if relay == "ssmtp":
        return foreign.read_ssmtp(source or foreign.SSMTP_CONF, where)
    return msmtprc.read_msmtp(source or msmtprc.default_path(), where)


class _Dumper(yaml.SafeDumper):
    """Block style, except that a password source stays on one line, as the manual writes it."""

    def represent_dict(self, data: Any) -> yaml.MappingNode:
        node = super().represent_dict(data)
        node.flow_style = len(data) == 1 and next(iter(data)) in ("file", "command", "keyring")
        return node


_Dumper.add_representer(dict, _Dumper.represent_dict)


def render(imported: foreign.Imported) -> str:
    """The pymta.yaml text: where it came from, what did not carry over, then the keys."""
    lines = [
        _comment(f"pymta.yaml made by `pymta import {imported.relay}` from {', '.join(imported.sources)}"),
        "# Check it with `pymta config check -C FILE`; every key is in pymta.yaml(5).",
    ]
    for pending in imported.secrets:
        lines.append(
            _comment(
                f"The password of {pending.owner_of} is not shown: `pymta import --write` puts it in "
                f"{pending.path} (0600)."
            )
        )
    if imported.notes:
        lines += ["#", "# Not carried over, or different in pymta:"]
        lines += [_comment(f"- {note}") for note in dict.fromkeys(imported.notes)]  # once each, in order
    body = yaml.dump(imported.document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)
    return "\n".join(lines) + "\n\n" + body


def _comment(text: str) -> str:
    """One comment line: what came from the foreign file cannot end the comment or control the terminal."""
    return "# " + " ".join("".join(c if c.isprintable() else "?" for c in text).split())


def check(text: str, config_path: str) -> Config:
    """The Config the text makes, by the loader of `pymta config check`; ConfigError when it is invalid."""
    return loads(text, config_path)


def install(imported: foreign.Imported, text: str, config_path: str, *, force: bool) -> Written:
    """Write the password files, then the config; refuse to replace anything without `force`."""
    check(text, config_path)
    for path in (config_path, *(pending.path for pending in imported.secrets)):
        if not force and os.path.lexists(path):
            raise WriteError(f"{path} exists; pass --force to replace it")
    directory = secrets_dir(config_path)
    written = []
    if imported.secrets:
        owner = _secrets_directory(directory, config_path)
        for pending in imported.secrets:
            _write(pending.path, pending.secret.reveal() + "\n", SECRET_FILE_MODE, owner, force)
            written.append(pending.path)
    admin = Owner(0, 0, "root:root") if os.geteuid() == 0 else owner_of(os.geteuid(), os.getegid())
    _write(config_path, text, CONFIG_MODE, admin, force)
    return Written(config_path, tuple(written))


def _write(path: str, text: str, mode: int, owner: Owner, force: bool) -> None:
    try:
        write_file(path, text, mode, owner, replace=force)
    except FileExistsError:
        raise WriteError(f"{path} appeared while importing; pass --force to replace it") from None
    except OSError as error:
        raise WriteError(f"cannot write {path}: {error.strerror or error}; check the directory") from None


def _secrets_directory(directory: str, config_path: str) -> Owner:
    """The secrets directory, made 0700 when missing, and who its files belong to. A directory that is a
    link, or that others may write, is refused: a password written there would not stay private."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        owner = _system_owner() if os.path.abspath(config_path) == paths.SYSTEM_CONFIG else None
        owner = owner or owner_of(os.geteuid(), os.getegid())
        try:
            os.makedirs(os.path.dirname(directory), 0o755, exist_ok=True)
            os.mkdir(directory, 0o700)
            if os.geteuid() == 0 and owner.uid is not None and owner.gid is not None:
                os.chown(directory, owner.uid, owner.gid, follow_symlinks=False)
        except OSError as error:
            raise WriteError(f"cannot make {directory}: {error.strerror or error}") from None
        return owner
    except OSError as error:
        raise WriteError(f"cannot use {directory}: {error.strerror or error}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_mode & 0o077:
        raise WriteError(
            f"{directory} is not a private directory (a link, a file, or open to others); "
            f"make it a directory with chmod 700, or remove it"
        )
    if info.st_uid not in (0, os.geteuid()) and info.st_uid != getattr(_system_owner(), "uid", None):
        raise WriteError(f"{directory} belongs to another user; remove it or run the import as that user")
    return owner_of(info.st_uid, info.st_gid)


def _system_owner() -> Owner | None:
    """The `pymta` user, who reads password files in system mode, when it exists."""
    try:
        entry = pwd.getpwnam(DEFAULT_USER)
    except KeyError:
        return None
    return owner_of(entry.pw_uid, entry.pw_gid)
