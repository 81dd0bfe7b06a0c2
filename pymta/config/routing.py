"""Where each recipient goes: a local mailbox or a smarthost. Aliases and the admin address decide.

A recipient is local when it is a bare name (`root`), or its domain is `localhost`, this host's name, or one
of `local_domains` (issue 5). A local recipient is looked up in the aliases file; a local name it ends up
as goes to the `admin` address when one is configured and the name is a system account (root, cron,
daemons: uid below FIRST_PERSON_UID) or no account at all, so root's cron mail reaches a real inbox through
the smarthost; a person's account, or any name when there is no admin, gets its mailbox. Everything else
goes to a smarthost.

The result for one recipient is a `Plan`: deliver it to a mailbox, and/or hand it on to other addresses
(its *targets*). The flush records targets as recipients of their own, each remembering which
recipient it came from, so an alias is expanded once and a target that was delivered is never sent again.
"""

from __future__ import annotations

import os
import pwd

from pymta.config.identity import host_names
from pymta.config.model import Config
from pymta.errors import ConfigError
from pymta.mail.address import qualify
from pymta.mail.idn import domain_key
from pymta.records import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.config.aliases import Aliases
    from pymta.config.expansion import Expansion, Unhonoured

# The mailbox of last resort: where the admin's mail goes when the admin address leads to no mailbox.
LAST_RESORT_MAILBOX = "root"
# Accounts from this uid up are people (Debian's and Fedora's UID_MIN): their mail stays in their mailbox;
# mail for system accounts below it (root, cron, daemons) and for names that are no account goes to `admin`.
FIRST_PERSON_UID = 1000


@record(frozen=True)
class Plan:
    """What to do with one recipient: deliver to the mailbox of `user`, and/or hand it on to `targets`."""

    user: str | None = None
    targets: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    # `|program` and `/file` targets met: not honoured; the flush sends the admin a copy naming them
    unhonoured: tuple[Unhonoured, ...] = ()


def local_domains(config: Config) -> set[str]:
    """The domains whose mail is for local users: this host's names (`identity.host_names`) and the
    configured local_domains, as `idn.domain_key` compares them (A-label and U-label are one domain)."""
    return {domain_key(domain) for domain in (*host_names(config.hostname), *config.local_domains)}


