"""API keys: the keys page (create, with an expiry and limits; show once, revoke,
team admins' view) and `manage.py createapikey`. Alice is Red's admin, Bob a member,
Charlie on his own."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from inference.models import Generation
from mixtralweb.accounts.models import ApiKey, ApiKeyExpired, Quota

URL = "/account/keys/"


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_keys_page_needs_a_login(cast):
    response = Client().get(URL)
    assert response.status_code == 302 and reverse("login") in response["Location"]


def test_a_new_key_is_shown_once_and_stored_hashed(cast):
    client = logged_in(cast.alice)
    response = client.post(URL, {"name": "laptop editor"})
    assert response.status_code == 302
    key = ApiKey.objects.get(user=cast.alice)
    page = client.get(URL).content.decode()
    secret = page.split('<code id="new-key-secret">')[1].split("</code>")[0]
    assert secret.startswith("mxw-") and len(secret) > 40
    assert ApiKey.authenticate(secret) == key
    # Only the hash is kept; the page never shows the secret again.
    assert secret not in {key.name, key.prefix, key.secret_hash}
    assert key.secret_hash == ApiKey.hash_secret(secret)
    assert secret not in client.get(URL).content.decode()
    assert key.prefix in page


def test_a_key_needs_a_name_unique_among_the_users_active_keys(cast):
    client = logged_in(cast.alice)
    client.post(URL, {"name": "ci"})
    response = client.post(URL, {"name": "ci"})
    assert response.status_code == 200
    assert "already have a key named" in response.content.decode()
    response = client.post(URL, {"name": "   "})
    assert response.status_code == 200 and ApiKey.objects.count() == 1
    # Bob may use the same name, and Alice may reuse it once the first is revoked.
    logged_in(cast.bob).post(URL, {"name": "ci"})
    ApiKey.objects.get(user=cast.alice).revoke()
    client.post(URL, {"name": "ci"})
    assert ApiKey.objects.filter(name="ci").count() == 3


def test_a_revoked_key_no_longer_authenticates(cast):
    key, secret = ApiKey.issue(user=cast.alice, name="old")
    response = logged_in(cast.alice).post(reverse("api_key_revoke", args=[key.pk]))
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert ApiKey.authenticate(secret) is None


def test_nobody_revokes_someone_elses_key(cast):
    key, secret = ApiKey.issue(user=cast.alice, name="mine")
    response = logged_in(cast.charlie).post(reverse("api_key_revoke", args=[key.pk]))
    assert response.status_code == 404
    assert ApiKey.authenticate(secret) == key


def test_authentication_records_the_last_use(cast):
    key, secret = ApiKey.issue(user=cast.alice, name="cron")
    assert key.last_used_at is None
    ApiKey.authenticate(secret)
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_the_last_use_is_written_at_most_once_a_minute(cast):
    key, secret = ApiKey.issue(user=cast.alice, name="busy script")
    ApiKey.authenticate(secret)
    key.refresh_from_db()
    first = key.last_used_at
    ApiKey.authenticate(secret)
    key.refresh_from_db()
    assert key.last_used_at == first
    # A minute later the next call records itself again.
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=first - ApiKey.LAST_USED_RESOLUTION)
    ApiKey.authenticate(secret)
    key.refresh_from_db()
    assert key.last_used_at > first


def test_an_expired_key_is_refused_as_expired_and_its_last_use_kept(cast):
    key, secret = ApiKey.issue(
        user=cast.alice, name="old", expires_at=timezone.now() - timedelta(seconds=1)
    )
    with pytest.raises(ApiKeyExpired, match=r"expired on \d{4}-\d\d-\d\d \d\d:\d\d UTC"):
        ApiKey.authenticate(secret)
    key.refresh_from_db()
    assert key.last_used_at is None and key.state == "expired"
    # Until then it works.
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() + timedelta(minutes=1))
    assert ApiKey.authenticate(secret) == key


def test_a_key_is_created_with_an_expiry_and_its_own_limits(cast):
    client = logged_in(cast.alice)
    response = client.post(
        URL,
        {"name": "ci", "expires": "30", "requests_per_minute": "5", "tokens_per_day": ""},
    )
    assert response.status_code == 302
    key = ApiKey.objects.get(user=cast.alice)
    assert abs(key.expires_at - (timezone.now() + timedelta(days=30))) < timedelta(minutes=1)
    assert (key.requests_per_minute, key.tokens_per_day, key.concurrent_generations) == (
        5,
        None,
        None,
    )
    row = client.get(URL).content.decode().split('id="my-keys"')[1].split("</tr>")[1]
    assert key.expires_at_display in row and "5 requests per minute" in row
    # On a date: refused from that day's start, in TIME_ZONE; never: no expiry.
    tomorrow = timezone.localdate() + timedelta(days=1)
    client.post(URL, {"name": "dated", "expires": "date", "expires_on": tomorrow.isoformat()})
    dated = ApiKey.objects.get(name="dated")
    assert dated.expires_at == timezone.make_aware(datetime.combine(tomorrow, time.min))
    client.post(URL, {"name": "forever", "expires": "never"})
    assert ApiKey.objects.get(name="forever").expires_at is None


# What the form refuses, the field it names and (part of) the message.
REFUSED_KEY_FORMS = [
    ({"expires": "date"}, "expires_on", "Choose the date on which the key expires."),
    ({"expires": "date", "expires_on": "TODAY"}, "expires_on", "Choose a date after today."),
    ({"expires": "never", "expires_on": "TOMORROW"}, "expires_on", "is not &#x27;On the"),
    ({"requests_per_minute": "0"}, "requests_per_minute", "or equal to 1"),
    (
        {"requests_per_minute": "11"},
        "requests_per_minute",
        "Your own limit is 10 requests per minute; a key&#x27;s limit cannot be above it.",
    ),
    ({"tokens_per_day": "2000"}, "tokens_per_day", "Your own limit is 1,000 tokens per day"),
]


def test_the_key_form_refuses_what_it_cannot_honour_and_says_why(cast):
    # One test for the table (each test here costs a database flush).
    Quota.objects.create(user=cast.alice, requests_per_minute=10, tokens_per_day=1000)
    client = logged_in(cast.alice)
    dates = {"TODAY": timezone.localdate(), "TOMORROW": timezone.localdate() + timedelta(days=1)}
    for post, field, message in REFUSED_KEY_FORMS:
        data = {k: dates[v].isoformat() if v in dates else v for k, v in post.items()}
        response = client.post(URL, {"name": "x", **data})
        assert response.status_code == 200, post
        page = response.content.decode()
        assert f'<p class="error" id="id_{field}_error">' in page and message in page, post
        field_tag = page.split(f'id="id_{field}"')[0].rsplit("<", 1)[1]
        assert 'aria-invalid="true"' in field_tag and f"id_{field}_error" in field_tag, post
    assert not ApiKey.objects.exists()
    # Up to her own limit, and any where she has none (0), is accepted.
    client.post(URL, {"name": "a", "requests_per_minute": "10", "concurrent_generations": "50"})
    key = ApiKey.objects.get(name="a")
    assert (key.requests_per_minute, key.concurrent_generations) == (10, 50)


def test_the_keys_page_shows_the_last_use_relatively_and_each_keys_state(cast):
    used, _ = ApiKey.issue(user=cast.alice, name="used")
    ApiKey.objects.filter(pk=used.pk).update(last_used_at=timezone.now() - timedelta(minutes=5))
    ApiKey.issue(user=cast.alice, name="fresh")
    ApiKey.issue(user=cast.alice, name="gone", expires_at=timezone.now() - timedelta(days=1))
    page = logged_in(cast.alice).get(URL).content.decode()
    rows = {
        name: page.split(f'data-label="Name">{name}</td>')[1].split("</tr>")[0]
        for name in ("used", "fresh", "gone")
    }
    assert ">5\u00a0minutes ago</time>" in rows["used"]
    assert 'data-label="Last used">never</td>' in rows["fresh"]
    assert "expired" in rows["gone"] and "Revoke gone" in rows["gone"]
    # An expired key keeps its name until it is revoked, and the form says so.
    response = logged_in(cast.alice).post(URL, {"name": "gone", "expires": "never"})
    assert "It has expired: revoke it to use its name again." in response.content.decode()


def test_a_deactivated_users_key_does_not_authenticate(cast):
    _, secret = ApiKey.issue(user=cast.charlie, name="x")
    cast.charlie.is_active = False
    cast.charlie.save()
    assert ApiKey.authenticate(secret) is None


def api_generation(user, key_name, model, prompt_tokens, completion_tokens):
    gen = Generation.objects.create(
        user=user,
        model=model,
        source=Generation.SOURCE_API,
        api_key_name=key_name,
        state=Generation.DONE,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )
    return gen


def test_a_team_admin_sees_the_usage_of_members_keys(cast, default_model):
    ApiKey.issue(user=cast.bob, name="bob-bot")
    api_generation(cast.bob, "bob-bot", default_model, 100, 23)
    api_generation(cast.bob, "bob-bot", default_model, 50, 7)
    ApiKey.issue(user=cast.charlie, name="charlie-bot")
    page = logged_in(cast.alice).get(URL).content.decode()
    team_table = page.split("Keys of Red's members")[1]
    assert "bob-bot" in team_table
    row = team_table.split("bob-bot")[1].split("</tr>")[0]
    assert 'data-label="Requests">2</td>' in row and 'data-label="Tokens">180</td>' in row
    assert "charlie-bot" not in page, "Charlie is not in Red"


def test_a_team_member_does_not_see_other_members_keys(cast):
    ApiKey.issue(user=cast.alice, name="alice-bot")
    page = logged_in(cast.bob).get(URL).content.decode()
    assert "alice-bot" not in page and "Keys of Red" not in page


def test_createapikey_prints_a_working_key(cast):
    out = StringIO()
    call_command("createapikey", "bob", "--name", "deploy", stdout=out)
    secret = out.getvalue().strip()
    key = ApiKey.authenticate(secret)
    assert key.user == cast.bob and key.name == "deploy"


def test_createapikey_refuses_an_unknown_user_and_a_duplicate_name(cast):
    with pytest.raises(CommandError, match="no user 'nobody'"):
        call_command("createapikey", "nobody", "--name", "x", stdout=StringIO())
    call_command("createapikey", "bob", "--name", "x", stdout=StringIO())
    with pytest.raises(CommandError, match="already has an active key"):
        call_command("createapikey", "bob", "--name", "x", stdout=StringIO())
    assert ApiKey.objects.filter(user=cast.bob).count() == 1
