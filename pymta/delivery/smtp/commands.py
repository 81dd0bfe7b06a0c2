"""The commands of a mail transaction as they go on the wire, and their ESMTP parameters.

NOTIFY, RET, ENVID and ORCPT (xtext, RFC 3461) go out with DSN; an address that SMTP cannot carry (CR,
LF, <, >, bytes that were not UTF-8) is refused before anything is sent.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from pymta.records import record

_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_UNSAFE_ADDRESS_RE = re.compile(r"[\x00-\x1f\x7f<>]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@record(frozen=True, slots=True)
class DsnParams:
    mail: list[str]
    rcpt: list[str]
    targets: list[str]  # rcpt for an alias's targets: NOTIFY without SUCCESS

    def for_recipient(self, recipient: str, expanded: Collection[str]) -> list[str]:
        """The RCPT parameters of `recipient`: NOTIFY (without SUCCESS for an alias target) and ORCPT."""
        return (self.targets if recipient in expanded else self.rcpt) + _orcpt(recipient)


def check_arguments(
    sender: str, recipients: Sequence[str], notify: str | None, ret: str | None, envid: str | None
) -> DsnParams:
    if not recipients:
        raise ValueError("send() needs at least one recipient")
    for address in (sender, *recipients):
        if _UNSAFE_ADDRESS_RE.search(address):
            raise ValueError(f"address {address!r} contains characters SMTP cannot carry")
        if _SURROGATE_RE.search(address):  # bytes that were not UTF-8: no SMTP command can carry them
            raise ValueError(f"address {address!r} is not valid UTF-8")
    mail: list[str] = []
    rcpt: list[str] = []
    targets: list[str] = []
    if ret:
        if ret.upper() not in ("HDRS", "FULL"):
            raise ValueError(f"ret must be hdrs or full, not {ret!r}")
        mail.append(f"RET={ret.upper()}")
    if envid:
        if not envid.isascii() or not envid.isprintable():
            raise ValueError("envid must be printable ASCII")
        mail.append(f"ENVID={xtext(envid)}")
    if notify:
        words = [word.strip().upper() for word in notify.split(",")]
        if words != ["NEVER"] and not (words and set(words) <= _NOTIFY_WORDS):
            raise ValueError(f"notify must be never or a list of success, failure, delay, not {notify!r}")
        rcpt.append(f"NOTIFY={','.join(words)}")
        kept = [word for word in words if word != "SUCCESS"]
        targets.append(f"NOTIFY={','.join(kept or ['NEVER'])}")
    return DsnParams(mail, rcpt, targets)


def xtext(text: str) -> str:
    """RFC 3461 xtext: printable ASCII except + and = as is, everything else as +XX (UTF-8 bytes)."""
    return "".join(
        char if "!" <= char <= "~" and char not in "+=" else "".join(f"+{byte:02X}" for byte in char.encode())
        for char in text
    )


def _orcpt(recipient: str) -> list[str]:
    # ORCPT with the utf-8 address type (RFC 6533) is not sent: a non-ASCII recipient simply has none.
    return [f"ORCPT=rfc822;{xtext(recipient)}"] if recipient.isascii() else []


def command_lines(commands: Sequence[str], encoding: str) -> bytes:
    return "".join(f"{command}\r\n" for command in commands).encode(encoding)


def doing(command: str) -> str:
    """A command as error messages name it: "RSET", "MAIL FROM", "RCPT TO"."""
    return command.split(":", 1)[0] if ":" in command else command.split(" ", 1)[0]


def join(params: Sequence[str]) -> str:
    return "".join(f" {param}" for param in params)
