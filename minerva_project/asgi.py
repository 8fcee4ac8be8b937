import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "minerva_project.settings")

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

# daphne serves the admin's CSS and JS itself: one process, nothing else to run on one machine.
application = ASGIStaticFilesHandler(get_asgi_application())
