"""The console's settings: [web] in the gateway's TOML, [gateway] filling the gaps."""

from __future__ import annotations

from pathlib import Path

import pytest

from milter.errors import RulesError
from milter.web.settings import load_web_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "school-milter.toml"
    path.write_text(text)
    return path


def test_gateway_values_fill_the_gaps(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[gateway]
database = "sqlite:////var/lib/school-milter/quarantine.db"
reinject = "127.0.0.1:10026"
metrics = "127.0.0.1:9464"
console_url = "https://mail-gateway.redborne.example/"

[web]
listen = "127.0.0.1:8081"
""",
    )
    settings = load_web_settings(path, {})
    assert settings.database == "sqlite:////var/lib/school-milter/quarantine.db"
    assert settings.reinject == "127.0.0.1:10026"
    assert settings.metrics_url == "http://127.0.0.1:9464/metrics"
    assert settings.base_url == "https://mail-gateway.redborne.example"
    assert settings.origin == "https://mail-gateway.redborne.example"
    assert settings.listen == "127.0.0.1:8081"
    assert settings.secure_cookies and settings.oidc is None
    assert (settings.session_idle_minutes, settings.session_max_hours) == (30, 12)


def test_web_wins_and_overrides_win_over_both(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[gateway]
database = "sqlite:///a.db"
metrics = ""

[web]
database = "sqlite:///b.db"

[web.oidc]
name = "Google"
discovery_url = "https://accounts.google.com/.well-known/openid-configuration"
client_id = "id"
client_secret = "secret"
allowed_domains = ["Redborne.example"]
""",
    )
    settings = load_web_settings(path, {"database": "sqlite:///c.db", "listen": None})
    assert settings.database == "sqlite:///c.db"
    assert settings.metrics_url == ""
    assert settings.oidc is not None and settings.oidc.allowed_domains == ["redborne.example"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[web]\nlisten = 'nowhere'", "web.listen: 'nowhere': expected HOST:PORT"),
        ("[web]\ncolour = 'blue'", "web.colour: Extra inputs are not permitted"),
        ("[web]\nlisten = '0.0.0.0:80'\nsecure_cookies = false", "only when listening on loopback"),
        ("[web]\nbase_url = 'mail-gateway'", "expected https://HOST[:PORT]"),
        (
            "[web.oidc]\ndiscovery_url = 'http://idp.example/x'\nclient_id = 'a'\nclient_secret = 'b'\n"
            "allowed_domains = ['redborne.example']",
            "must be https://",
        ),
        (
            "[web.oidc]\ndiscovery_url = 'https://idp.example/x'\nclient_id = 'a'\nclient_secret = 'b'\n"
            "allowed_domains = []",
            "web.oidc.allowed_domains",
        ),
        ("[web\n", "not valid TOML"),
        ("web = 3", "[web] must be a table"),
    ],
)
def test_mistakes_are_reported_with_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RulesError) as caught:
        load_web_settings(path, {})
    assert any(message in str(p) and str(path) in str(p) for p in caught.value.problems), (
        caught.value.problems
    )


def test_no_file_uses_defaults() -> None:
    settings = load_web_settings(None, {"database": "sqlite:///x.db"})
    assert settings.listen == "127.0.0.1:8080"
    assert settings.metrics_url == "http://127.0.0.1:9464/metrics"
