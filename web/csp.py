"""Content-Security-Policy for the pages: nothing but this server's own files may load or run, so neither model
output that slipped past the sanitizer nor a vendored library can fetch from elsewhere (ReDoc's footer wants a logo
from its CDN: refused)."""

import functools

PAGES = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
         "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")  # fmt: skip
# ReDoc styles itself with inline <style> (styled-components) and searches in a blob: worker.
DOCS = PAGES.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'") + "; worker-src 'self' blob:"


def csp(policy: str = PAGES):
    """Send `policy` with the view's response."""

    def decorate(view):
        @functools.wraps(view)
        def wrapper(request, *args, **kwargs):
            response = view(request, *args, **kwargs)
            response.setdefault("Content-Security-Policy", policy)
            return response

        return wrapper

    return decorate
