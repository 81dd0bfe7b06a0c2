"""MTA-STS (RFC 8461): whether a recipient domain asks for TLS with a verified certificate to its MX hosts,
and which MX hosts it names. Direct delivery applies it (`direct.DirectRoutes`, `mta_sts:` in the config):
enforce keeps only the MX hosts the policy names, with the verify TLS policy, else `StsRefusedError`.

`policy_for(domain, resolver, cache)` is the sender's side of RFC 8461 section 5.1: the `_mta-sts.DOMAIN`
TXT record ("v=STSv1; id=..."); when its id differs from the cached policy's, the policy is fetched over
HTTPS from `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (certificate verified for that name, no
redirect followed, at most 64 KiB of text/plain) and cached for its max_age. A cached policy that has not
expired applies when DNS or the fetch fails, as the RFC asks (a policy cannot be switched off by an attacker
who blocks the lookup); without one, the domain has no policy.

`PolicyCache` keeps one JSON file per domain in a directory of its own (direct delivery gives it one in
the spool, e.g. SPOOL/mta-sts): written to a hidden temporary file and renamed; read without following a
link, only when it is a regular file of bounded size, and checked field by field, so a file planted or
cut short costs a fetch, never a crash or a policy the domain did not publish.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import socket
import stat
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from pymta.delivery.lookups import DnsLookups, NoSuchName
from pymta.delivery.mx import DnsTemporaryError, MxLookupError, MxResolver, NoSuchDomainError, ascii_domain
from pymta.fsutil import READ_FLAGS, open_directory, read_all
from pymta.log import one_line

if TYPE_CHECKING:
    import ssl

Mode = Literal["enforce", "testing", "none"]
MODES: tuple[Mode, ...] = ("enforce", "testing", "none")

WELL_KNOWN = "/.well-known/mta-sts.txt"
HTTPS_PORT = 443
# RFC 8461 3.3: a policy larger than 64 KiB is refused; and 3.2: max_age is at most 31557600 s (a year).
MAX_POLICY_SIZE = 64 * 1024
MAX_AGE_LIMIT = 31557600
# Seconds for the whole fetch, every address tried included: RFC 8461 3.3 suggests a minute at the most,
# and the queue run waits for it (a server that sends a byte at a time must not hold it longer).
FETCH_TIMEOUT = 60.0
# Addresses of mta-sts.DOMAIN tried, in order.
MAX_FETCH_ADDRESSES = 4
# A cache file larger than this is not one this module wrote.
MAX_CACHE_FILE = MAX_POLICY_SIZE + 4096
# A record id (RFC 8461 3.1: 1 to 32 letters and digits); a host name or a pattern "*.example.net" (4.1).
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+")
_PATTERN = re.compile(rf"(?:\*\.)?(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+")


class PolicyFetchError(Exception):
    """The policy could not be fetched or is not valid: the reason, for the log."""


class StsRefusedError(MxLookupError):
    """The domain's MTA-STS policy (mode enforce) names none of its MX hosts: the mail waits (4.7.5), it is
    never sent to a host the domain did not name (RFC 8461 5.1)."""

    enhanced = "4.7.5"


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A domain's MTA-STS policy: `mode` enforce (deliver only over verified TLS to a named MX host),
    testing (report, deliver anyway) or none (the domain withdrew its policy); `mx` the patterns its MX
    hosts must match; `policy_id` the TXT record's id it was fetched under; `fetched` when (epoch)."""

    domain: str
    policy_id: str
    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    fetched: float

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def matches(self, host: str) -> bool:
        """Whether the MX host `host` is one the policy names: exactly, or by a pattern "*.example.net"
        that stands for one label (RFC 8461 4.1)."""
        name = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, dot, rest = name.partition(".")
                if label and dot and rest == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False


@dataclass(frozen=True, slots=True)
class StsLookup:
    """What `policy_for` found: the policy that applies (None: none), and how it came, for the log."""

    policy: StsPolicy | None
    note: str
    # the lookup, the fetch or the cache failed (the note says why): worth a warning, since a policy not
    # kept no longer protects the mail when an attacker later blocks the lookup
    failed: bool = False


