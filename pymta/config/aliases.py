"""The aliases file (aliases(5), `/etc/aliases` by default): reading it, checking it, expanding a local name.

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
the admin instead, see below). When a name is defined twice
the first definition is used (Postfix does the same) and the second is reported.

Expansion rules (`expand`):
- A name that is no alias is a local user: `expand(aliases, "bob")` is `["bob"]`.
- A self-reference (`root: root, me@example.org`) delivers to the local user root as well (sendmail).
- A loop (`root: admin`, `admin: root`) is reported, and the name the loop comes back to is delivered to
  as a local user: expanding root gives `["root"]`. Nothing is lost: mail reaches that user's mailbox, or,
  when there is no such user, bounces to the sender with that reason, while the warning tells the admin why.
- An alias whose targets are all unusable (refused, unreadable include, empty) and none a program or a
  file is delivered to as a local user too, with a warning, for the same reason.
- Nesting stops after `MAX_DEPTH` aliases (sendmail's MaxAliasRecursion); includes after `MAX_INCLUDE_DEPTH`
  files. The name where expansion stops is treated as a local user, with a warning.
- `postmaster` always works (RFC 5321 4.5.1): with no alias and no account of that name it is an alias of
  root.
- A `|program` or `/file` target is not honoured, but it is not lost either: the expansion lists it as
  *unhonoured*, and the flush sends a copy of the mail to the admin (or postmaster) saying which line it was.

Include files are read when an alias is expanded (as sendmail does: an edit takes effect at once), never
through a symlink as the last part of the path, only when they are regular files no bigger than
`MAX_INCLUDE_SIZE` that not everyone may write.

Include files are read with the rights of their owner (as Postfix's local(8) does), the include rule:
- A file named by the aliases file (root's) and owned by root, or by the user running pymta, is read with
  the flush's own rights. A file owned by anybody else is read with that user's rights, and so is every
  file it includes, however deep: rights only ever go down, never up.
- pymta cannot become that user (the delivery process runs as `pymta`), so it checks what the kernel
  would: every directory on the path must be searchable by that user and the file readable, by owner,
  group and other mode bits (not ACLs). It opens the path one component at a time from "/" and checks the
  directory or file it actually opened, so nothing can be swapped between the check and the read.
- A directory or symbolic link on the way that belongs to such a user hands the rest of the way to that
  user's rights too: they could have put anything below it. A directory that everyone may write, without
  the sticky bit, is refused.
- A file whose owner gives the rights must have exactly one link: with a second one, its owner need not be
  whoever put it where it is named.
So a user to whom the admin delegated a list can include only what that user could read anyway.

Nothing is ever quoted from an aliases or include file in a problem, a log line, a queue listing or a
bounce: problems name the file, the line and what is wrong ("line 3 of FILE: a target cannot be read as an
address"). Only what the file means (alias names, recipients) travels on.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pymta.errors import AddressError, ConfigError
from pymta.mail.address import is_local_part_only, parse_list
from pymta.queue.directory import read_all as _read_all

# How many aliases deep an expansion may go: sendmail's MaxAliasRecursion default.
MAX_DEPTH = 10
# How many :include: files deep: a file including a file including ... is a mistake long before this.
MAX_INCLUDE_DEPTH = 5
# Bytes: an include file is a list of addresses; a bigger one is not what the admin meant to include.
MAX_INCLUDE_SIZE = 1024 * 1024
# Symbolic links followed on the way to one include file: Linux's own limit (MAXSYMLINKS).
MAX_SYMLINKS = 40
# Where the mail of a `postmaster` with no alias and no account goes (RFC 5321 4.5.1: it must work).
POSTMASTER_ALIAS = "root"

TargetKind = Literal["local", "address", "include", "refused"]
Severity = Literal["error", "warning"]
UnhonouredKind = Literal["program", "file"]

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
# A directory on the way to an include file is opened only to look up the next name in it.
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
_SEARCH, _READ = 0o1, 0o4  # the x and r mode bits


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Target:
    """One target of an alias as written, classified."""

    kind: TargetKind
    value: str  # local: the name; address: the addr-spec; include: the path; refused: the text as written
    line: int
    include: str | None = None  # the include file it was read from
    expand: bool = True  # local only: False for `\\name` (deliver without more aliasing)
    reason: str = ""  # refused only: why, without the text
    unhonoured: UnhonouredKind | None = None  # refused only: a program or file target (sent to the admin)


@dataclass(frozen=True, slots=True)
class Alias:
    """One entry of the aliases file."""

    name: str  # as written (unquoted)
    targets: tuple[Target, ...]
    line: int


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Unhonoured:
    """A `|program` or `/file` target met while expanding an alias: pymta does not run or write it, and the
    flush sends the mail to the admin instead, with `header()` saying where the target was written."""

    kind: UnhonouredKind
    alias: str  # the alias whose expansion met it
    line: int
    file: str  # the aliases file or the include file it is written in

    def __str__(self) -> str:
        what = "|program" if self.kind == "program" else "/file"
        return f"{what} target of {self.alias} (line {self.line} of {self.file})"


# The header that names, in the admin's copy, a target that was not honoured (pymta.yaml(5)).
UNHONOURED_HEADER = "X-Pymta-Unhonoured"
# At most this many such headers in one copy; the rest are counted in the last.
MAX_UNHONOURED_HEADERS = 20


def unhonoured_header(items: Iterable[Unhonoured]) -> bytes:
    """The X-Pymta-Unhonoured header fields (CRLF-terminated, ASCII) naming `items`, one each."""
    found = list(items)
    lines = []
    for item in found[:MAX_UNHONOURED_HEADERS]:
        text = "".join(char if " " <= char < "\x7f" else "?" for char in str(item))
        lines.append(f"{UNHONOURED_HEADER}: {text}\r\n")
    if len(found) > MAX_UNHONOURED_HEADERS:
        lines.append(f"{UNHONOURED_HEADER}: and {len(found) - MAX_UNHONOURED_HEADERS} more\r\n")
    return "".join(lines).encode("ascii")


@dataclass(frozen=True, slots=True)
class Expansion:
    """Where mail for one local name goes (`resolve`)."""

    targets: list[str]  # bare local user names and addresses with a domain, unique ignoring case
    warnings: list[str]  # what is wrong on the way, each naming its file and line
    own: set[str]  # targets (lower case) written as `\\name` or as an alias's own name: their own mailbox
    unhonoured: list[Unhonoured]  # program and file targets met: the admin gets the mail for them


# --- Reading ---


def load(path: str) -> Aliases:
    """The aliases in the file at `path`; a missing file means no aliases.

    Raises ConfigError when the file exists but cannot be used (unreadable, not a file, writable by everyone).
    """
    try:
        fd = os.open(path, _READ_FLAGS)
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
        data = _read_all(fd, info.st_size)
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
        for item in _split_targets(text):
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
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "the alias name holds a control character"
    if any(0xDC80 <= ord(char) <= 0xDCFF for char in name):
        return "the alias name is not valid UTF-8"
    if "@" in name:
        return "the alias name has a domain; alias names are local parts: write only the part before the @"
    return ""


def _split_targets(text: str) -> list[str]:
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
        if any(ord(char) < 32 or ord(char) == 127 for char in path):  # it is shown in messages and logs
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


# --- Whose rights an include file is read with ---


@dataclass(frozen=True, slots=True)
class Reader:
    """A user whose rights an include file is read with (the include rule in the module docstring)."""

    uid: int
    name: str
    groups: frozenset[int]

    def may(self, info: os.stat_result, want: int) -> bool:
        """Whether this user may `want` (_READ, _SEARCH) the file `info` is of, by its mode bits: the owner's
        bits for its owner, else the group's for a member, else the others'."""
        if info.st_uid == self.uid:
            bits = info.st_mode >> 6
        elif info.st_gid in self.groups:
            bits = info.st_mode >> 3
        else:
            bits = info.st_mode
        return bits & want == want


class _RefusedError(Exception):
    """An include file that cannot be used: why, to follow ":include:PATH "."""


def _owner_rights(uid: int) -> Reader | None:
    """The rights a file owned by `uid` gives: None (the flush's own) for root and the user running pymta."""
    if uid in (0, os.geteuid()):
        return None
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise _RefusedError(
            f"belongs to uid {uid}, which has no account, so its rights are unknown"
        ) from None
    return Reader(uid, entry.pw_name, frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid)))


