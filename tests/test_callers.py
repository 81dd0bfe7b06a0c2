"""Every caller in shared/reference/sendmail-callers.md, replayed through the installed `sendmail` script
with its real argv and input shape. Each asserts the stored envelope and the copy that will be delivered:
Bcc gone, Date/Message-ID/From completed, bare addresses qualified, body bytes intact.
"""

from __future__ import annotations

import email.parser
import email.policy
import os
import pwd
import subprocess
from dataclasses import dataclass, field

import pytest
from conftest import MtaEnv, script

from pymta.mail.message import complete
from pymta.queue.entry import QueueEntry

LOGIN = pwd.getpwuid(os.getuid()).pw_name
DOMAIN = "example.org"
CRON_BODY = "Résumé of the job\n.\nline after a lone dot\n\xa0latin\n".encode() + b"\xff\xfe raw bytes\n"


@dataclass
class Caller:
    argv: list[str]
    message: bytes
    sender: str
    recipients: list[str]
    body: bytes  # the body as it must arrive (CRLF line endings)
    headers: dict[str, str] = field(default_factory=dict)  # header -> expected value in the delivered copy
    argv0: str | None = None
    stdin_is_file: bool = False
    quiet_stdio: bool = False  # stdout and stderr on /dev/null, as at and anacron run it
    sudo_env: bool = False  # the environment sudo gives its mailer: HOME=/, no XDG, a fixed PATH


def crlf(text: bytes) -> bytes:
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


