"""Quotas and rate limits: per user, per team and per API key, tokens per day,
generations per minute and at once; enforced on chat and the API. Alice and Bob
share team Red; Charlie is on his own."""

from __future__ import annotations

from datetime import timedelta

import openai
import pytest
from django.conf import settings
from django.utils import timezone

from inference.models import Conversation, Generation, Message
from inference.quotas import QuotaExceeded, check_quota, start_of_day
from mixtralweb.accounts.models import ApiKey, Quota


def generation(user, model, *, state=Generation.DONE, ago_s=0, tokens=None, team=None, key_name=""):
    gen = Generation.objects.create(
        user=user,
        team=team,
        model=model,
        api_key_name=key_name,
        source=Generation.SOURCE_API if key_name else Generation.SOURCE_CHAT,
        state=state,
        queued_at=timezone.now() - timedelta(seconds=ago_s),
        prompt_tokens=tokens or 0,
    )
    return gen


def test_nothing_is_limited_by_default(cast, default_model):
    for _ in range(5):
        generation(cast.charlie, default_model, state=Generation.RUNNING, tokens=10_000)
    check_quota(user=cast.charlie)


def test_the_concurrency_limit_waits_for_a_generation_to_finish(cast, default_model):
    Quota.objects.create(user=cast.charlie, concurrent_generations=1)
    running = generation(cast.charlie, default_model, state=Generation.RUNNING)
    with pytest.raises(QuotaExceeded) as caught:
        check_quota(user=cast.charlie)
    assert "1 generation(s) at once" in str(caught.value)
    assert caught.value.retry_after_s > 0
    running.state = Generation.DONE
    running.save()
    check_quota(user=cast.charlie)


def test_the_rate_limit_says_when_the_oldest_request_leaves_the_minute(cast, default_model):
    Quota.objects.create(user=cast.charlie, requests_per_minute=2)
    generation(cast.charlie, default_model, ago_s=90)  # outside the window
    generation(cast.charlie, default_model, ago_s=40)
    check_quota(user=cast.charlie)
    generation(cast.charlie, default_model, ago_s=10)
    with pytest.raises(QuotaExceeded) as caught:
        check_quota(user=cast.charlie)
    assert 18 <= caught.value.retry_after_s <= 21
    assert "2 generation(s) per minute" in str(caught.value)
    assert "Try again in 2" in str(caught.value)


def test_the_daily_token_quota_counts_today_only_and_resets_at_midnight(cast, default_model):
    Quota.objects.create(user=cast.charlie, tokens_per_day=1000)
    yesterday = (timezone.now() - start_of_day(timezone.now())).total_seconds() + 60
    generation(cast.charlie, default_model, ago_s=yesterday, tokens=5000)
    generation(cast.charlie, default_model, tokens=600)
    check_quota(user=cast.charlie)
    generation(cast.charlie, default_model, tokens=400)
    with pytest.raises(QuotaExceeded) as caught:
        check_quota(user=cast.charlie)
    to_midnight = (start_of_day(timezone.now()) + timedelta(days=1) - timezone.now()).seconds
    assert abs(caught.value.retry_after_s - to_midnight) <= 2
    assert "1,000 tokens per day" in str(caught.value)
    assert "1,000 have been used today" in str(caught.value)


def test_a_team_quota_counts_its_members_together(cast, default_model):
    Quota.objects.create(team=cast.red, requests_per_minute=2)
    generation(cast.alice, default_model, ago_s=5)
    generation(cast.bob, default_model, ago_s=5)
    with pytest.raises(QuotaExceeded) as caught:
        check_quota(user=cast.bob)
    assert str(caught.value).startswith("Team Red's limit")
    check_quota(user=cast.charlie)  # not in Red


def test_a_team_without_a_quota_row_gets_the_team_default_from_settings(
    cast, default_model, settings
):
    settings.QUOTA_TEAM_REQUESTS_PER_MINUTE = 2
    generation(cast.alice, default_model, ago_s=5)
    generation(cast.bob, default_model, ago_s=5)
    with pytest.raises(QuotaExceeded) as caught:
        check_quota(user=cast.alice)
    assert str(caught.value).startswith("Team Red's limit is 2 generation(s) per minute")
    check_quota(user=cast.charlie)  # in no team


def test_a_blank_limit_takes_the_settings_default_and_zero_means_none(
    cast, default_model, settings
):
    settings.QUOTA_USER_CONCURRENT_GENERATIONS = 1
    generation(cast.charlie, default_model, state=Generation.QUEUED)
    quota = Quota.objects.create(user=cast.charlie, tokens_per_day=10**6)
    with pytest.raises(QuotaExceeded):
        check_quota(user=cast.charlie)
    quota.concurrent_generations = 0
    quota.save()
    check_quota(user=cast.charlie)


