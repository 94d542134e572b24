"""Fill the database with synthetic request records, for benchmarks:
`manage.py generate_usage --count 1000000`.

Writes Generation and RequestMetrics rows with PostgreSQL's COPY (about a minute
for a million on two cores; SQLite gets bulk_create in batches), then rebuilds the
daily usage rollup. The rows belong to users "bench-user-N" in teams "bench-team-N"
(and to "bench", who asks a twentieth of everything) on two models "bench-model-*".
"""

from __future__ import annotations

import io
import json
import random
import time
from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.utils import timezone

from inference.models import Generation, LanguageModel
from mixtralweb.accounts.models import Membership, Team
from monitoring import rollup
from monitoring.models import RequestMetrics

CHUNK = 50_000
HEAVY_USER_SHARE = 0.05


def _text(value) -> str:
    """A value in COPY's text format."""
    if value is None:
        return r"\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    return (
        str(value)
        .replace("\\", "\\\\")
        .replace("\t", "\\t")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
    )


class Table:
    """COPY rows into a model's table: named columns per row, every other column
    gets its field's default, so fields added later need no change here."""

    def __init__(self, model, explicit: list[str]):
        self.model = model
        fields = [f for f in model._meta.concrete_fields]
        self.columns = [f.column for f in fields]
        by_column = {f.column: f for f in fields}
        self.explicit = explicit
        self.constant = {
            column: _text(by_column[column].get_default())
            for column in self.columns
            if column not in explicit
        }

    def copy(self, rows) -> None:
        sql = f'COPY "{self.model._meta.db_table}" ({", ".join(self.columns)}) FROM STDIN'
        buffer = io.StringIO()
        for row in rows:
            values = dict(zip(self.explicit, row, strict=True))
            buffer.write(
                "\t".join(
                    _text(values[c]) if c in values else self.constant[c] for c in self.columns
                )
            )
            buffer.write("\n")
        with connection.cursor() as cursor:
            with cursor.connection.cursor().copy(sql) as copy:
                copy.write(buffer.getvalue())


