"""The accounts' models now belong to the accounts app (their tables stay)."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0008_jobs_and_accounts_apps"),
        ("mixtralweb", "0003_invitation"),
        ("monitoring", "0004_team_in_accounts"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            # The tables stay as they are: only Django's record of which app owns
            # the models changes.
            state_operations=[
                migrations.RemoveField(
                    model_name="invitation",
                    name="accepted_by",
                ),
                migrations.RemoveField(
                    model_name="invitation",
                    name="created_by",
                ),
                migrations.RemoveField(
                    model_name="invitation",
                    name="team",
                ),
                migrations.RemoveField(
                    model_name="membership",
                    name="team",
                ),
                migrations.RemoveField(
                    model_name="membership",
                    name="user",
                ),
                migrations.RemoveField(
                    model_name="team",
                    name="members",
                ),
                migrations.RemoveField(
                    model_name="quota",
                    name="team",
                ),
                migrations.RemoveField(
                    model_name="quota",
                    name="user",
                ),
                migrations.DeleteModel(
                    name="ApiKey",
                ),
                migrations.DeleteModel(
                    name="Invitation",
                ),
                migrations.DeleteModel(
                    name="Membership",
                ),
                migrations.DeleteModel(
                    name="Team",
                ),
                migrations.DeleteModel(
                    name="Quota",
                ),
            ],
        ),
    ]
