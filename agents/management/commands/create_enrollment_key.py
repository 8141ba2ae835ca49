from django.core.management.base import BaseCommand, CommandError

from agents import services


class Command(BaseCommand):
    help = "Create an enrollment key for agent registration; the raw key is the last line printed."

    def add_arguments(self, parser):
        parser.add_argument("--uses", type=int, default=None, help="Registrations it admits.")
        parser.add_argument("--expires-in", type=int, default=None, help="Seconds it stays valid.")
        parser.add_argument("--label", default="", help="A note for operators.")

    def handle(self, *args, uses, expires_in, label, **options):
        if uses is not None and uses < 1:
            raise CommandError("--uses must be at least 1")
        if expires_in is not None and expires_in < 1:
            raise CommandError("--expires-in must be at least 1 second")
        key, raw = services.enrollment_key_create(label=label, max_uses=uses, expires_in=expires_in)
        uses_text = "unlimited uses" if uses is None else f"{uses} use(s)"
        expiry = (
            f"expires {key.expires_at:%Y-%m-%d %H:%M:%S} UTC" if key.expires_at else "no expiry"
        )
        self.stdout.write(f"Enrollment key {key.prefix}… created: {uses_text}, {expiry}.")
        self.stdout.write(raw)
