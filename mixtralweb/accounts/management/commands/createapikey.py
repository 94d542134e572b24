"""`manage.py createapikey USERNAME --name NAME`: a new API key, printed once."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from mixtralweb.accounts.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key for a user and print it (it cannot be shown again)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", required=True, help="Recorded with each request.")

    def handle(self, *args, username, name, **options):
        User = get_user_model()
        user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
        if user is None:
            raise CommandError(f"There is no user {username!r}.")
        name = name.strip()
        if not name or len(name) > 100:
            raise CommandError("--name must be 1 to 100 characters.")
        if ApiKey.objects.active().filter(user=user, name=name).exists():
            raise CommandError(f"{username} already has an active key named {name!r}.")
        _, secret = ApiKey.issue(user=user, name=name)
        self.stdout.write(secret)
