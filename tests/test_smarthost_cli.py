"""`pymta test` and `pymta password set|delete` through click's CliRunner, against real test servers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest
from click.testing import CliRunner, Result
from conftest import local_sandbox
from mailservers import PASSWORD, USER, SmtpServer, certificates, self_signed_context, smtp_server
from test_credentials import MemoryKeyring

from pymta.cli import smarthost as smarthost_cli

__all__ = ["certificates", "smtp_server"]  # fixtures imported for use
pymta_test = smarthost_cli.test_command  # not test_command: pytest would try to collect it
password = smarthost_cli.password_group


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def write_config(tmp_path: Path, *smarthosts: str) -> Path:
    path = tmp_path / "pymta.yaml"
    body = "smarthosts:\n" + "".join(smarthosts) if smarthosts else ""
    path.write_text(
        f"spool: {tmp_path / 'spool'}\nhostname: client.example.org\n{local_sandbox(tmp_path)}{body}"
    )
    return path


def smarthost_yaml(port: int, *, security: str = "starttls", extra: str = "", host: str = "127.0.0.1") -> str:
    return f"  - host: {host}\n    port: {port}\n    security: {security}\n    timeout: 3s\n{extra}"


def auth_yaml(ca_file: Path | None, source: str = "{env: PYMTA_TEST_PW}") -> str:
    ca = f"    ca_file: {ca_file}\n" if ca_file else ""
    return f"{ca}    username: {USER}\n    password: {source}\n"


def run(command: object, args: list[str], input: str | None = None) -> Result:
    result = CliRunner().invoke(command, args, input=input)  # type: ignore[arg-type]
    assert PASSWORD not in result.output
    return result


# --- pymta test ---


def test_a_working_smarthost(
    smtp_server: SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYMTA_TEST_PW", PASSWORD)
    assert smtp_server.tls is not None
    config = write_config(
        tmp_path, smarthost_yaml(smtp_server.port, extra=auth_yaml(smtp_server.tls.ca_file))
    )
    result = run(pymta_test, ["-C", str(config)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"127.0.0.1[127.0.0.1]:{smtp_server.port} (security: starttls)" in out
    for label in ("greeting:", "TLS:", "certificate:", "issuer:", "expires:", "fingerprint:", "extensions:"):
        assert label in out
    assert smtp_server.tls.fingerprint in out
    assert f"chain and host name verified against ca_file {smtp_server.tls.ca_file}" in out
    assert f"auth:         ok, PLAIN as {USER}" in out and "result:       OK" in out
    assert smtp_server.handler.messages == []  # nothing was sent


def test_auth_failure_is_explained(
    smtp_server: SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYMTA_TEST_PW", "wrong")
    assert smtp_server.tls is not None
    config = write_config(
        tmp_path, smarthost_yaml(smtp_server.port, extra=auth_yaml(smtp_server.tls.ca_file))
    )
    result = run(pymta_test, ["-C", str(config)])
    assert result.exit_code == 69
    assert "TLS:" in result.output  # what worked is still shown
    assert "FAILED:       the server rejected the login" in result.output
    assert "check username: and the password in {env: PYMTA_TEST_PW}" in result.output


def test_password_source_failure_is_explained(smtp_server: SmtpServer, tmp_path: Path) -> None:
    assert smtp_server.tls is not None
    config = write_config(
        tmp_path, smarthost_yaml(smtp_server.port, extra=auth_yaml(smtp_server.tls.ca_file))
    )
    result = run(pymta_test, ["-C", str(config)])
    assert result.exit_code == 69
    assert "cannot get the password" in result.output and "PYMTA_TEST_PW is not set" in result.output


def test_self_signed_certificate_shows_the_fingerprint_to_pin(tmp_path: Path) -> None:
    context, fingerprint = self_signed_context()
    with SmtpServer("starttls", server_context=context) as server:
        config = write_config(tmp_path, smarthost_yaml(server.port))
        result = run(pymta_test, ["-C", str(config)])
        assert result.exit_code == 69
        assert "certificate verify failed: self-signed certificate" in result.output
        assert "NOT verified" in result.output and f'fingerprint: "{fingerprint}"' in result.output
        pinned = write_config(
            tmp_path, smarthost_yaml(server.port, extra=f'    fingerprint: "{fingerprint}"\n')
        )
        result = run(pymta_test, ["-C", str(pinned)])
    assert result.exit_code == 0, result.output
    assert "pinned fingerprint matches" in result.output and "CN=self-signed.test" in result.output


def test_every_smarthost_is_checked(smtp_server: SmtpServer, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = probe.getsockname()[1]
    assert smtp_server.tls is not None
    ca = f"    ca_file: {smtp_server.tls.ca_file}\n"
    config = write_config(
        tmp_path, smarthost_yaml(closed_port, security="none"), smarthost_yaml(smtp_server.port, extra=ca)
    )
    result = run(pymta_test, ["-C", str(config)])
    assert result.exit_code == 69
    assert "connection refused" in result.output and "result:       OK" in result.output


def test_no_smarthost_says_how_to_add_one(tmp_path: Path) -> None:
    result = run(pymta_test, ["-C", str(write_config(tmp_path))])
    assert result.exit_code == 78
    assert "no smarthost configured" in result.output and "pymta password set" in result.output
    assert "{keyring: pymta}" in result.output


def test_no_smarthost_on_a_system_spool_suggests_a_password_file_not_the_keyring(tmp_path: Path) -> None:
    (tmp_path / "spool" / "new").mkdir(parents=True)
    (tmp_path / "spool" / "new").chmod(0o1733)  # what `pymta setup` makes: the flush runs as pymta
    result = run(pymta_test, ["-C", str(write_config(tmp_path))])
    assert result.exit_code == 78 and "no smarthost configured" in result.output
    assert "{file: /etc/pymta/secrets/smarthost}" in result.output and "chown pymta" in result.output
    assert "keyring" not in result.output


def test_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("smarthosts: [{host: x.example.org, prot: 25}]\n")
    result = run(pymta_test, ["-C", str(path)])
    assert result.exit_code == 78 and "did you mean" in result.output


def test_to_sends_a_test_message_through_the_queue(
    smtp_server: SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYMTA_TEST_PW", PASSWORD)
    assert smtp_server.tls is not None
    config = write_config(
        tmp_path, smarthost_yaml(smtp_server.port, extra=auth_yaml(smtp_server.tls.ca_file))
    )
    result = run(pymta_test, ["-C", str(config), "--to", "admin@example.org"])
    assert result.exit_code == 0, result.output
    assert "to admin@example.org: delivered to the smarthost" in result.output
    [received] = smtp_server.handler.messages
    assert received.rcpt_tos == ["admin@example.org"]
    assert b"Subject: pymta test message" in received.data and b"Message-ID: <" in received.data
    assert not any((tmp_path / "spool" / "queue").iterdir())


def test_to_reports_a_refused_recipient_and_keeps_the_message(
    smtp_server: SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYMTA_TEST_PW", PASSWORD)
    # Refused at the end of DATA: the probe (MAIL, RCPT, RSET) passes; a refusal at RCPT shows in the probe,
    # before anything is queued (test_auth_required.py).
    smtp_server.handler.data_reply = "550 5.1.1 no such user"
    assert smtp_server.tls is not None
    config = write_config(
        tmp_path, smarthost_yaml(smtp_server.port, extra=auth_yaml(smtp_server.tls.ca_file))
    )
    result = run(pymta_test, ["-C", str(config), "--to", "nobody@example.org"])
    assert result.exit_code == 69, result.output
    assert "failed" in result.output and "550 5.1.1 no such user" in result.output
    assert len(list((tmp_path / "spool" / "queue").iterdir())) == 1


def test_to_is_not_sent_when_the_checks_fail(smtp_server: SmtpServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, smarthost_yaml(smtp_server.port))  # the CA is unknown: TLS fails
    result = run(pymta_test, ["-C", str(config), "--to", "admin@example.org"])
    assert result.exit_code == 69 and "not sending the test message" in result.output
    assert smtp_server.handler.messages == []
    assert not (tmp_path / "spool").exists()


# --- pymta password ---


def keyring_config(tmp_path: Path, source: str = "{keyring: pymta-test}") -> Path:
    return write_config(tmp_path, smarthost_yaml(587, host="smtp.example.org", extra=auth_yaml(None, source)))


def test_password_set_from_stdin(memory_keyring: MemoryKeyring, tmp_path: Path) -> None:
    config = keyring_config(tmp_path)
    result = run(password, ["set", "smtp.example.org", "-C", str(config)], input=f"{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert memory_keyring.entries == {("pymta-test", USER): PASSWORD}
    assert f"stored the password for {USER} at smtp.example.org in the keyring (pymta-test)" in result.output


def test_password_set_prompts_twice_on_a_terminal(
    memory_keyring: MemoryKeyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smarthost_cli, "_stdin_is_terminal", lambda: True)
    config = keyring_config(tmp_path)
    result = run(password, ["set", "SMTP.example.org", "-C", str(config)], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("Password for me@example.org at smtp.example.org") == 1
    assert "Repeat for confirmation" in result.output
    assert memory_keyring.entries == {("pymta-test", USER): PASSWORD}


def test_password_set_without_a_password(memory_keyring: MemoryKeyring, tmp_path: Path) -> None:
    result = run(password, ["set", "smtp.example.org", "-C", str(keyring_config(tmp_path))])
    assert result.exit_code == 64 and "no password given" in result.output
    assert memory_keyring.entries == {}


def test_password_for_an_unknown_host(memory_keyring: MemoryKeyring, tmp_path: Path) -> None:
    config = keyring_config(tmp_path)
    result = run(password, ["set", "smtp.other.org", "-C", str(config)], input="x\n")
    assert result.exit_code == 64 and "no smarthost smtp.other.org" in result.output
    assert "configured: smtp.example.org" in result.output


def test_password_for_a_smarthost_not_using_the_keyring(
    memory_keyring: MemoryKeyring, tmp_path: Path
) -> None:
    config = keyring_config(tmp_path, source="{file: /etc/pymta/x.secret}")
    result = run(password, ["set", "smtp.example.org", "-C", str(config)], input="x\n")
    assert result.exit_code == 78
    assert "takes its password from {file: /etc/pymta/x.secret}" in result.output
    assert "{keyring: pymta}" in result.output


def test_password_set_without_a_keyring_backend(tmp_path: Path) -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())
    try:
        config = keyring_config(tmp_path)
        result = run(password, ["set", "smtp.example.org", "-C", str(config)], input=f"{PASSWORD}\n")
    finally:
        keyring.set_keyring(previous)
    assert result.exit_code == 69
    assert "no keyring backend" in result.output and "pip install keyrings.alt" in result.output


def test_password_delete(memory_keyring: MemoryKeyring, tmp_path: Path) -> None:
    memory_keyring.entries[("pymta-test", USER)] = PASSWORD
    config = keyring_config(tmp_path)
    result = run(password, ["delete", "smtp.example.org", "-C", str(config)])
    assert result.exit_code == 0 and "deleted the password" in result.output
    assert memory_keyring.entries == {}
    result = run(password, ["delete", "smtp.example.org", "-C", str(config)])
    assert result.exit_code == 0 and "nothing to do" in result.output


def test_keyring_password_is_used_by_pymta_test(
    memory_keyring: MemoryKeyring, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    assert smtp_server.tls is not None
    extra = auth_yaml(smtp_server.tls.ca_file, "{keyring: pymta-test}")
    config = write_config(tmp_path, smarthost_yaml(smtp_server.port, extra=extra))
    result = run(pymta_test, ["-C", str(config)])
    assert result.exit_code == 69 and "pymta password set 127.0.0.1" in result.output
    run(password, ["set", "127.0.0.1", "-C", str(config)], input=f"{PASSWORD}\n")
    result = run(pymta_test, ["-C", str(config)])
    assert result.exit_code == 0, result.output
