"""Monitoring pages: my usage, team usage, the admin overview, GPUs, /metrics.

Who sees what (one rule, in `_visible_generation` and the checks below): a user
sees their own requests; a team admin sees their team members' usage; staff see
everything. Anything else is 404 (a request) or 403 (a page).
"""

from __future__ import annotations

import hmac
from datetime import timedelta

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from inference.models import Generation
from mixtralweb.accounts.access import staff_required
from mixtralweb.accounts.models import Membership, Team
from monitoring import alerting, history, prometheus, telemetry, usage
from monitoring.alerts import gpu_alerts
from monitoring.models import Alert, UsageDaily, UsageDailyTotal, UsageDailyUser
from monitoring.nvml import NO_GPU_MESSAGE

# RequestMetrics fields that only NVML can fill: without a GPU they read "no NVIDIA GPU".
GPU_FIELDS = {
    "gpu_index",
    "gpu_uuid",
    "vram_process_start_bytes",
    "vram_process_peak_bytes",
    "vram_process_end_bytes",
    "vram_device_start_bytes",
    "vram_device_peak_bytes",
    "vram_device_end_bytes",
    "gpu_util_mean_pct",
    "power_mean_w",
    "energy_j",
    "temperature_max_c",
    "sm_clock_mean_mhz",
    "mem_clock_mean_mhz",
}


# How the detail page names each recorded field (units are shown with the values).
FIELD_LABELS = {
    "prompt_tokens": "Prompt tokens",
    "cached_tokens": "Cached (reused) prompt tokens",
    "completion_tokens": "Completion tokens",
    "n_ctx": "Context size (n_ctx)",
    "context_used": "Context used",
    "queue_ms": "Queue wait",
    "ttft_ms": "Time to first token (from start)",
    "prompt_eval_ms": "Prompt evaluation",
    "prompt_tokens_per_s": "Prompt evaluation speed",
    "decode_ms": "Decode time",
    "decode_tokens_per_s": "Decode speed",
    "itl_p50_ms": "Inter-token latency p50",
    "itl_p95_ms": "Inter-token latency p95",
    "e2e_ms": "End to end (queued to finished)",
    "host": "Host",
    "pid": "Worker PID",
    "gpu_index": "GPU index",
    "gpu_uuid": "GPU UUID",
    "vram_process_start_bytes": "VRAM of the process at start",
    "vram_process_peak_bytes": "VRAM of the process, peak",
    "vram_process_end_bytes": "VRAM of the process at end",
    "vram_device_start_bytes": "VRAM of the device at start",
    "vram_device_peak_bytes": "VRAM of the device, peak",
    "vram_device_end_bytes": "VRAM of the device at end",
    "gpu_util_mean_pct": "GPU utilisation, mean",
    "power_mean_w": "Power, mean",
    "energy_j": "Energy",
    "temperature_max_c": "Temperature, maximum",
    "sm_clock_mean_mhz": "SM clock, mean",
    "mem_clock_mean_mhz": "Memory clock, mean",
    "throttle_reasons": "Throttle reasons seen",
    "cpu_mean_pct": "CPU share of the worker, mean",
    "rss_peak_bytes": "Worker memory (RSS), peak",
    "created_at": "Recorded at",
}


def _status(form) -> int:
    return 400 if form.is_bound and not form.is_valid() else 200


