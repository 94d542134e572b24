"""API keys: the keys page (create, show once, revoke, team admins' view) and
`manage.py createapikey`. Alice is Red's admin, Bob a member, Charlie on his own."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from inference.models import Generation
from mixtralweb.accounts.models import ApiKey

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
    assert "<td>2</td>" in row and "<td>180</td>" in row
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
