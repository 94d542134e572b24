"""Pages for long-context jobs. Plain functions; writes go through services."""

from __future__ import annotations

import math

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils.text import slugify
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_POST

from inference.models import LanguageModel
from mixtralweb.accounts import access

from . import planning, services
from .forms import JobForm
from .models import Job
from .selectors import batch_progress, job_snapshot
from .uploads import DocumentUploadHandler

STATE_FILTERS = {
    "active": [Job.QUEUED, Job.RUNNING],
    "done": [Job.DONE],
    "failed": [Job.FAILED],
    "cancelled": [Job.CANCELLED],
    "draft": [Job.DRAFT],
}


def _job_or_404(user, job_id) -> Job:
    try:
        return services.get_job_for_user(user, job_id)
    except services.JobError:
        raise Http404("Job not found") from None


@login_required
def job_list(request):
    jobs = access.jobs(
        request.user,
        Job.objects.select_related("model", "user", "team").defer(
            "document", "result", "instruction"
        ),
    )
    state = request.GET.get("state", "")
    if state in STATE_FILTERS:
        jobs = jobs.filter(state__in=STATE_FILTERS[state])
    model = request.GET.get("model", "")
    if model:
        jobs = jobs.filter(model__name=model)
    owner = request.GET.get("owner", "")
    if owner == "mine":
        jobs = jobs.filter(user=request.user)
    elif owner == "team":
        jobs = jobs.exclude(user=request.user)
    query = request.GET.get("q", "").strip()
    if query:
        jobs = jobs.filter(title__icontains=query)
    page = Paginator(jobs, 25).get_page(request.GET.get("page"))
    page.object_list = list(page.object_list)  # one read, with the batches' progress on it
    batch_progress(page.object_list)
    return render(
        request,
        "inference/jobs/list.html",
        {
            "page": page,
            "filters": {"state": state, "model": model, "owner": owner, "q": query},
            "states": list(STATE_FILTERS),
            "models": LanguageModel.objects.all(),
        },
    )


@login_required
@csrf_exempt  # only to install the upload handler first; _job_new checks the token
def job_new(request):
    uploads = DocumentUploadHandler(request)
    request.upload_handlers.insert(0, uploads)
    return _job_new(request, uploads)


@csrf_protect
def _job_new(request, uploads: DocumentUploadHandler):
    if request.method != "POST":
        form = JobForm(user=request.user)
        return render(request, "inference/jobs/new.html", {"form": form})
    form = JobForm(request.POST, request.FILES, user=request.user)
    if form.is_valid():
        data = form.cleaned_data
        upload = data["file"]
        try:
            job = services.job_draft(
                user=request.user,
                instruction=data["instruction"],
                max_tokens=data["max_tokens"],
                model_name=data["model"],
                text=data["text"],
                file_name=upload.name if upload else "",
                file_data=upload.read() if upload else None,
                file_size=uploads.size_of("file", upload) if upload else None,
                team=data["team"],
                title=data["title"],
            )
        except services.JobError as exc:
            field = exc.field if exc.field in form.fields else None
            form.add_error(field, str(exc))
        else:
            return redirect("job_detail", job_id=job.pk)
    if request.FILES.get("file"):
        form.add_error("file", "Choose the file again: browsers do not keep it.")
    return render(request, "inference/jobs/new.html", {"form": form}, status=400)


@login_required
@require_POST
def job_count(request):
    """The pasted document counted against the model's context, as JSON (the form
    calls it as the user types); nothing is saved."""
    try:
        count = services.job_count(
            user=request.user,
            instruction=request.POST.get("instruction", ""),
            max_tokens=request.POST.get("max_tokens"),
            model_name=request.POST.get("model", ""),
            text=request.POST.get("text", ""),
        )
    except services.JobError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse(count)


@login_required
def job_detail(request, job_id: int):
    job = _job_or_404(request.user, job_id)
    if job.is_final and job.user_id == request.user.pk and job.seen_at is None:
        services.job_mark_seen(user=request.user, job_id=job.pk)
    if job.state == Job.DRAFT:
        return render(request, "inference/jobs/draft.html", _draft_context(request, job))
    return render(
        request,
        "inference/jobs/detail.html",
        {"job": job, "snapshot": job_snapshot(job), "is_owner": job.user_id == request.user.pk},
    )


def _draft_context(request, job: Job) -> dict:
    """What the user needs to choose: the counts, and for a document that does not
    fit, about how many chunks map-reduce takes, or why it cannot."""
    context = {
        "job": job,
        "is_owner": job.user_id == request.user.pk,
        "room": job.n_ctx - job.max_tokens,
        "over": job.prompt_tokens - (job.n_ctx - job.max_tokens),
    }
    if not job.fits:
        try:
            planning.check_map_reduce(job.model, job.instruction, job.max_tokens, job.n_ctx)
            budget = planning.chunk_budget(job.model, job.instruction, job.max_tokens, job.n_ctx)
            context["chunks_estimate"] = math.ceil(job.document_tokens / budget)
        except planning.PlanError as exc:
            context["map_reduce_error"] = str(exc)
    return context


@login_required
@require_POST
def job_run(request, job_id: int):
    try:
        services.job_submit(
            user=request.user, job_id=job_id, strategy=request.POST.get("strategy", "")
        )
    except services.JobError as exc:
        if exc.code == "not_found":
            raise Http404("Job not found") from None
        messages.error(request, str(exc))
    return redirect("job_detail", job_id=job_id)


@login_required
@require_POST
def job_discard(request, job_id: int):
    try:
        services.job_discard(user=request.user, job_id=job_id)
    except services.JobError as exc:
        if exc.code == "not_found":
            raise Http404("Job not found") from None
        messages.error(request, str(exc))
        return redirect("job_detail", job_id=job_id)
    messages.info(request, "The job was discarded; nothing was queued.")
    return redirect("job_new")


@login_required
@require_POST
def job_cancel(request, job_id: int):
    try:
        services.job_cancel(user=request.user, job_id=job_id)
    except services.JobError as exc:
        if exc.code == "not_found":
            raise Http404("Job not found") from None
        messages.error(request, str(exc))
    return redirect("job_detail", job_id=job_id)


@login_required
def job_download(request, job_id: int, fmt: str):
    job = _job_or_404(request.user, job_id)
    if fmt not in {"md", "txt"} or job.state != Job.DONE:
        raise Http404("No such download")
    content_type = "text/markdown" if fmt == "md" else "text/plain"
    response = HttpResponse(job.result, content_type=f"{content_type}; charset=utf-8")
    name = slugify(job.title)[:60] or f"job-{job.pk}"
    response["Content-Disposition"] = f'attachment; filename="{name}.{fmt}"'
    return response
