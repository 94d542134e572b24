"""Export a conversation as Markdown and JSON; import the JSON back (docs/export.md).

Alice owns a conversation shared with team Red (Bob is in it; Charlie is not): a
question, a finished answer with its metrics, and an earlier answer that a
regenerate replaced. Rows are written directly; nothing is generated."""

from __future__ import annotations

import html
import json

import pytest
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils import timezone

from inference.models import Conversation, Generation, Message
from mixtralweb.accounts.models import Membership, Team
from monitoring.models import RequestMetrics
from tests.jobs_documents import register_smollm2


@pytest.fixture
def world(db):
    model = register_smollm2()
    User = get_user_model()
    alice = User.objects.create_user("alice", password="alice-pass-123")
    bob = User.objects.create_user("bob", password="bob-pass-123")
    charlie = User.objects.create_user("charlie", password="charlie-pass-123")
    red = Team.objects.create(name="Red")
    Membership.objects.create(team=red, user=alice, role=Membership.ADMIN)
    Membership.objects.create(team=red, user=bob)
    conversation = Conversation.objects.create(
        owner=alice,
        team=red,
        model=model,
        title="Trip: Lyon / Turin?",
        system_prompt="Be brief.",
        params={"temperature": 0.2, "top_p": 0.9, "max_tokens": 300, "seed": 7},
    )
    Message.objects.create(
        conversation=conversation, role=Message.USER, author=alice, content="Train or car?"
    )
    old = Generation.objects.create(
        user=alice, model=model, conversation=conversation, state=Generation.DONE, text="Car."
    )
    Message.objects.create(
        conversation=conversation,
        role=Message.ASSISTANT,
        generation=old,
        superseded_at=old.queued_at,
    )
    gen = Generation.objects.create(
        user=alice,
        model=model,
        conversation=conversation,
        state=Generation.DONE,
        text="The **train**: 4 h.",
        finish_reason="stop",
        prompt_tokens=12,
        completion_tokens=6,
    )
    Message.objects.create(conversation=conversation, role=Message.ASSISTANT, generation=gen)
    RequestMetrics.objects.create(
        generation=gen,
        prompt_tokens=12,
        completion_tokens=6,
        ttft_ms=85.0,
        decode_tokens_per_s=41.5,
        vram_process_peak_bytes=3 * 2**30,
    )
    Message.objects.create(
        conversation=conversation, role=Message.USER, author=bob, content="And by bike?"
    )
    return type(
        "World",
        (),
        {"alice": alice, "bob": bob, "charlie": charlie, "conversation": conversation},
    )


