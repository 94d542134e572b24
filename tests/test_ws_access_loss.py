"""Losing access reaches open sockets at once, and floods meet their limits.

A team-mate following a shared conversation stops receiving its turns and tokens
when it is unshared or when he leaves the team; a socket ends when its session logs
out or its account is deactivated. Per user: a cap on open sockets, and the jobs
socket's frames count against the same rate limit as the chat socket's.
"""

from __future__ import annotations

import json
import time

import pytest
from django.conf import settings
from django.test import Client
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from inference import services
from mixtralweb.accounts.models import Membership
from tests.conftest import WSClient, session_cookie

MAX_TOKENS = {"max_tokens": 8}


def answer(ws, **frame) -> dict:
    ws.send({"type": "chat.send", "params": MAX_TOKENS, **frame})
    accepted, _ = ws.recv_until(lambda f: f["type"] == "chat.accepted")
    ws.recv_until(
        lambda f: f["type"] == "generation.final" and f["generation"] == accepted["generation"],
        timeout=120,
    )
    return accepted


@pytest.fixture
def shared(stack, cast, default_model, ws_factory):
    """Alice's conversation shared with Red, Bob watching it."""
    alice = ws_factory(cast.alice)
    first = answer(alice, content="Name a fruit.")
    conversation = first["conversation"]
    services.conversation_share(user=cast.alice, conversation_id=conversation, team_id=cast.red.pk)
    bob = ws_factory(cast.bob)
    bob.send({"type": "conversation.open", "conversation": conversation})
    bob.recv_until(lambda f: f["type"] == "conversation.snapshot")
    # While shared, Bob sees Alice's next turn stream.
    second = answer(alice, conversation=conversation, content="Name another.")
    bob.recv_until(
        lambda f: f["type"] == "generation.final" and f["generation"] == second["generation"],
        timeout=120,
    )
    return type("Shared", (), {"alice": alice, "bob": bob, "conversation": conversation})


def frames_of(ws, timeout: float) -> list[dict]:
    """Everything the socket receives within timeout seconds."""
    frames = []
    try:
        while True:
            frames.append(ws.recv(timeout=timeout))
    except TimeoutError:
        return frames


def test_an_unshared_conversation_stops_reaching_the_team_mate(shared, cast):
    services.conversation_share(user=cast.alice, conversation_id=shared.conversation, team_id=None)
    lost, _ = shared.bob.recv_until(lambda f: f["type"] == "access.lost", timeout=10)
    assert lost["conversation"] == shared.conversation
    answer(shared.alice, conversation=shared.conversation, content="And one more.")
    leaked = [f for f in frames_of(shared.bob, 2) if f["type"].startswith(("generation.", "turn"))]
    assert leaked == []


def test_a_team_mate_removed_from_the_team_stops_receiving(shared, cast):
    Membership.objects.filter(team=cast.red, user=cast.bob).delete()
    lost, _ = shared.bob.recv_until(lambda f: f["type"] == "access.lost", timeout=10)
    assert lost["conversation"] == shared.conversation
    answer(shared.alice, conversation=shared.conversation, content="And one more.")
    leaked = [f for f in frames_of(shared.bob, 2) if f["type"].startswith(("generation.", "turn"))]
    assert leaked == []


def test_logging_out_ends_the_sockets_of_that_session_only(stack, cast, ws_factory):
    cookie = session_cookie(cast.bob)
    on_that_session = WSClient(stack, cookie=cookie)
    elsewhere = ws_factory(cast.bob)  # another browser of Bob's

    browser = Client()
    name, value = cookie.split("=", 1)
    browser.cookies[name] = value
    assert browser.post("/logout/").status_code in (200, 302)

    revoked, _ = on_that_session.recv_until(lambda f: f["type"] == "access.revoked", timeout=10)
    assert "logged out" in revoked["message"]
    with pytest.raises(ConnectionClosed) as closed:
        on_that_session.recv(timeout=10)
    assert closed.value.rcvd.code == 4403
    on_that_session.close()
    elsewhere.send({"type": "ping", "request_id": 1})
    assert elsewhere.recv()["type"] == "pong"


