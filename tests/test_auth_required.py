"""A smarthost that wants AUTH when the config has no username (issue 14, item 3): the mail is deferred with
the fix, never bounced; and `pymta test` probes MAIL FROM and RCPT TO as a real delivery would, sending
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import MtaEnv, local_sandbox
from mailservers import HOST, SmtpServer
from test_smtp import MESSAGE, session

from pymta.cli import smarthost as smarthost_cli
from pymta.delivery.smtp.outcome import SessionError
from pymta.errors import AddressError

AUTH_REQUIRED = "530 5.7.0 Authentication required"
FIX = "set username and password for it in pymta.yaml"


@pytest.fixture
def plain() -> SmtpServer:
    with SmtpServer("plain", auth_require_tls=False) as server:
        yield server


@pytest.mark.parametrize("where", ["MAIL", "RCPT"])
def test_auth_required_ends_the_session_with_the_fix(plain: SmtpServer, where: str) -> None:
    if where == "MAIL":
        plain.handler.mail_reply = AUTH_REQUIRED
    else:
        plain.handler.rejections = {"a@example.org": "530 5.7.0 Authentication required"}
    with session(plain.smarthost()) as s, pytest.raises(SessionError) as caught:
        s.send("me@example.org", ["a@example.org"], MESSAGE)
    error = caught.value
    assert error.stage == "auth" and error.untouched
    assert FIX in str(error) and AUTH_REQUIRED in str(error)
    assert plain.handler.messages == []


def test_a_flush_defers_and_never_bounces(mta: MtaEnv, plain: SmtpServer) -> None:
    plain.handler.mail_reply = AUTH_REQUIRED
    mta.write_config(
        "domain: example.org\nhostname: mx.example.org\ndeliver: queue\n"
        f"smarthosts: [{{host: {HOST}, port: {plain.port}, security: none, timeout: 3s}}]\n"
    )
    queued = mta.sendmail("-i", "-f", "me@example.org", "a@example.org", input=b"Subject: x\n\nx\n")
    assert queued.returncode == 0, queued.stderr
    flushed = mta.run("pymta", ["flush", "-v"])
    assert flushed.returncode == 0, flushed.stderr
    entry = mta.only_entry()  # no bounce queued beside it
    assert entry.state == "deferred"
    assert entry.recipients[0].status == "deferred"
    assert FIX in (entry.last_error or "")
    listing = json.loads(mta.run("pymta", ["queue", "--json"]).stdout)
    assert len(listing) == 1


# --- pymta test: the probe ---


def write_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    path = tmp_path / "pymta.yaml"
    path.write_text(
        f"spool: {tmp_path / 'spool'}\nhostname: client.example.org\ndomain: example.org\n"
        f"{local_sandbox(tmp_path)}{extra}"
        f"smarthosts:\n  - host: {HOST}\n    port: {port}\n    security: none\n    timeout: 3s\n"
    )
    return path


def run_test(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(smarthost_cli.test_command, ["-C", str(config), *args])
    return result.exit_code, result.output


def test_the_probe_uses_the_rewritten_sender_and_the_admin(plain: SmtpServer, tmp_path: Path) -> None:
    config = write_config(
        tmp_path, plain.port, "admin: admin@example.net\nrewrite:\n  from: account@example.net\n"
    )
    code, out = run_test(config)
    assert code == 0, out
    assert plain.handler.mail_froms == ["account@example.net"]
    assert plain.handler.rcpts_seen == ["admin@example.net"]
    assert plain.handler.resets >= 1 and plain.handler.messages == []
    assert "MAIL FROM:<account@example.net>" in out and "RCPT TO:<admin@example.net>" in out
    assert "result:       OK" in out


def test_the_probe_takes_to(plain: SmtpServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, plain.port)
    code, out = run_test(config, "--to", "someone@example.net")
    assert "someone@example.net" in plain.handler.rcpts_seen
    assert plain.handler.mail_froms[0] == "root@example.org"  # cron's sender, qualified


def test_the_probe_shows_auth_required(plain: SmtpServer, tmp_path: Path) -> None:
    plain.handler.mail_reply = AUTH_REQUIRED
    code, out = run_test(write_config(tmp_path, plain.port, "admin: admin@example.net\n"))
    assert code == 69, out
    assert "result:       OK" not in out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and FIX in failed[0]


def test_the_probe_shows_a_sender_policy(plain: SmtpServer, tmp_path: Path) -> None:
    plain.handler.mail_reply = "554 Reject due to policy restrictions"
    code, out = run_test(write_config(tmp_path, plain.port, "admin: admin@example.net\n"))
    assert code == 69, out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1
    assert "root@example.org" in failed[0] and "rewrite:" in failed[0] and "554" in failed[0]


def test_the_probe_shows_a_refused_relay(plain: SmtpServer, tmp_path: Path) -> None:
    plain.handler.rejections = {"admin@example.net": "554 5.7.1 Relay access denied"}
    code, out = run_test(write_config(tmp_path, plain.port, "admin: admin@example.net\n"))
    assert code == 69, out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "admin@example.net" in failed[0] and "Relay access denied" in failed[0]
    assert plain.handler.messages == []


def test_to_that_is_no_address_is_one_line(plain: SmtpServer, tmp_path: Path) -> None:
    code, out = run_test(write_config(tmp_path, plain.port), "--to", "a@b@c")
    assert code == AddressError.exit_code, out
    assert out.startswith("pymta: ") and len(out.strip().splitlines()) == 1
    assert plain.handler.mail_froms == []


def test_a_route_rewrite_applies_only_to_its_smarthost(plain: SmtpServer, tmp_path: Path) -> None:
    with SmtpServer("plain", auth_require_tls=False) as other:
        path = tmp_path / "pymta.yaml"
        path.write_text(
            f"spool: {tmp_path / 'spool'}\nhostname: client.example.org\ndomain: example.org\n"
            f"{local_sandbox(tmp_path)}admin: admin@example.net\n"
            f"smarthosts:\n  - {{host: {HOST}, port: {plain.port}, security: none, name: one}}\n"
            f"  - {{host: {HOST}, port: {other.port}, security: none, name: two}}\n"
            'routes: [{sender: "*@example.org", smarthost: two, rewrite: {from: routed@example.net}}]\n'
        )
        code, out = run_test(path)
        assert code == 0, out
        assert other.handler.mail_froms == ["routed@example.net"]
    assert plain.handler.mail_froms == ["root@example.org"]  # cron's mail never goes this way
