"""Hostile input across the privilege split, with real users (issue 10: H2, M2 and two Low items).

The root process of a system-mode flush serves local deliveries for the delivery process (`pymta`) and
forks a child per recipient that runs as the recipient. What is proved here, on a real install
(`tests/system_install.py`):

- a path SMTP cannot carry (over 256 octets, RFC 5321 4.5.3.1.3) is refused by `sendmail` with 67 and
  one line, and nothing is queued;
- the same sender written straight into new/ by alice (70,000 characters, or 11,000 'é' that JSON
  escaping makes six times longer) wedges nothing: the flush ends, the flush lock is free for the next
  run, bob's mail is delivered and the bad message is not;
- a recipient who stops her own delivery child (SIGSTOP) delays only her own message: the child is
  killed at once, her message deferred and delivered by a later run, everyone else's delivered;
- a pre-created mailbox others may read is not written, and the fix says chown and chmod.

The protocol itself (random, truncated, oversized and hostile frames) is fuzzed in
`tests/test_privsep_protocol.py`.
"""

from __future__ import annotations

import pytest
from system_install import SystemInstall, system, system_install
from test_security import MESSAGE, submit

__all__ = ["system", "system_install"]  # fixtures imported for use

EX_NOUSER = 67
DOMAIN_PART = "@example.org"
LONG_SENDER = "a" * 70_000 + DOMAIN_PART
WIDE_SENDER = "é" * 11_000 + DOMAIN_PART  # 22,000 octets; as JSON (\u00e9) 66,000 characters
LONGEST = "a" * (254 - len(DOMAIN_PART)) + DOMAIN_PART  # <...> around it makes 256 octets


# --- refused at submission ---


@pytest.mark.parametrize(
    "args",
    [
        ["-f", LONG_SENDER, "{bob}"],
        ["-f", WIDE_SENDER, "{bob}"],
        ["-f", "x" + LONGEST, "{bob}"],
        ["{bob}", "b" + LONGEST],
    ],
    ids=["70000-char sender", "11000 x é sender", "257-octet sender", "257-octet recipient"],
)
def test_a_path_smtp_cannot_carry_is_refused_at_submission(system: SystemInstall, args: list[str]) -> None:
    argv = [arg.format(bob=system.bob.name) for arg in args]

    result = system.sendmail(system.alice, *argv, input=MESSAGE)

    assert result.returncode == EX_NOUSER, result.stderr
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("sendmail: ") and "256 octets" in line and len(line) < 400, line
    assert system.names("new") == [] and system.names("tmp") == []


def test_the_longest_path_smtp_carries_is_queued(system: SystemInstall) -> None:
    submit(system, system.alice, "-f", LONGEST, system.bob.name, LONGEST)
    assert len(system.names("new")) == 1
