"""Jobs move into their own app (inference.jobs, label jobs) and teams into the
accounts app, keeping their tables; generations record their token counts."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0001_initial"),
        ("inference", "0007_batching_and_threads"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            # The tables stay as they are: only Django's record of which app owns
            # the models changes.
            state_operations=[
                migrations.RemoveField(
                    model_name="jobchunk",
                    name="job",
                ),
                migrations.RemoveField(
                    model_name="jobchunk",
                    name="generation",
                ),
                migrations.RemoveField(
                    model_name="jobchunk",
                    name="generations",
                ),
                migrations.AlterField(
                    model_name="conversation",
                    name="team",
                    field=models.ForeignKey(
                        blank=True,
                        help_text="Shared with this team's members.",
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="conversations",
                        to="accounts.team",
                    ),
                ),
                migrations.AlterField(
                    model_name="generation",
                    name="team",
                    field=models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to="accounts.team",
                    ),
                ),
                migrations.DeleteModel(
                    name="Job",
                ),
                migrations.DeleteModel(
                    name="JobChunk",
                ),
            ],
        ),
        migrations.AddField(
            model_name="generation",
            name="completion_tokens",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="generation",
            name="prompt_tokens",
            field=models.PositiveIntegerField(default=0),
        ),
    ]
