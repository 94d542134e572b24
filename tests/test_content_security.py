"""Every page sends a Content-Security-Policy that allows only this site's own
scripts, styles and connections (and websockets to this host), and no template
needs more: no inline script, style or event-handler attribute."""

import re
from pathlib import Path

import pytest
from django.test import Client

ROOT = Path(__file__).resolve().parent.parent


def directives(response) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]
    return {
        name: values
        for name, *values in (part.split() for part in header.split(";") if part.strip())
    }


@pytest.mark.parametrize("path", ["/", "/jobs/", "/usage/", "/planner/", "/account/keys/"])
def test_signed_in_pages_send_the_policy(cast, path):
    client = Client()
    client.force_login(cast.alice)
    response = client.get(path)
    assert response.status_code == 200
    policy = directives(response)
    assert policy["default-src"] == ["'self'"]
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'", "ws://testserver", "wss://testserver"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["object-src"] == ["'none'"]


def test_the_login_page_sends_the_policy_for_its_own_host(db):
    response = Client().get("/login/", HTTP_HOST="localhost:8000")
    assert directives(response)["connect-src"] == [
        "'self'",
        "ws://localhost:8000",
        "wss://localhost:8000",
    ]


def test_a_host_we_do_not_serve_gets_no_websocket_source(db):
    response = Client().get("/login/", HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert directives(response)["connect-src"] == ["'self'"]


INLINE = re.compile(
    r"<script(?![^>]*\bsrc=)[^>]*>|<style\b|\sstyle=\"|\son[a-z]+=\"", re.IGNORECASE
)


def test_no_template_has_inline_scripts_styles_or_handlers():
    offenders = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in sorted((ROOT / "templates").rglob("*.html"))
        for match in INLINE.finditer(path.read_text())
    ]
    assert offenders == []
