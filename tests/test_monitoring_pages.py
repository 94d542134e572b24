"""The usage pages, the request detail and who may see them.

Who sees what (the cast from conftest): Alice and Bob are in team Red, Alice its
admin; Charlie is alone. Each sees their own requests; Alice also sees Red's
members' usage and requests; staff see everything.
"""

import csv
import io
from collections import Counter
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from inference.models import Generation
from monitoring import rollup
from monitoring.models import RequestMetrics


def make_generation(user, model, *, days_ago=0, source="chat", state="done", team=None, **m):
    queued = timezone.now() - timedelta(days=days_ago, minutes=5)
    gen = Generation.objects.create(
        user=user,
        team=team,
        model=model,
        source=source,
        state=state,
        reason="Out of memory while generating." if state == "failed" else "",
        queued_at=queued,
        started_at=queued + timedelta(milliseconds=40),
        first_token_at=queued + timedelta(milliseconds=240),
        finished_at=queued + timedelta(seconds=3),
        api_key_name="ci-key" if source == "api" else "",
    )
    values = dict(
        prompt_tokens=100,
        completion_tokens=50,
        n_ctx=8192,
        context_used=150,
        queue_ms=40.0,
        ttft_ms=200.0,
        decode_ms=2700.0,
        decode_tokens_per_s=18.0,
        e2e_ms=3000.0,
        rss_peak_bytes=300 * 2**20,
        cpu_mean_pct=180.0,
    )
    values.update(m)
    RequestMetrics.objects.create(generation=gen, **values)
    rollup.refresh_for(gen)
    return gen


@pytest.fixture
def cast(db):
    """The conftest cast, in a transaction rolled back after each test (these pages need
    no other process, and a rollback is much faster than flushing the database)."""
    from mixtralweb.accounts.models import Membership, Team

    User = get_user_model()
    alice = User.objects.create_user("alice")
    bob = User.objects.create_user("bob")
    charlie = User.objects.create_user("charlie")
    red = Team.objects.create(name="Red")
    Membership.objects.create(team=red, user=alice, role=Membership.ADMIN)
    Membership.objects.create(team=red, user=bob)
    return type("Cast", (), {"alice": alice, "bob": bob, "charlie": charlie, "red": red})


@pytest.fixture
def default_model(db):
    # A registry entry is all these pages need; no worker loads it.
    from inference.models import LanguageModel

    return LanguageModel.objects.create(name="page-test-model", path="unused.gguf")


@pytest.fixture
def usage(cast, default_model):
    alice = [make_generation(cast.alice, default_model, days_ago=d) for d in (0, 1, 1)]
    api = make_generation(cast.alice, default_model, source="api", completion_tokens=7)
    bob = make_generation(cast.bob, default_model, decode_tokens_per_s=30.0)
    charlie = make_generation(cast.charlie, default_model, state="failed")
    return type("Usage", (), {"alice": alice, "api": api, "bob": bob, "charlie": charlie})


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_user("stella", is_staff=True)


def unfinished_generations(user, model) -> dict[str, Generation]:
    """A generation of `user` in each state that ends without a full run (or has not
    ended yet), by a short name; most have no metrics row at all."""
    now = timezone.now()

    def make(state, *, started=False, reason=""):
        return Generation.objects.create(
            user=user,
            model=model,
            state=state,
            reason=reason,
            queued_at=now - timedelta(minutes=2),
            started_at=now - timedelta(minutes=1) if started else None,
            finished_at=now if state in Generation.FINAL_STATES else None,
        )

    stopped = make(Generation.QUEUED)
    stopped.request_stop(by=user)  # as Stop does while it waits: cancelled at once
    failed_in_prompt = make(Generation.FAILED, started=True, reason="DecodeError: no KV room")
    # A run that fails before its first token still records what it read.
    RequestMetrics.objects.create(generation=failed_in_prompt, prompt_tokens=900, n_ctx=8192)
    gens = {
        "queued": make(Generation.QUEUED),
        "running": make(Generation.RUNNING, started=True),
        "stopped before it started": stopped,
        "failed before reaching the model": make(
            Generation.FAILED, reason="The prompt is 9,000 tokens; the context is 8,192."
        ),
        "failed before its first token": failed_in_prompt,
        "lost while queued": make(
            Generation.FAILED, reason="Its task was lost 3 times; it was not sent again."
        ),
        "lost while running": make(
            Generation.FAILED,
            started=True,
            reason="The worker (h:1) stopped responding; the answer so far is kept.",
        ),
    }
    for gen in gens.values():
        if gen.is_final:
            rollup.refresh_for(gen)
    return gens


def assert_lists_every_state(html: str, gens: dict[str, Generation]):
    for name, gen in gens.items():
        assert f'href="/usage/requests/{gen.pk}/"' in html, name
        assert f'<td class="state-{gen.state}" title="{gen.reason}">' in html, name


