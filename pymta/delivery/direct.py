"""Direct delivery (issue 15): the MX hosts of a recipient's domain as the targets a session is opened to.

Each address of each MX host becomes an `MxRelay`, a `Smarthost` whose `host` is the MX name (the name its
certificate is checked against, and the log shows) and whose `address` is where to connect; so `Sessions`
opens, reuses, fails over and gives up MX hosts exactly as smarthosts, one session per (MX name, address)
for the run, shared by every domain with that MX. An MX host is never sent AUTH, and its TLS is the
recipient domain's policy (`mx.tls`, `mx.tls_policy`): opportunistic or verify (`smtp.connection`).

`DirectRoutes` looks a domain up once per run (`mx.MxResolver`, its answer or its error remembered) and
drops the MX hosts at or above our own preference when this host is among them (RFC 5321 5.1); when that
leaves none, the mail would loop back to us: a 5.4.6 failure.

Then the domain's MTA-STS policy (RFC 8461, `mtasts.policy_for`, cached in SPOOL/mta-sts; `mta_sts:` in
the config switches it off) applies: in mode enforce only the MX hosts it names remain, with the verify
TLS policy whatever `mx.tls_policy` says (none named: `mtasts.StsRefusedError`, 4.7.5, the mail waits);
in mode testing every MX host remains with the configured TLS policy, and what enforce would refuse is
logged (here the MX hosts it does not name, in `sessions` the TLS a session got). `MxRelay.sts` carries
the mode to the log line (`sts=enforce`). A stricter `mx.tls_policy` (verify) applies in every mode.
"""

from __future__ import annotations

import logging
import os

from pymta.config.identity import host_names
from pymta.config.model import Config, Smarthost
from pymta.log import LOGGER_NAME
from pymta.mail.idn import domain_key
from pymta.records import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from typing import Literal

    from pymta.config.model import MxTls
    from pymta.delivery.mtasts import StsLookup, StsPolicy
    from pymta.delivery.mx import Destination, MxHost, MxLookupError, MxResolver

    # The MTA-STS mode a relay was chosen under, for the log line: "" when no policy applies.
    StsApplied = Literal["enforce", "testing", ""]

# Seconds to wait for the TCP connection to an MX address (Postfix's smtp_connect_timeout): an address
# that drops packets must not cost the 5 minutes a live server gets for its greeting.
MX_CONNECT_TIMEOUT = 30.0
# The spool's directory for MTA-STS policies (`mtasts.PolicyCache`): made 0700 by its owner on first use.
STS_CACHE = "mta-sts"


@record(frozen=True, slots=True)
class MxRelay(Smarthost):
    """One address of one MX host as a session target; `host` is the MX name, `tls_policy` the domain's."""

    address: str = ""
    tls_policy: MxTls = "opportunistic"
    connect_timeout: float = MX_CONNECT_TIMEOUT
    sts: StsApplied = ""


def recipient_domain(address: str) -> str:
    """The domain of a recipient as it goes out (qualified), as `idn.domain_key` compares it."""
    return domain_key(address.rpartition("@")[2])


class DirectRoutes:
    """Where the mail for each domain goes in one run: its MX relays, looked up once and remembered."""

    def __init__(
        self, config: Config, resolver: MxResolver | None = None, logger: logging.Logger | None = None
    ) -> None:
        self.config = config
        self._resolver = resolver
        self.log = logger or logging.getLogger(LOGGER_NAME)
        self._found: dict[str, tuple[MxRelay, ...] | MxLookupError] = {}
        self._ours = {domain_key(name) for name in host_names(config.hostname)}
        self.sts: dict[str, StsLookup] = {}  # the MTA-STS lookup of each domain, for `pymta test`

    @property
    def resolver(self) -> MxResolver:
        if self._resolver is None:
            from pymta.delivery.mx import MxResolver  # lazy: dnspython, for direct delivery only

            self._resolver = MxResolver(self.config.dns)
        return self._resolver

    def known(self, domain: str) -> bool:
        """Whether `domain` was looked up in this run already (its relays are at hand, no DNS wait)."""
        return domain_key(domain) in self._found

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
        targets = self._without_us(domain, destination).relays()
        sts = self._sts_policy(domain)
        applied: StsApplied = ""
        if sts is not None:
            targets = self._under_sts(sts, targets)
            applied = "enforce" if sts.mode == "enforce" else "testing"
            if applied == "enforce":
                policy = "verify"  # RFC 8461 4.2: a certificate valid for the MX name, from a trusted CA
        return tuple(
            MxRelay(
                host=host.name,
                port=mx.port,
                security="starttls",  # the session's TLS follows tls_policy (`Connection._open_direct`)
                timeout=mx.timeout,
                name=f"{host.name}[{address}]:{mx.port}",
                address=address,
                tls_policy=policy,
                sts=applied,
            )
            for host, address in targets
        )

    def _sts_policy(self, domain: str) -> StsPolicy | None:
        """The MTA-STS policy that applies to `domain` in mode enforce or testing; None when there is none,
        it says mode none, or `mta_sts.enabled` is false. Its lookup is logged (a failure as a warning)."""
        if not self.config.mta_sts.enabled:
            return None
        from pymta.delivery.mtasts import PolicyCache, policy_for  # lazy: dnspython, as in `relays`

        found = policy_for(
            domain,
            self.resolver,
            PolicyCache(os.path.join(self.config.spool, STS_CACHE)),
            port=self.config.mta_sts.port,
            context=self._sts_context(),
        )
        self.sts[domain_key(domain)] = found
        self.log.log(logging.WARNING if found.failed else logging.DEBUG, f"MTA-STS: {found.note}")
        policy = found.policy
        return policy if policy is not None and policy.mode != "none" else None

    def _sts_context(self) -> ssl.SSLContext | None:
        """The TLS context for fetching policies: None (the system's CAs) unless `mta_sts.ca_file` says."""
        ca_file = self.config.mta_sts.ca_file
        if ca_file is None:
            return None
        import ssl

        try:
            return ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            self.log.warning(
                f"MTA-STS: cannot load mta_sts.ca_file {ca_file} ({error}); the system's CAs apply"
            )
            return None

    def _under_sts(self, policy: StsPolicy, targets: list[tuple[MxHost, str]]) -> list[tuple[MxHost, str]]:
        """The MX addresses `policy` lets mail go to: in mode enforce those of the MX hosts it names (none:
        StsRefusedError), in mode testing all, with a warning naming those enforce would refuse."""
        from pymta.delivery.mtasts import StsRefusedError  # lazy: dnspython, as in `relays`

        unnamed = list(dict.fromkeys(host.name for host, _ in targets if not policy.matches(host.name)))
        if not unnamed:
            return targets
        patterns = ", ".join(policy.mx)
        if policy.mode == "testing":
            self.log.warning(
                f"MTA-STS (mode testing) for {policy.domain}: the policy (mx: {patterns}) does not name the "
                f"MX host(s) {', '.join(unnamed)}; they are used, and in mode enforce they would not be"
            )
            return targets
        named = [(host, address) for host, address in targets if policy.matches(host.name)]
        if not named:
            raise StsRefusedError(
                policy.domain,
                f"its MTA-STS policy (mode enforce, id {policy.policy_id}) names none of its MX hosts "
                f"({', '.join(unnamed)}; the policy says mx: {patterns}): the mail waits until the MX "
                "records or the policy change (RFC 8461)",
            )
        return named

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
