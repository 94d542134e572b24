"""Formats for measured values: unknown shows as an em dash, never as 0.

Unknown is None (a field not measured) or "": what the template engine gives for
`gen.metrics.ttft_ms` when the generation has no metrics row at all (queued,
stopped before it started, failed before it reached the model).
"""

from django import template

register = template.Library()

DASH = "—"


def _unknown(value) -> bool:
    return value is None or value == ""


@register.filter
def gib(value):
    return DASH if _unknown(value) else f"{value / 2**30:.2f} GiB"


@register.filter
def ms(value):
    return DASH if _unknown(value) else f"{value:,.0f} ms"


@register.filter
def count(value):
    """An integer with thousands separators (humanize's intcomma, without its
    localisation machinery, which is slow over hundreds of table cells)."""
    return DASH if _unknown(value) else f"{value:,}"


@register.filter
def num(value, digits=1):
    return DASH if _unknown(value) else f"{value:,.{int(digits)}f}"


@register.filter
def measured(value, name):
    """A RequestMetrics field's value with its unit, chosen from the field's name."""
    if _unknown(value):
        return DASH
    if isinstance(value, list):
        return ", ".join(value) or "none"
    if name.endswith("_bytes"):
        return gib(value)
    if name.endswith("_ms"):
        return f"{value:,.1f} ms"
    if name.endswith("_per_s"):
        return f"{value:,.1f} tokens/s"
    if name.endswith("_pct"):
        return f"{value:.1f} %"
    if name.endswith("_w"):
        return f"{value:.1f} W"
    if name.endswith("_j"):
        return f"{value:,.1f} J"
    if name.endswith("_c"):
        return f"{value:.0f} °C"
    if name.endswith("_mhz"):
        return f"{value:,.0f} MHz"
    return value