def test_my_usage_lists_requests_in_every_state(client, cast, default_model):
    gens = unfinished_generations(cast.alice, default_model)
    assert gens["stopped before it started"].state == Generation.CANCELLED
    client.force_login(cast.alice)
    response = client.get("/usage/")
    assert response.status_code == 200
    assert_lists_every_state(response.content.decode(), gens)


def test_the_admin_overview_lists_requests_in_every_state(client, staff, cast, default_model):
    gens = unfinished_generations(cast.alice, default_model)
    client.force_login(staff)
    response = client.get("/usage/admin/")
    assert response.status_code == 200
    assert_lists_every_state(response.content.decode(), gens)


def test_the_detail_page_shows_a_request_in_every_state(client, cast, default_model):
    gens = unfinished_generations(cast.alice, default_model)
    client.force_login(cast.alice)
    for name, gen in gens.items():
        response = client.get(f"/usage/requests/{gen.pk}/")
        assert response.status_code == 200, name
        html = response.content.decode()
        assert gen.get_state_display() in html and (gen.reason or "—") in html, name


def test_my_usage_shows_my_totals_and_requests_only(client, cast, usage):
    client.force_login(cast.alice)
    response = client.get("/usage/")
    assert response.status_code == 200
    assert response.context["totals"]["requests"] == 4
    assert response.context["totals"]["completion_tokens"] == 3 * 50 + 7
    listed = {gen.pk for gen in response.context["page"]}
    assert listed == {g.pk for g in usage.alice} | {usage.api.pk}
    assert f"/usage/requests/{usage.bob.pk}/" not in response.content.decode()


def test_my_usage_filters_by_source_and_date(client, cast, usage):
    client.force_login(cast.alice)
    response = client.get("/usage/", {"source": "api"})
    assert [g.pk for g in response.context["page"]] == [usage.api.pk]
    today = timezone.localdate()
    response = client.get(
        "/usage/", {"start": today - timedelta(days=1), "end": today - timedelta(days=1)}
    )
    assert response.context["totals"]["requests"] == 2
    assert response.context["chart"]["labels"] == [str(today - timedelta(days=1))]


def test_my_usage_refuses_a_backwards_date_range_with_a_clear_error(client, cast, usage):
    client.force_login(cast.alice)
    response = client.get("/usage/", {"start": "2026-05-02", "end": "2026-05-01"})
    assert response.status_code == 400
    assert "The start date is after the end date." in response.content.decode()


def test_my_usage_refuses_a_date_that_is_not_a_date(client, cast, usage):
    client.force_login(cast.alice)
    response = client.get("/usage/", {"start": "yesterday-ish"})
    assert response.status_code == 400
    assert "Enter a valid date." in response.content.decode()


def test_my_usage_exports_my_requests_as_csv(client, cast, usage):
    client.force_login(cast.alice)
    response = client.get("/usage/", {"format": "csv"})
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert {int(r["id"]) for r in rows} == {g.pk for g in usage.alice} | {usage.api.pk}
    assert {r["user.username"] for r in rows} == {"alice"}
    api_row = next(r for r in rows if int(r["id"]) == usage.api.pk)
    assert api_row["api_key_name"] == "ci-key" and api_row["metrics.completion_tokens"] == "7"
    assert api_row["metrics.vram_device_peak_bytes"] == "", "no GPU: empty, not 0"


def test_the_request_list_paginates(client, cast, default_model, settings):
    from monitoring import usage as usage_module

    for _ in range(usage_module.PAGE_SIZE + 3):
        make_generation(cast.alice, default_model)
    client.force_login(cast.alice)
    first = client.get("/usage/")
    assert len(first.context["page"]) == usage_module.PAGE_SIZE and first.context["older"]
    second = client.get("/usage/", {"before": first.context["older"]})
    assert len(second.context["page"]) == 3 and second.context["older"] is None
    assert not {g.pk for g in first.context["page"]} & {g.pk for g in second.context["page"]}


def test_the_detail_page_shows_every_recorded_field(client, cast, usage):
    client.force_login(cast.alice)
    response = client.get(f"/usage/requests/{usage.api.pk}/")
    assert response.status_code == 200
    html = response.content.decode()
    for field in RequestMetrics._meta.concrete_fields:
        if field.name not in {"id", "generation"}:
            assert f'data-field="{field.name}"' in html, field.name
    assert "ci-key" in html and "no NVIDIA GPU" in html


def test_a_gpu_request_shows_its_vram_in_gib(client, cast, default_model):
    gen = make_generation(
        cast.alice, default_model, gpu_index=0, gpu_uuid="GPU-1", vram_device_peak_bytes=3 * 2**30
    )
    client.force_login(cast.alice)
    html = client.get(f"/usage/requests/{gen.pk}/").content.decode()
    assert "3.00 GiB" in html


