"""Where pymta's files are, and the few settings `sendmail` needs, read without YAML.

`sendmail` runs for every cron job, and importing a YAML parser costs more than the rest of an enqueue. It
needs only a handful of top-level scalars (where the spool is, whether to start a flush), so it reads them
with the small line reader here. Anything the reader is not certain about (a flow collection, an anchor, a
block scalar, a continued line) makes it fall back to the real YAML parser, so both always agree; a test
checks that against PyYAML.

A config file that is broken *elsewhere* does not stop `sendmail`: the mail is queued and the flush, which
validates the whole file (`pymta.config.load`), refuses to run until it is fixed. Mail is kept, not lost.

The search order for the config file (DESIGN.md) lives here too, so `sendmail` and `pymta` agree on it.
Like the rest of sendmail's path it does without os (`pymta.queue.commit` says why): `getenv`, `join`
and `posix` stand in for os.environ, os.path.join and os.
"""

import posix
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    import yaml

ENV_CONFIG = "PYMTA_CONFIG"
SYSTEM_CONFIG = "/etc/pymta/pymta.yaml"
SYSTEM_SPOOL = "/var/spool/pymta"

# Plain scalars starting with these are YAML structure, not text: leave them to the real parser.
_YAML_INDICATORS = frozenset("[]{}&*!|>%@`,?")


def environ() -> "Mapping[str, str] | Mapping[bytes, bytes]":
    """The environment: os.environ once os is loaded (the process may have changed it through os), else
    the built-in posix.environ that os.environ is made from (bytes)."""
    os = sys.modules.get("os")
    return posix.environ if os is None else os.environ


def getenv(name: str) -> str:
    """`os.environ.get(name, "")`, without importing os."""
    os = sys.modules.get("os")
    if os is not None:
        return os.environ.get(name, "")  # type: ignore[no-any-return]
    value = posix.environ.get(name.encode())
    return "" if value is None else value.decode(sys.getfilesystemencoding(), "surrogateescape")


def join(directory: str, *names: str) -> str:
    """`os.path.join` of a directory and relative names, without importing os."""
    path = directory
    for name in names:
        path = path + name if not path or path.endswith("/") else f"{path}/{name}"
    return path


def _exists(path: str, directory: bool = False) -> bool:
    try:
        mode = posix.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not directory or mode & 0o170000 == 0o040000


def _home() -> str:
    """The real user's home: $HOME unless it is unset or "/" (sudo runs sendmail with HOME=/), else passwd."""
    home = getenv("HOME")
    if home and home != "/":
        return home
    import pwd

    try:
        return pwd.getpwuid(posix.getuid()).pw_dir or "/"
    except KeyError:  # a uid with no passwd entry
        return home or "/"


def _xdg(variable: str, fallback: str) -> str:
    value = getenv(variable)
    return value if value.startswith("/") else join(_home(), fallback)


def config_candidates(explicit: str | None = None) -> list[str]:
    """The config files in the order they are tried; a `-C` file or $PYMTA_CONFIG is the only one."""
    if explicit:
        return [explicit]
    from_env = getenv(ENV_CONFIG)
    if from_env:
        return [from_env]
    return [SYSTEM_CONFIG, join(_xdg("XDG_CONFIG_HOME", ".config"), "pymta", "pymta.yaml")]


def find_config(explicit: str | None = None) -> str | None:
    """The config file to use, or None when there is none (which is valid: defaults apply).

    A file named explicitly (`-C`, $PYMTA_CONFIG) is returned even if missing, so reading it reports that.
    """
    candidates = config_candidates(explicit)
    if explicit or getenv(ENV_CONFIG):
        return candidates[0]
    for path in candidates:
        if _exists(path):
            return path
    return None


def default_spool() -> str:
    """The spool when the config names none: the system spool once `pymta setup` made it, else the user's."""
    if _exists(join(SYSTEM_SPOOL, "new"), directory=True):
        return SYSTEM_SPOOL
    return join(_xdg("XDG_STATE_HOME", join(".local", "state")), "pymta")


