"""Every URL × every kind of user: what each one gets, in one table.

The cast: Alice owns a conversation, a job, an API key and an invitation, all of
team Red; Bob is a member of Red; Dana is Red's other admin; Charlie is in no team;
Sam is staff (not superuser) in no team; and an anonymous visitor. Each URL pattern
of the project is filled with Alice's ids and tried by each of them. The expected
answer of every (URL, user) pair is written in TABLE below: a URL that is added
without a row fails `test_every_url_has_a_row`.

Answers: "ok" (the page, or the action done and a redirect back), "login" (a
redirect to the login page), 404 (hidden: not found and not yours look alike), 403,
405 (wrong method), 429 and so on as numbers.
"""

from __future__ import annotations

import json

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from inference.jobs.models import Job
from inference.models import Conversation, Generation, Message, Preset
from mixtralweb.accounts.invitations import invitation_create
from mixtralweb.accounts.models import ApiKey, Invitation, Membership
from monitoring.models import Alert, RequestMetrics

ROLES = ("anonymous", "owner", "member", "team_admin", "outsider", "staff")
ALL_OK = dict.fromkeys(ROLES[1:], "ok") | {"anonymous": "login"}
OWNER_ONLY = {
    "anonymous": "login",
    "owner": "ok",
    "member": 404,
    "team_admin": 404,
    "outsider": 404,
    "staff": 404,
}
TEAM = {
    "anonymous": "login",
    "owner": "ok",
    "member": "ok",
    "team_admin": "ok",
    "outsider": 404,
    "staff": 404,
}
STAFF = {
    "anonymous": "login",
    "owner": 403,
    "member": 403,
    "team_admin": 403,
    "outsider": 403,
    "staff": "ok",
}

# name: (method, expected answer per role). Alice (the owner) is also Red's admin.
# An action's "ok" means it was done: `EFFECTS` checks the database, not only the
# status, since a refused action may also redirect back with a message.
REFUSED = {"anonymous": "login", "owner": "ok"} | dict.fromkeys(ROLES[2:], "refused")
TABLE: dict[str, tuple[str, dict]] = {
    "chat": ("get", ALL_OK),
    "conversation": ("get", TEAM),
    "conversation_rename": ("post", REFUSED),
    "conversation_delete": ("post", REFUSED),
    "conversation_share": ("post", REFUSED),
    # Whoever may see a conversation may download it.
    "conversation_export_md": ("get", TEAM),
    "conversation_export_json": ("get", TEAM),
    # Anyone signed in imports a file into a conversation of their own.
    "conversation_import": ("post", ALL_OK),
    # Chat presets: each user's own list (and their teams' shared ones); saving one
    # makes it the saver's. Alice's preset is shared with Red: Red sees it, but only
    # Alice renames or deletes it (a team admin neither).
    "presets": ("get", ALL_OK),
    "preset_create": ("post", ALL_OK),
    "preset_rename": ("post", REFUSED),
    "preset_delete": ("post", REFUSED),
    "workers": ("get", STAFF),
    # Every model's state and queue, without hosts, PIDs or paths: for everyone.
    "status": ("get", ALL_OK),
    "job_list": ("get", ALL_OK),
    "job_new": ("get", ALL_OK),
    "job_detail": ("get", TEAM),
    "job_run": ("post", REFUSED),
    "job_discard": ("post", REFUSED),
    "job_cancel": ("post", REFUSED),
    "job_download": ("get", TEAM),
    # Counts a pasted document for the new-job form; saves nothing, shows no one's data.
    "job_count": ("post", ALL_OK),
    "my_usage": ("get", ALL_OK),
    # A usage row (metrics, not text): its user, their team's admins, staff.
    "request_detail": ("get", TEAM | {"member": 404, "staff": "ok"}),
    "team_usage": ("get", {**STAFF, "owner": "ok", "team_admin": "ok"}),
    "admin_overview": ("get", STAFF),
    "gpus": ("get", STAFF),
    "alerts": ("get", STAFF),
    "alert_acknowledge": ("post", STAFF),
    "metrics": ("get", {**STAFF, "anonymous": 401}),
    "planner:page": ("get", ALL_OK),
    "login": ("get", dict.fromkeys(ROLES, "ok")),
    "logout": ("post", dict.fromkeys(ROLES, "login")),
    "password_change": ("get", ALL_OK),
    "api_keys": ("get", ALL_OK),
    "api_key_revoke": ("post", REFUSED),
    # Team admins and staff see invitations; members and outsiders have none to see.
    "invitations": ("get", {**STAFF, "owner": "ok", "team_admin": "ok"}),
    "invitation_revoke": ("post", {**REFUSED, "team_admin": "ok", "staff": "ok"}),
    # Anyone holding the link may use it: anonymous visitors sign up through it.
    "invitation_accept": ("get", dict.fromkeys(ROLES, "ok")),
    # The API takes keys, never a browser session: 401 to everyone here.
    "api_models": ("get", dict.fromkeys(ROLES, 401)),
    "api_chat_completions": ("post", dict.fromkeys(ROLES, 401)),
    "api_completions": ("post", dict.fromkeys(ROLES, 401)),
    "api_files": ("post", dict.fromkeys(ROLES, 401)),
    "api_file_content": ("get", dict.fromkeys(ROLES, 401)),
    "api_batches": ("post", dict.fromkeys(ROLES, 401)),
    "api_batch": ("get", dict.fromkeys(ROLES, 401)),
    "api_batch_cancel": ("post", dict.fromkeys(ROLES, 401)),
}

