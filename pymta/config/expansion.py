"""Where mail for a local name goes: expanding it through the aliases file (`pymta.config.aliases`) and the
`:include:` files it names, and checking the whole file for `newaliases`.

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

Include files are read when an alias is expanded (as sendmail does: an edit takes effect at once), with the
rights of their owner: `pymta.config.include` says how.

Nothing is ever quoted from an aliases or include file in a problem, a log line, a queue listing or a
bounce: problems name the file, the line and what is wrong. Only what the file means travels on.
"""

from __future__ import annotations

from collections.abc import Iterable

from pymta.config import include as include_file
from pymta.config.aliases import Alias, Aliases, Problem, Target, classify, is_user, load, split_targets
from pymta.config.include import Reader
from pymta.errors import ConfigError
from pymta.mail.address import POSTMASTER, is_local_part_only
from pymta.mail.idn import domain_key
from pymta.records import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.config.aliases import UnhonouredKind

# How many aliases deep an expansion may go: sendmail's MaxAliasRecursion default.
MAX_DEPTH = 10
# How many :include: files deep: a file including a file including ... is a mistake long before this.
MAX_INCLUDE_DEPTH = 5
# Where the mail of a `postmaster` with no alias and no account goes (RFC 5321 4.5.1: it must work).
POSTMASTER_ALIAS = "root"


@record(frozen=True, slots=True)
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


@record(frozen=True, slots=True)
class Expansion:
    """Where mail for one local name goes (`resolve`)."""

    targets: list[str]  # bare local user names and addresses with a domain, unique ignoring case
    warnings: list[str]  # what is wrong on the way, each naming its file and line
    own: set[str]  # targets (lower case) written as `\\name` or as an alias's own name: their own mailbox
    unhonoured: list[Unhonoured]  # program and file targets met: the admin gets the mail for them


@record(frozen=True, slots=True)
class _Loop:
    names: tuple[str, ...]  # the chain from the name that is repeated, ending with it again
    line: int  # where the alias the chain starts at is defined


@record(frozen=True, slots=True)
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
        self.local_domains = {domain_key(domain) for domain in local_domains}
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
                self.reader = include_file.owner_rights(aliases.owner)
            except include_file.RefusedError as refused:
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
        if domain_key(domain) in self.local_domains and is_local_part_only(local):
            return local[1:-1] if len(local) >= 2 and local[0] == local[-1] == '"' else local
        return None

    def expand(self, name: str, chain: list[str], line: int) -> None:
        """Add what `name` expands to; `chain` holds the names (lower case) being expanded around it."""
        alias = self.aliases.get(name)
        if alias is None:
            if name.lower() == POSTMASTER and not is_user(name):
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
        data, rights = include_file.read(path, reader)
    except include_file.RefusedError as refused:
        return refuse(str(refused))
    targets: list[Target] = []
    problems: list[Problem] = []
    text = data.decode("utf-8", "surrogateescape")
    for number, row in enumerate(text.splitlines(), start=1):
        stripped = row.strip()
        if not stripped or stripped.startswith("#"):
            continue
        for item in split_targets(stripped):
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
