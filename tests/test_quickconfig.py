"""quickconfig: the config search order, the default spool, and the YAML-free reader agreeing with PyYAML."""

import os
import pwd
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymta.config import paths as quickconfig

TARGETS = ("spool", "deliver", "max_message_size")
KEYS = frozenset(TARGETS)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PYMTA_* or XDG_* variable from the developer's session, and HOME is a fresh directory."""
    for name in list(os.environ):
        if name.startswith(("PYMTA_", "XDG_")):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)  # tests/conftest.py may have made it already
    monkeypatch.setenv("HOME", str(home))
    return home


# --- find_config: -C, then $PYMTA_CONFIG, then /etc/pymta/pymta.yaml, then $XDG_CONFIG_HOME ---


@pytest.fixture
def system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Where the tests put the system-wide config file (instead of /etc/pymta/pymta.yaml)."""
    path = tmp_path / "etc" / "pymta.yaml"
    monkeypatch.setattr(quickconfig, "SYSTEM_CONFIG", str(path))
    return path


def touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return str(path)


def test_explicit_file_wins_even_when_missing(monkeypatch: pytest.MonkeyPatch, system_config: Path) -> None:
    touch(system_config)
    monkeypatch.setenv("PYMTA_CONFIG", touch(system_config.parent / "env.yaml"))
    assert quickconfig.find_config("/nonexistent/pymta.yaml") == "/nonexistent/pymta.yaml"
    assert quickconfig.config_candidates("/x.yaml") == ["/x.yaml"]


def test_environment_variable_comes_next_even_when_missing(
    monkeypatch: pytest.MonkeyPatch, system_config: Path
) -> None:
    touch(system_config)
    monkeypatch.setenv("PYMTA_CONFIG", "/nonexistent/env.yaml")
    assert quickconfig.find_config() == "/nonexistent/env.yaml"
    assert quickconfig.find_config(None) == "/nonexistent/env.yaml"


def test_empty_environment_variable_is_ignored(monkeypatch: pytest.MonkeyPatch, system_config: Path) -> None:
    monkeypatch.setenv("PYMTA_CONFIG", "")
    system = touch(system_config)
    assert quickconfig.find_config() == system


def test_system_file_comes_before_the_users(
    monkeypatch: pytest.MonkeyPatch, system_config: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    user = touch(tmp_path / "xdg" / "pymta" / "pymta.yaml")
    assert quickconfig.config_candidates() == [str(system_config), user]
    assert quickconfig.find_config() == user
    system = touch(system_config)
    assert quickconfig.find_config() == system


def test_user_file_under_xdg_config_home(
    monkeypatch: pytest.MonkeyPatch, system_config: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert quickconfig.find_config() is None
    user = touch(tmp_path / "xdg" / "pymta" / "pymta.yaml")
    assert quickconfig.find_config() == user


@pytest.mark.parametrize("xdg_config_home", [None, "", "relative/dir"])
def test_user_file_defaults_to_dot_config(
    monkeypatch: pytest.MonkeyPatch, system_config: Path, clean_environment: Path, xdg_config_home: str | None
) -> None:
    # The XDG base directory spec: an unset, empty or relative value is ignored.
    if xdg_config_home is not None:
        monkeypatch.setenv("XDG_CONFIG_HOME", xdg_config_home)
    user = touch(clean_environment / ".config" / "pymta" / "pymta.yaml")
    assert quickconfig.find_config() == user


def test_no_file_anywhere(system_config: Path) -> None:
    assert quickconfig.find_config() is None


# --- default_spool: the system spool once set up, else $XDG_STATE_HOME/pymta ---


@pytest.fixture
def system_spool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    path = tmp_path / "var-spool-pymta"
    monkeypatch.setattr(quickconfig, "SYSTEM_SPOOL", str(path))
    return path


def test_system_spool_once_set_up(system_spool: Path) -> None:
    system_spool.mkdir()
    assert quickconfig.default_spool() != str(system_spool)  # not set up: no new/ inside
    (system_spool / "new").mkdir()
    assert quickconfig.default_spool() == str(system_spool)


def test_user_spool_under_xdg_state_home(
    monkeypatch: pytest.MonkeyPatch, system_spool: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert quickconfig.default_spool() == str(tmp_path / "state" / "pymta")


def test_user_spool_defaults_to_local_state(system_spool: Path, clean_environment: Path) -> None:
    assert quickconfig.default_spool() == str(clean_environment / ".local" / "state" / "pymta")


@pytest.mark.parametrize("home", [None, "", "/"])
def test_home_unset_or_root_falls_back_to_passwd(
    monkeypatch: pytest.MonkeyPatch, system_spool: Path, home: str | None
) -> None:
    # sudo runs sendmail with HOME=/, some cron daemons with no HOME at all.
    if home is None:
        monkeypatch.delenv("HOME")
    else:
        monkeypatch.setenv("HOME", home)
    passwd_home = pwd.getpwuid(os.getuid()).pw_dir
    assert quickconfig.default_spool() == os.path.join(passwd_home, ".local", "state", "pymta")


def test_uid_without_passwd_entry(monkeypatch: pytest.MonkeyPatch, system_spool: Path) -> None:
    monkeypatch.setenv("HOME", "/")

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert quickconfig.default_spool() == "/.local/state/pymta"


# --- read_scalars agrees with yaml.safe_load ---


def expected(document: object) -> dict[str, str | None]:
    """What read_scalars promises for a document PyYAML could load: the text of each top-level target key."""
    assert isinstance(document, dict)
    found: dict[str, str | None] = {}
    for key in TARGETS:
        if key in document:
            value = document[key]
            if isinstance(value, bool):
                found[key] = "true" if value else "false"
            else:
                found[key] = None if value is None else str(value)
    return found


def reads_as_itself(text: str) -> bool:
    try:
        return yaml.safe_load(f"k: {text}\n") == {"k": text}
    except yaml.YAMLError:
        return False


PLAIN_ALPHABET = string.ascii_letters + string.digits + " /._-:#'\"@%!&*,?[]{}|>=~+\\éß"
plain_values = (
    st.text(PLAIN_ALPHABET, min_size=1, max_size=16)
    .map(str.strip)
    .filter(lambda text: bool(text) and reads_as_itself(text))
)
# Plain scalars YAML 1.1 reads as something else (bool, int, float, date, null) or that look like them.
special_values = st.sampled_from(
    [
        "yes", "No", "ON", "off", "True", "false", "~", "null", "NULL", "0x1F", "0o17", "010", "09", "1_000",
        "1:20", "2001-12-14", ".inf", "-.5", "+5", "-1", "1.5", "1e3", "1.0e+3", "0", "35", "35M", "35MB",
        "10k", "5d", "0b101", "1.5M", "=", "-", "- x", "-x", ".hidden",
    ]
)  # fmt: skip
line_text = st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=12)


@st.composite
def single_quoted(draw: st.DrawFn) -> str:
    return "'" + draw(line_text).replace("'", "''") + "'"


@st.composite
def double_quoted(draw: st.DrawFn) -> str:
    escapes = {"\\": "\\\\", '"': '\\"', "\t": "\\t", "\n": "\\n"}
    text = draw(st.text(st.one_of(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), st.just("\t"))))
    return '"' + "".join(escapes.get(char, char) for char in text[:12]) + '"'


comments = st.sampled_from(["", " # a comment", "   #", " #: spool: /x", '  # "open'])
values = st.one_of(plain_values, special_values, single_quoted(), double_quoted(), st.just(""))


@st.composite
def target_entry(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(TARGETS))
    space = draw(st.sampled_from(["", " "]))  # "spool : x" is a key too
    value = draw(values)
    line = f"{key}{space}:{' ' + value if value else ''}{draw(comments)}"
    continuation = draw(
        st.sampled_from(["", "\n  more text", "\n\n  more", "\n# c\n  - item", "\n  # only a comment"])
    )
    return line + continuation


CONTINUATION_INDENTS = st.sampled_from(["", " ", "  "])


@st.composite
def other_entry(draw: st.DrawFn) -> str:
    """A top-level key that is not a target, often hiding target-looking lines inside its value."""
    key = draw(st.sampled_from(["other", "smarthosts", "retry", "x-y", "spool_dir"]))
    indent = draw(CONTINUATION_INDENTS)
    anchor = draw(st.sampled_from(["", "&a1 "]))
    target = draw(st.sampled_from(TARGETS))
    forms = [
        f"{key}: {draw(plain_values)}",
        f"{key}:\n  {target}: /nested\n  deliver: queue",
        f"{key}:\n  - host: smtp.example.org\n    port: 587\n  - {target}: x",
        f"{key}: {anchor}{{schedule: [1m, 5m], lifetime: 5d}}",
        f"{key}: {anchor}[a,\n{indent}{target}: /from-flow]",
        f"{key}: {{a: 1,\n{indent}{target}: /from-flow}}",
        f'{key}: "abc\n{indent}{target}: /from-quote"',
        f"{key}: 'abc\n{indent}{target}: /from-quote'",
        f"{key}: |\n  {target}: /from-block\n  text",
        f'{key}:\n  - k: |\n      t\n    k2: "abc\n{indent}{target}: /from-nested-quote"',
        f'{key}:\n  nested: ["a", "b # c", \'d\']\n  {target}: "x"',
        f"base{draw(st.integers(0, 3))}: &b{draw(st.integers(0, 3))}\n  {target}: /merged",
        f"<<: {{{target}: /merged}}",
    ]
    return draw(st.sampled_from(forms))


filler = st.sampled_from(["", "# a comment line", "   ", "# spool: /commented"])


@st.composite
def config_text(draw: st.DrawFn) -> str:
    entries = draw(st.lists(st.one_of(target_entry(), other_entry(), filler), max_size=6))
    start = draw(st.sampled_from(["", "---\n", "--- # doc\n"]))
    end = draw(st.sampled_from(["\n", "", "\n...\n", "\r\n"]))
    return start + "\n".join(entries) + end


def check_agreement(text: str, tmp_path: Path) -> None:
    path = tmp_path / "pymta.yaml"
    path.write_bytes(text.encode("utf-8"))
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        # A broken file: the reader may be more lenient (sendmail must still queue), but fails only cleanly.
        try:
            quickconfig.read_scalars(str(path), KEYS)
        except ValueError:
            pass
        return
    node = yaml.compose(text)
    keys = [k.value for k, _ in node.value] if isinstance(node, yaml.MappingNode) else []
    if len(keys) != len(set(keys)):
        # PyYAML keeps the last of a key written twice; `pymta` refuses the file, and so does the reader.
        with pytest.raises(quickconfig.BrokenConfigError, match="duplicate key"):
            quickconfig.read_scalars(str(path), KEYS)
    elif document is None:
        assert quickconfig.read_scalars(str(path), KEYS) == {}
    elif not isinstance(document, dict):
        with pytest.raises(ValueError):
            quickconfig.read_scalars(str(path), KEYS)
    else:
        assert quickconfig.read_scalars(str(path), KEYS) == expected(document), text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config_text())
def test_read_scalars_agrees_with_pyyaml(tmp_path: Path, text: str) -> None:
    check_agreement(text, tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        "spool: /var/spool/pymta\ndeliver: queue\nmax_message_size: 35M\n",
        "spool: # set later\ndeliver: queue\n",  # a comment is not the value
        "spool:   #\n",
        "deliver: yes\n",  # YAML 1.1 reads a bool
        "max_message_size: 1_000_000\n",  # an int, 1000000
        "max_message_size: 0x100000\n",
        "max_message_size: 010\n",  # octal 8
        "spool: a\n\n  b\n",  # a plain scalar continued after a blank line
        "spool:\n# c\n  /x\n",  # the value on a later line, after a comment
        'other: "abc\nspool: /evil"\n',  # a quoted value continued at column 0 hides the key
        "other: [a,\nspool: /evil]\n",
        "other: &a {a: 1,\nspool: /evil}\n",
        'a:\n  - k: |\n      t\n    k2: "abc\nspool: /evil"\n',
        "base: &b\n  spool: /merged\n<<: *b\n",  # a merge key brings spool in
        "spool: x\n---\nspool: y\n",
        "spool: 'it''s'  # c\ndeliver: \"q\\\"ueue\" # c\n",
    ],
)
def test_read_scalars_examples(tmp_path: Path, text: str) -> None:
    check_agreement(text, tmp_path)


def test_read_scalars_absent_keys_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "pymta.yaml"
    path.write_text("# nothing here\n")
    assert quickconfig.read_scalars(str(path), KEYS) == {}
    path.write_text("hostname: h.example.org\n")
    assert quickconfig.read_scalars(str(path), KEYS) == {}


def test_read_scalars_fast_path_does_not_need_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The common config must be read without the YAML parser: that is the point of the reader.
    path = tmp_path / "pymta.yaml"
    path.write_text(
        "# pymta\nspool: /var/spool/pymta\ndeliver: immediate   # or queue\nmax_message_size: 35M\n"
        'smarthosts:\n  - host: smtp.web.de\n    password: {command: "pass show web.de"}\n'
        '    fingerprint: "sha256:AB:CD"\nretry:\n  schedule: [1m, 5m, 15m, 1h, 4h]\n  lifetime: 5d\n'
        'note: |\n  a "block\n  [scalar\n'
    )

    def no_yaml(data: bytes, keys: frozenset[str]) -> dict[str, str | None]:
        raise AssertionError("fell back to YAML")

    monkeypatch.setattr(quickconfig, "_read_with_yaml", no_yaml)
    assert quickconfig.read_scalars(str(path), KEYS) == {
        "spool": "/var/spool/pymta",
        "deliver": "immediate",
        "max_message_size": "35M",
    }


def test_read_scalars_errors(tmp_path: Path) -> None:
    path = tmp_path / "pymta.yaml"
    with pytest.raises(OSError):
        quickconfig.read_scalars(str(path), KEYS)
    path.write_text("spool: [unclosed\n")
    with pytest.raises(ValueError):
        quickconfig.read_scalars(str(path), KEYS)
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        quickconfig.read_scalars(str(path), KEYS)


def test_the_settings_are_read_with_system_calls_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sendmail reads its config on every message: with open, read and close, no file object (which adds
    an fstat, an ioctl and two seeks); a file longer than one read comes whole, a directory is OSError."""
    import builtins

    config = tmp_path / "pymta.yaml"
    config.write_text("# " + "x" * 200_000 + "\nspool: /var/tmp/s\n")

    def no_file_object(*args: object, **kwargs: object) -> None:
        raise AssertionError("a file object was made")

    monkeypatch.setattr(builtins, "open", no_file_object)
    assert quickconfig.read_plain(str(config), frozenset({"spool"})) == ({"spool": "/var/tmp/s"}, None)
    values, problem = quickconfig.read_plain(str(tmp_path), frozenset({"spool"}))
    assert values == {} and isinstance(problem, OSError) and problem.strerror == "Is a directory"


def test_sendmail_reads_a_small_message_in_reads_of_64_kib_and_a_large_one_in_growing_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read of n bytes allocates n first: a cron job's message is read in 64 KiB (what a pipe holds), not
    in the mebibyte a large one from a file is read in."""
    import posix

    from pymta.submission.submit import read_blocks

    def reads(data: bytes) -> list[int]:
        asked: list[int] = []
        rest = [data]

        def read(fd: int, size: int) -> bytes:
            assert fd == 0
            asked.append(size)
            chunk, rest[0] = rest[0][:size], rest[0][size:]
            return chunk

        with monkeypatch.context() as patch:
            patch.setattr(posix, "read", read)
            assert b"".join(read_blocks(False)) == data
        return asked

    assert reads(b"Subject: cron\n\nout\n") == [65536, 65536]
    assert reads(b"x" * 3_000_000) == [65536, 131072, 262144, 524288, 1048576, 1048576, 1048576]