def _refused_for(reader: Reader) -> _RefusedError:
    return _RefusedError(
        f"cannot be read by {reader.name}, whose rights it is read with (an include file is read with the"
        " rights of the user who owns it, the file that includes it, or a directory or link on its way)"
    )


def _open_include(path: str, reader: Reader | None) -> tuple[int, Reader | None]:
    """The include file `path` opened for reading, and the rights its own includes are read with.

    Opens one component at a time from "/", following symbolic links on the way itself (never the last
    one), so that every check is made on exactly what was opened: with the flush's own rights (`reader`
    None), a directory or symbolic link on the way that belongs to another user hands the rest of the way
    to that user's rights (they could have put anything below it); with a user's rights, each directory
    looked up in must be searchable by them, and the file readable. Raises _RefusedError."""
    pending = [part for part in path.split("/") if part not in ("", ".")]
    links = 0
    directory = os.open("/", _DIR_FLAGS)
    try:
        while True:
            reader = _enter_directory(os.fstat(directory), reader)
            if not pending:
                raise _RefusedError("is not a regular file")
            name = pending.pop(0)
            if not pending:
                return _open_last(directory, name, reader)
            try:
                found = os.open(name, _DIR_FLAGS, dir_fd=directory)
            except OSError as error:
                if error.errno != errno.ELOOP:  # without O_PATH a symbolic link fails to open
                    raise _RefusedError(f"cannot be read ({error.strerror})") from None
                found = -1
            if found >= 0:
                info = os.fstat(found)
                if stat.S_ISDIR(info.st_mode):
                    os.close(directory)
                    directory = found
                    continue
                os.close(found)
            else:
                info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if not stat.S_ISLNK(info.st_mode):
                raise _RefusedError(f"cannot be read ({os.strerror(errno.ENOTDIR)})")
            links += 1
            if links > MAX_SYMLINKS:
                raise _RefusedError(f"cannot be read ({os.strerror(errno.ELOOP)})")
            if reader is None:
                reader = _owner_rights(info.st_uid)
            try:
                target = os.readlink(name, dir_fd=directory)
            except OSError as error:
                raise _RefusedError(f"cannot be read ({error.strerror})") from None
            pending[:0] = [part for part in target.split("/") if part not in ("", ".")]
            if target.startswith("/"):
                os.close(directory)
                directory = os.open("/", _DIR_FLAGS)
    finally:
        os.close(directory)