CALLERS: dict[str, Caller] = {
    "Debian cron": Caller(
        ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
        b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> /usr/bin/j\xc3\xb6b\n"
        b"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n"
        b"X-Cron-Env: <SHELL=/bin/sh>\nX-Cron-Env: <HOME=/root>\n\n" + CRON_BODY,
        LOGIN,
        ["root"],
        crlf(CRON_BODY),
        {"From": f"root@{DOMAIN} (Cron Daemon)", "To": f"root@{DOMAIN}"},
    ),
    "cronie": Caller(
        ["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "alice"],
        b'From: "(Cron Daemon)" <alice>\nTo: alice,bob@example.net\nSubject: Cron <alice@host> ls\n'
        b"Auto-Submitted: auto-generated\nPrecedence: bulk\n\n" + CRON_BODY,
        "alice",
        ["alice", "bob@example.net"],
        crlf(CRON_BODY),
        {"From": f'"(Cron Daemon)" <alice@{DOMAIN}>', "To": f"alice@{DOMAIN},bob@example.net"},
    ),
    "anacron (no -i, stdin a file)": Caller(
        ["-FAnacron", "-odi", "root"],
        b"From: Anacron <root>\nTo: root\nSubject: Anacron job 'cron.daily' on host\n\n"
        b"run-parts output\n.\nnot the end: stdin is no terminal\n",
        LOGIN,
        ["root"],
        b"run-parts output\r\n.\r\nnot the end: stdin is no terminal\r\n",
        {"From": f"Anacron <root@{DOMAIN}>"},
        stdin_is_file=True,
        quiet_stdio=True,
    ),
    "atd (argv[0] bare sendmail)": Caller(
        ["-i", "alice"],
        b"Subject: Output from your job 7\nTo: alice\n\nhello from at\n",
        LOGIN,
        ["alice"],
        b"hello from at\r\n",
        {"From": f"<{LOGIN}@{DOMAIN}>"},
        argv0="sendmail",
        stdin_is_file=True,
        quiet_stdio=True,
    ),
    "systemd-cron 2 (-B separate)": Caller(
        ["-i", "-B", "8BITMIME", "root"],
        b'Content-Type: text/plain; charset="utf-8"\nMIME-Version: 1.0\nContent-Transfer-Encoding: binary\n'
        b"Date: Sat, 28 Nov 2026 10:00:00 +0000\nFrom: root (systemd-cron)\nTo: root\n"
        b"Subject: [host] job foo.service failed\n\n" + b"x" * 3000 + b"\n",
        LOGIN,
        ["root"],
        b"x" * 3000 + b"\r\n",
        {"Date": "Sat, 28 Nov 2026 10:00:00 +0000", "From": f"root@{DOMAIN} (systemd-cron)"},
    ),
    "busybox crond (-ti)": Caller(
        ["-ti"],
        b"To: admin@example.net\nSubject: cron: backup\n\nbackup done\n",
        LOGIN,
        ["admin@example.net"],
        b"backup done\r\n",
    ),
    "bsd-mailx (Bcc in the header)": Caller(
        ["-i", "-t"],
        b"To: root, friend@example.net\nSubject: hi\nCc: cc@example.net\nBcc: hidden@example.net\n"
        b'MIME-Version: 1.0\nContent-Type: text/plain; charset="UTF-8"\nContent-Transfer-Encoding: 8bit\n\n'
        b"Gr\xc3\xbc\xc3\x9fe\n.\n",
        LOGIN,
        ["root", "friend@example.net", "cc@example.net", "hidden@example.net"],
        b"Gr\xc3\xbc\xc3\x9fe\r\n.\r\n",
        {"To": f"root@{DOMAIN}, friend@example.net"},
    ),
    "s-nail (-F separate, --, Bcc only on argv)": Caller(
        ["-i", "-F", "Bot", "-f", "bot@example.org", "--", "to@example.net", "root", "bcc@example.net"],
        b"Date: Sat, 28 Nov 2026 10:00:00 +0000\nFrom: Bot <bot@example.org>\nTo: to@example.net\nCc: root\n"
        b"Subject: s-nail\nMessage-ID: <x@y>\n\nquoted =2E body\n",
        "bot@example.org",
        ["to@example.net", "root", "bcc@example.net"],
        b"quoted =2E body\r\n",
        {"Message-ID": "<x@y>", "Cc": f"root@{DOMAIN}"},
    ),
    "mutt (-N, -R, --, ISO-8859-1 body)": Caller(
        [
            "-oem",
            "-oi",
            "-B8BITMIME",
            "-f",
            "me@example.org",
            "-N",
            "failure,delay",
            "-R",
            "hdrs",
            "--",
            "to@example.net",
            "cc@example.net",
        ],
        b"Date: Sat, 28 Nov 2026 10:00:00 +0000\nFrom: Me <me@example.org>\nTo: to@example.net\n"
        b"Cc: cc@example.net\nSubject: mutt\nMessage-ID: <m@example.org>\n"
        b"Content-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: 8bit\n\nK\xe4se\n",
        "me@example.org",
        ["to@example.net", "cc@example.net"],
        b"K\xe4se\r\n",
    ),
    "git send-email": Caller(
        ["-f", "dev@example.org", "-i", "list@example.net", "maint@example.net"],
        b"From: Dev <dev@example.org>\nTo: list@example.net\nCc: maint@example.net\nSubject: [PATCH] fix\n"
        b"Date: Sat, 28 Nov 2026 10:00:00 +0000\nMessage-Id: <p@example.org>\n\n"
        b"--- a/x\n+++ b/x\n.leading dot\n-removed\n+added\n",
        "dev@example.org",
        ["list@example.net", "maint@example.net"],
        b"--- a/x\r\n+++ b/x\r\n.leading dot\r\n-removed\r\n+added\r\n",
    ),
    "PHP mail() (CRLF headers, LF body)": Caller(
        ["-t", "-i", "-fbounce@example.org"],
        b"To: customer@example.net\r\nSubject: Order\r\nFrom: shop@example.org\r\n"
        b"Bcc: archive@example.org\r\n"
        b"\r\nline one\nline two\n",
        "bounce@example.org",
        ["customer@example.net", "archive@example.org"],
        b"line one\r\nline two\r\n",
    ),
    "PHPMailer (-oi -fX -t)": Caller(
        ["-oi", "-fsender@example.org", "-t"],
        b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nTo: a@example.net\r\nFrom: sender@example.org\r\n"
        b"Bcc: b@example.net\r\nMessage-ID: <pm@example.org>\r\nSubject: x\r\n\r\nbody\r\n",
        "sender@example.org",
        ["a@example.net", "b@example.net"],
        b"body\r\n",
    ),
    "MIME::Lite (-t -oi -oem -fX)": Caller(
        ["-t", "-oi", "-oem", "-fperl@example.org"],
        b"Date: Sat, 28 Nov 2026 10:00:00 +0000\nMIME-Version: 1.0\nTo: x@example.net\nBcc: y@example.net\n"
        b"From: perl@example.org\nSubject: perl\nX-Mailer: MIME::Lite\n\nperl body\n",
        "perl@example.org",
        ["x@example.net", "y@example.net"],
        b"perl body\r\n",
    ),
    "sudo (-t, environment replaced, HOME=/)": Caller(
        ["-t"],
        b"To: root\nFrom: alice\nAuto-Submitted: auto-generated\n"
        b"Subject: *** SECURITY information for host ***\n\nhost : alice : command not allowed\n",
        LOGIN,
        ["root"],
        b"host : alice : command not allowed\r\n",
        {"From": f"alice@{DOMAIN}", "To": f"root@{DOMAIN}"},
        sudo_env=True,
    ),
    "unattended-upgrades (-oi -t)": Caller(
        ["-oi", "-t"],
        b"Subject: unattended-upgrades result for host: SUCCESS\nTo: root\nContent-Type: text/plain\n\nok\n",
        LOGIN,
        ["root"],
        b"ok\r\n",
    ),
    "logwatch (-t, a To line per recipient, bare From)": Caller(
        ["-t"],
        b"To: root\nTo: admin@example.net\nFrom: Logwatch\nSubject: Logwatch for host (Linux)\n"
        b"Auto-Submitted: auto-generated\nMIME-Version: 1.0\n\n ### Logwatch ###\n.\n",
        LOGIN,
        ["root", "admin@example.net"],
        b" ### Logwatch ###\r\n.\r\n",
        {"From": f"Logwatch@{DOMAIN}"},
    ),
    "mdadm (-t, short host)": Caller(
        ["-t"],
        b"From: mdadm monitoring <root@host>\nTo: root\nSubject: Fail event on /dev/md0:host\n\n"
        b"Personalities : [raid1]\n",
        LOGIN,
        ["root"],
        b"Personalities : [raid1]\r\n",
        {"From": "mdadm monitoring <root@host>"},
    ),
    "fail2ban (-f sender dest, 8-bit without MIME)": Caller(
        ["-f", "fail2ban@host.example.org", "root@localhost"],
        b"Subject: [Fail2Ban] sshd: banned 192.0.2.1\nDate: Sat, 28 Nov 2026 10:00:00 +0000\n"
        b"From: Fail2Ban <fail2ban@host.example.org>\nTo: root@localhost\n\nwhois: Stra\xdfe\n",
        "fail2ban@host.example.org",
        ["root@localhost"],
        b"whois: Stra\xdfe\r\n",
    ),
    "rkhunter (no options)": Caller(
        ["root"],
        b"Subject: [rkhunter] Weekly report\nTo: root\n\nWarning: found\n",
        LOGIN,
        ["root"],
        b"Warning: found\r\n",
    ),
    "zfs-zed (header-less body)": Caller(
        ["root", "admin@example.net"],
        b"ZFS has finished a scrub:\n\n   eid: 42\n",
        LOGIN,
        ["root", "admin@example.net"],
        b"ZFS has finished a scrub:\r\n\r\n   eid: 42\r\n",
    ),
    "debsecan (popen -t)": Caller(
        ["-t"],
        b"Subject: Debian security status\nTo: root\n\nCVE-2026-0001\n",
        LOGIN,
        ["root"],
        b"CVE-2026-0001\r\n",
    ),
    "git post-receive-email (-t, no From, no -i)": Caller(
        ["-t", "-f", "git@example.org"],
        b"To: commits@example.net\nSubject: [repo] branch main updated\nX-Git-Refname: refs/heads/main\n\n"
        b"commit abc\n\n.\n",
        "git@example.org",
        ["commits@example.net"],
        b"commit abc\r\n\r\n.\r\n",
        {"From": "<git@example.org>"},
    ),
}


def run_caller(mta: MtaEnv, caller: Caller, tmp_path: object) -> subprocess.CompletedProcess[bytes]:
    executable = script("sendmail")
    argv = [caller.argv0 or executable, *caller.argv]
    stdin: object = None
    if caller.stdin_is_file:
        path = os.path.join(str(tmp_path), "stdin")
        with open(path, "wb") as handle:
            handle.write(caller.message)
        stdin = open(path, "rb")  # noqa: SIM115 - closed below
    output = subprocess.DEVNULL if caller.quiet_stdio else subprocess.PIPE
    env = mta.env
    if caller.sudo_env:
        env = {
            "HOME": "/",
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "LOGNAME": "root",
            "USER": "root",
            "PYMTA_CONFIG": str(mta.config),
        }
    try:
        return subprocess.run(
            argv,
            executable=executable,
            stdin=stdin,
            stdout=output,
            stderr=output,
            env=env,
            timeout=60,
            input=None if caller.stdin_is_file else caller.message,
        )
    finally:
        if caller.stdin_is_file:
            stdin.close()  # type: ignore[attr-defined]


def delivered_copy(mta: MtaEnv, entry: QueueEntry) -> bytes:
    return complete(
        mta.message(entry),
        queued_at=entry.queued_at,
        message_id=entry.id,
        sender=entry.sender,
        submitted_by=entry.submitted_by,
        full_name=entry.full_name,
        domain=DOMAIN,
        hostname="mx.example.org",
    )


@pytest.mark.parametrize("name", CALLERS)
def test_caller_queues_the_right_envelope_and_message(mta: MtaEnv, name: str, tmp_path: object) -> None:
    caller = CALLERS[name]
    result = run_caller(mta, caller, tmp_path)
    assert result.returncode == 0, result.stderr
    if not caller.quiet_stdio:
        assert result.stdout == b""
        assert result.stderr == b""
    entry = mta.only_entry()
    assert entry.sender == caller.sender
    assert [r.address for r in entry.recipients] == caller.recipients
    assert entry.submitted_by == LOGIN
    assert entry.uid == os.getuid()

    stored = mta.message(entry)
    assert b"\nBcc:" not in stored and not stored.startswith(b"Bcc:")
    assert stored.endswith(caller.body)
    assert b"\n" not in stored.replace(b"\r\n", b"")  # CRLF only, no bare LF or CR

    delivered = delivered_copy(mta, entry)
    assert delivered.endswith(b"\r\n\r\n" + caller.body)
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(delivered)
    for header in ("Date", "Message-ID", "From"):
        assert len(parsed.get_all(header, [])) == 1, header
    assert "bcc" not in {key.lower() for key in parsed.keys()}
    for header, value in caller.headers.items():
        assert str(parsed[header]).strip() == value or str(parsed[header]).endswith(value), header


def test_dsn_options_from_mutt_are_kept_for_delivery(mta: MtaEnv, tmp_path: object) -> None:
    result = run_caller(mta, CALLERS["mutt (-N, -R, --, ISO-8859-1 body)"], tmp_path)
    assert result.returncode == 0
    entry = mta.only_entry()
    assert (entry.dsn_notify, entry.dsn_ret, entry.body_type) == ("failure,delay", "hdrs", "8BITMIME")


def test_generated_from_uses_the_full_name_of_dash_f(mta: MtaEnv) -> None:
    result = mta.sendmail("-F", "Backup Robot", "root", input=b"Subject: x\n\nbody\n")
    assert result.returncode == 0
    entry = mta.only_entry()
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(delivered_copy(mta, entry))
    assert parsed["From"].addresses[0].display_name == "Backup Robot"
    assert parsed["From"].addresses[0].addr_spec == f"{LOGIN}@{DOMAIN}"
