"""Error pages that must work when the database does not.

A database outage is answered with 503 and a page that says so (and Retry-After),
not a generic 500: the template touches neither the database nor the session.
"""

from __future__ import annotations

import sys

from django.db import DatabaseError, InterfaceError, OperationalError
from django.template import loader
from django.views import defaults

UNAVAILABLE_RETRY_AFTER_S = 30
DATABASE_DOWN = (OperationalError, InterfaceError)


def database_unavailable(request):
    body = loader.get_template("503.html").render({"retry_after_s": UNAVAILABLE_RETRY_AFTER_S})
    from django.http import HttpResponse

    response = HttpResponse(body, status=503)
    response["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_S)
    return response


def server_error(request, *args, **kwargs):
    """handler500: a database outage becomes 503; anything else the usual 500."""
    exc = sys.exc_info()[1]
    if isinstance(exc, DATABASE_DOWN) or (
        isinstance(exc, DatabaseError) and "connection" in str(exc).lower()
    ):
        return database_unavailable(request)
    return defaults.server_error(request, *args, **kwargs)


class DatabaseUnavailableMiddleware:
    """Turns a database outage inside a view into the 503 page."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if isinstance(exception, DATABASE_DOWN):
            return database_unavailable(request)
        return None
