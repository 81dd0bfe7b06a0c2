"""The AUTH dialogues (PLAIN, LOGIN, CRAM-MD5, XOAUTH2, OAUTHBEARER) and which mechanism `auth:` picks.

AUTH is sent only over TLS, unless the smarthost says `auth_plaintext: true` (the session checks that
before it gets here). The secret travels as `credentials.Secret` and appears in no exception, log line or
repr: the dialogues are never logged, and every reply they read is scrubbed of what was sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable, Sequence

from pymta.delivery.smtp.replies import Client, format_reply

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.config.model import Smarthost
    from pymta.delivery.credentials import Secret

# The mechanisms `auth: auto` tries, in order, among those the server offers. Over TLS: PLAIN (one round
# trip, UTF-8 by RFC 4616), LOGIN (old Exchange), CRAM-MD5 (obsolete). Without TLS (only with
# auth_plaintext) CRAM-MD5 comes first: it is the one that does not put the password on the wire.
# XOAUTH2 and OAUTHBEARER need a token, not a password, so they are used only when named.
AUTO_MECHANISMS_TLS: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")
AUTO_MECHANISMS_PLAINTEXT: tuple[str, ...] = ("CRAM-MD5", "PLAIN", "LOGIN")
MECHANISMS: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "OAUTHBEARER")


def choose(wanted: str, offered: Sequence[str], encrypted: bool) -> str:
    """The mechanism to use: `wanted` (`auth:`, upper case) when the server offers it, or for "AUTO" the
    first of the automatic order that it offers. Raises ValueError with the reason and its fix."""
    if wanted != "AUTO":
        if wanted not in MECHANISMS:
            raise ValueError(f"unknown auth mechanism {wanted}; use one of {', '.join(MECHANISMS)}")
        if wanted not in offered:
            raise ValueError(
                f"auth: {wanted.lower()} is configured but the server offers only {' '.join(offered)}; "
                "choose one of those, or auth: auto"
            )
        return wanted
    order = AUTO_MECHANISMS_TLS if encrypted else AUTO_MECHANISMS_PLAINTEXT
    for mechanism in order:
        if mechanism in offered:
            return mechanism
    raise ValueError(
        f"the server offers AUTH {' '.join(offered)}, none of which pymta chooses by itself "
        f"({', '.join(order)}); for an OAuth2 token set auth: xoauth2 or oauthbearer"
    )


def scrub(text: str, sent: Sequence[str]) -> str:
    """`text` with everything in `sent` (what AUTH put on the wire) starred out."""
    for secret in sent:
        text = text.replace(secret, "********")
    return text


class Dialogue:
    """One AUTH exchange on `client`; each mechanism's method returns the final (code, scrubbed reply).
    What goes on the wire that holds the secret is appended to `sent`, for scrubbing."""

    def __init__(self, client: Client, smarthost: Smarthost, sent: list[str]) -> None:
        self.client = client
        self.smarthost = smarthost
        self.sent = sent

    def command(self, line: str) -> tuple[int, str, bytes]:
        """One AUTH step: send `line` (never logged), read the reply; (code, scrubbed reply, raw text)."""
        self.client.putcmd(line)
        code, message = self.client.getreply()
        return code, scrub(format_reply(code, message), self.sent), message

    def plain(self, username: str, secret: Secret) -> tuple[int, str]:
        response = _b64(f"\0{username}\0{secret.reveal()}")
        self.sent.append(response)
        code, reply, _ = self.command(f"AUTH PLAIN {response}")
        if code == 334:  # a server that ignores the initial response asks again
            code, reply, _ = self.command(response)
        return code, reply

    def login(self, username: str, secret: Secret) -> tuple[int, str]:
        password = _b64(secret.reveal())
        self.sent.append(password)
        code, reply, _ = self.command("AUTH LOGIN")
        if code == 334:
            code, reply, _ = self.command(_b64(username))
        if code == 334:
            code, reply, _ = self.command(password)
        return code, reply

    def cram_md5(self, username: str, secret: Secret) -> tuple[int, str]:
        code, reply, challenge = self.command("AUTH CRAM-MD5")
        if code != 334:
            return code, reply
        try:
            nonce = base64.b64decode(challenge, validate=True)
        except binascii.Error:
            code, reply, _ = self.command("*")
            return code, reply
        digest = hmac.new(secret.reveal().encode("utf-8"), nonce, hashlib.md5).hexdigest()
        code, reply, _ = self.command(_b64(f"{username} {digest}"))
        return code, reply

    def xoauth2(self, username: str, secret: Secret) -> tuple[int, str]:
        response = _b64(f"user={username}\x01auth=Bearer {secret.reveal()}\x01\x01")
        self.sent.append(response)
        code, reply, error = self.command(f"AUTH XOAUTH2 {response}")
        if code == 334:  # the error comes as a base64 JSON challenge; an empty line fetches the final reply
            detail = _oauth_error(error)
            code, reply, _ = self.command("")
            reply = f"{reply} ({detail})" if detail else reply
        return code, reply

    def oauthbearer(self, username: str, secret: Secret) -> tuple[int, str]:
        authzid = username.replace("=", "=3D").replace(",", "=2C")
        host, port = self.smarthost.host, self.smarthost.port
        response = _b64(
            f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {secret.reveal()}\x01\x01"
        )
        self.sent.append(response)
        code, reply, error = self.command(f"AUTH OAUTHBEARER {response}")
        if code == 334:  # RFC 7628 3.2.3: answer the error challenge with a lone ^A
            detail = _oauth_error(error)
            code, reply, _ = self.command(_b64("\x01"))
            reply = f"{reply} ({detail})" if detail else reply
        return code, reply


DIALOGUES: dict[str, Callable[[Dialogue, str, Secret], tuple[int, str]]] = {
    "PLAIN": Dialogue.plain,
    "LOGIN": Dialogue.login,
    "CRAM-MD5": Dialogue.cram_md5,
    "XOAUTH2": Dialogue.xoauth2,
    "OAUTHBEARER": Dialogue.oauthbearer,
}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _oauth_error(challenge: bytes) -> str:
    """The status in an XOAUTH2/OAUTHBEARER error challenge (base64 JSON), e.g. "status 401"."""
    try:
        data = json.loads(base64.b64decode(challenge, validate=True))
    except (binascii.Error, ValueError):
        return ""
    if not isinstance(data, dict):
        return ""
    status = data.get("status")
    return f"token rejected, status {status}; the token may have expired" if status else ""
