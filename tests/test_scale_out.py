"""Scale-out: two ASGI servers and two model workers on one Redis and PostgreSQL.

A user on server A streams an answer while a team-mate on server B watches it live;
both workers take requests from the same model queue; the workers page lists both.
"""

import urllib.request

import pytest
from django.contrib.auth import get_user_model

from inference.models import Conversation, Generation, WorkerHeartbeat
from tests.cluster import Cluster, Reader, RedisServer, connect, send, until_final, wait_for
from tests.conftest import session_cookie


@pytest.fixture(scope="module")
def cluster(django_db_setup, django_db_blocker, tmp_path_factory):
    from inference.registry import ensure_default_model

    with django_db_blocker.unblock():
        ensure_default_model()
    redis_server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    running = Cluster("scale", redis_server)
    try:
        running.start_web()
        running.start_web()
        running.start_worker()
        running.start_worker()
        running.wait_ready(2)
        yield running
    finally:
        running.stop()
        redis_server.kill()


def test_a_team_mate_on_another_server_watches_the_answer_live_while_another_worker_answers(
    cluster, cast, default_model
):
    server_a, server_b = cluster.webs
    shared = Conversation.objects.create(owner=cast.alice, team=cast.red, model=default_model)
    alice = connect(server_a, cast.alice)
    bob = connect(server_b, cast.bob)
    bob_own = connect(server_b, cast.bob)  # a second tab, for his own conversation
    try:
        bob.send({"type": "conversation.open", "conversation": shared.pk})
        bob.recv_until(lambda f: f["type"] == "conversation.snapshot")

        # Two answers at once: Alice's in the shared conversation, Bob's in his own.
        accepted = send(
            alice,
            conversation=shared.pk,
            content="Write three sentences about lighthouses.",
            params={"max_tokens": 48, "seed": 1},
        )
        own = send(bob_own, content="Name two rivers.", params={"max_tokens": 48, "seed": 2})
        own_reader = Reader(bob_own, own["generation"])
        assert accepted["type"] == own["type"] == "chat.accepted"
        gen_id = accepted["generation"]

        # Bob hears of Alice's new turn on server B and follows it live (asking for
        # a snapshot if he joined after the first tokens, as the page does).
        bob.recv_until(
            lambda f: f["type"] == "conversation.turn" and f["conversation"] == shared.pk
        )
        alice_reader, bob_reader = Reader(alice, gen_id), Reader(bob, gen_id)
        alice_final = alice_reader.until_final()
        bob_final = bob_reader.until_final()
        own_final = own_reader.until_final()
    finally:
        for ws in (alice, bob, bob_own):
            ws.close()

    gen = Generation.objects.get(pk=gen_id)
    assert gen.state == Generation.DONE and gen.text
    assert alice_reader.text == gen.text == alice_final["text"]
    # Bob's copy came over server B's socket, token by token, and matches.
    bob_tokens = [
        f
        for f in bob_reader.frames
        if f["type"] == "generation.token" and f["generation"] == gen_id
    ]
    assert bob_tokens, "the team-mate saw no live tokens"
    assert bob_reader.text == gen.text == bob_final["text"]

    # The two answers ran at the same time on the two workers of the one queue.
    other = Generation.objects.get(pk=own["generation"])
    assert other.state == Generation.DONE and own_reader.text == other.text == own_final["text"]
    assert gen.worker and other.worker and gen.worker != other.worker
    assert gen.started_at < other.finished_at and other.started_at < gen.finished_at


def test_both_workers_take_requests_from_the_same_model_queue(cluster, cast, default_model):
    server_a, server_b = cluster.webs
    clients = [connect(server_a, cast.alice), connect(server_b, cast.bob)]
    gen_ids = []
    try:
        for round_ in range(2):
            accepted = [
                send(ws, content=f"Count to {3 + i + round_}.", params={"max_tokens": 24})
                for i, ws in enumerate(clients)
            ]
            for ws, reply in zip(clients, accepted, strict=True):
                until_final(ws, reply["generation"])
                gen_ids.append(reply["generation"])
    finally:
        for ws in clients:
            ws.close()
    gens = Generation.objects.filter(pk__in=gen_ids)
    assert {g.state for g in gens} == {Generation.DONE}
    worker_pids = {w["pid"] for w in cluster.redis.worker_states()}
    used = {int(g.worker.rsplit(":", 1)[1]) for g in gens}
    assert len(used) == 2 and used <= worker_pids


def get_page(web, path: str, user) -> str:
    request = urllib.request.Request(
        f"{web.http_url}{path}", headers={"Cookie": session_cookie(user)}
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        assert response.status == 200
        return response.read().decode()


def test_the_workers_page_and_the_admin_list_both_workers(cluster, cast, default_model):
    pids = {w["pid"] for w in cluster.redis.worker_states()}
    assert len(pids) == 2
    # The heartbeats are mirrored into the table the admin shows.
    wait_for(
        lambda: set(WorkerHeartbeat.objects.values_list("pid", flat=True)) >= pids,
        what="both heartbeat rows",
    )
    root = get_user_model().objects.create_superuser("root", "root@example.com", "root-pass-123")
    for web in cluster.webs:
        page = get_page(web, "/workers/", cast.sam)
        live = page.split('id="live-workers"')[1].split("</table>")[0]
        assert all(f"<td>{pid}</td>" in live for pid in pids)
        admin = get_page(web, "/admin/inference/workerheartbeat/", root)
        assert all(f">{pid}<" in admin for pid in pids)