class Router:
    """Recipient routing for one flush; reads the aliases file once, on first use."""

    def __init__(self, config: Config, *, user_mode: bool = False) -> None:
        """`user_mode`: the spool is the running user's own (not root, not a system spool), so every local
        name's mail goes to that user's mailbox; otherwise each name keeps its own mailbox."""
        self.config = config
        self.user_mode = user_mode
        self.local_domains = local_domains(config)
        self._aliases: Aliases | None = None

    def local_part(self, address: str) -> str | None:
        """The local user name when `address` is local (bare, or a local domain), else None."""
        local, at, domain = address.rpartition("@")
        if not at:
            return address
        return local if domain_key(domain) in self.local_domains else None

    def sender_is_local(self, sender: str) -> bool:
        """Whether mail from `sender` comes from a local account, or is our own notice (the null sender):
        sender rewriting applies to it."""
        if not sender:
            return True
        local, at, domain = sender.rpartition("@")
        domain = domain_key(domain)
        return not at or domain in self.local_domains or domain == domain_key(self.config.domain)

    def plan(self, address: str, *, expanded: bool = False, use_admin: bool = True) -> Plan | None:
        """How to deliver `address`: None when it goes to a smarthost as it is.

        `expanded` says the address is already the result of an alias expansion: it is not looked up again
        (that is where alias loops end), but the admin rule still applies to a local name. `use_admin`
        False leaves the admin rule out (the notice to postmaster, sent because the admin failed). A target an
        alias wrote as `\\name` comes back as the recipient `\\name`: that user's mailbox, admin or not
        (the mark is kept in the queue, so a retry in a later run still knows it).

        A local admin address is looked up even as a target, and the admin rule does not apply within it;
        a name it leads to that has no mailbox (`postmaster@` this host with no aliases file) is root's: the
        admin's mail must reach someone, never bounce back to the admin (issue 11).
        """
        if address.startswith("\\") and "@" not in address:
            return Plan(user=self._mailbox_owner(address[1:]))
        user = self.local_part(address)
        if user is None:
            return None
        from pymta.config.aliases import is_user  # lazy: only local recipients need the aliases

        admin = self.config.admin if use_admin else None
        admin_user = (self.local_part(admin) or "").lower() if admin else ""
        is_admin = bool(admin_user) and user.lower() == admin_user
        warnings: list[str] = []
        names = [user]
        marked: set[str] = set()  # \name and self-references: that mailbox, not the admin
        unhonoured: tuple[Unhonoured, ...] = ()
        if not expanded or is_admin:
            found = self._expand(user)
            names, warnings, marked = found.targets, found.warnings, found.own
            unhonoured = tuple(found.unhonoured)
        if is_admin and unhonoured:  # a copy for the admin of the admin's own mail would loop: root's mailbox
            warnings.extend(f"{item} not honoured for the admin's mail" for item in unhonoured)
            names, unhonoured = names or [LAST_RESORT_MAILBOX], ()
        targets: list[str] = []
        for name in names:
            if "@" in name:
                targets.append(name)  # aliased to an address elsewhere
            elif is_admin:
                mailbox = name if self.user_mode or is_user(name) else LAST_RESORT_MAILBOX
                targets.append(name if mailbox == name and name.lower() == user.lower() else f"\\{mailbox}")
            elif name.lower() in marked and name.lower() != user.lower():
                targets.append(f"\\{name}")  # its own mailbox, whatever `admin:` says
            elif admin and admin_user != name.lower() and name.lower() not in marked and not _is_person(name):
                targets.append(admin)  # root, cron, daemons: their mail goes to the admin
            else:
                targets.append(name)
        targets = list(dict.fromkeys(targets))
        # The user's own name among its targets (no alias, `root: root, x@y`, or an expanded name): its
        # mailbox gets a copy, and the other targets are recipients of their own.
        own = [t for t in targets if "@" not in t and t.lower() == user.lower()]
        others = tuple(t for t in targets if t not in own)
        if own:
            return Plan(self._mailbox_owner(user), others, tuple(warnings), unhonoured)
        return Plan(targets=others, warnings=tuple(warnings), unhonoured=unhonoured)

    def _mailbox_owner(self, user: str) -> str:
        """In user mode every local recipient's mail goes to the running user's own mailbox."""
        if not self.user_mode:
            return user
        try:
            return pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            return user

    def _expand(self, user: str) -> Expansion:
        from pymta.config import aliases  # lazy: only local recipients need the aliases
        from pymta.config.expansion import resolve  # lazy: only local recipients need the aliases

        if self._aliases is None:
            self._aliases = aliases.load(self.config.aliases)
        return resolve(self._aliases, user, local_domains=self.local_domains)

    def admin_warning(self) -> str | None:
        """What is wrong with `admin:` when it is a local address that leads to no mailbox (for `pymta
        config check`): its mail then goes to root's mailbox (`plan`), not to whoever set it. None when
        `admin:` is unset, elsewhere, or fine."""
        admin = self.config.admin
        user = self.local_part(admin) if admin else None
        if user is None:
            return None
        try:
            names = self._expand(user).targets
        except ConfigError as error:
            return f"admin: {admin} is a local address that cannot be checked: {error}"
        from pymta.config.aliases import is_user  # lazy: only local recipients need the aliases

        missing = [name for name in names if "@" not in name and not is_user(name)]
        if not missing:
            return None
        return (
            f"admin: {admin} is a local address that leads to no mailbox ({', '.join(missing)}: no such user"
            f" and no alias), so the admin's mail goes to root's mailbox; set admin: to an address someone"
            f" reads, or give {user} an alias in {self.config.aliases}"
        )

    def wire_address(self, address: str) -> str:
        """The address as the smarthost gets it: a bare name qualified with the configured domain."""
        return qualify(address, self.config.domain)


def _is_person(name: str) -> bool:
    """Whether the local name is a person's account (uid >= FIRST_PERSON_UID), not a system account."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return False
    return FIRST_PERSON_UID <= uid < 65534  # nobody (65534) is a system account
