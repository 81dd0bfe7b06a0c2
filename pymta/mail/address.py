"""Parsing and qualifying mail addresses: RFC 5322 §3.4 address lists, lenient with obsolete forms.

`sendmail` imports this module on every cron job, so it imports nothing but `errors`: a small hand-rolled
scanner stands in for `re` and `email`. Main invariant: every `Mailbox` records where its addr-spec sits in
the text it came from, so callers can qualify a bare local part in place without touching any other character.
"""

from pymta.errors import AddressError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

# One-character tokens; everything else is an atom, quoted string, domain literal, comment or whitespace.
_SPECIALS = frozenset("<>@,;:.")
# Characters that end an atom. A backslash outside quotes is kept in the atom (lenient: it cannot harm).
_ATOM_ENDS = frozenset('<>@,;:."()[] \t\r\n')
_WHITESPACE = " \t"
# Token kinds that can make up a local part or a domain (the rest are specials).
_WORD = "word"  # atom or quoted string
_LITERAL = "literal"  # [domain literal]
# How many characters of an offending text an error message shows.
_EXCERPT_LIMIT = 100
# Octets of a reverse-path or forward-path, with its <>: the most SMTP carries (RFC 5321 4.5.3.1.3).
# Who is told of a double bounce when the admin cannot be (RFC 5321 4.5.1: every host has a postmaster; a
# bare local name, so aliases decide whose mailbox it is: root's, or in user mode the user's own).
POSTMASTER = "postmaster"
MAX_PATH = 256


class Mailbox:
    """One address from an address list: the addr-spec as written and where it sits in the parsed text."""

    __slots__ = ("addr", "display", "start", "end")

    def __init__(self, addr: str, display: str, start: int, end: int) -> None:
        self.addr = addr  # the addr-spec without comments and whitespace, quoting as written; "" for <>
        self.display = display  # the display name as written (quotes, encoded words kept), or ""
        self.start = start  # text[start:end] is the addr-spec as it appears in the text
        self.end = end

    def __repr__(self) -> str:
        return f"Mailbox(addr={self.addr!r}, display={self.display!r}, start={self.start}, end={self.end})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mailbox):
            return NotImplemented
        return self._key() == other._key()

    def _key(self) -> tuple[str, str, int, int]:
        return (self.addr, self.display, self.start, self.end)

    def __hash__(self) -> int:
        return hash(self._key())


class _Token:
    """A lexical unit of an address list with its position; `control` marks C0/DEL characters inside it."""

    __slots__ = ("kind", "text", "start", "end", "control")

    def __init__(self, kind: str, text: str, start: int, end: int) -> None:
        self.kind = kind
        self.text = text
        self.start = start
        self.end = end
        self.control = has_control(text, tab=True)


def excerpt(text: str) -> str:
    """`text` as one printable line in double quotes for an error message: controls and raw bytes escaped."""
    shown = []
    for char in text[:_EXCERPT_LIMIT]:
        code = ord(char)
        if is_control(char):
            shown.append({"\r": "\\r", "\n": "\\n", "\t": "\\t"}.get(char, f"\\x{code:02x}"))
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            shown.append(f"\\x{code - 0xDC00:02x}")
        else:
            shown.append(char)
    more = "..." if len(text) > _EXCERPT_LIMIT else ""
    return '"' + "".join(shown) + more + '"'


def is_control(char: str) -> bool:
    """Whether `char` is a C0 control character or DEL: what no address, name or path that ends up in a
    header, an SMTP command, a message or a log line may hold (header injection)."""
    return char < " " or char == "\x7f"


def has_control(text: str, *, tab: bool = False) -> bool:
    """Whether `text` holds a control character (`is_control`); with `tab`, a TAB is allowed."""
    return any(is_control(char) and not (tab and char == "\t") for char in text)


def _after_line_break(text: str, position: int) -> int:
    """Skip the CRLF of folding whitespace at `position`; any other CR or LF is refused (header injection)."""
    if text.startswith("\r\n", position) and text[position + 2 : position + 3] in (" ", "\t"):
        return position + 2
    raise AddressError(f"line break that is not folding whitespace in {excerpt(text)}")


def _closing(text: str, position: int, opener: str, closer: str, what: str) -> int:
    """The index after the `closer` that ends the construct opened at `position`; only comments nest."""
    nests = opener == "("
    depth = 1
    index = position + 1
    length = len(text)
    while index < length:
        char = text[index]
        if char == "\\":
            if text[index + 1 : index + 2] in ("\r", "\n"):
                _after_line_break(text, index + 1)  # an escaped line break is still a line break
            index += 2
            continue
        if char in "\r\n":
            index = _after_line_break(text, index)
            continue
        if char == closer:
            depth -= 1
            if depth == 0:
                return index + 1
        elif nests and char == opener:
            depth += 1
        index += 1
    raise AddressError(f"unterminated {what} in {excerpt(text)}")