class Command(BaseCommand):
    help = "Generate synthetic request records (Generation + RequestMetrics) for benchmarks."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=1_000_000)
        parser.add_argument("--users", type=int, default=200)
        parser.add_argument("--teams", type=int, default=10)
        parser.add_argument("--days", type=int, default=90)
        parser.add_argument("--seed", type=int, default=1)

    def handle(self, *args, count, users, teams, days, seed, **options):
        if count < 1 or users < 1 or teams < 1 or days < 1:
            raise CommandError("--count, --users, --teams and --days must be positive.")
        rng = random.Random(seed)
        began = time.monotonic()
        people, team_of = self.cast(users, teams)
        models = [
            LanguageModel.objects.get_or_create(
                name=name, defaults={"path": "bench.gguf", "n_ctx": n_ctx}
            )[0]
            for name, n_ctx in (("bench-model-mixtral", 65536), ("bench-model-small", 8192))
        ]
        if connection.vendor == "postgresql":
            self.copy_rows(rng, count, people, team_of, models, days)
        else:
            self.bulk_rows(rng, count, people, team_of, models, days)
        loaded = time.monotonic()
        today = timezone.localdate()
        rollup.refresh(today - timedelta(days=days + 1), today)
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                for table in ("inference_generation", "monitoring_requestmetrics"):
                    cursor.execute(f'ANALYZE "{table}"')
                cursor.execute('ANALYZE "monitoring_usagedaily"')
        self.stdout.write(
            f"{count:,} requests written in {loaded - began:.1f} s; "
            f"daily rollup rebuilt in {time.monotonic() - loaded:.1f} s."
        )

    def cast(self, users: int, teams: int):
        User = get_user_model()
        heavy, _ = User.objects.get_or_create(username="bench")
        existing = set(
            User.objects.filter(username__startswith="bench-user-").values_list(
                "username", flat=True
            )
        )
        User.objects.bulk_create(
            [
                User(username=f"bench-user-{i}")
                for i in range(users)
                if f"bench-user-{i}" not in existing
            ]
        )
        people = list(
            User.objects.filter(username__startswith="bench-user-").order_by("id")[:users]
        )
        team_rows = [Team.objects.get_or_create(name=f"bench-team-{i}")[0] for i in range(teams)]
        team_of = {}
        for i, person in enumerate([heavy, *people]):
            team = team_rows[i % teams]
            Membership.objects.get_or_create(
                team=team,
                user=person,
                defaults={"role": Membership.ADMIN if i < teams else Membership.MEMBER},
            )
            team_of[person.pk] = team.pk
        return [heavy, *people], team_of

    def synthetic(self, rng, count, people, team_of, models, days):
        """(generation values, metrics values) tuples, oldest first."""
        now = timezone.now()
        span_s = days * 86400
        heavy = people[0]
        for i in range(count):
            user = heavy if rng.random() < HEAVY_USER_SHARE else rng.choice(people[1:] or people)
            model = models[0] if rng.random() < 0.7 else models[1]
            roll = rng.random()
            source = "chat" if roll < 0.7 else ("api" if roll < 0.9 else "job")
            roll = rng.random()
            state = "done" if roll < 0.95 else ("failed" if roll < 0.98 else "cancelled")
            queued = now - timedelta(seconds=span_s * (1 - i / count))
            queue_ms = rng.expovariate(1 / 300)
            prompt = int(rng.lognormvariate(6.5, 1.2)) + 10
            prompt = min(prompt, model.n_ctx - 1024)
            completion = rng.randint(8, 900)
            ttft_ms = 40 + prompt * rng.uniform(0.3, 0.8)
            tps = rng.uniform(8, 24) if model is models[0] else rng.uniform(60, 120)
            decode_ms = (completion - 1) / tps * 1000
            e2e_ms = queue_ms + ttft_ms + decode_ms
            started = queued + timedelta(milliseconds=queue_ms)
            first = started + timedelta(milliseconds=ttft_ms)
            finished = queued + timedelta(milliseconds=e2e_ms)
            gpu = model is models[0]
            vram_start = 71_000_000_000 if gpu else None
            gen = (
                user.pk,
                team_of[user.pk],
                model.pk,
                source,
                f"key-{user.pk}" if source == "api" else "",
                state,
                "Synthetic failure." if state == "failed" else "",
                "stop",
                1,
                "bench:1",
                queued,
                started,
                first,
                finished,
                finished,
            )
            metrics = (
                prompt,
                rng.randint(0, prompt // 2),
                completion,
                model.n_ctx,
                prompt + completion,
                queue_ms,
                ttft_ms,
                ttft_ms,
                prompt / ttft_ms * 1000,
                decode_ms,
                tps,
                1000 / tps,
                1300 / tps,
                e2e_ms,
                "bench-host",
                1,
                0 if gpu else None,
                "GPU-bench" if gpu else "",
                vram_start,
                vram_start + (prompt + completion) * 229_376 if gpu else None,
                rng.uniform(20, 95) if gpu else None,
                rng.uniform(150, 400) if gpu else None,
                rng.uniform(55, 84) if gpu else None,
                rng.uniform(50, 200),
                2_000_000_000,
                finished,
            )
            yield gen, metrics

    GEN_COLUMNS = [
        "user_id",
        "team_id",
        "model_id",
        "source",
        "api_key_name",
        "state",
        "reason",
        "finish_reason",
        "attempts",
        "worker",
        "queued_at",
        "started_at",
        "first_token_at",
        "finished_at",
        "heartbeat_at",
    ]
    METRIC_COLUMNS = [
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "n_ctx",
        "context_used",
        "queue_ms",
        "ttft_ms",
        "prompt_eval_ms",
        "prompt_tokens_per_s",
        "decode_ms",
        "decode_tokens_per_s",
        "itl_p50_ms",
        "itl_p95_ms",
        "e2e_ms",
        "host",
        "pid",
        "gpu_index",
        "gpu_uuid",
        "vram_device_start_bytes",
        "vram_device_peak_bytes",
        "gpu_util_mean_pct",
        "power_mean_w",
        "temperature_max_c",
        "cpu_mean_pct",
        "rss_peak_bytes",
        "created_at",
    ]

    def copy_rows(self, rng, count, people, team_of, models, days):
        generations = Table(Generation, ["id", *self.GEN_COLUMNS])
        metrics = Table(RequestMetrics, ["id", "generation_id", *self.METRIC_COLUMNS])
        with connection.cursor() as cursor:
            cursor.execute("SELECT COALESCE(MAX(id), 0) FROM inference_generation")
            next_gen = cursor.fetchone()[0] + 1
            cursor.execute("SELECT COALESCE(MAX(id), 0) FROM monitoring_requestmetrics")
            next_metrics = cursor.fetchone()[0] + 1
        rows = self.synthetic(rng, count, people, team_of, models, days)
        done = 0
        while done < count:
            n = min(CHUNK, count - done)
            chunk = [next(rows) for _ in range(n)]
            with transaction.atomic():
                generations.copy((next_gen + k, *g) for k, (g, _) in enumerate(chunk))
                metrics.copy((next_metrics + k, next_gen + k, *m) for k, (_, m) in enumerate(chunk))
            next_gen += n
            next_metrics += n
            done += n
            self.stdout.write(f"  {done:,} / {count:,}")
        with connection.cursor() as cursor:
            for table in ("inference_generation", "monitoring_requestmetrics"):
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT MAX(id) FROM {table}))"
                )

    def bulk_rows(self, rng, count, people, team_of, models, days):
        for start in range(0, count, 5000):
            batch = list(
                self.synthetic(rng, min(5000, count - start), people, team_of, models, days)
            )
            gens = Generation.objects.bulk_create(
                [Generation(**dict(zip(self.GEN_COLUMNS, g, strict=True))) for g, _ in batch]
            )
            RequestMetrics.objects.bulk_create(
                [
                    RequestMetrics(generation=gen, **dict(zip(self.METRIC_COLUMNS, m, strict=True)))
                    for gen, (_, m) in zip(gens, batch, strict=True)
                ]
            )
