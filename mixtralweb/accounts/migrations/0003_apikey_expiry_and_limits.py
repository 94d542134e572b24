"""API keys may expire, and may carry limits of their own under their owner's."""

import django.core.validators
from django.db import migrations, models


def limit(help_text):
    return models.PositiveIntegerField(
        blank=True,
        help_text=help_text,
        null=True,
        validators=[django.core.validators.MinValueValidator(1)],
    )


class Migration(migrations.Migration):
    dependencies = [("accounts", "0002_invitation_token_hash")]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="expires_at",
            field=models.DateTimeField(
                blank=True, help_text="From then on it is refused. Blank: never.", null=True
            ),
        ),
        migrations.AddField(
            model_name="apikey",
            name="requests_per_minute",
            field=limit("Generations this key starts per minute. Blank: none."),
        ),
        migrations.AddField(
            model_name="apikey",
            name="tokens_per_day",
            field=limit("Prompt + completion tokens of this key per day. Blank: none."),
        ),
        migrations.AddField(
            model_name="apikey",
            name="concurrent_generations",
            field=limit("This key's generations queued or running at once."),
        ),
    ]