def parse_policy(text: str) -> tuple[Mode, tuple[str, ...], int]:
    """The mode, MX patterns and max_age of a policy body (RFC 8461 3.2): "key: value" lines, CRLF or LF;
    unknown keys ignored, the first of a repeated key counts (mx: all of them). ValueError when it is
    not a valid STSv1 policy."""
    fields: dict[str, str] = {}
    patterns: list[str] = []
    for line in re.split(r"\r?\n", text):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"a line without a colon: {one_line(line[:60])!r}")
        key, value = key.strip().lower(), value.strip()
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _PATTERN.fullmatch(pattern):
                raise ValueError(f"mx: {one_line(value[:80])!r} is not a host name or *.domain pattern")
            patterns.append(pattern)
        else:
            fields.setdefault(key, value)
    if fields.get("version", "").lower() != "stsv1":
        raise ValueError("no version: STSv1")
    mode = fields.get("mode", "").lower()
    if mode not in MODES:
        raise ValueError(f"mode: {one_line(fields.get('mode', '')[:20])!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not re.fullmatch(r"[0-9]{1,10}", age) or int(age) > MAX_AGE_LIMIT:
        raise ValueError(f"max_age: {one_line(age[:20])!r} is not a number of seconds up to {MAX_AGE_LIMIT}")
    if mode != "none" and not patterns:
        raise ValueError(f"mode {mode} without mx:")
    return mode, tuple(patterns), int(age)


def record_id(domain: str, lookups: DnsLookups) -> str | None:
    """The id of the domain's `_mta-sts` TXT record, or None when it has no valid one (none, or more than
    one: RFC 8461 3.1). DnsTemporaryError when the lookup fails."""
    try:
        texts = lookups.records(f"_mta-sts.{domain}", "TXT")
    except NoSuchName:
        return None
    records = [text for text in texts if re.match(r"v=STSv1\s*(;|$)", text)]
    if len(records) != 1:
        return None
    fields = dict(part.strip().partition("=")[::2] for part in records[0].split(";") if part.strip())
    found = fields.get("id", "")
    return found if _ID.fullmatch(found) else None


def fetch_policy_text(
    domain: str,
    lookups: DnsLookups,
    *,
    port: int = HTTPS_PORT,
    context: ssl.SSLContext | None = None,
    timeout: float = FETCH_TIMEOUT,
) -> str:
    """The body of https://mta-sts.DOMAIN/.well-known/mta-sts.txt, its host looked up through `lookups`
    (the same DNS as the delivery's) and its certificate verified for that name (`context`: the system's
    CAs by default), all within `timeout` seconds. PolicyFetchError with the reason otherwise."""
    import http.client  # only for a domain with a policy to fetch: it loads the email package
    import ssl

    host = f"mta-sts.{domain}"
    try:
        addresses = lookups.existing(host, "A") + lookups.existing(host, "AAAA")
    except DnsTemporaryError as error:
        raise PolicyFetchError(f"{host}: {error.reason}") from None
    if not addresses:
        raise PolicyFetchError(f"{host} has no address")
    context = context or ssl.create_default_context()
    reasons = []
    deadline = time.monotonic() + timeout
    for address in addresses[:MAX_FETCH_ADDRESSES]:
        left = deadline - time.monotonic()
        if left <= 0:
            reasons.append(f"{host}[{address}]: not tried, the fetch took {timeout:g}s already")
            break
        # connected to the address DNS gave, the certificate checked for the name: http.client would ask
        # the system's resolver instead
        connection = http.client.HTTPSConnection(host, port, timeout=left)
        tls = None
        try:
            raw = socket.create_connection((address, port), timeout=left)
            tls = context.wrap_socket(raw, server_hostname=host)
            connection.sock = _DeadlineSocket(tls, deadline)
            connection.request("GET", WELL_KNOWN, headers={"User-Agent": "pymta", "Connection": "close"})
            response = connection.getresponse()
            body = response.read(MAX_POLICY_SIZE + 1)
        except ssl.SSLCertVerificationError as error:
            reasons.append(f"{host}[{address}]: certificate not valid for {host} ({error.verify_message})")
            continue
        except TimeoutError:
            reasons.append(f"{host}[{address}]: no complete answer within {timeout:g}s")
            continue
        except (OSError, http.client.HTTPException) as error:
            reasons.append(f"{host}[{address}]: {one_line(str(error)) or type(error).__name__}")
            continue
        finally:
            connection.close()
            if tls is not None:
                tls.close()
        return _body(host, response.status, response.getheader("Content-Type") or "", body)
    raise PolicyFetchError("; ".join(reasons))


class _DeadlineSocket:
    """The TLS socket of a fetch, as http.client uses it (sendall, makefile, close), with every read ending
    by one deadline: http.client gives each read its timeout anew, so a server that sends a byte at a
    time would otherwise hold the fetch as long as it liked."""

    def __init__(self, sock: ssl.SSLSocket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("past the deadline")
        self.sock.settimeout(left)

    def sendall(self, data: bytes) -> None:
        self.arm()
        self.sock.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        """Nothing: http.client closes the connection once it has the headers of an answer that ends with
        it, and the body is still to be read; `fetch_policy_text` closes the socket when it is done."""


class _DeadlineReader(io.RawIOBase):
    def __init__(self, owner: _DeadlineSocket) -> None:
        self.owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.owner.arm()
        return self.owner.sock.recv_into(buffer)


def _body(host: str, status: int, content_type: str, body: bytes) -> str:
    """The policy text of an answer, or PolicyFetchError: 200 only (a redirect is not followed, RFC 8461
    3.3), text/plain, within the size limit, UTF-8."""
    if status != 200:
        raise PolicyFetchError(f"{host} answered HTTP {status}, not 200 (redirects are not followed)")
    media = content_type.partition(";")[0].strip().lower()
    if media != "text/plain":
        raise PolicyFetchError(f"{host} sent {one_line(media[:60]) or 'no media type'}, not text/plain")
    if len(body) > MAX_POLICY_SIZE:
        raise PolicyFetchError(f"{host} sent a policy over {MAX_POLICY_SIZE} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyFetchError(f"{host} sent a policy that is not UTF-8") from None


class PolicyCache:
    """Policies by domain in `directory` (made 0700 when missing), one JSON file each."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def get(self, domain: str) -> StsPolicy | None:
        """The cached policy for `domain`, expired or not; None when there is none or it cannot be used."""
        if not _NAME.fullmatch(domain):
            return None
        try:
            directory = open_directory(self.directory)
        except OSError:
            return None
        try:
            fd = os.open(domain, READ_FLAGS | os.O_NOFOLLOW, dir_fd=directory)
        except OSError:
            return None
        finally:
            os.close(directory)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CACHE_FILE:
                return None
            data = json.loads(read_all(fd, info.st_size, limit=MAX_CACHE_FILE))
            return _cached(domain, data)
        except (OSError, ValueError, TypeError, KeyError):
            return None
        finally:
            os.close(fd)

    def put(self, policy: StsPolicy) -> None:
        """Keep `policy` (a hidden temporary file renamed over the domain's). OSError when it cannot."""
        if not _NAME.fullmatch(policy.domain):
            return
        try:
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            pass
        directory = open_directory(self.directory)
        try:
            temporary = f".{policy.domain}.{secrets.token_hex(6)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temporary, flags, 0o600, dir_fd=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    json.dump(asdict(policy), file)
                os.rename(temporary, policy.domain, src_dir_fd=directory, dst_dir_fd=directory)
            except BaseException:
                try:
                    os.unlink(temporary, dir_fd=directory)
                except OSError:
                    pass
                raise
        finally:
            os.close(directory)


def _cached(domain: str, data: object) -> StsPolicy | None:
    """A policy read back from the cache, each field checked as if it had come from the domain."""
    if not isinstance(data, dict) or data.get("domain") != domain:
        return None
    patterns = data["mx"]
    if not isinstance(patterns, list) or not all(
        isinstance(p, str) and _PATTERN.fullmatch(p) for p in patterns
    ):
        return None
    policy_id, mode, max_age, fetched = data["policy_id"], data["mode"], data["max_age"], data["fetched"]
    if not (isinstance(policy_id, str) and _ID.fullmatch(policy_id)) or mode not in MODES:
        return None
    if (
        not isinstance(max_age, int)
        or not 0 <= max_age <= MAX_AGE_LIMIT
        or not isinstance(fetched, int | float)
    ):
        return None
    return StsPolicy(domain, policy_id, mode, tuple(patterns), max_age, float(fetched))


def policy_for(
    domain: str,
    resolver: MxResolver,
    cache: PolicyCache | None = None,
    *,
    port: int = HTTPS_PORT,
    context: ssl.SSLContext | None = None,
    timeout: float = FETCH_TIMEOUT,
    now: float | None = None,
) -> StsLookup:
    """The MTA-STS policy that applies to mail for `domain` now (RFC 8461 5.1), and how it was found.
    `port` and `context` are for tests (a loopback HTTPS server and its CA)."""
    now = time.time() if now is None else now
    try:
        name = ascii_domain(domain)
    except NoSuchDomainError as error:
        return StsLookup(None, one_line(f"no MTA-STS policy: {error}"))
    lookups = DnsLookups(resolver)
    cached = cache.get(name) if cache is not None else None
    if cached is not None and cached.expires <= now:
        cached = None
    kept = f"the cached policy (id {cached.policy_id}) applies" if cached else "no policy applies"
    try:
        current = record_id(name, lookups)
    except (DnsTemporaryError, ValueError) as error:
        reason = error.reason if isinstance(error, DnsTemporaryError) else str(error)
        return StsLookup(cached, f"_mta-sts.{name}: {reason}; {kept}", failed=True)
    if current is None:
        return StsLookup(cached, f"no MTA-STS record at _mta-sts.{name}; {kept}")
    if cached is not None and cached.policy_id == current:
        return StsLookup(cached, f"the cached policy (id {current}) is current")
    try:
        text = fetch_policy_text(name, lookups, port=port, context=context, timeout=timeout)
        mode, patterns, max_age = parse_policy(text)
    except (PolicyFetchError, ValueError) as error:
        note = f"the policy of {name} (id {current}) could not be fetched: {error}; {kept}"
        return StsLookup(cached, note, failed=True)
    policy = StsPolicy(name, current, mode, patterns, max_age, now)
    note = f"the policy of {name} (id {current}) fetched: mode {mode}, max_age {max_age}"
    if cache is not None:
        try:
            cache.put(policy)
        except OSError as error:
            return StsLookup(policy, f"{note}; not cached ({one_line(str(error))})", failed=True)
    return StsLookup(policy, note)
