"""Login throttling: wrong passwords for one username from one address lock that
pair out for a while, even with the right password; the login page says so."""

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.conf import settings
from django.test import Client
from django.utils import timezone

LOCKED = b"Too many failed logins for this username from your address"


@pytest.fixture
def throttled(settings):
    """Throttling on, as in every server (tests/conftest.py turns it off in the
    tests' own process, for the test client's login())."""
    settings.AXES_ENABLED = True


def log_in(client: Client, username: str, password: str, **extra):
    return client.post("/login/", {"username": username, "password": password}, **extra)


def fail(client: Client, username: str, times: int, **extra):
    """`times` wrong passwords; the last response. The one that reaches the limit
    already gets the lockout page."""
    for attempt in range(1, times + 1):
        response = log_in(client, username, "wrong-password", **extra)
        if attempt < settings.LOGIN_FAILURE_LIMIT:
            assert response.status_code == 200 and b"didn't match" in response.content
    return response


def test_wrong_passwords_lock_the_account_out_even_with_the_right_password(cast, throttled):
    assert settings.LOGIN_FAILURE_LIMIT == 5
    client = Client()
    fail(client, "alice", settings.LOGIN_FAILURE_LIMIT - 1)
    assert log_in(Client(), "alice", "alice-pass-123").status_code == 302  # not yet

    client = Client()
    last_wrong = fail(client, "alice", settings.LOGIN_FAILURE_LIMIT)
    assert last_wrong.status_code == 429 and LOCKED in last_wrong.content
    response = log_in(client, "alice", "alice-pass-123")
    assert response.status_code == 429
    assert LOCKED in response.content
    assert b"locked for 15 minutes" in response.content
    assert settings.SESSION_COOKIE_NAME not in client.cookies
    assert client.get("/").status_code == 302  # still anonymous


def test_the_lockout_holds_one_username_from_one_address(cast, throttled):
    fail(Client(), "alice", settings.LOGIN_FAILURE_LIMIT)
    elsewhere = log_in(Client(), "alice", "alice-pass-123", REMOTE_ADDR="10.1.2.3")
    assert elsewhere.status_code == 302
    assert log_in(Client(), "bob", "bob-pass-123").status_code == 302


def test_a_successful_login_clears_the_count(cast, throttled):
    fail(Client(), "alice", settings.LOGIN_FAILURE_LIMIT - 1)
    assert log_in(Client(), "alice", "alice-pass-123").status_code == 302
    fail(Client(), "alice", settings.LOGIN_FAILURE_LIMIT - 1)
    assert log_in(Client(), "alice", "alice-pass-123").status_code == 302


def test_the_lockout_ends_after_the_cool_off(cast, throttled):
    fail(Client(), "alice", settings.LOGIN_FAILURE_LIMIT)
    assert log_in(Client(), "alice", "alice-pass-123").status_code == 429
    cool_off = timedelta(minutes=settings.LOGIN_COOLOFF_MINUTES)
    AccessAttempt.objects.update(attempt_time=timezone.now() - cool_off - timedelta(seconds=5))
    assert log_in(Client(), "alice", "alice-pass-123").status_code == 302


def test_the_admin_login_is_throttled_too(cast, throttled):
    client = Client()
    for _ in range(settings.LOGIN_FAILURE_LIMIT):
        client.post("/admin/login/", {"username": "alice", "password": "wrong-password"})
    assert log_in(client, "alice", "alice-pass-123").status_code == 429


def test_the_test_client_logs_in_in_the_tests_own_process(cast):
    client = Client()
    assert client.login(username="alice", password="alice-pass-123")
    assert client.get("/").status_code == 200
