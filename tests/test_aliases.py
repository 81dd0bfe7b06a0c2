"""The aliases file (pymta/aliases.py): parsing, expansion, loops, includes, refusals and validate()."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymta.config import aliases, expansion
from pymta.config.aliases import Problem
from pymta.errors import ConfigError

NOBODY_KNOWS = "pymta-no-such-user"


def parse(text: str) -> aliases.Aliases:
    return aliases.parse(textwrap.dedent(text))


def expand(text: str, name: str, **kwargs: object) -> tuple[list[str], list[str]]:
    return expansion.expand(parse(text), name, **kwargs)  # type: ignore[arg-type]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    path.chmod(0o644)
    return path


# --- parsing ---


def test_names_targets_comments_and_blank_lines() -> None:
    table = parse(
        """\
        # the admin
        root: admin, me@example.org

        admin:me@example.org
        """
    )
    assert table.problems == ()
    assert len(table) == 2
    root = table.get("root")
    assert root is not None and root.line == 2
    assert [(t.kind, t.value, t.line) for t in root.targets] == [
        ("local", "admin", 2),
        ("address", "me@example.org", 2),
    ]


def test_continuation_lines_join_the_entry_and_keep_their_line_numbers() -> None:
    table = parse(
        """\
        staff: alice,
            bob,
          # a comment inside the entry

        \tcarol@example.org
        next: dave
        """
    )
    assert table.problems == ()
    staff = table.get("staff")
    assert staff is not None
    assert [(t.value, t.line) for t in staff.targets] == [("alice", 1), ("bob", 2), ("carol@example.org", 5)]
    assert expansion.expand(table, "next") == (["dave"], [])


def test_lookup_ignores_case_and_quoted_names_work() -> None:
    table = parse(
        """\
        Postmaster: root
        "sales team": alice, "Bob Smith" <bob@example.org>
        """
    )
    assert "POSTMASTER" in table and "postmaster" in table
    assert expansion.expand(table, "PostMaster") == (["root"], [])
    assert expansion.expand(table, "Sales Team") == (["alice", "bob@example.org"], [])


def test_targets_are_unique_ignoring_case() -> None:
    assert expand("team: a@x.org, A@X.org, lead\nlead: a@x.org, b@x.org\n", "team") == (
        ["a@x.org", "b@x.org"],
        [],
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("bad line", "line 2: the line cannot be read as an alias: no ':' after the name"),
        ("who@example.org: root", "line 2: the alias name has a domain"),
        ('"zq\x01xw": root', "line 2: the alias name holds a control character"),
        (": root", "line 2: an alias with an empty name"),
        ("empty:", "line 2: empty has no targets"),
        ("odd: a b c", "line 2: a target cannot be read as an address"),
        ("mailer: error:5.1.1 gone", "line 2: a 'word:' target (such as error:) is not supported"),
        ("rel: :include:lists/staff", "line 2: an :include: target names no absolute path"),
        ("esc: :include:/lists/staff\x1b[2J", "line 2: an :include: target holds a control character"),
        ("bs: \\no/name", "line 2: a \\name target cannot be read as a local user name"),
    ],
)
def test_malformed_entries_are_reported_with_their_line_and_not_their_text(line: str, problem: str) -> None:
    # The text of a line that cannot be used is never quoted (issue 10, H1): it could be a secret.
    table = aliases.parse(f"# first\n{line}\nok: root\n")
    assert any(str(found).startswith(problem) for found in table.problems), table.problems
    assert "ok" in table
    for word in ("bad line", "who@", "zq", "a b c", "5.1.1 gone", "lists/staff", "no/name"):
        assert not any(word in str(found) for found in table.problems), table.problems


def test_a_continuation_line_before_any_entry_is_reported() -> None:
    table = aliases.parse("  stray\nroot: admin\n")
    assert [str(problem) for problem in table.problems] == [
        "line 1: a continuation line with no alias before it"
    ]


def test_a_second_definition_is_reported_and_the_first_is_used() -> None:
    table = aliases.parse("root: alice\nx: y\nROOT: bob\n")
    assert [str(problem) for problem in table.problems] == [
        "line 3: ROOT is defined again (first on line 1, which is used); merge the two entries"
    ]
    assert expansion.expand(table, "root") == (["alice"], [])


# --- programs and files are refused ---


def test_programs_and_files_are_refused_with_a_warning_never_run_and_listed_as_unhonoured(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    program = f"\"|/bin/sh -c 'touch {marker}, again'\""
    table = aliases.parse(f"# x\nlog: |touch {marker}, {program}, {tmp_path}/file, admin@example.org\n")
    assert [str(problem) for problem in table.problems] == [
        "line 2: a |program target is not honoured: pymta never runs programs from aliases",
        "line 2: a /file target is not honoured: pymta never writes files from aliases",
    ]
    found = expansion.resolve(table, "log")
    assert found.targets == ["admin@example.org"]
    assert found.warnings == [f"aliases: {problem}" for problem in table.problems]
    assert [str(item) for item in found.unhonoured] == [
        "|program target of log (line 2 of aliases)",
        "/file target of log (line 2 of aliases)",
    ]
    assert expansion.unhonoured_header(found.unhonoured) == (
        b"X-Pymta-Unhonoured: |program target of log (line 2 of aliases)\r\n"
        b"X-Pymta-Unhonoured: /file target of log (line 2 of aliases)\r\n"
    )
    assert not marker.exists()
    assert not (tmp_path / "file").exists()


def test_an_alias_with_only_a_program_is_not_delivered_to_a_local_user_of_its_name() -> None:
    # Issue 11: its mail went to /var/mail/procmail, where nobody reads it; the flush sends it to the admin.
    found = expansion.resolve(parse("procmail: |/usr/bin/procmail\n"), "procmail")
    assert found.targets == []
    assert [str(item) for item in found.unhonoured] == ["|program target of procmail (line 1 of aliases)"]
    assert found.warnings == [
        "aliases: line 1: a |program target is not honoured: pymta never runs programs from aliases"
    ]


def test_an_alias_with_only_unreadable_targets_is_delivered_to_the_local_user() -> None:
    targets, warnings = expand("odd: a b c\n", "odd")
    assert targets == ["odd"]
    assert warnings == [
        "aliases: line 1: a target cannot be read as an address",
        "aliases: line 1: odd has no usable target; delivering to the local user odd",
    ]


def test_the_unhonoured_header_is_plain_ascii_on_one_line_and_bounded() -> None:
    items = [expansion.Unhonoured("program", f"l\u00e9\r\nX-Evil: {n}", n, "/etc/aliases") for n in range(30)]
    header = expansion.unhonoured_header(items)
    lines = header.split(b"\r\n")[:-1]
    assert len(lines) == expansion.MAX_UNHONOURED_HEADERS + 1
    assert all(line.startswith(b"X-Pymta-Unhonoured: ") for line in lines)
    assert lines[-1] == b"X-Pymta-Unhonoured: and 10 more"
    assert b"\n" not in header.replace(b"\r\n", b"")


# --- postmaster (RFC 5321 4.5.1) ---


def test_postmaster_with_no_alias_and_no_account_is_root() -> None:
    assert expand("", "postmaster") == (["root"], [])
    assert expand("", "PostMaster") == (["root"], [])
    assert expand("root: admin@example.org\n", "postmaster") == (["admin@example.org"], [])
    assert expand("postmaster: alice\n", "postmaster") == (["alice"], [])  # an alias of its own wins
    # root's alias leading to postmaster: root's own mailbox ends it
    assert expand("root: postmaster\n", "root") == (["root"], [])


# --- expansion ---


def test_a_name_that_is_no_alias_is_the_local_user() -> None:
    assert expand("root: admin\n", "alice") == (["alice"], [])


def test_nested_aliases_expand_recursively() -> None:
    text = "root: admins\nadmins: alice, bob, ops@example.org\nbob: bob@example.org\n"
    assert expand(text, "root") == (["alice", "bob@example.org", "ops@example.org"], [])


def test_a_self_reference_delivers_to_the_local_user_too() -> None:
    assert expand("root: root, admin@example.org\n", "root") == (["root", "admin@example.org"], [])
    assert expand("Root: ROOT\n", "root") == (["ROOT"], [])


def test_a_backslash_delivers_to_the_local_user_without_more_aliasing() -> None:
    assert expand("root: \\admin, x@example.org\nadmin: elsewhere@example.org\n", "root") == (
        ["admin", "x@example.org"],
        [],
    )


def test_a_loop_is_reported_and_the_name_it_returns_to_is_delivered_locally() -> None:
    text = "root: admin, me@example.org\nadmin: root\n"
    assert expand(text, "root") == (
        ["root", "me@example.org"],
        ["aliases: line 2: alias loop root -> admin -> root; delivering to the local user root"],
    )
    assert expand(text, "admin") == (
        ["admin", "me@example.org"],
        ["aliases: line 1: alias loop admin -> root -> admin; delivering to the local user admin"],
    )


def test_a_longer_loop() -> None:
    targets, warnings = expand("a: b\nb: c\nc: a, c@example.org\n", "a")
    assert targets == ["a", "c@example.org"]
    assert warnings == ["aliases: line 3: alias loop a -> b -> c -> a; delivering to the local user a"]


def test_addresses_in_local_domains_are_expanded_and_their_loops_caught() -> None:
    text = "root: admin@localhost\nadmin: root@Host.Example.org, me@example.org\n"
    targets, warnings = expand(text, "root", local_domains=["localhost", "host.example.org"])
    assert targets == ["root", "me@example.org"]
    assert warnings == [
        "aliases: line 2: alias loop root -> admin -> root; delivering to the local user root"
    ]
    assert expand(text, "root")[0] == ["admin@localhost"]  # without local domains they are just addresses


def test_nesting_deeper_than_the_limit_stops_with_a_warning() -> None:
    text = "".join(f"a{n}: a{n + 1}\n" for n in range(expansion.MAX_DEPTH + 5))
    targets, warnings = expand(text, "a0")
    assert targets == [f"a{expansion.MAX_DEPTH}"]
    assert len(warnings) == 1 and f"nested more than {expansion.MAX_DEPTH} deep" in warnings[0]


# --- :include: ---


def test_include_files_one_per_line_or_comma_separated(tmp_path: Path) -> None:
    staff = write(tmp_path / "staff", "# the staff\nalice\nbob, carol@example.org\n\n  dave@example.org  \n")
    targets, warnings = expand(f"staff: :include:{staff}, boss@example.org\n", "staff")
    assert targets == ["alice", "bob", "carol@example.org", "dave@example.org", "boss@example.org"]
    assert warnings == []


def test_include_targets_are_aliases_too_and_nest(tmp_path: Path) -> None:
    inner = write(tmp_path / "inner", "deep@example.org\n")
    outer = write(tmp_path / "outer", f"bob\n:INCLUDE:{inner}\n|/bin/sh\n")
    targets, warnings = expand(f"list: :include:{outer}\nbob: bob@example.org\n", "list")
    assert targets == ["bob@example.org", "deep@example.org"]
    assert warnings == [
        f"line 3 of {outer}: a |program target is not honoured: pymta never runs programs from aliases"
    ]


def test_include_nesting_is_limited_and_self_inclusion_stopped(tmp_path: Path) -> None:
    me = tmp_path / "me"
    write(me, f"me@example.org\n:include:{me}\n")
    targets, warnings = expand(f"loop: :include:{me}\n", "loop")
    assert targets == ["me@example.org"]
    assert warnings == [f"line 2 of {me}: {me} includes itself; skipped"]
    chain = [tmp_path / f"level{n}" for n in range(expansion.MAX_INCLUDE_DEPTH + 2)]
    for here, there in zip(chain, chain[1:], strict=False):
        write(here, f"{here.name}@example.org\n:include:{there}\n")
    write(chain[-1], "last@example.org\n")
    targets, warnings = expand(f"deep: :include:{chain[0]}\n", "deep")
    assert targets == [f"level{n}@example.org" for n in range(expansion.MAX_INCLUDE_DEPTH)]
    assert len(warnings) == 1 and f"nested more than {expansion.MAX_INCLUDE_DEPTH} deep" in warnings[0]


def test_an_include_through_a_symlink_makes_the_mail_wait(tmp_path: Path) -> None:
    real = write(tmp_path / "real", "someone@example.org\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError) as refused:
        expand(f"list: :include:{link}, other@example.org\n", "list")
    assert str(refused.value) == (
        f"aliases: line 1: :include:{link} is a symbolic link, which pymta does not follow:"
        " name the real file; mail for list waits until it can be read"
    )


def test_a_world_writable_or_missing_include_makes_the_mail_wait_not_bounce(tmp_path: Path) -> None:
    # Its members are unknown: delivering to the others, or bouncing, would each be wrong for someone.
    open_to_all = write(tmp_path / "open", "evil@example.org\n")
    open_to_all.chmod(0o666)
    with pytest.raises(ConfigError, match=f"open is writable by everyone.*chmod o-w {open_to_all}"):
        expand(f"list: :include:{open_to_all}\n", "list")
    with pytest.raises(ConfigError) as missing:
        expand(f"list: :include:{tmp_path}/missing, x@example.org\n", "list")
    assert str(missing.value) == (
        f"aliases: line 1: :include:{tmp_path}/missing cannot be read (No such file or directory);"
        " mail for list waits until it can be read"
    )
    # newaliases still reports it, as a problem of the file
    (tmp_path / "aliases").write_text(f"list: :include:{tmp_path}/missing, x@example.org\n")
    problems = expansion.validate(str(tmp_path / "aliases"), check_users=False)
    assert [str(p) for p in problems] == [
        f"line 1: :include:{tmp_path}/missing cannot be read (No such file or directory); skipped"
    ]


def test_an_include_is_read_at_expansion_time(tmp_path: Path) -> None:
    staff = write(tmp_path / "staff", "alice\n")
    table = aliases.parse(f"staff: :include:{staff}\n")
    assert expansion.expand(table, "staff")[0] == ["alice"]
    write(staff, "bob\n")
    assert expansion.expand(table, "staff")[0] == ["bob"]


# --- load ---


def test_load_a_file(tmp_path: Path) -> None:
    path = write(tmp_path / "aliases", "root: admin@example.org\n")
    table = aliases.load(str(path))
    assert table.source == str(path)
    assert expansion.expand(table, "root") == (["admin@example.org"], [])


def test_a_missing_file_means_no_aliases(tmp_path: Path) -> None:
    table = aliases.load(str(tmp_path / "missing"))
    assert len(table) == 0 and table.problems == ()
    assert expansion.validate(str(tmp_path / "missing")) == []


def test_a_file_that_cannot_be_used_is_an_error_naming_it_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"the aliases file {tmp_path} is not a regular file"):
        aliases.load(str(tmp_path))
    open_to_all = write(tmp_path / "aliases", "root: evil@example.org\n")
    open_to_all.chmod(0o666)
    with pytest.raises(ConfigError, match=r"writable by everyone.*chmod o-w"):
        aliases.load(str(open_to_all))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_an_error_naming_it_and_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path / "aliases", "root: admin\n")
    path.chmod(0)
    with pytest.raises(
        ConfigError, match=rf"cannot read the aliases file {path}: Permission denied; .*chmod 644"
    ):
        aliases.load(str(path))


# --- validate (newaliases) ---


def test_validate_reports_every_problem_with_its_line(tmp_path: Path) -> None:
    staff = write(tmp_path / "staff", f"alice@example.org\n/var/log/staff\n{NOBODY_KNOWS}\n")
    path = write(
        tmp_path / "aliases",
        f"""\
        # aliases
        root: admin, me@example.org
        admin: root
        postmaster: root
        mailer-daemon: postmaster
        procmail: |/usr/bin/procmail
        staff: :include:{staff}
        broken line
        ghost: {NOBODY_KNOWS}
        a: b
        b: c
        c: a
        root: again@example.org
        """,
    )
    problems = expansion.validate(str(path))
    assert [str(problem) for problem in problems] == [
        "line 2: alias loop root -> admin -> root",
        "line 6: a |program target is not honoured: pymta never runs programs from aliases",
        "line 8: the line cannot be read as an alias: no ':' after the name",
        f"line 9: {NOBODY_KNOWS} is neither an alias nor a local user",
        "line 10: alias loop a -> b -> c -> a",
        "line 13: root is defined again (first on line 2, which is used); merge the two entries",
        f"line 2 of {staff}: a /file target is not honoured: pymta never writes files from aliases",
        f"line 3 of {staff}: {NOBODY_KNOWS} is neither an alias nor a local user",
    ]
    severities = {str(problem): problem.severity for problem in problems}
    assert severities["line 2: alias loop root -> admin -> root"] == "warning"
    assert severities["line 8: the line cannot be read as an alias: no ':' after the name"] == "error"


def test_validate_can_skip_the_user_check(tmp_path: Path) -> None:
    path = write(tmp_path / "aliases", f"ghost: {NOBODY_KNOWS}\n")
    assert [str(p) for p in expansion.validate(str(path))] == [
        f"line 1: {NOBODY_KNOWS} is neither an alias nor a local user"
    ]
    assert expansion.validate(str(path), check_users=False) == []


def test_validate_warns_of_a_self_reference_to_no_user(tmp_path: Path) -> None:
    path = write(tmp_path / "aliases", f"{NOBODY_KNOWS}: {NOBODY_KNOWS}, x@example.org\nroot: root\n")
    assert expansion.validate(str(path)) == [
        Problem(1, f"{NOBODY_KNOWS} is not a local user", "warning"),
    ]


def test_a_clean_file_has_no_problems(tmp_path: Path) -> None:
    path = write(tmp_path / "aliases", "postmaster: root\nroot: root, me@example.org\nabuse: \\root\n")
    assert expansion.validate(str(path)) == []


# --- the include rule: an include file is read with its owner's rights (issue 10, H1) ---

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: gives files to other users")
SECRET = "hunter2-not-an-address"


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user may search (tmp_path lies under root's 0700 pytest directory)."""
    path = Path(tempfile.mkdtemp(prefix="pymta-aliases-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def owned(path: Path, text: str, owner: str, mode: int = 0o644, group: str | None = None) -> Path:
    path.write_text(text)
    path.chmod(mode)
    entry = pwd.getpwnam(owner)
    os.chown(path, entry.pw_uid, grp.getgrnam(group).gr_gid if group else entry.pw_gid)
    return path


def private_dir(path: Path, owner: str = "root", mode: int = 0o700) -> Path:
    path.mkdir()
    path.chmod(mode)
    entry = pwd.getpwnam(owner)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def refused_for(text: str, name: str = "list") -> str:
    with pytest.raises(ConfigError) as refused:
        expand(text, name)
    return str(refused.value)


@as_root
def test_a_users_include_file_cannot_include_what_that_user_cannot_read(shared: Path) -> None:
    # The attack of issue 10: an admin delegates a list to a user, who includes the smarthost password.
    secrets = private_dir(shared / "secrets")
    in_private_dir = owned(secrets / "smarthost", f"{SECRET}\n", "root", 0o644)  # only the directory protects
    unreadable = owned(shared / "root-only", f"{SECRET}\n", "root", 0o600)  # only the mode protects
    for secret in (in_private_dir, unreadable):
        members = owned(shared / "nobody.list", f"someone@example.org\n:include:{secret}\n", "nobody")
        message = refused_for(f"list: :include:{members}\n")
        assert message == (
            f"line 2 of {members}: :include:{secret} cannot be read by nobody, whose rights it is read with"
            " (an include file is read with the rights of the user who owns it, the file that includes it,"
            " or a directory or link on its way); mail for list waits until it can be read"
        )
        members.unlink()
        problems = expansion.validate(str(owned(shared / "aliases", f"list: :include:{members}\n", "root")))
        assert SECRET not in str(problems)  # newaliases, as root, does not print it either


@as_root
def test_a_users_include_file_may_include_what_that_user_can_read(shared: Path) -> None:
    public = owned(shared / "public", "pub@example.org\n", "root", 0o644)
    by_group = owned(shared / "by-group", "group@example.org\n", "root", 0o640, group="nogroup")
    mine = owned(shared / "mine", "mine@example.org\n", "nobody", 0o600)
    members = owned(
        shared / "nobody.list", f":include:{public}\n:include:{by_group}\n:include:{mine}\n", "nobody"
    )
    assert expand(f"list: :include:{members}\n", "list") == (
        ["pub@example.org", "group@example.org", "mine@example.org"],
        [],
    )
    # the owner's bits are the owner's, even when the group's or others' would allow more
    owned(mine, "mine@example.org\n", "nobody", 0o044)
    assert "cannot be read by nobody" in refused_for(f"list: :include:{members}\n")


@as_root
def test_the_rights_of_an_include_never_go_up(shared: Path) -> None:
    # nobody's list includes daemon's list: it is read with nobody's rights, and so is what it includes.
    daemons = owned(shared / "daemon-private", "private@example.org\n", "daemon", 0o600)
    daemon_list = owned(shared / "daemon.list", f"d@example.org\n:include:{daemons}\n", "daemon")
    members = owned(shared / "nobody.list", f":include:{daemon_list}\n", "nobody")
    message = refused_for(f"list: :include:{members}\n")
    assert f"line 2 of {daemon_list}: :include:{daemons} cannot be read by nobody" in message
    # named by the aliases file itself, daemon's list is read with daemon's rights
    assert expand(f"list: :include:{daemon_list}\n", "list") == (["d@example.org", "private@example.org"], [])


@as_root
def test_a_symbolic_link_on_the_way_is_followed_with_the_readers_rights(shared: Path) -> None:
    hidden = private_dir(shared / "hidden")
    inner = private_dir(hidden / "inner", mode=0o755)
    secret = owned(inner / "list", f"{SECRET}@example.org\n", "root", 0o644)
    (shared / "way").symlink_to(inner)  # the link itself is fine; hidden/ on its way is not
    members = owned(shared / "nobody.list", f":include:{shared}/way/list\n", "nobody")
    assert "cannot be read by nobody" in refused_for(f"list: :include:{members}\n")
    hidden.chmod(0o711)
    assert expand(f"list: :include:{members}\n", "list") == ([f"{SECRET}@example.org"], [])
    assert expand(f"list: :include:{shared}/way/../inner/list\n", "list")[0] == [f"{SECRET}@example.org"]
    assert secret.exists()


@as_root
def test_a_file_whose_owner_gives_the_rights_must_have_one_link(shared: Path) -> None:
    members = owned(shared / "nobody.list", "someone@example.org\n", "nobody")
    os.link(members, shared / "second-name")
    message = refused_for(f"list: :include:{members}\n")
    assert "belongs to nobody and has 2 links" in message
    (shared / "second-name").unlink()
    assert expand(f"list: :include:{members}\n", "list") == (["someone@example.org"], [])


@as_root
def test_an_aliases_file_owned_by_a_user_is_read_with_that_users_rights(shared: Path) -> None:
    secret = owned(shared / "root-only", f"{SECRET}\n", "root", 0o600)
    table = aliases.load(str(owned(shared / "aliases", f"list: :include:{secret}\n", "nobody")))
    with pytest.raises(ConfigError, match="cannot be read by nobody") as refused:
        expansion.expand(table, "list")
    assert SECRET not in str(refused.value)


@as_root
def test_a_directory_or_link_of_a_user_on_the_way_hands_the_rest_of_the_way_to_that_user(
    shared: Path,
) -> None:
    # The admin names a file in nobody's directory: nobody could have put anything there, a link or a
    # hard link to a root-only file included, so what lies below is read with nobody's rights.
    theirs = private_dir(shared / "theirs", "nobody", 0o755)
    root_only = owned(theirs / "list", f"{SECRET}@example.org\n", "root", 0o600)
    assert "cannot be read by nobody" in refused_for(f"list: :include:{root_only}\n")
    root_only.chmod(0o644)
    assert expand(f"list: :include:{root_only}\n", "list")[0] == [f"{SECRET}@example.org"]
    # a link of nobody's in a root directory, to a root-only directory
    hidden = private_dir(shared / "hidden")
    owned(hidden / "list", f"{SECRET}@example.org\n", "root", 0o644)
    (shared / "way").symlink_to(hidden)
    os.chown(shared / "way", pwd.getpwnam("nobody").pw_uid, -1, follow_symlinks=False)
    assert "cannot be read by nobody" in refused_for(f"list: :include:{shared}/way/list\n")
    assert expand(f"list: :include:{hidden}/list\n", "list")[0] == [f"{SECRET}@example.org"]  # root's own way


@as_root
def test_an_include_in_a_directory_everyone_may_write_is_refused(shared: Path) -> None:
    open_dir = private_dir(shared / "open", mode=0o777)
    members = owned(open_dir / "list", "someone@example.org\n", "root")
    assert "lies in a directory that everyone may write" in refused_for(f"list: :include:{members}\n")
    open_dir.chmod(0o1777)  # sticky, as /tmp: only a file's owner may replace it
    assert expand(f"list: :include:{members}\n", "list") == (["someone@example.org"], [])