def _tokenize(text: str) -> list[_Token]:
    """Split `text` into words, domain literals and specials; comments and folding whitespace are dropped."""
    tokens: list[_Token] = []
    index = 0
    length = len(text)
    while index < length:
        char = text[index]
        if char in _WHITESPACE:
            index += 1
        elif char in "\r\n":
            index = _after_line_break(text, index)
        elif char == "(":
            index = _closing(text, index, "(", ")", "comment")
        elif char == '"':
            end = _closing(text, index, '"', '"', "quoted string")
            tokens.append(_Token(_WORD, text[index:end], index, end))
            index = end
        elif char == "[":
            end = _closing(text, index, "[", "]", "domain literal")
            tokens.append(_Token(_LITERAL, text[index:end], index, end))
            index = end
        elif char in _SPECIALS:
            tokens.append(_Token(char, char, index, index + 1))
            index += 1
        elif char in ")]":
            raise AddressError(f"unbalanced '{char}' in {excerpt(text)}")
        else:
            end = index + 1
            while end < length and text[end] not in _ATOM_ENDS:
                end += 1
            tokens.append(_Token(_WORD, text[index:end], index, end))
            index = end
    return tokens


def parse_list(text: str) -> list[Mailbox]:
    """The mailboxes of an address list (a To/Cc/Bcc value or a recipient argument), groups flattened.

    Empty members and a stray ';' are skipped; a bare word is a local part. Raises AddressError for what
    cannot be an address.
    """
    tokens = _tokenize(text)
    mailboxes: list[Mailbox] = []
    index = 0
    while index < len(tokens):
        if tokens[index].kind in (",", ";"):  # an empty member, or ';' used as a separator (Outlook habit)
            index += 1
            continue
        index = _parse_address(text, tokens, index, mailboxes, in_group=False)
    return mailboxes


def _parse_address(
    text: str, tokens: list[_Token], index: int, into: list[Mailbox], *, in_group: bool
) -> int:
    """Parse one address (mailbox or group) starting at tokens[index]; return the index of what follows it."""
    end = index
    while end < len(tokens) and tokens[end].kind not in ("<", ":", ",", ";", ">"):
        end += 1
    stop = tokens[end].kind if end < len(tokens) else ""
    if stop == "<":
        display = text[tokens[index].start : tokens[end - 1].end] if end > index else ""
        end = _parse_angle_addr(text, tokens, end, display, into)
        if end < len(tokens) and tokens[end].kind not in (",", ";"):
            raise AddressError(f"unexpected {excerpt(tokens[end].text)} after an address in {excerpt(text)}")
        return end
    if stop == ":":
        if in_group:
            raise AddressError(f"a group inside a group in {excerpt(text)}")
        return _parse_group(text, tokens, end + 1, into)
    if stop == ">":
        raise AddressError(f"'>' without '<' in {excerpt(text)}")
    into.append(_addr_spec(text, tokens, index, end, display=""))
    return end


def _parse_group(text: str, tokens: list[_Token], index: int, into: list[Mailbox]) -> int:
    """Parse the members of a group after its ':'; a missing final ';' is tolerated, as getaddresses does."""
    while index < len(tokens):
        kind = tokens[index].kind
        if kind == ";":
            return index + 1
        if kind == ",":
            index += 1
            continue
        index = _parse_address(text, tokens, index, into, in_group=True)
    return index


def _parse_angle_addr(text: str, tokens: list[_Token], index: int, display: str, into: list[Mailbox]) -> int:
    """Parse `<[route:]addr-spec>` starting at the '<'; the obsolete source route is dropped."""
    first = index + 1
    close = first
    while close < len(tokens) and tokens[close].kind != ">":
        if tokens[close].kind in ("<", ";"):
            raise AddressError(f"unexpected '{tokens[close].kind}' inside <...> in {excerpt(text)}")
        close += 1
    if close == len(tokens):
        raise AddressError(f"unterminated '<' in {excerpt(text)}")
    if first < close and tokens[first].kind == "@":  # obs-route: @a,@b:local@domain
        colon = first
        while colon < close and tokens[colon].kind != ":":
            colon += 1
        if colon == close:
            raise AddressError(f"source route without ':' in {excerpt(text)}")
        first = colon + 1
    if first == close:
        position = tokens[close].start
        into.append(Mailbox("", display, position, position))
    else:
        for token in tokens[first:close]:
            if token.kind in (",", ":"):
                raise AddressError(f"unexpected '{token.kind}' inside <...> in {excerpt(text)}")
        into.append(_addr_spec(text, tokens, first, close, display=display))
    return close + 1


def _addr_spec(text: str, tokens: list[_Token], first: int, end: int, *, display: str) -> Mailbox:
    """Check tokens[first:end] form `local-part[@domain]` and make the Mailbox; extra dots are tolerated."""
    span = tokens[first:end]
    written = text[span[0].start : span[-1].end]
    at_signs = [position for position, token in enumerate(span) if token.kind == "@"]
    if len(at_signs) > 1:
        raise AddressError(f"more than one '@' in {excerpt(written)}")
    if not at_signs and any(one.kind == two.kind == _WORD for one, two in zip(span, span[1:], strict=False)):
        raise AddressError(f"no address in {excerpt(written)}: several words, no '@' and no <...>")
    local = span[: at_signs[0]] if at_signs else span
    problem = _dotted_words_problem(local, "local part", allow_literal=False)
    if not problem and at_signs:
        problem = _dotted_words_problem(span[at_signs[0] + 1 :], "domain", allow_literal=True)
    if problem:
        raise AddressError(f"not an address: {excerpt(written)} ({problem})")
    if any(token.control for token in span):
        raise AddressError(f"control character in the address {excerpt(written)}")
    return Mailbox("".join(token.text for token in span), display, span[0].start, span[-1].end)


