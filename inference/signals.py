"""Signals other parts of the product listen to (jobs advance on them)."""

from django.dispatch import Signal

# Sent by the worker once a generation reached a final state and was saved.
# Arguments: generation (the Generation).
generation_finished = Signal()
