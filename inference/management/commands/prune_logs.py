"""`python manage.py prune_logs [--days N]`: delete request-log rows older than MINERVA_LOG_RETENTION_DAYS."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inference.services import request_logs_prune


class Command(BaseCommand):
    help = "Delete request-log rows older than --days (default MINERVA_LOG_RETENTION_DAYS)."

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, default=settings.LOG_RETENTION_DAYS)

    def handle(self, *args, days: int, **options):
        if days <= 0:
            raise CommandError("No retention set: pass --days N or set MINERVA_LOG_RETENTION_DAYS.")
        self.stdout.write(f"Deleted {request_logs_prune(days=days)} request-log rows older than {days} days.")
