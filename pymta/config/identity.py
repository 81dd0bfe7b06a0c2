"""Sender identity: who may set which envelope sender, and what happens when someone sets another's.

The submitting user is who the operating system says (ARCHITECTURE.md invariant 6): in system mode the owner
of the drop file. A user may always send as themselves: their login name bare, or `login@` one of this host's
names (hostname, domain, local_domains, localhost). Setting any other sender with `-f`/`-r` (or MAIL FROM
under `-bs`) is a claim only `trusted_users` may make freely. The null sender `<>` counts as another sender:
it says "this is a delivery notice from the mail system" and makes failures of the message vanish, so an
untrusted user who sets it is treated as setting any other address.

What an untrusted claim gets, by `sender_policy`:

    warn (the default)   the message goes, with `X-Authentication-Warning: HOST: LOGIN set sender to ADDRESS
                         using -f` added at the top of its header, as sendmail(8) does
    strict               refused: `sendmail` exits 77 (EX_NOPERM); a file dropped without sendmail is set
                         aside in corrupt/ at pick-up

The decision is taken where the kernel's word is trusted: at pick-up of a drop file owned by another user
(`Spool.pick_up`), and, for `strict`, already in `sendmail`. In user mode everything in the spool is the
user's own and nothing is checked at pick-up.

`spool` and `sendmail` import this module only when they need it; it imports only the header helper
(`pymta.mail.message.prepend_field`) that adds the warning field.
"""

from __future__ import annotations

import os

from pymta.mail.address import has_control
from pymta.mail.message import prepend_field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.config.model import Config

# Names of this host that are always local, whatever it is called.
LOCAL_HOSTS = ("localhost", "localhost.localdomain")


def host_names(hostname: str) -> tuple[str, ...]:
    """Every name mail to this host may use, in lower case: localhost, `hostname` (the configured or fully
    qualified one) and its first label (`root@myhost` where the host is myhost.example.org, as Debian's
    /etc/hosts names it too), and the kernel's node name when it is a single label. A dotted node name that
    differs from `hostname` is left out: it may be a mail domain of its own (a server called example.org
    whose hostname: is mail.example.org), whose mail must go out, not into local mailboxes."""
    names = [*LOCAL_HOSTS]
    hostname = hostname.lower().rstrip(".")
    if hostname:
        names += [hostname, hostname.partition(".")[0]]
    nodename = os.uname().nodename.lower().rstrip(".")
    if nodename and "." not in nodename:
        names.append(nodename)
    return tuple(dict.fromkeys(names))


ACCEPT = "accept"
WARN = "warn"
REFUSE = "refuse"


def shown(sender: str) -> str:
    """An envelope sender as messages and headers show it: the null sender is `<>`."""
    return sender or "<>"


class SenderPolicy:
    """What the config says about envelope senders: the trusted users, this host's names, strict or warn."""

    __slots__ = ("hostname", "domain", "domains", "trusted_users", "strict")

    def __init__(
        self,
        *,
        hostname: str,
        domain: str = "",
        local_domains: tuple[str, ...] = (),
        trusted_users: tuple[str, ...] = ("root",),
        strict: bool = False,
    ) -> None:
        self.hostname = hostname
        self.domain = domain or hostname
        names = (*host_names(hostname), self.domain, *local_domains)
        self.domains = frozenset(name.lower() for name in names if name)
        self.trusted_users = frozenset(trusted_users)
        self.strict = strict

    def owns(self, login: str, sender: str) -> bool:
        """Whether `sender` is `login`'s own address: the login bare, or login@ one of this host's names."""
        if sender == login:
            return True
        local, at, domain = sender.rpartition("@")
        return bool(at) and local == login and domain.lower().rstrip(".") in self.domains

    def judge(self, login: str, sender: str) -> str:
        """ACCEPT, WARN or REFUSE for `login` submitting with the envelope sender `sender` ("" is <>)."""
        if login in self.trusted_users or self.owns(login, sender):
            return ACCEPT
        return REFUSE if self.strict else WARN

    def warning_field(self, login: str, sender: str) -> bytes:
        """The X-Authentication-Warning field (with its CRLF) for `login` having set `sender`."""
        text = f"X-Authentication-Warning: {self.hostname}: {login} set sender to {shown(sender)} using -f"
        return text.encode("utf-8") + b"\r\n"

    def refusal(self, login: str, sender: str) -> str:
        """Why `login` may not set `sender` under `sender_policy: strict`, and what to do about it."""
        return (
            f"{login} may not set the sender {shown(sender)}: with sender_policy: strict only trusted_users "
            f"may set a sender other than their own ({login} or {login}@{self.domain})"
        )

    def check_drop(self, login: str, sender: str, message: bytes) -> tuple[str, bytes]:
        """For a drop file owned by `login` with the envelope sender `sender`: why it is refused ("" when it
        is not), and the message to store (with the warning field at the top when one is due)."""
        if has_control(sender) or any(0xD800 <= ord(char) <= 0xDFFF for char in sender):
            return "the envelope sender holds a control character or undecodable bytes", message
        verdict = self.judge(login, sender)
        if verdict == REFUSE:
            return self.refusal(login, sender), message
        if verdict == WARN:
            return "", prepend_field(message, self.warning_field(login, sender))
        return "", message


def policy_of(config: Config) -> SenderPolicy:
    """The SenderPolicy a loaded config describes."""
    return SenderPolicy(
        hostname=config.hostname,
        domain=config.domain,
        local_domains=config.local_domains,
        trusted_users=config.trusted_users,
        strict=config.sender_policy == "strict",
    )
