"""Attacks on system mode as the hostile side, with real users (see tests/system_install.py).

Each test is one finding of an attack on the real install: alice (an ordinary user) or the spool's owner
plants something where root's commands or a delivery child look, and the test proves what root must not do.

Everything skips when not run as root.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from system_install import SystemInstall

MESSAGE = b"Subject: attack\n\nhello\n"


def _config(system: SystemInstall, local: str) -> None:
    system.config.write_text(
        f"spool: {system.spool}\nhostname: mx.example.org\ndomain: example.org\ndeliver: queue\n"
        f"local:\n{local}  mail_spool: {system.mail_spool}\naliases: {system.aliases}\n"
    )
    system.config.chmod(0o644)


def _owned_by(directory: str, uid: int) -> list[str]:
    return sorted(
        entry.name for entry in os.scandir(directory) if entry.stat(follow_symlinks=False).st_uid == uid
    )


def test_a_maildir_link_into_the_mail_spool_gets_nothing_created_there_with_its_group(
    system: SystemInstall,
) -> None:
    """Like Debian's /var/mail (root:mail 2775), the mail spool lets only its group create files, so a
    delivery child to an mbox carries that group. alice points her Maildir at the mail spool: her child
    must not use the group to create directories there (it would own names in the mail spool)."""
    alice = system.alice
    group = system.bob.gid  # a group alice is not in, standing for Debian's mail
    os.chown(system.mail_spool, 0, group)
    system.mail_spool.chmod(0o2775)
    for mailbox in ("maildir", "auto"):
        _config(system, f"  mailbox: {mailbox}\n  maildir: ~/Maildir\n")
        link = os.path.join(alice.home, "Maildir")
        if os.path.lexists(link):
            os.unlink(link)
        assert system.run_as(alice, ["/bin/ln", "-s", str(system.mail_spool), link]).returncode == 0
        sent = system.sendmail(alice, alice.name, input=MESSAGE)
        assert sent.returncode == 0, sent.stderr

        flushed = system.flush()

        assert flushed.returncode in (0, 75), flushed.stderr
        planted = _owned_by(str(system.mail_spool), alice.uid)
        assert planted in ([], [alice.name]), (mailbox, planted, flushed.stderr.decode()[-2000:])
        for name in planted:  # at most her own mbox, a plain file
            assert stat.S_ISREG(os.lstat(system.mail_spool / name).st_mode)
        os.unlink(link)
        subprocess.run(["/bin/rm", "-rf", *(str(system.mail_spool / name) for name in planted)], check=True)


def test_a_link_in_queue_costs_only_itself_not_the_run(system: SystemInstall) -> None:
    """The spool's owner (or a crash, or a careless admin) leaves a symbolic link under a queue id in
    queue/: it is set aside in corrupt/ like any unreadable message, and the run delivers the others
    (invariant 11), instead of the delivery process failing on it and every run after."""
    alice, bob = system.alice, system.bob
    planted = "000000000000000000000000"  # sorts first: due before alice's message
    link = system.spool / "queue" / planted
    failed = "000000000000000000000001"  # its state marks it failed: the run's housekeeping looks first
    state = system.spool / "state" / failed
    plant = (
        f"ln -s /dev/zero {link} && ln -s /dev/zero {system.spool / 'queue' / failed}"
        f" && echo '{{}}' > {state} && touch -d @2147483647 {state}"
    )
    made = system.run_as(system.spool_user, ["/bin/sh", "-c", plant])
    assert made.returncode == 0, made.stderr
    assert system.sendmail(alice, bob.name, input=MESSAGE).returncode == 0

    for _ in range(2):  # the first run picks up and delivers; the second finds the queue sound
        flushed = system.flush()
        assert flushed.returncode == 0, flushed.stderr.decode()[-2000:]

    assert b"Subject: attack" in (system.mail_spool / bob.name).read_bytes()
    assert not os.path.lexists(link)  # the due one is set aside; the failed one is no one's work
    assert os.path.islink(system.spool / "corrupt" / planted)


@pytest.mark.parametrize("spool_mode", [0o1777, 0o755], ids=["the child creates the mbox", "root creates it"])
def test_whether_mail_goes_to_the_maildir_is_judged_with_the_recipients_rights(
    system: SystemInstall, spool_mode: int
) -> None:
    """alice links her Maildir to a directory only root may look into: her mail goes to her mbox, as for
    any Maildir she cannot reach, so how her mail fares tells her nothing about root's files. In a mail
    spool only root may create files in (0755), root creates the missing mbox before the child delivers,
    unless the mail goes to the Maildir; root judged that by following her link, so her mail waited
    there: root now looks with her rights, as the child does."""
    alice = system.alice
    hidden = system.base / "attack-hidden"  # others use base/root-only
    (hidden / "Maildir").mkdir(parents=True)
    hidden.chmod(0o700)
    system.mail_spool.chmod(spool_mode)
    _config(system, "  mailbox: auto\n  maildir: ~/Maildir\n")
    link = os.path.join(alice.home, "Maildir")
    assert system.run_as(alice, ["/bin/ln", "-s", str(hidden / "Maildir"), link]).returncode == 0
    try:
        assert system.sendmail(alice, alice.name, input=MESSAGE).returncode == 0
        flushed = system.flush()
        assert flushed.returncode == 0, flushed.stderr
        assert system.entries() == [], flushed.stderr.decode()[-2000:]
        assert b"Subject: attack" in (system.mail_spool / alice.name).read_bytes(), flushed.stderr
    finally:
        os.unlink(link)
        subprocess.run(["/bin/rm", "-rf", str(hidden)], check=True)
