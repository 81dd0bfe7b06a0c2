"""DNS records as text for the checks around direct delivery (`readiness`, `mtasts`): what a name holds,
on the dnspython resolver of an `MxResolver`, with its failures typed as `mx` types them.

A name that does not exist is `NoSuchName`, a lookup that fails `mx.DnsTemporaryError`, a name that is no
domain name ValueError. TXT strings are joined and made printable: what DNS says may reach a terminal or a
log. After one lookup times out, a `DnsLookups` asks nothing more (each would wait as long) and says so.
"""

from __future__ import annotations

import dns.exception
import dns.name
import dns.rdatatype
import dns.rdtypes.ANY.PTR  # noqa: F401  (loaded before the privilege switch, as mx.py says of its types)
import dns.rdtypes.ANY.TXT  # noqa: F401
import dns.resolver

from pymta.delivery.mx import DnsTemporaryError, MxResolver
from pymta.log import one_line


class NoSuchName(Exception):
    """The name does not exist (NXDOMAIN)."""


class DnsLookups:
    """The lookups of one check on the resolver's dnspython resolver: records as text, NXDOMAIN as
    `NoSuchName`, a failure as `DnsTemporaryError`. After a timeout it asks nothing more."""

    def __init__(self, resolver: MxResolver) -> None:
        self.mx = resolver
        self.silent = ""

    def records(self, name: str, rdtype: str) -> list[str]:
        """The records of `rdtype` at `name` as text ([] when the name has none); TXT strings joined.
        ValueError for a name that is not a domain name (one an SPF term names)."""
        try:
            query = dns.name.from_text(name)
        except dns.exception.DNSException as error:
            raise ValueError(f"{name}: {error}") from None
        if self.silent:
            raise DnsTemporaryError(name, f"not asked: {self.silent}")
        try:
            answer = self.mx.resolver.resolve(
                query,
                dns.rdatatype.from_text(rdtype),
                search=False,
                raise_on_no_answer=False,
            )
        except dns.resolver.NXDOMAIN:
            raise NoSuchName(name) from None
        except dns.resolver.LifetimeTimeout:
            self.silent = f"the DNS server did not answer within {self.mx.settings.timeout:g}s"
            raise DnsTemporaryError(name, f"no answer to the {rdtype} lookup") from None
        except dns.resolver.NoNameservers:
            raise DnsTemporaryError(name, f"the DNS server failed the {rdtype} lookup (SERVFAIL)") from None
        except dns.exception.DNSException as error:
            raise DnsTemporaryError(name, f"the {rdtype} lookup failed: {error}") from None
        if answer.rrset is None:
            return []
        if rdtype == "TXT":
            # what DNS says is shown to the admin: no control character reaches the terminal
            return [one_line(b"".join(record.strings).decode("utf-8", "replace")) for record in answer.rrset]
        if rdtype in ("A", "AAAA"):
            return [record.address for record in answer.rrset]
        if rdtype == "MX":
            return [record.exchange.to_text(omit_final_dot=True).lower() for record in answer.rrset]
        return [record.to_text().rstrip(".").lower() for record in answer.rrset]

    def existing(self, name: str, rdtype: str) -> list[str]:
        """As `records`, with [] for a name that does not exist."""
        try:
            return self.records(name, rdtype)
        except NoSuchName:
            return []