def test_a_deactivated_account_loses_its_sockets(stack, cast, ws_factory):
    ws = ws_factory(cast.charlie)
    cast.charlie.is_active = False
    cast.charlie.save()
    revoked, _ = ws.recv_until(lambda f: f["type"] == "access.revoked", timeout=10)
    assert "deactivated" in revoked["message"]
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)


def test_one_user_may_hold_only_so_many_sockets(stack, cast, ws_factory):
    limit = settings.WS_SOCKETS_PER_USER
    held = [ws_factory(cast.bob) for _ in range(limit)]
    held[-1].send({"type": "ping", "request_id": 1})
    assert held[-1].recv()["type"] == "pong"
    one_too_many = ws_factory(cast.bob)
    error = one_too_many.recv(timeout=10)
    assert error["code"] == "too_many_sockets" and str(limit) in error["message"]
    with pytest.raises(ConnectionClosed) as closed:
        one_too_many.recv(timeout=10)
    assert closed.value.rcvd.code == 4429
    # Closing one makes room again; another user is not affected.
    held.pop().close()
    again = ws_factory(cast.bob)
    again.send({"type": "ping", "request_id": 2})
    assert again.recv()["type"] == "pong"
    alice = ws_factory(cast.alice)
    alice.send({"type": "ping", "request_id": 3})
    assert alice.recv()["type"] == "pong"


def test_the_jobs_socket_meets_the_rate_limit(stack, cast):
    url = stack.ws_url.replace("/ws/chat/", "/ws/jobs/")
    headers = {"Origin": stack.http_url, "Cookie": session_cookie(cast.bob)}
    limit = settings.WS_RATE_LIMIT_FRAMES
    window = settings.WS_RATE_LIMIT_WINDOW_S
    with connect(url, additional_headers=headers) as ws:
        # The limit counts frames per fixed window: flood well inside one.
        while time.time() % window > window - 3:
            time.sleep(0.2)
        for i in range(limit + 5):
            ws.send(json.dumps({"type": "ping", "request_id": i}))
        replies = []
        while len([r for r in replies if r["type"] == "error"]) < limit + 5:
            replies.append(json.loads(ws.recv(timeout=10)))
    # (The jobs socket has no ping: the first frames get unknown_type, the rest
    # are refused before they are even read.)
    codes = [r["code"] for r in replies if r["type"] == "error"]
    assert "rate_limited" not in codes[:limit]
    assert codes[limit:] == ["rate_limited"] * 5


def test_a_socket_follows_at_most_so_many_answers_the_oldest_giving_way(
    stack, cast, default_model, ws_factory
):
    from inference.models import Conversation, Generation
    from inference.streams import announce
    from mixtralweb import namespace

    limit = settings.WS_FOLLOW_MAX
    conversation = Conversation.objects.create(owner=cast.alice, model=default_model)
    answers = [
        Generation.objects.create(
            user=cast.alice, model=default_model, conversation=conversation, state="done"
        ).pk
        for _ in range(limit + 1)
    ]
    ws = ws_factory(cast.alice)
    assert limit + 1 < settings.WS_RATE_LIMIT_FRAMES  # all within the frame rate limit
    for gen_id in answers:
        ws.send({"type": "generation.subscribe", "generation": gen_id})
        ws.recv_until(
            lambda f, g=gen_id: f["type"] == "generation.snapshot" and f["generation"] == g
        )
    for gen_id in (answers[0], answers[-1]):
        announce(
            namespace.generation_group(gen_id),
            {"type": "generation.token", "generation": gen_id, "offset": 0, "text": "x"},
        )
    token, _ = ws.recv_until(lambda f: f["type"] == "generation.token", timeout=10)
    assert token["generation"] == answers[-1]
    assert not [f for f in frames_of(ws, 1) if f["type"] == "generation.token"]
