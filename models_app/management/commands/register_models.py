from django.core.management.base import BaseCommand

from models_app.services import models_sync


class Command(BaseCommand):
    help = "Register the default model and every *.gguf under MINERVA_MODELS_DIR."

    def handle(self, *args, **options):
        for model in models_sync():
            self.stdout.write(f"{model.name}\t{model.context_length or '?'}\t{model.path}")
