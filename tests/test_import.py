"""`pymta import nullmailer|msmtp|ssmtp`: real sample files of each relay, run through the installed `pymta`.

Every imported config must pass `pymta config check`; no password may show on stdout or stderr; `--write`
makes 0600 password files and replaces nothing without --force. The last test is a user's whole way in:
an msmtprc for a loopback server with AUTH, imported, and one message delivered through it by `pymta flush`.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, local_sandbox
from mailservers import PASSWORD, USER, SmtpServer, certificates, smtp_server, wait_until

from pymta.config.load import loads

__all__ = ["certificates", "smtp_server"]  # fixtures

WEBDE_SECRET = "w3b.de-Geheim#1 =x"
GMAIL_SECRET = "abcd efgh ijkl mnop"
GMX_SECRET = 'gmx"pass\\word'


def run(*args: str, home: Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    result = subprocess.run([str(BIN / "pymta"), *args], capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_no_secret(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        for part in (secret, *secret.split()):
            if len(part) >= 4:
                assert part not in result.stdout and part not in result.stderr, part


def checked(tmp_path: Path, text: str) -> str:
    """`pymta config check` on the printed config must succeed; returns its output."""
    path = tmp_path / "imported.yaml"
    path.write_text(text)
    result = run("config", "check", "-C", str(path), home=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- nullmailer ---


def nullmailer_dir(tmp_path: Path, remotes: str, **control: str) -> Path:
    directory = tmp_path / "nullmailer"
    directory.mkdir()
    (directory / "remotes").write_text(remotes)
    for name, text in control.items():
        (directory / name).write_text(text)
    return directory


def test_nullmailer_webde_with_its_control_files(tmp_path: Path) -> None:
    directory = nullmailer_dir(
        tmp_path,
        "# relay via web.de\n\n  smtp.web.de smtp --port=587 --starttls --user=me@web.de "
        f"--pass={WEBDE_SECRET.replace(' ', '')}\n"
        "backup.example.net   qmqp\n",
        me="box\n",
        defaultdomain="example.org\n",
        defaulthost="example.org\n",
        adminaddr="me@web.de, other@example.org\n",
        pausetime="60\n",
    )
    result = run("import", "nullmailer", str(directory), home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result, WEBDE_SECRET.replace(" ", ""))
    document = yaml.safe_load(result.stdout)
    assert document["hostname"] == "box.example.org"
    assert document["domain"] == "example.org"
    assert document["admin"] == "me@web.de"
    (host,) = document["smarthosts"]
    assert host["host"] == "smtp.web.de" and host["port"] == 587 and host["security"] == "starttls"
    assert host["username"] == "me@web.de"
    assert host["password"] == {"file": "/etc/pymta/secrets/smtp.web.de"}  # root: the system's place
    assert "qmqp" in result.stdout and "pausetime" in result.stdout  # noted, with why
    assert "other@example.org" in result.stdout.split("\n\n")[0]  # in the comments
    checked(tmp_path, result.stdout)


def test_nullmailer_ssl_insecure_and_plain_remotes_in_order(tmp_path: Path) -> None:
    directory = nullmailer_dir(
        tmp_path,
        "mail.gmx.net smtp --ssl --user=me@gmx.de --pass=x1y2z3w4 --insecure\n"
        "relay.isp.example smtp\n"
        "relay2.isp.example smtp port=2525 user=box pass=plainpw9\n",
    )
    result = run("import", "nullmailer", str(directory), home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result, "x1y2z3w4", "plainpw9")
    hosts = yaml.safe_load(result.stdout)["smarthosts"]
    assert [(h["host"], h["port"], h["security"]) for h in hosts] == [
        ("mail.gmx.net", 465, "tls"),
        ("relay.isp.example", 25, "none"),
        ("relay2.isp.example", 2525, "none"),
    ]
    assert hosts[2]["auth_plaintext"] is True and "unencrypted" in result.stdout
    assert "--insecure" in result.stdout
    checked(tmp_path, result.stdout)


def test_nullmailer_without_remotes_is_66(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run("import", "nullmailer", str(tmp_path / "empty"), home=tmp_path)
    assert result.returncode == 66, result.stderr
    assert "remotes" in result.stderr and result.stdout == ""
    missing = run("import", "nullmailer", str(tmp_path / "nowhere"), home=tmp_path)
    assert missing.returncode == 66


# --- msmtp ---

MSMTPRC = f"""\
# ~/.msmtprc: several accounts
defaults
auth           on
tls            on
tls_trust_file /etc/ssl/certs/ca-certificates.crt
logfile        ~/.msmtp.log

