"""Every frame the sockets accept, with a value of the wrong kind where a number,
an id or a text belongs: a list, an object, Infinity, NaN, a number too large for
any id or for a float, a boolean, a fraction. Each gets an error frame that says
what is wrong (never "server_error"), queues nothing, and the socket stays open.

The sockets: ws/chat/ (inference/consumers.py), ws/jobs/ (inference/jobs) and
ws/gpu/ (monitoring, staff only, which accepts no frame type at all)."""

import json
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model

from inference.models import Generation
from tests.conftest import WSClient

BAD = "__BAD_VALUE__"

# JSON text put where BAD stands, as a client may send it.
BAD_VALUES = {
    "list": "[1, 2]",
    "object": '{"id": 1}',
    "infinity": "Infinity",
    "minus_infinity": "-Infinity",
    "nan": "NaN",
    "float_overflow": "1e999",
    "huge_integer": "1" + "0" * 30,
    "boolean": "true",
    "fraction": "1.5",
}

# (socket, frame with BAD where the wrong value goes)
FRAMES = {
    "chat.send conversation": ("chat", {"type": "chat.send", "content": "hi", "conversation": BAD}),
    "chat.send content": ("chat", {"type": "chat.send", "content": BAD}),
    "chat.send model": ("chat", {"type": "chat.send", "content": "hi", "model": BAD}),
    "chat.send params": ("chat", {"type": "chat.send", "content": "hi", "params": BAD}),
    "chat.send system_prompt": (
        "chat",
        {"type": "chat.send", "content": "hi", "system_prompt": BAD},
    ),
    "chat.send overflow": ("chat", {"type": "chat.send", "content": "hi", "overflow": BAD}),
    **{
        f"chat.send params.{name}": (
            "chat",
            {"type": "chat.send", "content": "hi", "params": {name: BAD}},
        )
        for name in ("temperature", "top_p", "max_tokens", "seed")
    },
    "chat.regenerate conversation": ("chat", {"type": "chat.regenerate", "conversation": BAD}),
    "chat.continue conversation": ("chat", {"type": "chat.continue", "conversation": BAD}),
    "chat.edit message": ("chat", {"type": "chat.edit", "message": BAD, "content": "hi"}),
    "chat.edit content": ("chat", {"type": "chat.edit", "message": 1, "content": BAD}),
    "conversation.open conversation": ("chat", {"type": "conversation.open", "conversation": BAD}),
    "generation.stop generation": ("chat", {"type": "generation.stop", "generation": BAD}),
    "generation.subscribe generation": (
        "chat",
        {"type": "generation.subscribe", "generation": BAD},
    ),
    "status.watch model": ("chat", {"type": "status.watch", "model": BAD}),
    "chat type": ("chat", {"type": BAD}),
    "job.subscribe job": ("jobs", {"type": "job.subscribe", "job": BAD}),
    "job.seen job": ("jobs", {"type": "job.seen", "job": BAD}),
    "jobs type": ("jobs", {"type": BAD}),
    "gpu type": ("gpu", {"type": BAD}),
}


def connect(stack, socket: str, user) -> WSClient:
    url = f"ws://127.0.0.1:{stack.port}/ws/{socket}/"
    return WSClient(SimpleNamespace(ws_url=url, http_url=stack.http_url), user)


def assert_still_open(ws, socket: str) -> None:
    if socket == "gpu":  # it answers no frame type, but it answers
        ws.send({"type": "ping"})
        assert ws.recv()["code"] == "unknown_type"
        return
    ws.send({"type": "ping" if socket == "chat" else "job.seen", "request_id": "after"})
    reply = ws.recv()
    assert reply["type"] in {"pong", "error"}, reply


# 1.5 is a temperature like any other.
VALID = {("chat.send params.temperature", "fraction")}


@pytest.mark.parametrize("frame", sorted(FRAMES))
def test_a_wrong_kind_of_value_gets_an_error_frame(stack, default_model, frame):
    """Every wrong kind of value in this field, one after another on one socket: each
    gets an error frame, and the socket stays open for the next."""
    socket, template = FRAMES[frame]
    # A user of its own per field: the per-user frame rate limit is not shared.
    user = get_user_model().objects.create_user(
        f"probe-{frame}".replace(" ", "-"), is_staff=socket == "gpu"
    )
    ws = connect(stack, socket, user)
    if socket == "jobs":
        assert ws.recv()["type"] == "jobs.unread"
    for value in sorted(BAD_VALUES):
        if (frame, value) in VALID:
            continue
        text = json.dumps({**template, "request_id": value}).replace(
            json.dumps(BAD), BAD_VALUES[value]
        )
        ws.send(text)
        error = ws.recv()
        assert error["type"] == "error", (value, error)
        assert error["code"] != "server_error", (value, error)
        assert error["message"], value
        assert_still_open(ws, socket)
    assert not Generation.objects.exists()
