"""Generations now carry their own token counts (the quotas read them): copy them
from the metrics recorded so far."""

from django.db import migrations
from django.db.models import OuterRef, Subquery


def copy_token_counts(apps, schema_editor):
    Generation = apps.get_model("inference", "Generation")
    RequestMetrics = apps.get_model("monitoring", "RequestMetrics")
    metrics = RequestMetrics.objects.filter(generation=OuterRef("pk"))
    Generation.objects.filter(metrics__isnull=False).update(
        prompt_tokens=Subquery(metrics.values("prompt_tokens")[:1]),
        completion_tokens=Subquery(metrics.values("completion_tokens")[:1]),
    )


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0008_jobs_and_accounts_apps"),
        ("monitoring", "0004_team_in_accounts"),
    ]

    operations = [migrations.RunPython(copy_token_counts, migrations.RunPython.noop)]