def _dotted_words_problem(tokens: list[_Token], part: str, *, allow_literal: bool) -> str:
    """What is wrong with `tokens` as `word *("." word)` or one domain literal; "" when nothing is."""
    if allow_literal and len(tokens) == 1 and tokens[0].kind == _LITERAL:
        return ""
    previous = ""
    words = 0
    for token in tokens:
        if token.kind == _WORD:
            if previous == _WORD:
                return f"a space inside the {part}: a missing comma?"
            if allow_literal and token.text.startswith('"'):
                return "a quoted string is no domain"
            words += 1
        elif token.kind != ".":
            return f"unexpected {excerpt(token.text)} in the {part}"
        previous = token.kind
    return "" if words else f"empty {part}"


def is_local_part_only(addr: str) -> bool:
    """True when `addr` is a non-empty addr-spec without a domain (no '@' outside a quoted local part)."""
    quoted = False
    escaped = False
    for char in addr:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "@" and not quoted:
            return False
    return addr != ""


def qualify(addr: str, domain: str) -> str:
    """`addr` with `@domain` added when it is a bare local part; <> and an empty domain change nothing."""
    if domain and is_local_part_only(addr):
        return f"{addr}@{domain}"
    return addr


def recipient_addrs(mailboxes: "Iterable[Mailbox]", source: str) -> list[str]:
    """The addr-specs of `mailboxes` as envelope recipients; refuses <>, bytes that are not UTF-8 and
    paths SMTP cannot carry."""
    addrs = []
    for mailbox in mailboxes:
        if not mailbox.addr:
            raise AddressError(f"the null address <> cannot be a recipient (in {excerpt(source)})")
        if has_raw_bytes(mailbox.addr):
            raise AddressError(f"the address {excerpt(mailbox.addr)} is not valid UTF-8")
        _check_path_length(mailbox.addr, "recipient")
        addrs.append(mailbox.addr)
    return addrs


def path_octets(addr: str) -> int:
    """The octets of `addr` as an SMTP path: its UTF-8 with the enclosing <>."""
    return len(addr.encode("utf-8", "surrogatepass")) + 2


def _check_path_length(addr: str, role: str) -> None:
    octets = path_octets(addr)
    if octets > MAX_PATH:
        raise AddressError(
            f"the {role} {excerpt(addr)} is {octets} octets long as an SMTP path; SMTP carries at most"
            f" {MAX_PATH} octets (RFC 5321 4.5.3.1.3): use a shorter address"
        )


def has_raw_bytes(text: str) -> bool:
    """True when `text` holds bytes that were not UTF-8 (decoded with surrogateescape)."""
    return any(0xDC80 <= ord(char) <= 0xDCFF for char in text)


def unique_addresses(addrs: "Iterable[str]") -> list[str]:
    """`addrs` in order without repeats; addresses differing only in case count as the same."""
    seen: set[str] = set()
    unique = []
    for addr in addrs:
        key = addr.lower()
        if key not in seen:
            seen.add(key)
            unique.append(addr)
    return unique


def parse_envelope_address(text: str) -> str:
    """The addr-spec of a `-f`/`-r` value: '' and '<>' give the null sender "", `Name <a@x>` gives a@x.

    When the value holds several addresses the first one wins (Postfix does that). Control characters anywhere
    are refused: an envelope address ends up in SMTP commands and in generated headers.
    """
    if has_control(text):
        raise AddressError(f"the sender {excerpt(text)} contains a control character (header injection?)")
    if has_raw_bytes(text):
        raise AddressError(f"the sender {excerpt(text)} is not valid UTF-8")
    stripped = text.strip(" ")
    if stripped in ("", "<>"):
        return ""
    mailboxes = parse_list(stripped)
    if not mailboxes:
        raise AddressError(f"no address in the sender {excerpt(text)}")
    _check_path_length(mailboxes[0].addr, "sender")
    return mailboxes[0].addr


def recipients_from_args(args: list[str]) -> list[str]:
    """The recipients named on the command line, in order, without repeats.

    Each argument is read as an address list: Debian cron passes `a@x,b@y` as one word, and Postfix reads argv
    recipients as RFC 822 text so `Name <a@x>` works too. An argument with no address at all is skipped.
    """
    addrs: list[str] = []
    for arg in args:
        if "\r" in arg or "\n" in arg:
            raise AddressError(f"the recipient {excerpt(arg)} contains a line break (header injection?)")
        addrs.extend(recipient_addrs(parse_list(arg), arg))
    return unique_addresses(addrs)
