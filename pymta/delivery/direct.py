"""Direct delivery (issue 15): the MX hosts of a recipient's domain as the targets a session is opened to.

Each address of each MX host becomes an `MxRelay`, a `Smarthost` whose `host` is the MX name (the name its
certificate is checked against, and the log shows) and whose `address` is where to connect; so `Sessions`
opens, reuses, fails over and gives up MX hosts exactly as smarthosts, one session per (MX name, address)
for the run, shared by every domain with that MX. An MX host is never sent AUTH, and its TLS is the
recipient domain's policy (`mx.tls`, `mx.tls_policy`): opportunistic or verify (`smtp.connection`).

`DirectRoutes` looks a domain up once per run (`mx.MxResolver`, its answer or its error remembered) and
drops the MX hosts at or above our own preference when this host is among them (RFC 5321 5.1); when that
leaves none, the mail would loop back to us: a 5.4.6 failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pymta.config.identity import host_names
from pymta.config.model import Config, MxTls, Smarthost
from pymta.mail.idn import domain_key

if TYPE_CHECKING:
    from pymta.delivery.mx import Destination, MxLookupError, MxResolver

# Seconds to wait for the TCP connection to an MX address (Postfix's smtp_connect_timeout): an address
# that drops packets must not cost the 5 minutes a live server gets for its greeting.
MX_CONNECT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class MxRelay(Smarthost):
    """One address of one MX host as a session target; `host` is the MX name, `tls_policy` the domain's."""

    address: str = ""
    tls_policy: MxTls = "opportunistic"
    connect_timeout: float = MX_CONNECT_TIMEOUT


def recipient_domain(address: str) -> str:
    """The domain of a recipient as it goes out (qualified), as `idn.domain_key` compares it."""
    return domain_key(address.rpartition("@")[2])


class DirectRoutes:
    """Where the mail for each domain goes in one run: its MX relays, looked up once and remembered."""

    def __init__(self, config: Config, resolver: MxResolver | None = None) -> None:
        self.config = config
        self._resolver = resolver
        self._found: dict[str, tuple[MxRelay, ...] | MxLookupError] = {}
        self._ours = {domain_key(name) for name in host_names(config.hostname)}

    @property
    def resolver(self) -> MxResolver:
        if self._resolver is None:
            from pymta.delivery.mx import MxResolver  # lazy: dnspython, for direct delivery only

            self._resolver = MxResolver(self.config.dns)
        return self._resolver

    def relays(self, domain: str) -> tuple[MxRelay, ...]:
        """The relays for `domain` in the order to try them; raises `MxLookupError` (the run's first
        answer for the domain, each time it is asked)."""
        from pymta.delivery.mx import MxLookupError  # lazy: dnspython, for direct delivery only

        key = domain_key(domain)
        found = self._found.get(key)
        if found is None:
            try:
                found = self._relays(domain, self.resolver.lookup(domain))
            except MxLookupError as error:
                found = error
            self._found[key] = found
        if isinstance(found, MxLookupError):
            raise found
        return found

    def destination(self, domain: str) -> Destination:
        """The domain's MX hosts after the loop check, for `pymta test`."""
        return self._without_us(domain, self.resolver.lookup(domain))

    def _relays(self, domain: str, destination: Destination) -> tuple[MxRelay, ...]:
        mx = self.config.mx
        policy = mx.tls_for(domain)
        return tuple(
            MxRelay(
                host=host.name,
                port=mx.port,
                security="starttls",  # the session's TLS follows tls_policy (`Connection._open_direct`)
                timeout=mx.timeout,
                name=f"{host.name}[{address}]:{mx.port}",
                address=address,
                tls_policy=policy,
            )
            for host, address in self._without_us(domain, destination).relays()
        )

    def _without_us(self, domain: str, destination: Destination) -> Destination:
        """RFC 5321 5.1: when this host is one of the MX hosts, only those preferred to it remain."""
        from pymta.delivery.mx import Destination, RoutingLoopError, ascii_domain  # lazy: as in `relays`

        ours = [host.preference for host in destination.hosts if domain_key(host.name) in self._ours]
        if not ours:
            return destination
        kept = tuple(host for host in destination.hosts if host.preference < min(ours))
        if not kept:
            mine = next(host.name for host in destination.hosts if domain_key(host.name) in self._ours)
            raise RoutingLoopError(
                ascii_domain(domain),
                f"mail for it loops back to this host: its MX host {mine} is this host's name "
                f"(hostname {self.config.hostname}); fix the domain's MX records, or add it to local_domains",
            )
        return Destination(destination.domain, kept, destination.implicit, destination.notes)