# GMX, password from gpg
account        gmx
host           mail.gmx.net
port           587
from           me@gmx.de
user           me@gmx.de
passwordeval   "gpg --quiet --decrypt ~/.gmx.gpg"

account   webde
host  smtp.web.de
\tport 465
tls_starttls off
from\tme@web.de
user me@web.de
password {WEBDE_SECRET}

account gmail : gmx
host smtp.gmail.com
from me@gmail.com
user me@gmail.com
password "{GMAIL_SECRET}"
tls_certcheck off

account default : gmx
"""


def test_msmtp_accounts_become_smarthosts_and_routes(tmp_path: Path) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_text(MSMTPRC)
    result = run("import", "msmtp", str(rc), home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result, WEBDE_SECRET, GMAIL_SECRET)
    document = yaml.safe_load(result.stdout)
    hosts = {host["name"]: host for host in document["smarthosts"]}
    assert list(hosts) == ["gmx", "webde", "gmail"]  # the default account first, no second copy of it
    assert hosts["gmx"]["password"] == {"command": "gpg --quiet --decrypt ~/.gmx.gpg"}
    assert (hosts["webde"]["port"], hosts["webde"]["security"]) == (465, "tls")
    assert (hosts["gmail"]["port"], hosts["gmail"]["security"]) == (587, "starttls")  # from its parent
    assert hosts["gmail"]["password"] == {"file": "/etc/pymta/secrets/gmail"}
    assert document["routes"] == [
        {"sender": "me@web.de", "smarthost": "webde"},
        {"sender": "me@gmail.com", "smarthost": "gmail"},
        {"sender": "*", "smarthost": "gmx"},
    ]
    assert document["rewrite"] == {"from": "me@gmx.de"}
    comments = result.stdout.split("\n\n")[0]
    assert "tls_certcheck" in comments and comments.count("logfile") == 1
    assert "admin:" in comments
    checked(tmp_path, result.stdout)


def test_msmtp_found_in_home_when_no_path_is_given(tmp_path: Path) -> None:
    home = tmp_path / "user"
    home.mkdir()
    (home / ".msmtprc").write_text(
        "account default\nhost smtp.example.org\nport 25\nauth off\nfrom box@example.org\n"
    )
    result = run("import", "msmtp", home=home)
    assert result.returncode == 0, result.stderr
    (host,) = yaml.safe_load(result.stdout)["smarthosts"]
    assert (host["host"], host["port"], host["security"]) == ("smtp.example.org", 25, "none")
    assert str(home / ".msmtprc") in result.stdout
    checked(tmp_path, result.stdout)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("host smtp.example.org\n", "before any account"),
        ('account a\nhost smtp.example.org\npassword "open\n', "never closed"),
        ("account a\nhost smtp.example.org\nport submission\n", "not a port"),
        ("defaults\ntls on\n", "defines no account"),
        ("account a : nosuch\nhost x.example\n", "nosuch"),
        ("account a\nhost smtp_with_underscore\n", "host"),
    ],
)
def test_msmtp_broken_file_is_78_with_the_line(tmp_path: Path, text: str, fragment: str) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_text(text)
    result = run("import", "msmtp", str(rc), home=tmp_path)
    assert result.returncode == 78, (result.stdout, result.stderr)
    assert fragment in result.stderr and result.stdout == ""
    assert "open" not in result.stderr or "never closed" in result.stderr  # no password in the error


def test_msmtp_unreadable_is_78_and_missing_is_66(tmp_path: Path) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_bytes(b"account a\nhost \xff\n")
    result = run("import", "msmtp", str(rc), home=tmp_path)
    assert result.returncode == 78 and "UTF-8" in result.stderr
    assert run("import", "msmtp", str(tmp_path / "none"), home=tmp_path).returncode == 66
    assert run("import", "exim", home=tmp_path).returncode == 64


# --- ssmtp ---


def test_ssmtp_gmail_with_revaliases(tmp_path: Path) -> None:
    directory = tmp_path / "ssmtp"
    directory.mkdir()
    (directory / "ssmtp.conf").write_text(
        "#\n# Config file for sSMTP sendmail\n#\nroot=me@gmail.com\n"
        "mailhub=smtp.gmail.com:587\n  rewriteDomain = gmail.com  \nhostname=box.example.org\n"
        f"AuthUser=me@gmail.com\nAuthPass={GMAIL_SECRET}\nUseTLS=YES\nUseSTARTTLS=YES\n"
        "FromLineOverride=YES\n"
    )
    (directory / "revaliases").write_text(
        "# sSMTP aliases\nroot:me@gmail.com:smtp.gmail.com:587\nwww-data:web@example.org\n"
    )
    result = run("import", "ssmtp", str(directory / "ssmtp.conf"), home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result, GMAIL_SECRET)
    document = yaml.safe_load(result.stdout)
    assert document["admin"] == "me@gmail.com" and document["domain"] == "gmail.com"
    assert document["hostname"] == "box.example.org"
    assert document["rewrite"] == {"from": "me@gmail.com"}
    (host,) = document["smarthosts"]
    assert (host["host"], host["port"], host["security"]) == ("smtp.gmail.com", 587, "starttls")
    assert "www-data" in result.stdout and "certificate" in result.stdout
    checked(tmp_path, result.stdout)


def test_ssmtp_without_mailhub_is_78(tmp_path: Path) -> None:
    conf = tmp_path / "ssmtp.conf"
    conf.write_text("root=postmaster\nAuthPass=hunter22\n")
    result = run("import", "ssmtp", str(conf), home=tmp_path)
    assert result.returncode == 78 and "mailhub" in result.stderr
    assert_no_secret(result, "hunter22")


# --- --write ---


def test_write_makes_0600_secrets_and_refuses_to_clobber(tmp_path: Path) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_text(MSMTPRC)
    config = tmp_path / "etc" / "pymta.yaml"
    result = run("import", "msmtp", str(rc), "--write", "-C", str(config), home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result, WEBDE_SECRET, GMAIL_SECRET)
    secrets = tmp_path / "etc" / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for name, secret in (("webde", WEBDE_SECRET), ("gmail", GMAIL_SECRET)):
        path = secrets / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == os.geteuid()
        assert path.read_text() == secret + "\n"
    text = config.read_text()
    assert WEBDE_SECRET not in text and GMAIL_SECRET not in text
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    assert loads(text, str(config)).smarthosts[1].password.reference == str(secrets / "webde")  # type: ignore[union-attr]
    checked(tmp_path, text)

    config.write_text("# mine\n")
    again = run("import", "msmtp", str(rc), "--write", "-C", str(config), home=tmp_path)
    assert again.returncode == 73 and "--force" in again.stderr
    assert config.read_text() == "# mine\n"
    forced = run("import", "msmtp", str(rc), "--write", "--force", "-C", str(config), home=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert config.read_text() == text


def test_write_refuses_a_secrets_directory_others_may_enter(tmp_path: Path) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_text(MSMTPRC)
    (tmp_path / "secrets").mkdir(mode=0o755)
    os.chmod(tmp_path / "secrets", 0o755)
    config = tmp_path / "pymta.yaml"
    result = run("import", "msmtp", str(rc), "--write", "-C", str(config), home=tmp_path)
    assert result.returncode == 73 and "private" in result.stderr
    assert not config.exists() and list((tmp_path / "secrets").iterdir()) == []


def test_write_does_not_install_an_invalid_config(tmp_path: Path) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_text(f"account default\nhost bad_host\ntls on\nuser u\npassword {WEBDE_SECRET}\n")
    config = tmp_path / "pymta.yaml"
    result = run("import", "msmtp", str(rc), "--write", "-C", str(config), home=tmp_path)
    assert result.returncode == 78, result.stderr
    assert not config.exists() and not (tmp_path / "secrets").exists()
    assert_no_secret(result, WEBDE_SECRET)


# --- a user's way in, end to end ---


def test_imported_msmtprc_delivers_through_a_real_server(tmp_path: Path, smtp_server: SmtpServer) -> None:
    home = tmp_path / "home"
    (home / ".msmtprc").write_text(
        "defaults\ntls on\ntls_starttls on\n"
        f"tls_trust_file {smtp_server.tls.ca_file}\n"  # type: ignore[union-attr]
        f"\naccount loop\nhost 127.0.0.1\nport {smtp_server.port}\nauth on\nfrom {USER}\nuser {USER}\n"
        f'password "{PASSWORD}"\n\naccount default : loop\n'
    )
    config = home / ".config" / "pymta" / "pymta.yaml"
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    imported = subprocess.run(
        [str(BIN / "pymta"), "import", "msmtp", "--write", "-C", str(config)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert PASSWORD not in imported.stdout + imported.stderr
    with config.open("a") as handle:  # keep the spool and local mail inside the test
        handle.write(f"spool: {tmp_path / 'spool'}\ndeliver: queue\n{local_sandbox(tmp_path)}")
    env["PYMTA_CONFIG"] = str(config)
    sent = subprocess.run(
        [str(BIN / "sendmail"), "-f", USER, "you@example.org"],
        input=b"Subject: imported\n\nhello\n", env=env, timeout=60,
    )  # fmt: skip
    assert sent.returncode == 0
    flushed = subprocess.run(
        [str(BIN / "pymta"), "flush", "-v"], capture_output=True, text=True, env=env, timeout=60
    )
    assert flushed.returncode == 0, flushed.stderr
    assert PASSWORD not in flushed.stdout + flushed.stderr
    wait_until(lambda: len(smtp_server.handler.messages) == 1, what="the message")
    (message,) = smtp_server.handler.messages
    assert message.rcpt_tos == ["you@example.org"] and message.login == USER
    assert b"hello" in message.data


def test_msmtp_login_without_tls_setting_gets_starttls_and_keyring(tmp_path: Path) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_text("account default\nhost smtp.gmx.net\nport 587\nauth login\nuser me@gmx.de\n")
    result = run("import", "msmtp", str(rc), home=tmp_path)
    assert result.returncode == 0, result.stderr
    (host,) = yaml.safe_load(result.stdout)["smarthosts"]
    assert host["security"] == "starttls" and "auth_plaintext" not in host  # never a password in clear
    assert host["auth"] == "login" and host["password"] == {"keyring": "pymta"}
    assert "pymta password set default" in result.stdout
    checked(tmp_path, result.stdout)


def test_ssmtp_does_not_show_the_value_of_a_key_it_does_not_know(tmp_path: Path) -> None:
    conf = tmp_path / "ssmtp.conf"
    conf.write_text("mailhub=mail.isp.example\nAuthUser=box\nAuthPasswd=hunter22\n")
    result = run("import", "ssmtp", str(conf), home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "authpasswd" in result.stdout
    assert_no_secret(result, "hunter22")
    (host,) = yaml.safe_load(result.stdout)["smarthosts"]
    assert (host["port"], host["security"], host["username"]) == (25, "none", "box")
    assert "password" not in host


def test_ssmtp_ipv6_mailhub_and_a_hostile_path_stays_in_its_comment(tmp_path: Path) -> None:
    directory = tmp_path / "a\rb"
    directory.mkdir()
    conf = directory / "ssmtp.conf"
    conf.write_text("mailhub=[2001:db8::25]:2525\nhostname=box.example.org\n")
    result = run("import", "ssmtp", str(conf), home=tmp_path)
    assert result.returncode == 0, result.stderr
    (host,) = yaml.safe_load(result.stdout)["smarthosts"]
    assert (host["host"], host["port"]) == ("2001:db8::25", 2525)
    assert "\r" not in result.stdout
    checked(tmp_path, result.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another user")
def test_write_as_root_refuses_a_secrets_directory_another_user_owns(tmp_path: Path) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_text(MSMTPRC)
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    os.chown(secrets, 65534, 65534)  # nobody: a password written here would be theirs to read
    config = tmp_path / "pymta.yaml"
    result = run("import", "msmtp", str(rc), "--write", "-C", str(config), home=tmp_path)
    assert result.returncode == 73 and "another user" in result.stderr
    assert not config.exists() and list(secrets.iterdir()) == []
