"""The Content-Security-Policy of every page (django-csp; the policy itself is
CONTENT_SECURITY_POLICY in settings.py), with the page's own host added to
connect-src for websockets.

CSP Level 3 lets 'self' match ws:// and wss:// on the same host, but not every
browser in use implements that yet; naming the host is what they all understand.
"""

from __future__ import annotations

from csp.middleware import CSPMiddleware
from django.core.exceptions import DisallowedHost


class ContentSecurityPolicyMiddleware(CSPMiddleware):
    def get_policy_parts(self, request, response, report_only: bool = False):
        parts = super().get_policy_parts(request, response, report_only)
        try:
            host = request.get_host()
        except DisallowedHost:
            return parts  # a 400 for a host we do not serve: no websocket to allow
        update = dict(parts.update or {})
        update["connect-src"] = [*update.get("connect-src", []), f"ws://{host}", f"wss://{host}"]
        parts.update = update
        return parts
