"""The config keys of direct delivery (issue 15): `direct`, `mx:`, `dns:` and routes by recipient, read and
refused with one-line errors; `pymta config check` shows them and reads its own output back."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pymta.cli.config import config_group
from pymta.config.load import loads
from pymta.config.model import Config, DnsSettings, Mx, Route
from pymta.errors import EX_CONFIG, ConfigError

FILE = "/etc/pymta/pymta.yaml"

FULL = """\
direct: true
smarthosts:
  - host: relay.corp.example
    name: corp-relay
mx:
  port: 2525
  tls: verify
  tls_policy:
    bank.example: verify
    Müller.DE: opportunistic
  timeout: 90s
dns:
  nameservers: [127.0.0.1, "::1"]
  port: 5353
  timeout: 2s
routes:
  - recipient: "*@corp.example"
    smarthost: corp-relay
  - sender: "*@lists.example"
    smarthost: direct
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        loads(text, FILE)
    assert caught.value.exit_code == EX_CONFIG
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{FILE}: ")
    return message


def test_defaults_change_nothing() -> None:
    config = Config()
    assert config.direct is False
    assert config.mx == Mx(port=25, tls="opportunistic", tls_policy=(), timeout=300)
    assert config.dns == DnsSettings(nameservers=(), port=53, timeout=10)
    assert loads("spool: /tmp/q\n", FILE).mx == Mx()


def test_every_key_is_read() -> None:
    config = loads(FULL, FILE)
    assert config.direct is True
    assert config.mx == Mx(
        2525, "verify", (("bank.example", "verify"), ("xn--mller-kva.de", "opportunistic")), 90
    )
    assert config.dns == DnsSettings(("127.0.0.1", "::1"), 5353, 2)
    assert config.routes == (
        Route(sender=None, recipient="*@corp.example", smarthost="corp-relay"),
        Route(sender="*@lists.example", smarthost="direct"),
    )


@pytest.mark.parametrize(
    ("domain", "policy"),
    [("bank.example", "verify"), ("BANK.example.", "verify"), ("müller.de", "opportunistic"),
     ("xn--mller-kva.de", "opportunistic"), ("other.example", "verify")],
)  # fmt: skip
def test_tls_policy_compares_domains_by_their_key(domain: str, policy: str) -> None:
    assert loads(FULL, FILE).mx.tls_for(domain) == policy


def test_masked_reads_back_and_config_check_shows_it(tmp_path: Path) -> None:
    config = loads(FULL, FILE)
    again = loads(yaml.safe_dump(config.masked()), FILE)
    assert (again.direct, again.mx, again.dns, again.routes) == (
        config.direct,
        config.mx,
        config.dns,
        config.routes,
    )
    path = tmp_path / "pymta.yaml"
    path.write_text("direct: true\n")
    result = CliRunner().invoke(config_group, ["check", "-C", str(path)])
    assert result.exit_code == 0, result.output
    assert "direct: true" in result.stdout and "tls: opportunistic" in result.stdout
    assert "other mail waits in the queue" not in result.stdout  # direct mail does not wait


def test_a_route_to_direct_needs_no_direct_true() -> None:
    config = loads('routes:\n  - recipient: "*@corp.example"\n    smarthost: direct\n', FILE)
    assert config.direct is False and config.routes[0].smarthost == "direct"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("direct: yes please\n", 'direct: must be true or false, not "yes please"'),
        ("mx:\n  tls: required\n", 'mx.tls: must be one of opportunistic, verify, not "required"'),
        ("mx:\n  port: 0\n", "mx.port: must be a whole number from 1 to 65535"),
        ("mx:\n  timeout: soon\n", 'mx.timeout: "soon" is not a duration'),
        ("mx:\n  tls_policy: verify\n", "mx.tls_policy: must be a mapping of domains"),
        ("mx:\n  tls_policy:\n    bank.example: strict\n", "mx.tls_policy.bank.example: must be one of"),
        ("mx:\n  tls_policy:\n    bad_domain!: verify\n", "is not a domain name"),
        (
            "mx:\n  tls_policy:\n    müller.de: verify\n    xn--mller-kva.de: opportunistic\n",
            "mx.tls_policy.xn--mller-kva.de: is the same domain as another one here",
        ),
        ("mx:\n  tsl: verify\n", 'mx.tsl: unknown key; did you mean "tls"?'),
        ("mx: verify\n", 'mx: must be a mapping with tls: and port:, not "verify"'),
        ("dns:\n  nameservers: 127.0.0.1\n", "dns.nameservers: must be a list of IP addresses"),
        ("dns:\n  nameservers: [ns1.example]\n", 'dns.nameservers[0]: "ns1.example" is not an IP address'),
        ("dns:\n  port: 99999\n", "dns.port: must be a whole number from 1 to 65535"),
        ("dns:\n  timeout: 0\n", "dns.timeout: must be longer than 0 seconds"),
        ("tls_policy: {a.example: verify}\n", "tls_policy: unknown key here; it belongs under mx:"),
        ("nameservers: [127.0.0.1]\n", "nameservers: unknown key here; it belongs under dns:"),
        (
            'routes:\n  - recipient: "*@a.example"\n    sender: "*@b.example"\n    smarthost: direct\n',
            "routes[0]: needs exactly one of sender: and recipient:",
        ),
        ("routes:\n  - smarthost: direct\n", "routes[0]: needs exactly one of sender: and recipient:"),
        ('routes:\n  - recipient: "*@a.example"\n', "routes[0].smarthost: is missing"),
        (
            'routes:\n  - recipient: "*@a.example"\n    smarthost: relay\n',
            'routes[0].smarthost: "relay" is not a smarthost\'s name or host',
        ),
        (
            "smarthosts:\n  - host: relay.example\n    name: direct\n",
            'smarthosts[0]: is called "direct", the name routes use for the MX hosts',
        ),
        ("smarthosts:\n  - host: direct\n", 'smarthosts[0]: is called "direct"'),
    ],
)
def test_invalid_keys_are_one_line_errors(text: str, message: str) -> None:
    assert message in error_of(text)


def test_config_check_exits_78_for_a_bad_direct_key(tmp_path: Path) -> None:
    path = tmp_path / "pymta.yaml"
    path.write_text("mx:\n  tls: always\n")
    result = CliRunner().invoke(config_group, ["check", "-C", str(path)])
    assert result.exit_code == EX_CONFIG
    assert result.stderr == (f'pymta: {path}: mx.tls: must be one of opportunistic, verify, not "always"\n')