class UnsureError(Exception):
    """The line reader met YAML it does not handle; the real parser must decide."""


def _unquote_double(text: str) -> str:
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == '"':
            rest = "".join(chars).strip()
            if rest and not rest.startswith("#"):
                raise UnsureError
            return "".join(out)
        if char == "\\":
            escaped = next(chars, "")
            simple = {"\\": "\\", '"': '"', "n": "\n", "t": "\t", "/": "/", " ": " "}
            if escaped not in simple:
                raise UnsureError
            out.append(simple[escaped])
        else:
            out.append(char)
    raise UnsureError  # unterminated: it continues on the next line


def _unquote_single(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        if text[i] == "'":
            if text[i + 1 : i + 2] == "'":
                out.append("'")
                i += 2
                continue
            rest = text[i + 1 :].strip()
            if rest and not rest.startswith("#"):
                raise UnsureError
            return "".join(out)
        out.append(text[i])
        i += 1
    raise UnsureError


# Plain scalars YAML 1.1 reads as booleans, or as the merge and value tags: not text.
_NOT_TEXT = frozenset(
    "yes Yes YES no No NO true True TRUE false False FALSE on On ON off Off OFF = <<".split()
)


def _may_be_number(text: str) -> bool:
    """Whether YAML 1.1 might read `text` as a number or a date (0x1F, 010, 1_000, 1:20, 2001-12-14, .5, +1).

    A plain decimal and a decimal with a unit of letters (35M, 5d) are certainly what they look like.
    """
    digits = len(text) - len(text.lstrip("0123456789"))
    if digits == 0:
        return text[0] in "+-."
    rest = text[digits:]
    return (text[0] == "0" and len(text) > 1) or not (rest == "" or (rest.isascii() and rest.isalpha()))


def _plain(text: str) -> str | None:
    # A comment starts at " #" (or is all there is); a ": " inside a plain scalar is a nested mapping.
    cut = text.find(" #")
    if cut >= 0:
        text = text[:cut]
    text = text.strip()
    if not text or text.startswith("#") or text in ("~", "null", "Null", "NULL"):
        return None
    if text[0] in _YAML_INDICATORS or ": " in text or text.endswith(":") or "\t" in text:
        raise UnsureError
    if text in _NOT_TEXT or _may_be_number(text):
        raise UnsureError  # YAML reads it as a bool, number or date; let it say which
    return text


def _check_closed(node: str) -> None:
    """Raise UnsureError unless the quoted scalar or [flow] {collection} that `node` starts with ends on its
    line.

    PyYAML lets such a node continue on lines at any indentation, even column 0, where the line reader
    would take its continuation for a top-level key.
    """
    if node[0] == '"':
        _unquote_double(node[1:])
        return
    if node[0] == "'":
        _unquote_single(node[1:])
        return
    depth = 0
    quote = ""
    i = 0
    while i < len(node):
        char = node[i]
        if quote:
            if char == "\\" and quote == '"':
                i += 1
            elif char == quote and node[i + 1 : i + 2] == "'" == quote:
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'" and node[i - 1] in " [{,:":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                rest = node[i + 1 :].strip()
                if rest and not rest.startswith("#"):
                    raise UnsureError
                return
        elif char == "#" and node[i - 1] in " \t":
            raise UnsureError  # a comment inside an open collection: it goes on
        i += 1
    raise UnsureError


def _node(line: str) -> tuple[str, int]:
    """Where a value starts in `line` (after "- ", "? ", anchors, tags and a plain "key: "), and the offset
    of the key that owns it: a block scalar's lines are indented beyond that."""
    content = line
    owner = 0
    while True:
        if content[:2] in ("- ", "? ", ": ") or content in ("-", "?", ":"):
            content = content[2:].lstrip(" ")
        elif content[:1] in ("&", "!"):
            content = content.partition(" ")[2].lstrip(" ")
        elif not content or content[0] in "\"'[{|>":
            return content, owner
        else:
            owner = len(line) - len(content)
            key, colon, rest = content.partition(": ")
            if not colon:
                return "", owner
            content = rest.lstrip(" ")


def _continues(lines: list[str], number: int) -> bool:
    """Whether the next line with content after `number` is indented, i.e. belongs to this line's value."""
    for following in lines[number + 1 :]:
        stripped = following.strip()
        if stripped and not stripped.startswith("#"):
            return following[0] in " \t"
    return False


def _scan(text: str, keys: frozenset[str]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    seen: set[str] = set()  # every top-level key: one written twice is an error PyYAML alone lets pass
    started = False  # a line of the document has been read: a "---" now starts a second one
    lines = text.splitlines()
    block_column = -1  # lines indented beyond this column are the content of a | or > block scalar
    for number, line in enumerate(lines):
        content = line.lstrip(" ")
        indent = len(line) - len(content)
        if block_column >= 0 and (indent > block_column or not content.strip()):
            continue
        block_column = -1
        if not content.strip() or content.startswith("#"):
            continue
        if line.startswith(("---", "...")) and line[3:4] in ("", " ", "\t"):
            if started or (line[3:].strip() and not line[3:].strip().startswith("#")):
                raise UnsureError  # a second document, or content on the document marker line
            continue
        started = True
        node, owner = _node(content)
        if node[:1] in ("|", ">"):
            block_column = indent + owner
        elif node[:1] in ('"', "'", "[", "{"):
            _check_closed(node)
        if indent:
            continue
        if line.startswith("%") or line[0] in "\"'?-[{\t":
            raise UnsureError  # directives, quoted or complex keys, a top-level sequence
        key, colon, rest = line.partition(":")
        if not colon:
            raise UnsureError
        key = key.rstrip()
        if key == "<<" or key in seen:
            # A merge key can bring in any key; a key twice is for the YAML reader to report.
            raise UnsureError
        seen.add(key)
        if key not in keys:
            continue
        if rest and rest[0] != " ":
            raise UnsureError
        if _continues(lines, number):
            raise UnsureError  # a nested block, or a value continued on the next lines
        found[key] = _scalar(rest.strip())
    return found


def _scalar(value: str) -> str | None:
    """A one-line scalar as YAML reads it: double-quoted, single-quoted or plain. Raises UnsureError."""
    if value.startswith('"'):
        return _unquote_double(value[1:])
    if value.startswith("'"):
        return _unquote_single(value[1:])
    return _plain(value)


def _duplicate_key(node: object) -> tuple[str, int] | None:
    """The first top-level key of a YAML mapping node that is written twice, and its line (1-based)."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return None
    seen: set[str] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            if key_node.value in seen:
                return key_node.value, key_node.start_mark.line + 1
            seen.add(key_node.value)
    return None


class BrokenConfigError(ValueError):
    """The file is not valid YAML. `salvaged` holds the wanted keys that stand plainly on a line of their
    own (`spool: /path` at the start of a line), so a broken line elsewhere does not move the mail to
    another spool."""

    def __init__(self, message: str, salvaged: dict[str, str | None]) -> None:
        super().__init__(message)
        self.salvaged = salvaged


def _salvage(data: bytes, keys: frozenset[str]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    seen: set[str] = set()
    twice: set[str] = set()  # a key on two lines (a duplicate, a second document): neither value counts
    lines = data.decode("utf-8", "replace").splitlines()
    for number, line in enumerate(lines):
        key, colon, rest = line.partition(":")
        if not colon or key not in keys:
            continue
        if key in seen:
            twice.add(key)
        seen.add(key)
        if rest[:1] == " " and not _continues(lines, number):
            try:
                found[key] = _scalar(rest.strip())
            except UnsureError:
                continue
    return {key: value for key, value in found.items() if key not in twice}


def read_plain(path: str, keys: frozenset[str]) -> tuple[dict[str, str | None], OSError | ValueError | None]:
    """`read_scalars` for the readers that must not fail (sendmail, `sendmail -bs`, `pymta setup`): the values
    and, when the file cannot be read or is not a valid config, why. A broken file still gives the keys it
    says plainly on a line of their own (`BrokenConfigError.salvaged`); an unreadable one gives none."""
    try:
        return read_scalars(path, keys), None
    except (OSError, ValueError) as exc:
        return (exc.salvaged if isinstance(exc, BrokenConfigError) else {}), exc


def _read_file(path: str) -> bytes:
    """The file at `path`, read with the system calls alone: sendmail reads its config on every message,
    and a file object would add an fstat, an ioctl and two seeks to the open, read and close."""
    fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        parts = []
        while chunk := posix.read(fd, 65536):
            parts.append(chunk)
    finally:
        posix.close(fd)
    return b"".join(parts)


def read_scalars(path: str, keys: frozenset[str]) -> dict[str, str | None]:
    """The top-level scalar values of `keys` in the YAML file at `path` (absent keys are left out).

    Values are returned as the text YAML would give for a string; callers interpret them. Raises OSError
    when the file cannot be read, BrokenConfigError when it is not valid YAML, and ValueError when it is valid
    YAML but not a mapping.
    """
    data = _read_file(path)
    try:
        text = data.decode("utf-8")
        if text.startswith("\ufeff"):
            raise UnsureError
        return _scan(text, keys)
    except (UnsureError, UnicodeDecodeError):
        return _read_with_yaml(data, keys)


# A fix for the commonest YAML mistakes, by a fragment of PyYAML's problem text.
_SYNTAX_FIXES: tuple[tuple[str, str], ...] = (
    ("'\\t'", "indent with spaces, not tabs"),
    ("mapping values are not allowed", 'check the indentation, and quote values that contain ": "'),
    ("expected <block end>", "check that keys at the same level line up"),
    ("could not find expected ':'", 'write "key: value", with a space after the colon'),
    ("found unexpected end of stream", "close the quote or bracket that is still open"),
    ("expected a single document", "remove the second document (the line with --- or ...)"),
)


def yaml_problem(error: "yaml.YAMLError") -> str:
    """What is wrong with a file PyYAML cannot read, in one line: where, what, and the likely fix.

    Both readers say it in these words: `pymta config check` (`pymta.config.load`) and sendmail's warning.
    """
    import yaml

    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"is not valid YAML: {' '.join(str(error).split())}"
    mark = error.problem_mark
    problem = " ".join((error.problem or "").split())
    if problem.startswith("duplicate key"):
        return f"line {mark.line + 1}: {problem}"
    said = f"{problem} {error.context or ''}"
    fix = next(
        (fix for fragment, fix in _SYNTAX_FIXES if fragment in said), "check the indentation and quoting"
    )
    context = (
        f" ({error.context} on line {error.context_mark.line + 1})"
        if error.context and error.context_mark
        else ""
    )
    return f"line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: {problem}{context}; {fix}"


def _read_with_yaml(data: bytes, keys: frozenset[str]) -> dict[str, str | None]:
    import yaml

    try:
        loader = yaml.SafeLoader(data)
        try:
            node = loader.get_single_node()
            twice = _duplicate_key(node)
            document = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise BrokenConfigError(yaml_problem(exc), _salvage(data, keys)) from None
    except RecursionError:  # PyYAML recurses once per level of nesting: `[[[[...` a few thousand deep
        raise BrokenConfigError("nested too deeply to be read", _salvage(data, keys)) from None
    if twice is not None:  # PyYAML keeps the last; `pymta` refuses the file: neither value can be trusted
        key, line = twice
        raise BrokenConfigError(
            f"line {line}: duplicate key {key!r}; remove one of them", _salvage(data, keys)
        )
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ValueError("the file must be a mapping of keys to values")
    found: dict[str, str | None] = {}
    for key in keys:
        if key in document:
            value = document[key]
            if isinstance(value, bool):
                found[key] = "true" if value else "false"
            else:
                found[key] = None if value is None else str(value)
    return found
