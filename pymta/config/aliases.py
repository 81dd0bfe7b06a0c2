"""The aliases file (aliases(5), `/etc/aliases` by default): its format, and reading it into `Aliases`.

Where a local name goes (expansion, loops, `:include:` files, `newaliases`'s checks) is
`pymta.config.expansion`; how an include file is opened with its owner's rights, `pymta.config.include`.

Format, as sendmail and Postfix read it:

    # a comment (only at the start of a line)
    root: admin, me@example.org          name: targets, comma-separated
    staff: alice,
        bob                              a line starting with whitespace continues the entry
    "sales team": alice                  a name may be quoted
    lists: :include:/etc/mail/lists      a file of addresses, one per line or comma-separated
    postmaster: \\root                   a backslash delivers to the local user without more aliasing

Names are local parts and match case-insensitively. A target is a local name (expanded again), an address
with a domain, or `:include:/absolute/path`. `|program` and `/file` targets are refused with a warning:
pymta never runs a program or writes a file because an aliases file says so (the flush sends their mail to
the admin instead, see `pymta.config.expansion`). When a name is defined twice
the first definition is used (Postfix does the same) and the second is reported.

Nothing is ever quoted from an aliases or include file in a problem, a log line, a queue listing or a
bounce: problems name the file, the line and what is wrong ("line 3 of FILE: a target cannot be read as an
address"). Only what the file means (alias names, recipients) travels on.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Mapping

from pymta.errors import AddressError, ConfigError
from pymta.fsutil import READ_FLAGS, read_all
from pymta.mail.address import has_control, has_raw_bytes, is_local_part_only, parse_list
from pymta.records import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    TargetKind = Literal["local", "address", "include", "refused"]
    Severity = Literal["error", "warning"]
    UnhonouredKind = Literal["program", "file"]


@record(frozen=True, slots=True)
class Problem:
    """Something wrong in an aliases or include file, with where it is.

    `error`: something written in the file is not used (a malformed entry, a refused program or file target,
    a second definition). `warning`: it is used, but probably not as meant (a loop, an unknown user).
    The message never quotes the file's text (see the module docstring).
    """

    line: int
    message: str
    severity: Severity = "error"
    include: str | None = None  # the include file the line is in; None: the aliases file itself

    def __str__(self) -> str:
        where = f"line {self.line}" if self.include is None else f"line {self.line} of {self.include}"
        return f"{where}: {self.message}"


@record(frozen=True, slots=True)
class Target:
    """One target of an alias as written, classified."""

    kind: TargetKind
    value: str  # local: the name; address: the addr-spec; include: the path; refused: the text as written
    line: int
    include: str | None = None  # the include file it was read from
    expand: bool = True  # local only: False for `\\name` (deliver without more aliasing)
    reason: str = ""  # refused only: why, without the text
    unhonoured: UnhonouredKind | None = None  # refused only: a program or file target (sent to the admin)


@record(frozen=True, slots=True)
class Alias:
    """One entry of the aliases file."""

    name: str  # as written (unquoted)
    targets: tuple[Target, ...]
    line: int


@record(frozen=True, slots=True)
class Aliases:
    """A parsed aliases file: entries by lower-cased name, and what was wrong with the file."""

    entries: Mapping[str, Alias] = field(default_factory=dict)
    source: str | None = None  # the file read; None when parsed from text or when there was none
    problems: tuple[Problem, ...] = ()
    owner: int | None = None  # the file's owner (uid); None when parsed from text

    def get(self, name: str) -> Alias | None:
        """The alias called `name` (any case), or None."""
        return self.entries.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.entries

    def __len__(self) -> int:
        return len(self.entries)


# --- Reading ---


def load(path: str) -> Aliases:
    """The aliases in the file at `path`; a missing file means no aliases.

    Raises ConfigError when the file exists but cannot be used (unreadable, not a file, writable by everyone).
    """
    try:
        fd = os.open(path, READ_FLAGS)
    except FileNotFoundError:
        return Aliases(source=path)
    except OSError as error:
        raise _unreadable(path, error) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"the aliases file {path} is not a regular file; point aliases: at a file")
        if info.st_mode & stat.S_IWOTH:
            raise ConfigError(
                f"the aliases file {path} is writable by everyone, so anyone could redirect mail;"
                f" fix it with chmod o-w {path}"
            )
        data = read_all(fd, info.st_size)
    except OSError as error:
        raise _unreadable(path, error) from None
    finally:
        os.close(fd)
    aliases = parse(data.decode("utf-8", "surrogateescape"))
    return Aliases(aliases.entries, path, aliases.problems, info.st_uid)


def _unreadable(path: str, error: OSError) -> ConfigError:
    return ConfigError(
        f"cannot read the aliases file {path}: {error.strerror or error}; make it readable by the user"
        f" that runs the flush (chmod 644 {path}) or point aliases: in pymta.yaml at another file"
    )


def parse(text: str) -> Aliases:
    """The aliases in `text` (the content of an aliases file); problems are collected, not raised."""
    problems: list[Problem] = []
    entries: dict[str, Alias] = {}
    for first_line, pieces in _logical_entries(text, problems):
        alias = _parse_entry(first_line, pieces, problems)
        if alias is None:
            continue
        key = alias.name.lower()
        if key in entries:
            problems.append(
                Problem(
                    first_line,
                    f"{alias.name} is defined again (first on line {entries[key].line}, which is used);"
                    " merge the two entries",
                )
            )
            continue
        entries[key] = alias
    return Aliases(entries, None, tuple(problems))


def _logical_entries(text: str, problems: list[Problem]) -> list[tuple[int, list[tuple[int, str]]]]:
    """The entries of the file: (first line number, [(line number, text)...]) joining continuation lines.

    Blank lines and lines whose first non-blank character is '#' are skipped, even inside a continued entry.
    """
    entries: list[tuple[int, list[tuple[int, str]]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if not entries:
                problems.append(Problem(number, "a continuation line with no alias before it"))
                continue
            entries[-1][1].append((number, line))
        else:
            entries.append((number, [(number, line)]))
    return entries


def _parse_entry(first_line: int, pieces: list[tuple[int, str]], problems: list[Problem]) -> Alias | None:
    """One entry: `name: target, target...` spread over `pieces` (its physical lines)."""
    head = pieces[0][1]
    name, rest = _split_name(head)
    if name is None:
        problems.append(Problem(first_line, "the line cannot be read as an alias: no ':' after the name"))
        return None
    problem = _name_problem(name)
    if problem:
        problems.append(Problem(first_line, problem))
        return None
    targets: list[Target] = []
    for number, text in [(first_line, rest), *pieces[1:]]:
        for item in split_targets(text):
            targets.append(classify(item, number, None))
    # Each of the entry's lines is its own; only a line naming two refused targets can repeat a problem.
    problems.extend(dict.fromkeys(Problem(t.line, t.reason) for t in targets if t.kind == "refused"))
    if not targets:
        problems.append(Problem(first_line, f"{name} has no targets; name at least one address"))
        return None
    return Alias(name, tuple(targets), first_line)


def _split_name(line: str) -> tuple[str | None, str]:
    """(name, the rest after the colon); name None when there is no colon. A quoted name is unquoted."""
    if line.startswith('"'):
        index = 1
        chars = []
        while index < len(line) and line[index] != '"':
            if line[index] == "\\" and index + 1 < len(line):
                index += 1
            chars.append(line[index])
            index += 1
        rest = line[index + 1 :].lstrip()
        if index >= len(line) or not rest.startswith(":"):
            return None, ""
        return "".join(chars), rest[1:]
    name, colon, rest = line.partition(":")
    if not colon:
        return None, ""
    return name.strip(), rest


def _name_problem(name: str) -> str:
    """What is wrong with `name` as an alias name; "" when nothing is. The name itself is not quoted: it is
    text that could not be used."""
    if not name:
        return "an alias with an empty name"
    if has_control(name):
        return "the alias name holds a control character"
    if has_raw_bytes(name):
        return "the alias name is not valid UTF-8"
    if "@" in name:
        return "the alias name has a domain; alias names are local parts: write only the part before the @"
    return ""


def split_targets(text: str) -> list[str]:
    """`text` split at commas that are outside quotes, <...> and (comments); items stripped, empty dropped."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    depth = 0  # inside (comments) or <...>
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            current.append(text[index : index + 2])
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "(<":
            depth += 1
        elif not quoted and char in ")>" and depth:
            depth -= 1
        elif char == "," and not quoted and not depth:
            items.append("".join(current))
            current = []
            index += 1
            continue
        current.append(char)
        index += 1
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


