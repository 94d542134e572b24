"""Job and JobChunk, until now models of the inference app, keep their tables."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def move_content_types(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    ContentType.objects.filter(app_label="inference", model__in=["job", "jobchunk"]).update(
        app_label="jobs"
    )


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        ("accounts", "0001_initial"),
        ("inference", "0008_jobs_and_accounts_apps"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            # The tables stay as they are: only Django's record of which app owns
            # the models changes.
            state_operations=[
                migrations.CreateModel(
                    name="Job",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True,
                                primary_key=True,
                                serialize=False,
                                verbose_name="ID",
                            ),
                        ),
                        ("title", models.CharField(max_length=200)),
                        ("instruction", models.TextField()),
                        ("document", models.TextField()),
                        (
                            "document_name",
                            models.CharField(
                                blank=True, help_text="Uploaded file name.", max_length=255
                            ),
                        ),
                        ("document_tokens", models.PositiveIntegerField(default=0)),
                        ("prompt_tokens", models.PositiveIntegerField(default=0)),
                        (
                            "max_tokens",
                            models.PositiveIntegerField(
                                default=512, help_text="New tokens per pass."
                            ),
                        ),
                        (
                            "n_ctx",
                            models.PositiveIntegerField(
                                default=0, help_text="The model's context when counted."
                            ),
                        ),
                        (
                            "strategy",
                            models.CharField(
                                blank=True,
                                choices=[("single", "One pass"), ("map_reduce", "Map-reduce")],
                                max_length=12,
                            ),
                        ),
                        (
                            "state",
                            models.CharField(
                                choices=[
                                    ("draft", "Draft"),
                                    ("queued", "Queued"),
                                    ("running", "Running"),
                                    ("done", "Done"),
                                    ("failed", "Failed"),
                                    ("cancelled", "Cancelled"),
                                ],
                                db_index=True,
                                default="draft",
                                max_length=10,
                            ),
                        ),
                        (
                            "reason",
                            models.TextField(
                                blank=True, help_text="Why it failed or was cancelled."
                            ),
                        ),
                        ("result", models.TextField(blank=True)),
                        ("cancel_requested", models.BooleanField(default=False)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        ("queued_at", models.DateTimeField(blank=True, null=True)),
                        ("finished_at", models.DateTimeField(blank=True, null=True)),
                        ("seen_at", models.DateTimeField(blank=True, null=True)),
                        (
                            "model",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.PROTECT,
                                related_name="jobs",
                                to="inference.languagemodel",
                            ),
                        ),
                        (
                            "team",
                            models.ForeignKey(
                                blank=True,
                                help_text="Shared with this team's members.",
                                null=True,
                                on_delete=django.db.models.deletion.SET_NULL,
                                related_name="jobs",
                                to="accounts.team",
                            ),
                        ),
                        (
                            "user",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="jobs",
                                to=settings.AUTH_USER_MODEL,
                            ),
                        ),
                    ],
                    options={
                        "db_table": "inference_job",
                        "ordering": ["-created_at"],
                    },
                ),
                migrations.CreateModel(
                    name="JobChunk",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True,
                                primary_key=True,
                                serialize=False,
                                verbose_name="ID",
                            ),
                        ),
                        ("level", models.PositiveSmallIntegerField(default=0)),
                        ("index", models.PositiveIntegerField()),
                        ("start", models.PositiveIntegerField()),
                        ("end", models.PositiveIntegerField()),
                        (
                            "prompt_tokens",
                            models.PositiveIntegerField(
                                default=0, help_text="Counted when planned."
                            ),
                        ),
                        (
                            "state",
                            models.CharField(
                                choices=[
                                    ("pending", "Pending"),
                                    ("running", "Running"),
                                    ("done", "Done"),
                                    ("failed", "Failed"),
                                ],
                                default="pending",
                                max_length=10,
                            ),
                        ),
                        ("attempts", models.PositiveSmallIntegerField(default=0)),
                        ("answer", models.TextField(blank=True)),
                        (
                            "generation",
                            models.OneToOneField(
                                blank=True,
                                null=True,
                                on_delete=django.db.models.deletion.SET_NULL,
                                related_name="job_chunk",
                                to="inference.generation",
                            ),
                        ),
                        (
                            "generations",
                            models.ManyToManyField(
                                blank=True,
                                db_table="inference_jobchunk_generations",
                                related_name="+",
                                to="inference.generation",
                            ),
                        ),
                        (
                            "job",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="chunks",
                                to="jobs.job",
                            ),
                        ),
                    ],
                    options={
                        "db_table": "inference_jobchunk",
                        "ordering": ["level", "index"],
                    },
                ),
                migrations.AddIndex(
                    model_name="job",
                    index=models.Index(
                        fields=["user", "-created_at"], name="inference_j_user_id_90800b_idx"
                    ),
                ),
                migrations.AddConstraint(
                    model_name="jobchunk",
                    constraint=models.UniqueConstraint(
                        fields=("job", "level", "index"), name="one_chunk_per_place"
                    ),
                ),
            ],
        ),
        migrations.RunPython(move_content_types, migrations.RunPython.noop),
    ]
