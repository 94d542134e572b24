"""Reads for the usage pages: filters, daily series, breakdowns, request lists.

Charts and totals come from UsageDaily (a few rows per user and day); only the
request lists and the distributions touch Generation rows, through the
(user, queued_at) and (queued_at) indexes, a page or a bounded sample at a time.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import date, timedelta

from django import forms
from django.db.models import F, Max, Q, QuerySet, Sum
from django.utils import timezone

from inference.models import Generation, LanguageModel
from monitoring.models import RequestMetrics, UsageDailyUser
from monitoring.rollup import day_bounds

DEFAULT_DAYS = 30
MAX_DAYS = 366
PAGE_SIZE = 50
# The distributions and the scatter plot draw the latest requests of the range, at
# most this many: enough for the shape, bounded in cost however large the table.
DISTRIBUTION_SAMPLE = 2000

# Columns a request list never shows: an answer's text can be megabytes.
LIST_DEFERRED = ["text", "input_messages", "prompt_text", "params", "user__password"]

SUM_FIELDS = [
    "requests",
    "failed",
    "cancelled",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "decode_tps_sum",
    "decode_tps_count",
    "ttft_ms_sum",
    "ttft_ms_count",
    "queue_ms_sum",
    "queue_ms_count",
    "e2e_ms_sum",
    "e2e_ms_count",
]


# Imported answers were never run here: usage has none of them.
USAGE_SOURCES = [c for c in Generation.SOURCE_CHOICES if c[0] != Generation.SOURCE_IMPORT]


class UsageFilterForm(forms.Form):
    start = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    model = forms.ModelChoiceField(
        queryset=LanguageModel.objects.all(), required=False, empty_label="All models"
    )
    source = forms.ChoiceField(choices=[("", "All sources"), *USAGE_SOURCES], required=False)

    def clean(self):
        data = super().clean()
        start, end = data.get("start"), data.get("end")
        if start and end and start > end:
            raise forms.ValidationError("The start date is after the end date.")
        if start and end and (end - start).days >= MAX_DAYS:
            raise forms.ValidationError(f"Choose a range of at most {MAX_DAYS} days.")
        return data


@dataclass
class Filters:
    start: date
    end: date
    model: LanguageModel | None = None
    source: str = ""

    @classmethod
    def from_request(cls, request) -> tuple[Filters, UsageFilterForm]:
        """Filters from the query string; an invalid form falls back to the defaults
        (the page shows the form's errors)."""
        today = timezone.localdate()
        filters = cls(start=today - timedelta(days=DEFAULT_DAYS - 1), end=today)
        form = UsageFilterForm(
            request.GET or None, initial={"start": filters.start, "end": filters.end}
        )
        if form.is_bound and form.is_valid():
            data = form.cleaned_data
            filters.end = data["end"] or today
            filters.start = data["start"] or filters.end - timedelta(days=DEFAULT_DAYS - 1)
            if filters.start > filters.end:
                filters.start = filters.end
            filters.model = data["model"]
            filters.source = data["source"]
        return filters, form

    def daily(self, rows: QuerySet) -> QuerySet:
        rows = rows.filter(day__gte=self.start, day__lte=self.end)
        if rows.model is UsageDailyUser:
            return rows  # summed over models and sources
        if self.model:
            rows = rows.filter(model=self.model)
        if self.source:
            rows = rows.filter(source=self.source)
        return rows

    def generations(self, generations: QuerySet) -> QuerySet:
        start, end = day_bounds(self.start, self.end)
        generations = generations.filter(queued_at__gte=start, queued_at__lt=end).exclude(
            source=Generation.SOURCE_IMPORT
        )
        if self.model:
            generations = generations.filter(model=self.model)
        if self.source:
            generations = generations.filter(source=self.source)
        return generations


def _sums():
    return {field: Sum(field) for field in SUM_FIELDS}


def _with_means(row: dict) -> dict:
    def mean(total, count):
        return total / count if count else None

    row = {k: (v if v is not None else 0) if k in SUM_FIELDS else v for k, v in row.items()}
    row["tokens"] = row["prompt_tokens"] + row["completion_tokens"]
    row["decode_tps_mean"] = mean(row["decode_tps_sum"], row["decode_tps_count"])
    row["ttft_ms_mean"] = mean(row["ttft_ms_sum"], row["ttft_ms_count"])
    row["queue_ms_mean"] = mean(row["queue_ms_sum"], row["queue_ms_count"])
    row["e2e_ms_mean"] = mean(row["e2e_ms_sum"], row["e2e_ms_count"])
    return row


def totals(rows: QuerySet) -> dict:
    return _with_means(rows.aggregate(**_sums(), vram_peak_max_bytes=Max("vram_peak_max_bytes")))


def by(rows: QuerySet, *fields: str, top: int | None = None) -> list[dict]:
    """Sums grouped by `fields` (e.g. "day", "user__username") with means; `top`: only
    the groups with the most tokens, most first."""
    grouped = rows.values(*fields).annotate(**_sums())
    if top:
        grouped = grouped.annotate(tokens_sum=F("prompt_tokens") + F("completion_tokens")).order_by(
            "-tokens_sum"
        )[:top]
    else:
        grouped = grouped.order_by(*fields)
    rows = [_with_means(row) for row in grouped]
    for row in rows:
        row["name"] = row[fields[-1]]
    return rows


def series(days: list[dict], start: date, end: date) -> dict:
    """Chart data by day, with empty days present (a gap is a fact, not a missing point)."""
    by_day = {row["day"]: row for row in days}
    labels, tokens, tps, ttft, queue, requests = [], [], [], [], [], []
    day = start
    while day <= end:
        row = by_day.get(day)
        labels.append(day.isoformat())
        requests.append(row["requests"] if row else 0)
        tokens.append(row["tokens"] if row else 0)
        tps.append(row["decode_tps_mean"] if row else None)
        ttft.append(row["ttft_ms_mean"] if row else None)
        queue.append(row["queue_ms_mean"] if row else None)
        day += timedelta(days=1)
    return {
        "labels": labels,
        "requests": requests,
        "tokens": tokens,
        "decode_tps": tps,
        "ttft_ms": ttft,
        "queue_ms": queue,
    }


def page_of(generations: QuerySet, before: str | None) -> tuple[list[Generation], int | None]:
    """One page of generations, newest first, before the generation `before` (keyset
    pagination: no COUNT over a million rows, and stable while rows are added)."""
    generations = (
        generations.select_related("metrics", "model", "user")
        .defer(*LIST_DEFERRED)
        .order_by("-queued_at", "-id")
    )
    if before and before.isdigit():
        anchor = Generation.objects.filter(pk=int(before)).values_list("queued_at", flat=True)
        anchor_at = anchor.first()
        if anchor_at is not None:
            generations = generations.filter(
                Q(queued_at__lt=anchor_at) | Q(queued_at=anchor_at, id__lt=int(before))
            )
    page = list(generations[: PAGE_SIZE + 1])
    older = page[PAGE_SIZE - 1].pk if len(page) > PAGE_SIZE else None
    return page[:PAGE_SIZE], older


def distributions(generations: QuerySet) -> dict:
    """Tokens/s and TTFT histograms and the VRAM-against-context scatter, over the
    latest DISTRIBUTION_SAMPLE requests with metrics."""
    sample = list(
        generations.filter(metrics__isnull=False)
        .order_by("-queued_at")
        .values_list(
            "metrics__decode_tokens_per_s",
            "metrics__ttft_ms",
            "metrics__context_used",
            "metrics__vram_device_peak_bytes",
        )[:DISTRIBUTION_SAMPLE]
    )
    tps = [row[0] for row in sample if row[0] is not None]
    ttft = [row[1] for row in sample if row[1] is not None]
    scatter = [{"x": row[2], "y": row[3] / 2**30} for row in sample if row[3] is not None]
    return {
        "sample_size": len(sample),
        "tps": histogram(tps),
        "ttft_ms": histogram(ttft),
        "vram_scatter": scatter,
    }


def histogram(values: list[float], bins: int = 12) -> dict:
    """Equal-width bins from the minimum to the 99th percentile; the last bin also
    holds the long tail above it (one slow request must not squash the rest)."""
    if not values:
        return {"labels": [], "counts": []}
    ordered = sorted(values)
    low, high = ordered[0], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    width = (high - low) / bins or 1
    counts = [0] * bins
    for value in values:
        counts[max(0, min(bins - 1, int((value - low) / width)))] += 1
    labels = [f"{low + i * width:.0f}–{low + (i + 1) * width:.0f}" for i in range(bins)]
    if ordered[-1] > high:
        labels[-1] = f"≥ {low + (bins - 1) * width:.0f}"
    return {"labels": labels, "counts": counts}


# --- CSV ---------------------------------------------------------------------------
GENERATION_COLUMNS = [
    "id",
    "user__username",
    "team__name",
    "model__name",
    "source",
    "api_key_name",
    "state",
    "reason",
    "finish_reason",
    "queued_at",
    "started_at",
    "first_token_at",
    "finished_at",
]
METRIC_COLUMNS = [
    f.name
    for f in RequestMetrics._meta.concrete_fields
    if f.name not in {"id", "generation", "created_at"}
]


class _Echo:
    def write(self, value):
        return value


# A spreadsheet runs a cell that begins with one of these as a formula (tab and
# carriage return can hide one behind them).
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value):
    """The value as a CSV cell a spreadsheet shows as text: a string that would be
    read as a formula (a username, a team or key name, a reason) gets a leading
    single quote, OWASP's CSV injection advice; empty for None."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_LEADS):
        return "'" + value
    return value


def csv_rows(generations: QuerySet):
    """CSV lines of every generation and its metrics, streamed."""
    writer = csv.writer(_Echo())
    columns = GENERATION_COLUMNS + [f"metrics__{c}" for c in METRIC_COLUMNS]
    yield writer.writerow([c.replace("__", ".") for c in columns])
    for row in generations.order_by("-queued_at").values_list(*columns).iterator(chunk_size=2000):
        yield writer.writerow([_cell(v) for v in row])


def csv_daily_rows(rows: QuerySet):
    writer = csv.writer(_Echo())
    columns = ["day", "user__username", "team__name", "model__name", "source", *SUM_FIELDS]
    yield writer.writerow([c.replace("__", ".") for c in columns])
    for row in rows.order_by("day").values_list(*columns).iterator(chunk_size=2000):
        yield writer.writerow([_cell(v) for v in row])