def test_a_stranger_gets_404_for_someone_elses_request(client, cast, usage):
    client.force_login(cast.charlie)
    assert client.get(f"/usage/requests/{usage.alice[0].pk}/").status_code == 404


def test_a_team_mate_who_is_not_admin_gets_404_for_a_request(client, cast, usage):
    client.force_login(cast.bob)
    assert client.get(f"/usage/requests/{usage.alice[0].pk}/").status_code == 404


def test_a_team_admin_sees_a_members_request(client, cast, usage):
    client.force_login(cast.alice)
    assert client.get(f"/usage/requests/{usage.bob.pk}/").status_code == 200


def test_team_usage_shows_members_and_models_to_the_team_admin(client, cast, usage):
    client.force_login(cast.alice)
    response = client.get(f"/usage/teams/{cast.red.pk}/")
    assert response.status_code == 200
    members = {row["name"]: row["requests"] for row in response.context["by_member"]}
    assert members == {"alice": 4, "bob": 1}
    assert response.context["by_model"][0]["requests"] == 5
    assert "charlie" not in response.content.decode()


def test_team_usage_is_forbidden_to_a_plain_member_and_to_strangers(client, cast, usage):
    for user in (cast.bob, cast.charlie):
        client.force_login(user)
        assert client.get(f"/usage/teams/{cast.red.pk}/").status_code == 403


def test_the_admin_overview_is_for_staff_only(client, cast, usage):
    client.force_login(cast.alice)
    assert client.get("/usage/admin/").status_code == 403
    client.logout()
    assert client.get("/usage/admin/").status_code == 302


def test_the_admin_overview_sums_everyone_and_ranks_top_users(client, staff, cast, usage):
    client.force_login(staff)
    response = client.get("/usage/admin/")
    assert response.status_code == 200
    assert response.context["totals"]["requests"] == 6
    assert response.context["totals"]["failed"] == 1
    assert [row["name"] for row in response.context["top_users"]][0] == "alice"
    assert response.context["distributions"]["sample_size"] == 6
    by_day = {row["name"]: row["requests"] for row in response.context["by_day"]}
    gens = [*usage.alice, usage.api, usage.bob, usage.charlie]
    assert by_day == dict(Counter(timezone.localdate(g.queued_at) for g in gens))
    html = response.content.decode()
    assert "no NVIDIA GPU" in html
    assert f"/usage/requests/{usage.charlie.pk}/" in html


def test_the_admin_overview_exports_the_daily_table(client, staff, cast, usage):
    client.force_login(staff)
    response = client.get("/usage/admin/", {"format": "csv"})
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert sum(int(r["requests"]) for r in rows) == 6
    assert {r["user.username"] for r in rows} == {"alice", "bob", "charlie"}


def test_staff_see_any_request(client, staff, usage):
    client.force_login(staff)
    assert client.get(f"/usage/requests/{usage.charlie.pk}/").status_code == 200


def test_usage_pages_need_a_login(client, usage):
    assert client.get("/usage/").status_code == 302
    assert client.get(f"/usage/requests/{usage.bob.pk}/").status_code == 302


FORMULAS = ['=HYPERLINK("http://x.example")', "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]


def test_csv_exports_show_formulas_as_text(client, staff, cast, default_model):
    """Names and reasons that users choose reach admins' spreadsheets as text, never
    as formulas (each begins with a single quote)."""
    User = get_user_model()
    from mixtralweb.accounts.models import Team

    for index, formula in enumerate(FORMULAS):
        user = User.objects.create_user(f"u{index}")
        User.objects.filter(pk=user.pk).update(username=formula)
        user.refresh_from_db()
        team = Team.objects.create(name=formula + " team")
        gen = make_generation(user, default_model, source="api", team=team)
        Generation.objects.filter(pk=gen.pk).update(api_key_name=formula, reason=formula)
    client.force_login(staff)
    requests = client.get("/usage/admin/", {"format": "requests-csv"})
    rows = list(csv.DictReader(io.StringIO(b"".join(requests.streaming_content).decode())))
    assert len(rows) == len(FORMULAS)
    for column in ("user.username", "team.name", "api_key_name", "reason"):
        cells = sorted(r[column] for r in rows)
        expected = sorted("'" + f + (" team" if column == "team.name" else "") for f in FORMULAS)
        assert cells == expected, column
    assert {r["metrics.prompt_tokens"] for r in rows} == {"100"}
    daily = client.get("/usage/admin/", {"format": "csv"})
    rows = list(csv.DictReader(io.StringIO(b"".join(daily.streaming_content).decode())))
    assert sorted(r["user.username"] for r in rows) == sorted("'" + f for f in FORMULAS)
    assert sorted(r["team.name"] for r in rows) == sorted("'" + f + " team" for f in FORMULAS)