# For actions: did it happen? (kwargs, objects) -> bool
EFFECTS = {
    "conversation_rename": lambda o: Conversation.objects.get(pk=o["conversation"]).title == "x",
    "conversation_delete": lambda o: not Conversation.objects.filter(pk=o["conversation"]).exists(),
    "conversation_share": lambda o: Conversation.objects.get(pk=o["conversation"]).team is None,
    "preset_create": lambda o: Preset.objects.filter(name="x").exists(),
    "preset_rename": lambda o: Preset.objects.get(pk=o["preset"]).name == "x",
    "preset_delete": lambda o: not Preset.objects.filter(pk=o["preset"]).exists(),
    "job_run": lambda o: Job.objects.get(pk=o["job"]).state != Job.DRAFT,
    "job_discard": lambda o: not Job.objects.filter(pk=o["job"]).exists(),
    "job_cancel": lambda o: Job.objects.get(pk=o["job"]).state == Job.CANCELLED,
    "api_key_revoke": lambda o: ApiKey.objects.get(pk=o["key"]).revoked_at is not None,
    "alert_acknowledge": lambda o: Alert.objects.get(pk=o["alert"]).acknowledged_at is not None,
    "invitation_revoke": lambda o: (
        Invitation.objects.get(pk=o["invitation"]).revoked_at is not None
    ),
    "conversation_import": lambda o: Conversation.objects.filter(title="imported").exists(),
}


