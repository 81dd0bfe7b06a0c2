"""The include rule with real users (issue 10, H1): an include file is read with the rights of its owner.

The attack: the admin delegates a list to alice (`staff: :include:/home/alice/staff.list` in the aliases
file), and alice writes `:include:` of the smarthost password file into her list. The flush reads include
files as the spool's owner, who can read that file; before the rule the password came back as a
"recipient" in alice's `mailq`, in her bounce and in the log, and root's `newaliases` printed it. Now
alice's list is read with alice's rights, and so is everything it includes: the password file is refused
without being read, the mail waits with a reason that names the file and the line, and the password is
nowhere. The fixtures are tests/system_install.py's (a real install, real users; root only).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest
from system_install import SystemInstall, User, system, system_install
from test_security import PASSWORD, files_under, flush, mbox_messages, secret_file, shell_as, submit

__all__ = ["system", "system_install"]  # fixtures imported for use

# An ASCII secret reads as a local name (the form of the leak in the issue); the non-ASCII one as no address.
ASCII_SECRET = f"Tr0ub4dor{secrets.token_hex(6)}"


def put_as(system: SystemInstall, user: User, path: Path, text: str, mode: str = "644") -> None:
    """Write `path` afresh as `user` (a home outlives a test), with `mode`."""
    script = 'rm -f "$1"; cat > "$1"; chmod "$2" "$1"'
    result = system.run_as(user, ["/bin/sh", "-c", script, "sh", str(path), mode], input=text.encode())
    assert result.returncode == 0, result.stderr


def ascii_secret_file(system: SystemInstall) -> Path:
    """Like `secret_file`, with a password that is a valid local part."""
    path = secret_file(system)
    path.write_text(ASCII_SECRET + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("make_secret", "secret"),
    [(secret_file, PASSWORD), (ascii_secret_file, ASCII_SECRET)],
    ids=["non-ascii", "ascii"],
)
def test_a_delegated_list_cannot_include_the_smarthost_password(
    system: SystemInstall, make_secret: object, secret: str
) -> None:
    alice, bob = system.alice, system.bob
    assert callable(make_secret)
    password_file = make_secret(system)
    system.write_config("local_domains: [example.org]\n")  # alice's bounce, if any, lands in her mailbox
    assert shell_as(system, alice, 'chmod 711 "$HOME"').returncode == 0
    members = Path(alice.home) / "staff.list"
    put_as(system, alice, members, f"{bob.name}\n:include:{password_file}\n")
    system.aliases.write_text(f"staff: :include:{members}\n")

    queue_id = submit(system, alice, "staff")
    outputs = [flush(system)]

    for user in (alice, None):
        for argv in (
            ["mailq"],
            ["pymta", "queue", "--json"],
            ["pymta", "queue", "show", queue_id],
            ["newaliases"],
        ):
            result = system.run_as(user, [system.script(argv[0]), *argv[1:]])
            outputs.append((result.stdout + result.stderr).decode("utf-8", "replace"))
    assert any(f"{queue_id}" in output for output in outputs[1:])  # alice does see her message waiting
    for output in outputs:
        assert secret not in output, output
    alice_box = system.mail_spool / alice.name
    assert not alice_box.exists() or all(secret not in m.as_string() for m in mbox_messages(alice_box))
    secrets_dir = password_file.parent
    for path in files_under(system.spool, system.mail_spool, Path(alice.home), system.root):
        if secrets_dir not in path.parents:
            assert secret.encode() not in path.read_bytes(), path

    [entry] = system.entries()
    assert (entry.id, entry.state) == (queue_id, "deferred")  # the list's members are unknown: it waits
    assert entry.last_error is not None
    assert (
        f"line 2 of {members}: :include:{password_file} cannot be read by {alice.name}, whose rights it is"
        " read with"
    ) in entry.last_error

    # alice mends her list: the mail that waited reaches bob
    put_as(system, alice, members, f"{bob.name}\n")
    retried = system.run_as(None, [system.script("pymta"), "queue", "retry", queue_id])
    assert retried.returncode == 0, retried.stderr
    flush(system)
    [message] = mbox_messages(system.mail_spool / bob.name)
    assert message["Message-ID"].startswith(f"<{queue_id}@")
    assert system.entries() == []


def test_a_delegated_list_may_include_a_file_its_owner_can_read(system: SystemInstall) -> None:
    """The rule takes nothing away from a list's owner: alice's list may include her other files and
    root's files that she may read (the flush, as the spool's owner, must be able to read them too), and
    mail to the list reaches their members."""
    alice, bob = system.alice, system.bob
    assert shell_as(system, alice, 'chmod 711 "$HOME"; mkdir -p -m 711 "$HOME/lists"').returncode == 0
    more = Path(alice.home) / "lists" / "more"
    put_as(system, alice, more, f"{alice.name}\n")
    public = system.base / "public.list"
    public.write_text(f"{bob.name}\n")
    public.chmod(0o644)
    members = Path(alice.home) / "staff.list"
    put_as(system, alice, members, f":include:{public}\n:include:{more}\n")
    system.aliases.write_text(f"staff: :include:{members}\n")

    queue_id = submit(system, bob, "staff")
    flush(system)

    for user in (alice, bob):
        [message] = mbox_messages(system.mail_spool / user.name)
        assert message["Message-ID"].startswith(f"<{queue_id}@")
    assert system.entries() == []


def test_root_newaliases_prints_no_line_of_a_file_a_users_list_reaches(system: SystemInstall) -> None:
    """The low finding of issue 10: root's newaliases printed the lines of a root-only file that alice's
    list included, as "not an address" or "no such user"."""
    alice = system.alice
    root_only = system.base / "root-only"
    root_only.write_text(f"{ASCII_SECRET}\nsecond line, {ASCII_SECRET}x y z\n")
    root_only.chmod(0o600)
    assert shell_as(system, alice, 'chmod 711 "$HOME"').returncode == 0
    members = Path(alice.home) / "staff.list"
    put_as(system, alice, members, f":include:{root_only}\n")
    system.aliases.write_text(f"staff: :include:{members}\n")

    result: subprocess.CompletedProcess[bytes] = system.run_as(None, [system.script("newaliases")])

    output = (result.stdout + result.stderr).decode()
    assert f"line 1 of {members}: :include:{root_only} cannot be read by {alice.name}" in output, output
    assert ASCII_SECRET not in output
    assert os.stat(root_only).st_mode & 0o777 == 0o600
