"""Bad input over the socket gets an error frame, and the socket stays usable."""

import struct

import pytest
from django.conf import settings
from websockets.exceptions import ConnectionClosed, InvalidStatus

from inference.models import Generation
from inference.services import chat_send


def assert_still_usable(ws):
    ws.send({"type": "ping", "request_id": "after"})
    pong, _ = ws.recv_until(lambda f: f["type"] == "pong")
    assert pong["request_id"] == "after"


def error_for(ws, frame) -> dict:
    ws.send(frame)
    error = ws.recv()
    assert error["type"] == "error", error
    assert_still_usable(ws)
    return error


def test_it_rejects_frames_that_are_not_json(stack, cast, ws_factory):
    error = error_for(ws_factory(cast.alice), "{not json")
    assert error["code"] == "bad_json"
    assert "not valid JSON" in error["message"]


def test_it_rejects_json_that_is_not_a_frame(stack, cast, ws_factory):
    assert error_for(ws_factory(cast.alice), "[1, 2]")["code"] == "bad_frame"


def test_it_rejects_unknown_types(stack, cast, ws_factory):
    error = error_for(ws_factory(cast.alice), {"type": "chat.explode"})
    assert error["code"] == "unknown_type"
    assert "chat.explode" in error["message"]


def test_it_rejects_an_empty_message_and_queues_nothing(stack, cast, default_model, ws_factory):
    error = error_for(ws_factory(cast.alice), {"type": "chat.send", "content": "   "})
    assert error["code"] == "empty"
    assert not Generation.objects.exists()


def test_it_rejects_an_oversized_message_and_queues_nothing(
    stack, cast, default_model, ws_factory, settings
):
    huge = "x" * 100_001
    error = error_for(ws_factory(cast.alice), {"type": "chat.send", "content": huge})
    assert error["code"] == "too_large"
    assert "100,001 characters" in error["message"]
    assert not Generation.objects.exists()


def test_a_frame_at_the_size_limit_reaches_the_consumer(stack, cast, ws_factory):
    error = error_for(ws_factory(cast.alice), "x" * settings.WS_FRAME_MAX_BYTES)
    assert error["code"] == "bad_json"  # read and parsed, not refused for its size


def test_a_frame_over_the_limit_closes_the_socket_with_1009_before_it_is_read(
    stack, cast, ws_factory
):
    ws = ws_factory(cast.alice)
    # Only the header of a 2 MiB text frame and its first KiB: the server refuses
    # it from the length in the header, without waiting for (or holding) the rest.
    header = bytes([0x81, 0x80 | 127]) + struct.pack(">Q", 2 * 1024 * 1024) + b"mask"
    ws.conn.socket.sendall(header + b"x" * 1024)
    with pytest.raises(ConnectionClosed) as closed:
        ws.conn.recv(timeout=10)
    assert closed.value.rcvd is not None, "dropped without a close frame"
    assert closed.value.rcvd.code == 1009  # message too big


def test_a_client_sending_2_mib_gets_1009(stack, cast, ws_factory):
    ws = ws_factory(cast.alice)
    with pytest.raises(ConnectionClosed) as closed:
        ws.send("x" * (2 * 1024 * 1024))
        ws.conn.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_it_rejects_bad_sampling_parameters(stack, cast, default_model, ws_factory):
    ws = ws_factory(cast.alice)
    error = error_for(ws, {"type": "chat.send", "content": "hi", "params": {"temperature": 9}})
    assert "temperature must be between" in error["message"]
    assert not Generation.objects.exists()


def test_it_hides_a_conversation_that_is_not_yours(stack, cast, default_model, ws_factory):
    conversation, _, gen = chat_send(user=cast.alice, content="private", params={"max_tokens": 4})
    ws = ws_factory(cast.charlie)
    for frame in (
        {"type": "conversation.open", "conversation": conversation.pk},
        {"type": "chat.send", "conversation": conversation.pk, "content": "let me in"},
        {"type": "generation.stop", "generation": gen.pk},
        {"type": "generation.subscribe", "generation": gen.pk},
    ):
        error = error_for(ws, frame)
        assert error["code"] == "not_found"
        assert "private" not in str(error)
    assert conversation.messages.count() == 2  # Charlie added nothing
    assert not Generation.objects.filter(cancel_requested=True).exists()


def test_it_refuses_an_anonymous_socket(stack, ws_factory):
    with pytest.raises(InvalidStatus) as excinfo:
        ws_factory(None)
    assert excinfo.value.response.status_code == 403


def test_it_refuses_a_cross_origin_socket(stack, cast, ws_factory):
    with pytest.raises(InvalidStatus) as excinfo:
        ws_factory(cast.alice, origin="http://evil.example")
    assert excinfo.value.response.status_code == 403


def test_a_flood_meets_the_per_user_rate_limit(stack, cast, ws_factory):
    from django.conf import settings

    first, second = ws_factory(cast.bob), ws_factory(cast.bob)
    limit = settings.WS_RATE_LIMIT_FRAMES
    # The limit is per user: two sockets share it.
    for i in range(limit + 5):
        (first if i % 2 else second).send({"type": "ping", "request_id": i})
    replies = [first.recv() for _ in range((limit + 5) // 2)]
    replies += [second.recv() for _ in range((limit + 5) - (limit + 5) // 2)]
    errors = [r for r in replies if r["type"] == "error"]
    pongs = [r for r in replies if r["type"] == "pong"]
    assert len(pongs) <= limit and len(errors) >= 5
    assert {e["code"] for e in errors} == {"rate_limited"}
    assert "Try again in" in errors[0]["message"]
    # Alice is not affected by Bob's flood.
    alice = ws_factory(cast.alice)
    alice.send({"type": "ping", "request_id": "alice"})
    assert alice.recv()["type"] == "pong"