def import_form() -> dict:
    """A fresh upload each time: a file is read once."""
    export = {
        "format": "mixtralweb.conversation",
        "version": 1,
        "title": "imported",
        "model": settings.DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    return {"file": SimpleUploadedFile("c.json", json.dumps(export).encode())}


# What each action posts, for the owner's case to be a real one (a callable: made
# afresh for each case).
FORMS = {
    "conversation_import": import_form,
    "conversation_rename": {"title": "x"},
    "conversation_share": {"team": ""},
    "preset_create": {"name": "x", "temperature": "0.2"},
    "preset_rename": {"name": "x"},
    "job_count": {
        "model": settings.DEFAULT_MODEL_NAME,
        "text": "Count me.",
        "instruction": "Summarise it.",
        "max_tokens": "256",
    },
}


def routes(patterns=None, prefix="", namespace=None):
    for p in patterns if patterns is not None else get_resolver().url_patterns:
        route = prefix + str(p.pattern)
        if route.startswith("admin/"):
            continue
        if isinstance(p, URLResolver):
            yield from routes(p.url_patterns, route, p.namespace or namespace)
        elif isinstance(p, URLPattern):
            yield (f"{namespace}:{p.name}" if namespace else p.name), route


@pytest.fixture
def world(db):
    """Built in a transaction rolled back after each case: every case starts afresh."""
    from mixtralweb.accounts.models import Team
    from tests.jobs_documents import register_smollm2

    default_model = register_smollm2()
    User = get_user_model()
    red = Team.objects.create(name="Red")
    alice = User.objects.create_user("alice", password="alice-pass-123")
    bob = User.objects.create_user("bob", password="bob-pass-123")
    charlie = User.objects.create_user("charlie", password="charlie-pass-123")
    dana = User.objects.create_user("dana", password="dana-pass-123")
    sam = User.objects.create_user("sam", password="sam-pass-123", is_staff=True)
    Membership.objects.create(team=red, user=alice, role=Membership.ADMIN)
    Membership.objects.create(team=red, user=bob)
    Membership.objects.create(team=red, user=dana, role=Membership.ADMIN)
    cast = type("Cast", (), {"alice": alice, "bob": bob, "charlie": charlie, "red": red})
    conversation = Conversation.objects.create(
        owner=cast.alice, team=cast.red, model=default_model, title="shared"
    )
    Message.objects.create(
        conversation=conversation, role=Message.USER, author=cast.alice, content="q"
    )
    gen = Generation.objects.create(
        user=cast.alice,
        team=cast.red,
        model=default_model,
        conversation=conversation,
        state=Generation.DONE,
        text="a",
        input_messages=[{"role": "user", "content": "q"}],
    )
    Message.objects.create(conversation=conversation, role=Message.ASSISTANT, generation=gen)
    RequestMetrics.objects.create(generation=gen, prompt_tokens=5, completion_tokens=3)
    job = Job.objects.create(
        user=cast.alice,
        team=cast.red,
        model=default_model,
        title="job",
        instruction="Summarise.",
        document="text",
        result="result",
        state=Job.DONE,
        document_tokens=10,
        prompt_tokens=40,
        max_tokens=16,
        n_ctx=default_model.n_ctx,
    )
    key, _ = ApiKey.issue(user=cast.alice, name="key")
    preset = Preset.objects.create(
        owner=cast.alice, team=cast.red, name="Terse", system_prompt="Be brief."
    )
    invitation, token = invitation_create(
        created_by=cast.alice, email="", team=cast.red, role=Membership.MEMBER, valid_days=7
    )
    alert = Alert.objects.create(
        key="gpu_temperature:host/0",
        kind=Alert.GPU_TEMPERATURE,
        subject="host GPU 0: temperature",
        message="host GPU 0 is at 90 °C (alert at 85 °C).",
        opened_at=gen.queued_at,
        fired_at=gen.queued_at,
        last_sent_at=gen.queued_at,
        times_sent=1,
    )
    kwargs = {
        "alert_id": alert.pk,
        "conversation_id": conversation.pk,
        "job_id": job.pk,
        "fmt": "md",
        "pk": gen.pk,
        "team_id": cast.red.pk,
        "key_id": key.pk,
        "preset_id": preset.pk,
        "invitation_id": invitation.pk,
        "token": token,
        # The API's own ids; a session is refused before any is looked up.
        "file_id": "file-1",
        "batch_id": "batch_1",
    }
    users = {
        "anonymous": None,
        "owner": alice,
        "member": cast.bob,
        "team_admin": dana,
        "outsider": cast.charlie,
        "staff": sam,
    }
    objects = {
        "conversation": conversation.pk,
        "job": job.pk,
        "key": key.pk,
        "preset": preset.pk,
        "invitation": invitation.pk,
        "alert": alert.pk,
    }
    return kwargs, users, objects


def url_for(route: str, kwargs: dict) -> str:
    import re

    return "/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda m: str(kwargs[m.group(1)]), route)


def answer(response) -> str | int:
    if response.status_code in (301, 302):
        return "login" if response["Location"].startswith("/login/") else "ok"
    if response.status_code == 200:
        return "ok"
    return response.status_code


def test_every_url_has_a_row():
    names = {name for name, _route in routes()}
    assert names - set(TABLE) == set(), "a URL without a row in TABLE"
    assert set(TABLE) - names == set(), "a row in TABLE for a URL that is gone"


CASES = [(name, role) for name in TABLE for role in ROLES]


@pytest.mark.parametrize(("name", "role"), CASES, ids=[f"{n}-{r}" for n, r in CASES])
def test_each_user_gets_what_the_table_says(world, name, role):
    kwargs, users, objects = world
    method, expected = TABLE[name]
    route = dict(routes())[name]
    if name in ("job_run", "job_discard"):
        Job.objects.filter(pk=objects["job"]).update(state=Job.DRAFT)
    elif name == "job_cancel":
        Job.objects.filter(pk=objects["job"]).update(state=Job.RUNNING)
    client = Client()
    if users[role] is not None:
        client.force_login(users[role])
    form = FORMS.get(name, {})
    if callable(form):
        form = form()
    if name == "job_run":
        form = {"strategy": Job.SINGLE}
    response = getattr(client, method)(url_for(route, kwargs), form)
    got = answer(response)
    if name in EFFECTS and got != "login":
        done = EFFECTS[name](objects)
        if expected[role] == "ok":
            assert done, f"{role} could not {name} ({response.status_code})"
        else:
            assert not done, f"{role} did {name}"
            assert got in ("ok", 403, 404), got  # refused: a message, or not found
        return
    assert got == expected[role], f"{role} {method.upper()} {name}: {got}"
