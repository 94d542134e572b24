from django.db import migrations, models


def flash_attn_to_mode(apps, schema_editor):
    # The old boolean's False was a default, not a choice: it becomes llama.cpp's own
    # default, auto. True stays on.
    LanguageModel = apps.get_model("inference", "LanguageModel")
    for model in LanguageModel.objects.all():
        model.flash_attn = "on" if model.flash_attn_old else "auto"
        model.save(update_fields=["flash_attn"])


def flash_attn_to_bool(apps, schema_editor):
    LanguageModel = apps.get_model("inference", "LanguageModel")
    for model in LanguageModel.objects.all():
        model.flash_attn_old = model.flash_attn == "on"
        model.save(update_fields=["flash_attn_old"])


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0006_workerheartbeat"),
    ]

    operations = [
        migrations.RenameField("languagemodel", "flash_attn", "flash_attn_old"),
        migrations.AddField(
            model_name="languagemodel",
            name="flash_attn",
            field=models.CharField(
                choices=[("auto", "auto"), ("on", "on"), ("off", "off")],
                default="auto",
                help_text="auto: llama.cpp uses flash attention where the device supports it.",
                max_length=4,
            ),
        ),
        migrations.RunPython(flash_attn_to_mode, flash_attn_to_bool),
        migrations.RemoveField("languagemodel", "flash_attn_old"),
        migrations.AlterField(
            model_name="languagemodel",
            name="n_threads",
            field=models.PositiveIntegerField(
                default=0, help_text="Threads for decoding; 0: the machine's physical cores."
            ),
        ),
        migrations.AddField(
            model_name="languagemodel",
            name="n_threads_batch",
            field=models.PositiveIntegerField(
                default=0, help_text="Threads for prompt evaluation; 0: the same as n_threads."
            ),
        ),
        migrations.AlterField(
            model_name="languagemodel",
            name="n_batch",
            field=models.PositiveIntegerField(
                default=512,
                help_text="Most prompt tokens evaluated in one step (a prefill chunk).",
            ),
        ),
        migrations.AddField(
            model_name="languagemodel",
            name="n_parallel",
            field=models.PositiveSmallIntegerField(
                default=4, help_text="Sequences decoded together (llama.cpp's --parallel)."
            ),
        ),
        migrations.AddField(
            model_name="languagemodel",
            name="job_sequences",
            field=models.PositiveSmallIntegerField(
                default=1, help_text="Of those, at most this many serve long-context job passes."
            ),
        ),
    ]
