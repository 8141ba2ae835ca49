"""Create the first operator (a Django superuser) unless one exists; `make run` calls this."""

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Unless a superuser exists, create one named HUB_OPERATOR_USERNAME (default 'admin') "
        "with HUB_OPERATOR_PASSWORD, or with a generated password printed once."
    )

    def handle(self, *args, **options):
        User = get_user_model()
        existing = User.objects.filter(is_superuser=True).order_by("pk").first()
        if existing is not None:
            self.stdout.write(f"Operator account exists: {existing.get_username()}")
            return

        username = os.environ.get("HUB_OPERATOR_USERNAME") or "admin"
        if User.objects.filter(**{User.USERNAME_FIELD: username}).exists():
            raise CommandError(
                f"user {username!r} exists but is not a superuser; promote it in the admin or "
                "set HUB_OPERATOR_USERNAME to another name"
            )
        # An empty value counts as unset: the admin login form cannot submit an empty password.
        password = os.environ.get("HUB_OPERATOR_PASSWORD") or None
        generated = password is None
        if generated:
            password = secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)

        # scripts/hub.py reads these lines; keep their "Key: value" shape.
        self.stdout.write(f"Operator account created: {username}")
        if generated:
            # Only the hash is stored, so this is the one chance to see it.
            self.stdout.write(f"Operator password: {password}")
