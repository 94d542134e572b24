"""Invitations keep a SHA-256 hash of their token instead of the token, and may be
revoked. Existing invitations are hashed in place, so the links already sent keep
working until they expire."""

import hashlib

from django.db import migrations, models


def hash_tokens(apps, schema_editor):
    Invitation = apps.get_model("accounts", "Invitation")
    for invitation in Invitation.objects.only("pk", "token_hash").iterator():
        digest = hashlib.sha256(invitation.token_hash.encode("utf-8")).hexdigest()
        Invitation.objects.filter(pk=invitation.pk).update(token_hash=digest)


def expire_hashed(apps, schema_editor):
    # A hash cannot be turned back into its token: going back, the links stop working.
    from django.utils import timezone

    Invitation = apps.get_model("accounts", "Invitation")
    Invitation.objects.filter(accepted_at__isnull=True).update(expires_at=timezone.now())


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_initial")]

    operations = [
        migrations.RenameField(model_name="invitation", old_name="token", new_name="token_hash"),
        migrations.AlterField(
            model_name="invitation",
            name="token_hash",
            field=models.CharField(editable=False, max_length=64, unique=True),
        ),
        migrations.RunPython(hash_tokens, expire_hashed),
        migrations.AddField(
            model_name="invitation",
            name="revoked_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