def client_of(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def export(user, conversation, fmt):
    return client_of(user).get(f"/c/{conversation.pk}/export.{fmt}")


def test_json_export_has_the_format_the_settings_the_current_turns_and_metrics(world):
    response = export(world.alice, world.conversation, "json")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="trip-lyon-turin.json"'
    data = json.loads(response.content)
    assert (data["format"], data["version"]) == ("mixtralweb.conversation", 1)
    assert data["title"] == "Trip: Lyon / Turin?"
    assert data["model"] == world.conversation.model.name
    assert data["system_prompt"] == "Be brief."
    assert data["params"]["temperature"] == 0.2
    assert (data["owner"], data["team"]) == ("alice", "Red")
    assert data["created_at"] and data["updated_at"]
    # The replaced answer ("Car.") is not a current turn.
    assert [(m["role"], m["author"], m["content"]) for m in data["messages"]] == [
        ("user", "alice", "Train or car?"),
        ("assistant", None, "The **train**: 4 h."),
        ("user", "bob", "And by bike?"),
    ]
    answer = data["messages"][1]
    assert (answer["state"], answer["finish_reason"]) == ("done", "stop")
    assert answer["metrics"] == {
        "prompt_tokens": 12,
        "cached_tokens": 0,
        "completion_tokens": 6,
        "ttft_ms": 85.0,
        "decode_tokens_per_s": 41.5,
        "e2e_ms": None,
        "vram_process_peak_bytes": 3 * 2**30,
        "vram_device_peak_bytes": None,
    }
    assert "state" not in data["messages"][0]


def test_markdown_export_reads_as_a_transcript(world):
    response = export(world.bob, world.conversation, "md")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/markdown; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="trip-lyon-turin.md"'
    text = response.content.decode()
    assert text.startswith("# Trip: Lyon / Turin?\n")
    assert f"- Model: {world.conversation.model.name}" in text
    assert "## System prompt\n\nBe brief." in text
    order = [text.index(s) for s in ("## alice", "Train or car?", "## Assistant", "## bob")]
    assert order == sorted(order)
    assert "The **train**: 4 h." in text and "Car." not in text
    assert "12 prompt tokens; 6 completion tokens; first token after 85 ms" in text
    assert "41.5 tokens/s; VRAM peak 3.00 GiB" in text


def test_a_stranger_gets_404_and_an_anonymous_visitor_the_login(world):
    assert export(world.charlie, world.conversation, "json").status_code == 404
    assert export(world.charlie, world.conversation, "md").status_code == 404
    anonymous = Client().get(f"/c/{world.conversation.pk}/export.json")
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")


def upload(user, content: bytes | str, name="c.json"):
    if isinstance(content, str):
        content = content.encode()
    return client_of(user).post("/import/", {"file": SimpleUploadedFile(name, content)})


def flash(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def refusal(response) -> str:
    """The reason shown on the page of a refused import."""
    text = response.content.decode()
    assert "Nothing was imported" in text
    return html.unescape(text.split('role="alert">', 1)[1].split("</p>", 1)[0])


def test_json_import_recreates_the_turns_in_a_new_conversation_of_the_importer(world):
    exported = export(world.bob, world.conversation, "json").content
    response = upload(world.charlie, exported)
    new = Conversation.objects.get(owner=world.charlie)
    assert response.status_code == 302 and response["Location"] == f"/c/{new.pk}/"
    assert (new.title, new.system_prompt, new.team) == ("Trip: Lyon / Turin?", "Be brief.", None)
    assert new.model == world.conversation.model and new.params["seed"] == 7
    turns = list(new.messages.current().select_related("generation"))
    assert [(m.role, m.text) for m in turns] == [
        ("user", "Train or car?"),
        ("assistant", "The **train**: 4 h."),
        ("user", "And by bike?"),
    ]
    # The file's usernames are not trusted: the importer wrote every question.
    assert {m.author for m in turns if m.role == "user"} == {world.charlie}
    answer = turns[1].generation
    assert (answer.state, answer.source, answer.user) == ("done", "import", world.charlie)
    assert not RequestMetrics.objects.filter(generation=answer).exists()
    # Its export says the same turns again.
    again = json.loads(export(world.charlie, new, "json").content)
    before = json.loads(exported)
    assert [(m["role"], m["content"]) for m in again["messages"]] == [
        (m["role"], m["content"]) for m in before["messages"]
    ]


def test_an_unknown_model_falls_back_to_the_default_with_a_note(world):
    data = json.loads(export(world.alice, world.conversation, "json").content)
    data["model"] = "gone-model"
    response = upload(world.alice, json.dumps(data))
    new = Conversation.objects.exclude(pk=world.conversation.pk).get()
    assert new.model == world.conversation.model
    assert any("'gone-model' is not available here" in m for m in flash(response))


def minimal(**changes) -> str:
    data = {
        "format": "mixtralweb.conversation",
        "version": 1,
        "messages": [{"role": "user", "content": "hello"}],
    }
    return json.dumps(data | changes)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("not json {", "The file is not JSON"),
        (b"\xff\xfe", "The file is not JSON"),
        (json.dumps([1, 2]), "not a conversation export"),
        (minimal(format="other"), "not a conversation export"),
        (minimal(version=2), "version is 2; this site reads version 1"),
        (minimal(version=True), "version is True"),
        (minimal(messages=[]), 'no "messages" list'),
        (minimal(messages=None), 'no "messages" list'),
        (minimal(messages=["hi"]), "Message 1 is not an object"),
        (minimal(messages=[{"role": "user"}]), 'Message 1 has no "content"'),
        (minimal(messages=[{"role": "tool", "content": "x"}]), "Message 1 has the role 'tool'"),
        (minimal(messages=[{"role": "user", "content": 5}]), "content must be text"),
        (minimal(messages=[{"role": "system", "content": "x"}]), "no user or assistant"),
        (minimal(params={"temperature": 9}), "temperature must be between"),
        (minimal(title="x" * 201), "longer than 200"),
    ],
)
def test_a_bad_file_is_refused_with_its_reason_and_nothing_is_created(world, content, says):
    before = (Conversation.objects.count(), Message.objects.count(), Generation.objects.count())
    response = upload(world.alice, content)
    assert response.status_code == 400
    assert response.context["error"] == refusal(response)
    assert says in refusal(response), refusal(response)
    after = (Conversation.objects.count(), Message.objects.count(), Generation.objects.count())
    assert after == before


def test_a_file_over_the_limit_is_refused(world, settings):
    settings.CONVERSATION_IMPORT_MAX_BYTES = 100
    response = upload(world.alice, minimal(title="y" * 100))
    assert response.status_code == 400
    assert "the most an import takes is 100." in refusal(response)
    assert Conversation.objects.count() == 1


def test_no_file_is_refused_and_get_is_not_allowed(world):
    response = client_of(world.alice).post("/import/")
    assert refusal(response) == "Choose a JSON file to import."
    assert client_of(world.alice).get("/import/").status_code == 405
    anonymous = Client().post("/import/", {"file": SimpleUploadedFile("c.json", b"{}")})
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")
    assert Conversation.objects.count() == 1


def test_imported_answers_count_in_neither_quotas_nor_usage(world):
    from inference.quotas import _user_generations
    from monitoring.models import UsageDaily
    from monitoring.rollup import refresh

    upload(world.charlie, export(world.alice, world.conversation, "json").content)
    assert not _user_generations(world.charlie).exists()
    today = timezone.localdate(Generation.objects.get(user=world.charlie).queued_at)
    refresh(today, today, user_id=world.charlie.pk)
    assert not UsageDaily.objects.filter(user=world.charlie).exists()


def test_the_chat_page_offers_the_exports_and_the_import(world):
    pk = world.conversation.pk
    owner_page = client_of(world.alice).get(f"/c/{pk}/").content.decode()
    assert f'href="/c/{pk}/export.md" download>Export Markdown' in owner_page
    assert f'href="/c/{pk}/export.json" download>Export JSON' in owner_page
    assert 'action="/import/" enctype="multipart/form-data"' in owner_page
    # A team-mate has no Manage menu, but may download it.
    member_page = client_of(world.bob).get(f"/c/{pk}/").content.decode()
    assert "<summary>Manage</summary>" not in member_page
    assert f'href="/c/{pk}/export.json" download>JSON' in member_page
