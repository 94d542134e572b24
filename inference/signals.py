"""Signals other parts of the product listen to: monitoring records what each
generation cost, jobs move on when a pass ends. inference sends them and never
imports its listeners.

Every one is sent with sender=Generation and generation=the Generation.
"""

from django.dispatch import Signal

# A worker admitted the generation to its model: prompt evaluation begins.
generation_started = Signal()

# The generation ran and its row is saved in its final state; the final event has
# not gone out yet. Also: stats (the engine's RunStats) and n_ctx. Receivers record
# what it cost: the final event carries that record.
generation_ended = Signal()

# The generation reached a final state and everyone following it was told (by any
# path: the worker, a stop before it started, the reaper). May come more than once
# for the same generation.
generation_finished = Signal()
