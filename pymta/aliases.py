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
pymta never runs a program or writes a file because an aliases file says so. When a name is defined twice
the first definition is used (Postfix does the same) and the second is reported.

Expansion rules (`expand`):
- A name that is no alias is a local user: `expand(aliases, "bob")` is `["bob"]`.
- A self-reference (`root: root, me@example.org`) delivers to the local user root as well (sendmail).
- A loop (`root: admin`, `admin: root`) is reported, and the name the loop comes back to is delivered to
  as a local user: expanding root gives `["root"]`. Nothing is lost: mail reaches that user's mailbox, or,
  when there is no such user, bounces to the sender with that reason, while the warning tells the admin why.
- An alias whose targets are all unusable (refused, unreadable include, empty) is delivered to as a local
  user too, with a warning, for the same reason.
- Nesting stops after `MAX_DEPTH` aliases (sendmail's MaxAliasRecursion); includes after `MAX_INCLUDE_DEPTH`
  files. The name where expansion stops is treated as a local user, with a warning.

Include files are read when an alias is expanded (as sendmail does: an edit takes effect at once), never
through a symlink (O_NOFOLLOW), only when they are regular files no bigger than `MAX_INCLUDE_SIZE` that not
everyone may write.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from .address import is_local_part_only, parse_list
from .errors import AddressError, ConfigError

# How many aliases deep an expansion may go: sendmail's MaxAliasRecursion default.
MAX_DEPTH = 10
# How many :include: files deep: a file including a file including ... is a mistake long before this.
MAX_INCLUDE_DEPTH = 5
# Bytes: an include file is a list of addresses; a bigger one is not what the admin meant to include.
MAX_INCLUDE_SIZE = 1024 * 1024

TargetKind = Literal["local", "address", "include", "refused"]
Severity = Literal["error", "warning"]

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong in an aliases or include file, with where it is.

    `error`: something written in the file is not used (a malformed entry, a refused program or file target,
    a second definition). `warning`: it is used, but probably not as meant (a loop, an unknown user).
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
    reason: str = ""  # refused only: why


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
        data = _read_all(fd)
    except OSError as error:
        raise _unreadable(path, error) from None
    finally:
        os.close(fd)
    aliases = parse(data.decode("utf-8", "surrogateescape"))
    return Aliases(aliases.entries, path, aliases.problems)


def _unreadable(path: str, error: OSError) -> ConfigError:
    return ConfigError(
        f"cannot read the aliases file {path}: {error.strerror or error}; make it readable by the user"
        f" that runs the flush (chmod 644 {path}) or point aliases: in pymta.yaml at another file"
    )


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


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
        problems.append(Problem(first_line, f"no ':' after the alias name in {head.strip()!r}"))
        return None
    problem = _name_problem(name)
    if problem:
        problems.append(Problem(first_line, problem))
        return None
    targets: list[Target] = []
    for number, text in [(first_line, rest), *pieces[1:]]:
        for item in _split_targets(text):
            targets.append(classify(item, number, None))
    for target in targets:
        if target.kind == "refused":
            problems.append(Problem(target.line, target.reason))
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
    """What is wrong with `name` as an alias name; "" when nothing is."""
    if not name:
        return "an alias with an empty name"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return f"the alias name {name!r} holds a control character"
    if any(0xDC80 <= ord(char) <= 0xDCFF for char in name):
        return f"the alias name {name!r} is not valid UTF-8"
    if "@" in name:
        return f"the alias name {name} has a domain; alias names are local parts: write {name.split('@')[0]}"
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


def classify(item: str, line: int, include: str | None) -> Target:
    """One target as written (already split from its neighbours) as a Target."""
    inner = item[1:-1] if len(item) >= 2 and item[0] == item[-1] == '"' else item
    if inner.startswith("|"):
        return _refused(item, line, include, f"{inner} is a program; pymta never runs programs from aliases")
    if inner.startswith("/"):
        return _refused(item, line, include, f"{inner} is a file; pymta never writes files from aliases")
    if item.lower().startswith(":include:"):
        path = item[len(":include:") :].strip()
        if not os.path.isabs(path):
            return _refused(item, line, include, f"{item}: the include file must be an absolute path")
        return Target("include", path, line, include)
    if item.startswith("\\"):
        name = item[1:].strip()
        if not name or not _is_plain_name(name):
            return _refused(item, line, include, f"{item} is not a local user name")
        return Target("local", name, line, include, expand=False)
    head = item.split(":", 1)[0]
    if ":" in item and head and all(char.isalnum() or char in "-_." for char in head):
        return _refused(item, line, include, f"{item}: {head}: targets are not supported")
    try:
        mailboxes = parse_list(item)
    except AddressError as error:
        return _refused(item, line, include, f"{item} is not an address ({error})")
    if len(mailboxes) != 1 or not mailboxes[0].addr:
        return _refused(item, line, include, f"{item} is not one address")
    addr = mailboxes[0].addr
    if is_local_part_only(addr):
        name = addr[1:-1] if len(addr) >= 2 and addr[0] == addr[-1] == '"' else addr
        return Target("local", name, line, include)
    return Target("address", addr, line, include)


def _refused(item: str, line: int, include: str | None, reason: str) -> Target:
    return Target("refused", item, line, include, reason=reason)


def _is_plain_name(name: str) -> bool:
    return all(char.isalnum() or char in "._-+" for char in name)


# --- Expanding ---


@dataclass(frozen=True, slots=True)
class _Loop:
    names: tuple[str, ...]  # the chain from the name that is repeated, ending with it again
    line: int  # where the alias the chain starts at is defined


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
        self._includes: dict[str, tuple[list[Target], list[Problem], Problem | None]] = {}
        self.unusable: list[Problem] = []  # include files that could not be used: the mail must wait
        self.own: set[str] = set()  # names (lower case) written as \name or as their own target

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
        before = len(self.targets)
        self.expand_targets(alias, alias.targets, chain, [])
        chain.pop()
        if len(self.targets) == before:
            self.note(
                Problem(
                    alias.line,
                    f"{alias.name} has no usable target; delivering to the local user {name}",
                    "warning",
                )
            )
            self.targets.append(name)

    def expand_targets(
        self, alias: Alias, targets: Iterable[Target], chain: list[str], includes: list[str]
    ) -> None:
        for target in targets:
            if target.kind == "refused":
                self.note(Problem(target.line, target.reason, "error", target.include))
            elif target.kind == "include":
                self.include(alias, target, chain, includes)
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

    def include(self, alias: Alias, target: Target, chain: list[str], includes: list[str]) -> None:
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
        if path not in self._includes:
            self._includes[path] = read_include(path, target.line, target.include)
        found, problems, unusable = self._includes[path]
        for problem in problems:
            self.note(problem)
        if unusable is not None and unusable not in self.unusable:
            self.unusable.append(unusable)
        self.expand_targets(alias, found, chain, [*includes, path])


def read_include(
    path: str, line: int, include: str | None = None
) -> tuple[list[Target], list[Problem], Problem | None]:
    """The targets in the include file `path` (named on `line`), the problems met reading it, and, when the
    file cannot be used at all (missing, unreadable, not a regular file, a symlink, writable by everyone,
    too big), that problem."""

    def refuse(why: str) -> tuple[list[Target], list[Problem], Problem | None]:
        problem = Problem(line, f":include:{path} {why}; skipped", "error", include)
        return [], [problem], problem

    try:
        fd = os.open(path, _READ_FLAGS | os.O_NOFOLLOW)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return refuse("is a symbolic link, which pymta does not follow: name the real file")
        return refuse(f"cannot be read ({error.strerror})")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return refuse("is not a regular file")
        if info.st_mode & stat.S_IWOTH:
            return refuse(f"is writable by everyone, so anyone could redirect mail (chmod o-w {path})")
        if info.st_size > MAX_INCLUDE_SIZE:
            return refuse(f"is bigger than {MAX_INCLUDE_SIZE} bytes")
        data = _read_all(fd)
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
            if target.kind == "refused":
                problems.append(Problem(number, target.reason, "error", path))
    return targets, problems, None


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
    """`expand_marked` without the names marked for their own mailbox."""
    targets, warnings, _ = expand_marked(aliases, local_part, local_domains=local_domains)
    return targets, warnings


def expand_marked(
    aliases: Aliases, local_part: str, *, local_domains: Iterable[str] = ()
) -> tuple[list[str], list[str], set[str]]:
    """Where mail for the local name `local_part` goes: (targets, warnings).

    Each target is either a bare local user name (deliver to that user's mailbox; no more aliasing applies)
    or an address with a domain. An address in one of `local_domains` (pass localhost, the hostname and the
    configured local_domains) is treated as its local part and expanded too, so loops through them are caught.
    Targets are unique ignoring case, in the order found. Warnings name the file and line they are about.
    See the module docstring for loops, self-references and unusable aliases. Raises ConfigError when an
    include file on the way cannot be used (missing, unreadable, unsafe): its members are unknown, so the
    caller defers the mail rather than deliver or bounce it. The third item holds the targets (lower case)
    written as `\\name` or as an alias's own name: their own mailbox, whatever else would apply (`admin:`).
    """
    expander = _Expander(aliases, local_domains)
    expander.expand(local_part, [], 0)
    source = aliases.source or "aliases"
    if expander.unusable:  # who the members are is unknown: neither deliver nor bounce, but wait for the fix
        problem = expander.unusable[0]
        where = f"{source}: " if problem.include is None else ""
        what = str(problem).removesuffix("; skipped")
        raise ConfigError(f"{where}{what}; mail for {local_part} waits until it can be read")
    warnings = [
        f"{source}: {problem}" if problem.include is None else str(problem) for problem in expander.problems
    ]
    return _unique(expander.targets), warnings, expander.own


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
            if not _is_user(name):
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


def _is_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except (KeyError, ValueError):
        try:
            pwd.getpwnam(name.lower())
        except (KeyError, ValueError):
            return False
    return True
