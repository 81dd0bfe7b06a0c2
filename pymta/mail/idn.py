"""International domain names: the A-label a server without SMTPUTF8 needs, the U-label people read, and one
key for comparing them.

IDNA 2008 with the UTS 46 mapping, from the `idna` package (Python's built-in "idna" codec is IDNA 2003,
which maps ß to ss: another domain). `idna` is imported only when a domain is not plain ASCII or holds an
A-label, so `sendmail`, `mailq` and an all-ASCII flush never load its tables. Main invariant: a domain that
is not valid IDNA is never changed here; the caller decides what it cannot express.
"""

from __future__ import annotations

_ACE_PREFIX = "xn--"


def a_label(domain: str) -> str | None:
    """The domain as ASCII (A-labels, lower case as UTS 46 maps it); an ASCII domain as it is; None when
    it is not a valid international domain name."""
    if domain.isascii():
        return domain
    if domain.startswith("[") or not domain.strip("."):  # an address literal, or nothing to convert
        return None
    import idna  # lazy: third-party tables, loaded only for a non-ASCII domain

    try:
        return idna.encode(domain.rstrip("."), uts46=True).decode("ascii") + (
            "." if domain.endswith(".") else ""
        )
    except (idna.IDNAError, UnicodeError):
        return None


def u_label(domain: str) -> str:
    """The domain as people write it (U-labels); as it is when it holds no valid A-label."""
    if _ACE_PREFIX not in domain.lower():
        return domain
    import idna  # lazy: as in a_label

    try:
        return str(idna.decode(domain.rstrip("."))) + ("." if domain.endswith(".") else "")
    except (idna.IDNAError, UnicodeError):
        return domain


def domain_key(domain: str) -> str:
    """The form two domains are compared in: the A-label form, lower case, without a trailing dot, so that
    `müller.de`, `Müller.DE` and `xn--mller-kva.de` are one domain."""
    domain = domain.rstrip(".")
    if domain.isascii() and _ACE_PREFIX not in domain.lower():
        return domain.lower()
    return (a_label(u_label(domain)) or domain).lower()


def wire_address(address: str) -> str:
    """`address` with its domain as an A-label; as it is when the domain is ASCII or not valid IDNA (the
    local part is never changed: only SMTPUTF8 can carry a non-ASCII one)."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    converted = a_label(domain)
    return address if converted is None else f"{local}@{converted}"


def display_address(address: str) -> str:
    """`address` with its domain as people write it, for listings."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    return f"{local}@{u_label(domain)}"
