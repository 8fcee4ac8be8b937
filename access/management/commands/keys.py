"""`python manage.py keys create|list|revoke`: manage API keys from the shell."""

from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_datetime, parse_duration

from access.models import ApiKey
from access.services import key_create, key_revoke


class Command(BaseCommand):
    help = "Create, list and revoke API keys. A new key is printed once; only its hash is stored."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create")
        create.add_argument("--name", required=True)
        create.add_argument("--models", default="", help="comma-separated model names (default: all)")
        create.add_argument("--rpm", type=int, help="requests per minute")
        create.add_argument("--tpm", type=int, help="tokens per minute")
        create.add_argument("--expires", help="an ISO date-time, or a duration from now like '30 00:00:00'")
        create.add_argument("--staff", action="store_true", help="may read the history API and /metrics")
        sub.add_parser("list")
        revoke = sub.add_parser("revoke")
        revoke.add_argument("prefix", help="the key's visible prefix (sk-mnrv-...)")

    def handle(self, *args, action: str, **options):
        getattr(self, f"_{action}")(**options)

    def _create(self, *, name, models, rpm, tpm, expires, staff, **_):
        from django.utils import timezone

        when = None
        if expires:
            when = parse_datetime(expires)
            if when is None and (duration := parse_duration(expires)) is not None:
                when = timezone.now() + duration
            if when is None:
                raise CommandError(f"--expires: not a date-time or duration: {expires!r}")
            if timezone.is_naive(when):
                when = timezone.make_aware(when)
        names = [m.strip() for m in models.split(",") if m.strip()]
        key, raw = key_create(name=name, models=names, rpm=rpm, tpm=tpm, expires=when, staff=staff)
        self.stdout.write(raw)
        self.stderr.write(f"Created {key}. Copy the key now: it is not stored and cannot be shown again.")

    def _list(self, **_):
        for key in ApiKey.objects.all():
            state = "revoked" if key.revoked else ("active" if key.active else "expired")
            self.stdout.write(f"{key.prefix}  {key.name}  {state}  models={','.join(key.models) or '*'} "
                              f"rpm={key.rpm or '-'} tpm={key.tpm or '-'}{'  staff' if key.staff else ''}")  # fmt: skip

    def _revoke(self, *, prefix, **_):
        key = ApiKey.objects.filter(prefix=prefix[:16]).first()
        if key is None:
            raise CommandError(f"No key with prefix {prefix!r}.")
        key_revoke(key=key)
        self.stdout.write(f"Revoked {key}.")