def test_a_keys_own_rate_limit_counts_that_keys_generations_only(cast, default_model):
    # An earlier, revoked key of the same name: its generations are not the new key's.
    old, _ = ApiKey.issue(user=cast.charlie, name="bot")
    generation(cast.charlie, default_model, ago_s=20, key_name="bot")
    old.revoke()
    key, _ = ApiKey.issue(user=cast.charlie, name="bot", requests_per_minute=1)
    other, _ = ApiKey.issue(user=cast.charlie, name="other")
    generation(cast.charlie, default_model, ago_s=10)  # chat
    generation(cast.charlie, default_model, ago_s=10, key_name="other")
    check_quota(user=cast.charlie, api_key=key)
    generation(cast.charlie, default_model, key_name="bot")
    with pytest.raises(QuotaExceeded) as caught:
        check_quota(user=cast.charlie, api_key=key)
    assert str(caught.value).startswith("This API key's limit is 1 generation(s) per minute")
    assert 55 <= caught.value.retry_after_s <= 60
    # The user, and their other key, may go on.
    check_quota(user=cast.charlie, api_key=other)
    check_quota(user=cast.charlie)


def test_a_keys_own_token_and_concurrency_limits(cast, default_model):
    key, _ = ApiKey.issue(user=cast.charlie, name="bot", tokens_per_day=100)
    generation(cast.charlie, default_model, tokens=99, key_name="bot")
    check_quota(user=cast.charlie, api_key=key)
    generation(cast.charlie, default_model, tokens=1, key_name="bot")
    with pytest.raises(QuotaExceeded, match="This API key's limit is 100 tokens per day"):
        check_quota(user=cast.charlie, api_key=key)
    ApiKey.objects.filter(pk=key.pk).update(tokens_per_day=None, concurrent_generations=1)
    key.refresh_from_db()
    check_quota(user=cast.charlie, api_key=key)
    generation(cast.charlie, default_model, state=Generation.QUEUED, key_name="bot")
    with pytest.raises(QuotaExceeded, match="This API key's limit is 1 generation"):
        check_quota(user=cast.charlie, api_key=key)


def test_the_users_limit_still_applies_under_a_laxer_key(cast, default_model):
    Quota.objects.create(user=cast.charlie, requests_per_minute=1)
    key, _ = ApiKey.issue(user=cast.charlie, name="bot", requests_per_minute=5)
    generation(cast.charlie, default_model, ago_s=5)  # chat, not the key
    with pytest.raises(QuotaExceeded, match="^Your limit is 1 generation"):
        check_quota(user=cast.charlie, api_key=key)


def test_a_quota_is_for_a_user_or_a_team_not_both(cast):
    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        Quota.objects.create(user=cast.alice, team=cast.red, tokens_per_day=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        Quota.objects.create(tokens_per_day=1)


# --- where they apply ----------------------------------------------------------------


def test_chat_refuses_a_message_over_quota_and_keeps_nothing_half_done(
    stack, cast, default_model, ws_factory
):
    Quota.objects.create(user=cast.charlie, requests_per_minute=1)
    generation(cast.charlie, default_model, ago_s=15)
    ws = ws_factory(cast.charlie)
    ws.send({"type": "chat.send", "request_id": 9, "content": "Hello?"})
    error, _ = ws.recv_until(lambda f: f["type"] == "error")
    assert error["code"] == "quota" and error["request_id"] == 9
    assert "1 generation(s) per minute" in error["message"] and "Try again in" in error["message"]
    assert not Conversation.objects.filter(owner=cast.charlie).exists()
    assert not Message.objects.exists()
    assert Generation.objects.filter(user=cast.charlie).count() == 1


def test_the_api_answers_429_with_retry_after_when_the_days_tokens_are_spent(
    stack, cast, default_model
):
    Quota.objects.create(team=cast.red, tokens_per_day=100)
    generation(cast.alice, default_model, tokens=100)
    _, secret = ApiKey.issue(user=cast.bob, name="bob-script")
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model=settings.DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "Hi"}]
        )
    retry_after = int(caught.value.response.headers["Retry-After"])
    assert 0 < retry_after <= 24 * 3600
    assert "Team Red's limit is 100 tokens per day" in caught.value.body["message"]
    assert not Generation.objects.filter(user=cast.bob).exists()


def test_an_admin_sets_a_quota_in_the_admin(cast):
    from django.contrib.auth import get_user_model
    from django.test import Client

    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw-123456")
    client = Client()
    client.force_login(admin)
    assert client.get("/admin/accounts/quota/add/").status_code == 200
    response = client.post(
        "/admin/accounts/quota/add/",
        {"team": cast.red.pk, "requests_per_minute": "30", "tokens_per_day": ""},
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    quota = Quota.objects.get(team=cast.red)
    assert quota.requests_per_minute == 30 and quota.tokens_per_day is None
