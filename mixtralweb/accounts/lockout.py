"""The page a locked-out login gets: the login page, saying why and for how long
(settings.LOGIN_FAILURE_LIMIT, LOGIN_COOLOFF_MINUTES; django-axes counts)."""

from django.conf import settings
from django.shortcuts import render


def locked_out(request, original_response=None, credentials=None):
    return render(
        request,
        "registration/login.html",
        {
            "locked_out": True,
            "cooloff_minutes": settings.LOGIN_COOLOFF_MINUTES,
            "next": request.POST.get("next", ""),
        },
        status=429,
    )
