"""Every URL, tried as an outsider and as an anonymous visitor.

The URL configuration is enumerated, so a new endpoint is covered the day it is
added. Each route is filled with the ids of everything Alice owns; Charlie (in no
team) and an anonymous visitor must get 404, 403, 401, 405 or a redirect to a login
page, or a page of their own that shows none of Alice's data.
"""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from inference.jobs.models import Job
from inference.models import Conversation, Generation, Message, Preset
from monitoring.models import RequestMetrics

SECRET = "alice-secret-7c1f"
# Pages anyone may open without logging in.
PUBLIC = {"/login/"}
DENIED = {401, 403, 404, 405}


def routes(patterns=None, prefix=""):
    """(route string, pattern) for every endpoint, admin excepted (Django's own
    staff check guards it; /admin/ itself is tried below)."""
    for p in patterns if patterns is not None else get_resolver().url_patterns:
        route = prefix + str(p.pattern)
        if route.startswith("admin/") or route.startswith("^"):
            continue
        if isinstance(p, URLResolver):
            yield from routes(p.url_patterns, route)
        elif isinstance(p, URLPattern):
            yield route, p


@pytest.fixture
def alices_things(cast, default_model):
    """Something of every kind, owned by Alice and shared with her team Red."""
    from mixtralweb.accounts.models import ApiKey

    conversation = Conversation.objects.create(
        owner=cast.alice, team=cast.red, model=default_model, title=f"{SECRET} title"
    )
    Message.objects.create(
        conversation=conversation, role=Message.USER, author=cast.alice, content=f"{SECRET} q"
    )
    gen = Generation.objects.create(
        user=cast.alice,
        team=cast.red,
        model=default_model,
        conversation=conversation,
        state=Generation.DONE,
        text=f"{SECRET} answer",
        input_messages=[{"role": "user", "content": f"{SECRET} q"}],
    )
    Message.objects.create(conversation=conversation, role=Message.ASSISTANT, generation=gen)
    metrics = RequestMetrics.objects.create(generation=gen, prompt_tokens=5, completion_tokens=3)
    key, _secret = ApiKey.issue(user=cast.alice, name=f"{SECRET} key")
    preset = Preset.objects.create(
        owner=cast.alice, team=cast.red, name=f"{SECRET} preset", system_prompt=f"{SECRET} p"
    )
    ids = {conversation.pk, gen.pk, metrics.pk, cast.red.pk, key.pk, preset.pk}

    job = Job.objects.create(
        user=cast.alice,
        team=cast.red,
        model=default_model,
        title=f"{SECRET} job",
        instruction=f"{SECRET} instruction",
        document=f"{SECRET} document",
        result=f"{SECRET} result",
        state=Job.DONE,
    )
    ids.add(job.pk)
    return conversation, sorted(ids)


def urls_to_try(ids):
    for route, _pattern in routes():
        names = re.findall(r"<(?:(\w+):)?(\w+)>", route)
        if not names:
            yield "/" + route
            continue
        for value in ids:
            url = route
            for converter, name in names:
                filler = str(value) if converter in ("int", "") or name.endswith("id") else "md"
                url = re.sub(r"<(?:\w+:)?" + name + ">", filler, url, count=1)
            yield "/" + url


def assert_no_leak(response, who, url):
    if response.status_code in DENIED:
        return
    if response.status_code in (301, 302):
        assert "login" in response["Location"], f"{who} {url} redirected to {response['Location']}"
        return
    # 200: a page of their own; 400: their own bad form. Neither may show Alice's data.
    assert response.status_code in (200, 400), f"{who} {url} answered {response.status_code}"
    body = b"".join(response.streaming_content) if response.streaming else response.content
    assert SECRET.encode() not in body, f"{who} saw Alice's data at {url}"


def test_an_outsider_sees_nothing_of_another_team(cast, alices_things):
    conversation, ids = alices_things
    client = Client()
    client.force_login(cast.charlie)
    tried = 0
    for url in urls_to_try(ids):
        for method in (client.get, client.post):
            response = method(url)
            assert_no_leak(response, "charlie", url)
            tried += 1
    assert tried > 40, "the URL enumeration found too few endpoints"
    conversation.refresh_from_db()
    assert conversation.title == f"{SECRET} title" and conversation.team_id == cast.red.pk
    assert Generation.objects.filter(text=f"{SECRET} answer", cancel_requested=False).exists()
    assert Preset.objects.filter(name=f"{SECRET} preset", team=cast.red).exists()


def test_an_anonymous_visitor_is_sent_to_log_in(cast, alices_things):
    _, ids = alices_things
    client = Client()
    for url in urls_to_try(ids):
        if url in PUBLIC:
            continue
        for method in (client.get, client.post):
            response = method(url)
            assert response.status_code in DENIED | {301, 302}, (
                f"anonymous {url}: {response.status_code}"
            )
            if response.status_code in (301, 302):
                assert "login" in response["Location"], f"anonymous {url} -> {response['Location']}"


def test_the_admin_site_is_for_staff_only(cast):
    client = Client()
    client.force_login(cast.charlie)
    response = client.get("/admin/")
    assert response.status_code == 302 and "login" in response["Location"]


def test_a_team_mate_sees_what_is_shared_with_the_team(cast, alices_things):
    """The same enumeration must not deny Bob what is his to see (the test above
    could pass by denying everything)."""
    conversation, _ = alices_things
    client = Client()
    client.force_login(cast.bob)
    response = client.get(f"/c/{conversation.pk}/")
    assert response.status_code == 200
    assert SECRET.encode() in response.content