def _csv(lines, filename: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse(lines, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _admin_teams(user):
    if user.is_staff:
        return Team.objects.all()
    return Team.objects.filter(memberships__user=user, memberships__role=Membership.ADMIN)


@login_required
def my_usage(request):
    filters, form = usage.Filters.from_request(request)
    days = filters.daily(UsageDaily.objects.filter(user=request.user))
    generations = filters.generations(Generation.objects.filter(user=request.user))
    if request.GET.get("format") == "csv":
        return _csv(usage.csv_rows(generations), f"usage-{filters.start}-{filters.end}.csv")
    page, older = usage.page_of(generations, request.GET.get("before"))
    context = {
        "form": form,
        "filters": filters,
        "totals": usage.totals(days),
        "chart": usage.series(usage.by(days, "day"), filters.start, filters.end),
        "by_model": usage.by(days, "model__name"),
        "page": page,
        "older": older,
        "teams": _admin_teams(request.user),
    }
    return render(request, "monitoring/my_usage.html", context, status=_status(form))


def _visible_generation(user, pk: int) -> Generation:
    """The generation if `user` may see it: theirs, a team admin's member's, or staff."""
    gen = get_object_or_404(
        Generation.objects.select_related("user", "team", "model", "metrics"), pk=pk
    )
    if user.is_staff or gen.user_id == user.pk:
        return gen
    if _admin_teams(user).filter(memberships__user_id=gen.user_id).exists():
        return gen
    raise Http404("No such request.")


@login_required
def request_detail(request, pk: int):
    gen = _visible_generation(request.user, pk)
    metrics = getattr(gen, "metrics", None)
    rows = []
    if metrics is not None:
        for field in metrics._meta.concrete_fields:
            if field.name in {"id", "generation"}:
                continue
            value = getattr(metrics, field.name)
            gpu_unknown = value is None and field.name in GPU_FIELDS and not metrics.has_gpu
            label = FIELD_LABELS.get(field.name, field.verbose_name)
            rows.append((label, field.name, value, gpu_unknown))
    return render(
        request,
        "monitoring/request_detail.html",
        {"gen": gen, "metrics": metrics, "rows": rows, "no_gpu": NO_GPU_MESSAGE},
    )


@login_required
def team_usage(request, team_id: int):
    team = get_object_or_404(Team, pk=team_id)
    if not team.is_admin(request.user):
        raise PermissionDenied("Only the team's admins see its usage.")
    filters, form = usage.Filters.from_request(request)
    members = team.memberships.values_list("user_id", flat=True)
    days = filters.daily(UsageDaily.objects.filter(user_id__in=members))
    if request.GET.get("format") == "csv":
        return _csv(usage.csv_daily_rows(days), f"team-{team.pk}-{filters.start}.csv")
    context = {
        "team": team,
        "form": form,
        "filters": filters,
        "totals": usage.totals(days),
        "chart": usage.series(usage.by(days, "day"), filters.start, filters.end),
        "by_member": usage.by(days, "user_id", "user__username"),
        "by_model": usage.by(days, "model__name"),
        "open_invitations": team.invitations.open().select_related("created_by"),
    }
    return render(request, "monitoring/team_usage.html", context, status=_status(form))


@staff_required
def admin_overview(request):
    filters, form = usage.Filters.from_request(request)
    days = filters.daily(UsageDaily.objects.all())  # by user: top users, CSV
    totals = filters.daily(UsageDailyTotal.objects.all())  # summed over users: the rest
    generations = filters.generations(Generation.objects.all())
    export = request.GET.get("format")
    if export == "csv":
        return _csv(usage.csv_daily_rows(days), f"usage-daily-{filters.start}.csv")
    if export == "requests-csv":
        return _csv(usage.csv_rows(generations), f"requests-{filters.start}.csv")
    page, older = usage.page_of(generations, request.GET.get("before"))
    per_day = usage.by(totals, "day")
    gpus = telemetry.current_gpus()
    context = {
        "form": form,
        "filters": filters,
        "totals": usage.totals(totals),
        "chart": usage.series(per_day, filters.start, filters.end),
        "by_day": per_day[::-1],
        "distributions": usage.distributions(generations),
        # Per-user daily sums rank users fastest; they know no model or source.
        "top_users": usage.by(
            days if filters.model or filters.source else filters.daily(UsageDailyUser.objects),
            "user_id",
            "user__username",
            top=10,
        ),
        "by_team": usage.by(totals, "team__name"),
        "by_model": usage.by(totals, "model__name"),
        "by_source": usage.by(totals, "source"),
        "page": page,
        "older": older,
        "alerts": gpu_alerts(gpus),
        "gpu_count": len(gpus),
        "no_gpu": NO_GPU_MESSAGE,
    }
    return render(request, "monitoring/admin_overview.html", context, status=_status(form))


@staff_required
def gpus(request):
    hours = history.RANGES.get(request.GET.get("range", ""), None)
    range_key = request.GET.get("range") if hours else "1h"
    hours = hours or history.RANGES["1h"]
    since = timezone.now() - timedelta(hours=hours)
    current = telemetry.current_gpus()
    context = {
        "hosts": telemetry.current_hosts(),
        "gpus": current,
        "alerts": gpu_alerts(current),
        "history": history.gpu_history(since),
        "ranges": list(history.RANGES),
        "range_key": range_key,
        "no_gpu": NO_GPU_MESSAGE,
        "live_interval_s": settings.GPU_SAMPLE_INTERVAL_S,
    }
    return render(request, "monitoring/gpus.html", context)


@staff_required
def alerts(request):
    """Open alerts (sent, not ended), then the history, newest first."""
    rows = Alert.objects.select_related("acknowledged_by").exclude(fired_at__isnull=True)
    history_rows = rows.filter(resolved_at__isnull=False)
    before = request.GET.get("before", "")
    if before.isdigit():
        history_rows = history_rows.filter(pk__lt=int(before))
    page = list(history_rows.order_by("-pk")[:51])
    context = {
        "open": rows.filter(resolved_at__isnull=True).order_by("-fired_at"),
        "history": page[:50],
        "older": page[49].pk if len(page) > 50 else None,
        "repeat_min": settings.ALERT_REPEAT_MIN,
        "evaluate_s": settings.ALERT_EVALUATE_INTERVAL_S,
        "pending": Alert.objects.filter(fired_at__isnull=True).count(),
    }
    return render(request, "monitoring/alerts.html", context)


@require_POST
@staff_required
def alert_acknowledge(request, alert_id: int):
    alert = get_object_or_404(Alert, pk=alert_id)
    alerting.acknowledge(alert, request.user)
    if alert.is_event:
        messages.success(request, f"Acknowledged and closed: {alert.subject}.")
    else:
        messages.success(
            request, f"Acknowledged: {alert.subject}. It is not sent again until it ends."
        )
    return redirect("alerts")


def metrics(request):
    """Prometheus text format; a Bearer METRICS_TOKEN or a staff session."""
    token = settings.METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    bearer = header[7:].strip() if header.lower().startswith("bearer ") else ""
    allowed = bool(token) and hmac.compare_digest(bearer.encode(), token.encode())
    if not allowed and not (request.user.is_authenticated and request.user.is_staff):
        if request.user.is_authenticated or bearer:
            return HttpResponse("Forbidden.\n", status=403, content_type="text/plain")
        response = HttpResponse(
            "Authentication required: a Bearer token (METRICS_TOKEN) or a staff session.\n",
            status=401,
            content_type="text/plain",
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(
        prometheus.exposition(), content_type="text/plain; version=0.0.4; charset=utf-8"
    )