def _enter_directory(info: os.stat_result, reader: Reader | None) -> Reader | None:
    """The rights to go on with inside a directory on an include file's way (`_open_include`); refuses one
    that everyone may write without the sticky bit (anyone could have swapped what lies in it)."""
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise _RefusedError("lies in a directory that everyone may write (chmod o-w, or +t, that directory)")
    if reader is None:
        reader = _owner_rights(info.st_uid)
    if reader is not None and not reader.may(info, _SEARCH):
        raise _refused_for(reader)
    return reader


def _open_last(directory: int, name: str, reader: Reader | None) -> tuple[int, Reader | None]:
    """The last part of an include file's path, opened in `directory` and checked (see _open_include)."""
    try:
        fd = os.open(name, _READ_FLAGS | os.O_NOFOLLOW, dir_fd=directory)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _RefusedError(
                "is a symbolic link, which pymta does not follow: name the real file"
            ) from None
        raise _RefusedError(f"cannot be read ({error.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _RefusedError("is not a regular file")
        if reader is not None:
            if not reader.may(info, _READ):
                raise _refused_for(reader)
        else:
            reader = _owner_rights(info.st_uid)
            if reader is not None and info.st_nlink != 1:
                raise _RefusedError(
                    f"belongs to {reader.name} and has {info.st_nlink} links; a file whose owner's rights"
                    " it is read with must have one link (another could have been made by someone else)"
                )
    except BaseException:
        os.close(fd)
        raise
    return fd, reader


# --- Expanding ---


@dataclass(frozen=True, slots=True)
class _Loop:
    names: tuple[str, ...]  # the chain from the name that is repeated, ending with it again
    line: int  # where the alias the chain starts at is defined


@dataclass(frozen=True, slots=True)
class _Include:
    """What one include file gave, read with some rights: its targets, the rights its own includes are
    read with, the problems met, and the problem that made it unusable (None when it was read)."""

    targets: list[Target]
    reader: Reader | None
    problems: list[Problem]
    unusable: Problem | None


class _Expander:
    """One expansion: targets found, problems met, loops seen. Include files are read once per expander."""

    def __init__(self, aliases: Aliases, local_domains: Iterable[str]) -> None:
        self.aliases = aliases
        self.local_domains = {domain.lower() for domain in local_domains}
        self.targets: list[str] = []
        self.problems: list[Problem] = []
        self.loops: list[_Loop] = []
        self.loop_problems: list[Problem] = []  # the loop warnings among `problems`
        self.locals_seen: list[Target] = []  # local targets that are no alias (for validate)
        self._includes: dict[tuple[int | None, str], _Include] = {}
        self.unusable: list[Problem] = []  # include files that could not be used: the mail must wait
        self.own: set[str] = set()  # names (lower case) written as \name or as their own target
        self.unhonoured: list[Unhonoured] = []
        self.reader: Reader | None = None  # the aliases file's rights: its owner's, unless root or ourselves
        if aliases.owner is not None:
            try:
                self.reader = _owner_rights(aliases.owner)
            except _RefusedError as refused:
                self.unusable.append(Problem(0, f"the aliases file {refused}"))
                self.note(self.unusable[-1])

    def note(self, problem: Problem) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    def local_name(self, target: Target) -> str | None:
        """The local user name `target` stands for, or None when it is an address elsewhere."""
        if target.kind == "local":
            return target.value
        local, _, domain = target.value.rpartition("@")
        if domain.lower() in self.local_domains and is_local_part_only(local):
            return local[1:-1] if len(local) >= 2 and local[0] == local[-1] == '"' else local
        return None

    def expand(self, name: str, chain: list[str], line: int) -> None:
        """Add what `name` expands to; `chain` holds the names (lower case) being expanded around it."""
        alias = self.aliases.get(name)
        if alias is None:
            if name.lower() == "postmaster" and not is_user(name):
                self._postmaster(name, chain)
                return
            self.targets.append(name)
            return
        if len(chain) >= MAX_DEPTH:
            self.note(
                Problem(
                    line,
                    f"aliases nested more than {MAX_DEPTH} deep ({' -> '.join([*chain, name.lower()])});"
                    f" delivering to the local user {name}",
                    "warning",
                )
            )
            self.targets.append(name)
            return
        chain.append(alias.name.lower())
        before = (len(self.targets), len(self.unhonoured))
        self.expand_targets(alias, alias.targets, chain, [], self.reader)
        chain.pop()
        if (len(self.targets), len(self.unhonoured)) == before:
            self.note(
                Problem(
                    alias.line,
                    f"{alias.name} has no usable target; delivering to the local user {name}",
                    "warning",
                )
            )
            self.targets.append(name)

    def _postmaster(self, name: str, chain: list[str]) -> None:
        """`postmaster` with no alias and no account: RFC 5321 4.5.1 says it must work, so it is an alias
        of root (and root's own alias, if any, applies)."""
        if POSTMASTER_ALIAS in chain:  # root's alias led here: root's own mailbox ends it
            self.targets.append(POSTMASTER_ALIAS)
            return
        chain.append(name.lower())
        self.expand(POSTMASTER_ALIAS, chain, 0)
        chain.pop()

    def expand_targets(
        self,
        alias: Alias,
        targets: Iterable[Target],
        chain: list[str],
        includes: list[str],
        reader: Reader | None,
    ) -> None:
        for target in targets:
            if target.kind == "refused":
                self.note(Problem(target.line, target.reason, "error", target.include))
                if target.unhonoured is not None:
                    where = target.include or self.aliases.source or "aliases"
                    found = Unhonoured(target.unhonoured, alias.name, target.line, where)
                    if found not in self.unhonoured:
                        self.unhonoured.append(found)
            elif target.kind == "include":
                self.include(alias, target, chain, includes, reader)
            else:
                local = self.local_name(target)
                if local is None:
                    self.targets.append(target.value)
                elif not target.expand or local.lower() == chain[-1]:
                    self.targets.append(local)  # \name, or a self-reference: the user's own mailbox
                    self.own.add(local.lower())
                    self.locals_seen.append(target)
                elif local.lower() in chain:
                    start = chain.index(local.lower())
                    names = (*chain[start:], local.lower())
                    first = self.aliases.get(names[0])
                    self.loops.append(_Loop(names, first.line if first else target.line))
                    problem = Problem(
                        target.line,
                        f"alias loop {' -> '.join(names)}; delivering to the local user {local}",
                        "warning",
                        target.include,
                    )
                    self.note(problem)
                    self.loop_problems.append(problem)
                    self.targets.append(local)
                else:
                    if local not in self.aliases:
                        self.locals_seen.append(target)
                    self.expand(local, chain, target.line)

    def include(
        self, alias: Alias, target: Target, chain: list[str], includes: list[str], reader: Reader | None
    ) -> None:
        path = target.value
        if path in includes:
            self.note(
                Problem(target.line, f"{path} includes itself; skipped", "error", target.include),
            )
            return
        if len(includes) >= MAX_INCLUDE_DEPTH:
            self.note(
                Problem(
                    target.line,
                    f"includes nested more than {MAX_INCLUDE_DEPTH} deep at {path}; skipped",
                    "error",
                    target.include,
                )
            )
            return
        key = (None if reader is None else reader.uid, path)
        if key not in self._includes:
            self._includes[key] = read_include(path, target.line, target.include, reader)
        found = self._includes[key]
        for problem in found.problems:
            self.note(problem)
        if found.unusable is not None and found.unusable not in self.unusable:
            self.unusable.append(found.unusable)
        self.expand_targets(alias, found.targets, chain, [*includes, path], found.reader)


def read_include(path: str, line: int, include: str | None = None, reader: Reader | None = None) -> _Include:
    """The include file `path` (named on `line` of `include`, or of the aliases file), read with the rights
    of `reader` (None: the flush's own, then its owner's; see the module docstring): its targets, the
    problems met, and, when the file cannot be used at all (missing, unreadable by the reader, not a regular
    file, a symlink, writable by everyone, too big), that problem."""

    def refuse(why: str) -> _Include:
        problem = Problem(line, f":include:{path} {why}; skipped", "error", include)
        return _Include([], reader, [problem], problem)

    try:
        fd, rights = _open_include(path, reader)
    except _RefusedError as refused:
        return refuse(str(refused))
    except OSError as error:
        return refuse(f"cannot be read ({error.strerror})")
    try:
        info = os.fstat(fd)
        if info.st_mode & stat.S_IWOTH:
            return refuse(f"is writable by everyone, so anyone could redirect mail (chmod o-w {path})")
        data = b""
        if info.st_size <= MAX_INCLUDE_SIZE:  # and no more than that is read: it could grow meanwhile
            data = _read_all(fd, limit=MAX_INCLUDE_SIZE + 1)
        if info.st_size > MAX_INCLUDE_SIZE or len(data) > MAX_INCLUDE_SIZE:
            return refuse(f"is bigger than {MAX_INCLUDE_SIZE} bytes")
    except OSError as error:
        return refuse(f"cannot be read ({error.strerror})")
    finally:
        os.close(fd)
    targets: list[Target] = []
    problems: list[Problem] = []
    text = data.decode("utf-8", "surrogateescape")
    for number, row in enumerate(text.splitlines(), start=1):
        stripped = row.strip()
        if not stripped or stripped.startswith("#"):
            continue
        for item in _split_targets(stripped):
            target = classify(item, number, path)
            targets.append(target)
            problem = Problem(number, target.reason, "error", path)
            if target.kind == "refused" and problem not in problems:
                problems.append(problem)
    return _Include(targets, rights, problems, None)


def _unique(addrs: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    unique = []
    for addr in addrs:
        if addr.lower() not in seen:
            seen.add(addr.lower())
            unique.append(addr)
    return unique


def expand(
    aliases: Aliases, local_part: str, *, local_domains: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """`resolve`'s targets and warnings."""
    found = resolve(aliases, local_part, local_domains=local_domains)
    return found.targets, found.warnings


def resolve(aliases: Aliases, local_part: str, *, local_domains: Iterable[str] = ()) -> Expansion:
    """Where mail for the local name `local_part` goes.

    Each target is either a bare local user name (deliver to that user's mailbox; no more aliasing applies)
    or an address with a domain. An address in one of `local_domains` (pass localhost, the hostname and the
    configured local_domains) is treated as its local part and expanded too, so loops through them are caught.
    Targets are unique ignoring case, in the order found. Warnings name the file and line they are about.
    See the module docstring for loops, self-references, unusable aliases, postmaster and unhonoured
    targets. Raises ConfigError when an include file on the way cannot be used (missing, unreadable, unsafe):
    its members are unknown, so the caller defers the mail rather than deliver or bounce it.
    """
    expander = _Expander(aliases, local_domains)
    expander.expand(local_part, [], 0)
    source = aliases.source or "aliases"
    if expander.unusable:  # who the members are is unknown: neither deliver nor bounce, but wait for the fix
        problem = expander.unusable[0]
        where = f"{source}: " if problem.include is None else ""
        what = str(problem).removesuffix("; skipped")
        if problem.line == 0:  # about the aliases file itself
            what = problem.message
        raise ConfigError(f"{where}{what}; mail for {local_part} waits until it can be read")
    warnings = [
        f"{source}: {problem}" if problem.include is None else str(problem) for problem in expander.problems
    ]
    return Expansion(_unique(expander.targets), warnings, expander.own, expander.unhonoured)


def validate(path: str, *, local_domains: Iterable[str] = (), check_users: bool = True) -> list[Problem]:
    """Everything wrong with the aliases file at `path`, in line order, for `newaliases`.

    Syntax problems, refused targets and second definitions (errors); loops, include files that cannot be
    read, and (when `check_users`) local names that are neither an alias nor a user (warnings). A missing
    file has no problems. Raises ConfigError when the file cannot be read at all.
    """
    aliases = load(path)
    domains = list(local_domains)
    problems = list(aliases.problems)
    loops: dict[frozenset[str], _Loop] = {}
    unknown: list[Target] = []
    for alias in aliases.entries.values():
        expander = _Expander(aliases, domains)
        expander.expand(alias.name, [], alias.line)
        for problem in expander.problems:
            if problem not in expander.loop_problems and problem not in problems:
                problems.append(problem)
        for loop in expander.loops:
            loops.setdefault(frozenset(loop.names), loop)
        unknown.extend(expander.locals_seen)
    for loop in loops.values():
        problems.append(
            Problem(_loop_line(aliases, loop), f"alias loop {_loop_text(aliases, loop)}", "warning")
        )
    if check_users:
        for target in unknown:
            name = target.value if target.kind == "local" else target.value.rpartition("@")[0]
            if not is_user(name):
                what = "is not a local user" if name in aliases else "is neither an alias nor a local user"
                problem = Problem(target.line, f"{name} {what}", "warning", target.include)
                if problem not in problems:
                    problems.append(problem)
    return sorted(
        problems, key=lambda problem: (problem.include is not None, problem.include or "", problem.line)
    )


def _loop_order(aliases: Aliases, loop: _Loop) -> list[str]:
    """The loop's names (without the repeat) rotated to start at the alias defined first in the file."""
    names = list(loop.names[:-1])
    lines = [alias.line if (alias := aliases.get(name)) else 0 for name in names]
    start = lines.index(min(lines))
    return names[start:] + names[:start]


def _loop_line(aliases: Aliases, loop: _Loop) -> int:
    alias = aliases.get(_loop_order(aliases, loop)[0])
    return alias.line if alias else loop.line


def _loop_text(aliases: Aliases, loop: _Loop) -> str:
    names = _loop_order(aliases, loop)
    return " -> ".join([*names, names[0]])


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