# Why a target is refused: said without its text (the module docstring).
PROGRAM_REFUSED = "a |program target is not honoured: pymta never runs programs from aliases"
FILE_REFUSED = "a /file target is not honoured: pymta never writes files from aliases"


def classify(item: str, line: int, include: str | None) -> Target:
    """One target as written (already split from its neighbours) as a Target."""
    inner = item[1:-1] if len(item) >= 2 and item[0] == item[-1] == '"' else item
    if inner.startswith("|"):
        return _refused(item, line, include, PROGRAM_REFUSED, "program")
    if inner.startswith("/"):
        return _refused(item, line, include, FILE_REFUSED, "file")
    if item.lower().startswith(":include:"):
        path = item[len(":include:") :].strip()
        if has_control(path):  # it is shown in messages and logs
            return _refused(item, line, include, "an :include: target holds a control character")
        if not os.path.isabs(path):
            return _refused(
                item, line, include, "an :include: target names no absolute path; write /the/path"
            )
        return Target("include", path, line, include)
    if item.startswith("\\"):
        name = item[1:].strip()
        if not name or not _is_plain_name(name):
            return _refused(item, line, include, "a \\name target cannot be read as a local user name")
        return Target("local", name, line, include, expand=False)
    head = item.split(":", 1)[0]
    if ":" in item and head and all(char.isalnum() or char in "-_." for char in head):
        return _refused(item, line, include, "a 'word:' target (such as error:) is not supported")
    try:
        mailboxes = parse_list(item)
    except AddressError:
        return _refused(item, line, include, "a target cannot be read as an address")
    if len(mailboxes) != 1 or not mailboxes[0].addr:
        return _refused(item, line, include, "a target cannot be read as one address")
    addr = mailboxes[0].addr
    if is_local_part_only(addr):
        name = addr[1:-1] if len(addr) >= 2 and addr[0] == addr[-1] == '"' else addr
        return Target("local", name, line, include)
    return Target("address", addr, line, include)


def _refused(
    item: str, line: int, include: str | None, reason: str, unhonoured: UnhonouredKind | None = None
) -> Target:
    return Target("refused", item, line, include, reason=reason, unhonoured=unhonoured)


def _is_plain_name(name: str) -> bool:
    return all(char.isalnum() or char in "._-+" for char in name)


def is_user(name: str) -> bool:
    """Whether the local name has an account, so a mailbox (in lower case too, as local delivery looks)."""
    try:
        pwd.getpwnam(name)
    except (KeyError, ValueError):
        try:
            pwd.getpwnam(name.lower())
        except (KeyError, ValueError):
            return False
    return True
