"""daphne as `serve` runs it (`python -m minerva_project.daphne`, daphne's own options), with a guard where Twisted
reads a request. Twisted reads a whole body before daphne hands the request to Django, so a check in Django comes
too late: a body over the cap, or one sent to /v1 without a key while keys are required, is not read here at all.
The request goes on with an empty body and a marker header, so the view answers it (413, 401) and logs it like any
other, at once instead of after megabytes; the connection closes after that answer."""

import os
import socket

from daphne import server as daphne_server
from daphne.cli import CommandLineInterface
from daphne.http_protocol import HTTPFactory, WebRequest
from twisted.internet import reactor
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "minerva_project.settings")

BODY_REFUSED = b"x-minerva-body-refused"  # set only here (a client's own is removed): "too-large" or "no-key"
MULTIPART_SLACK = 1024 * 1024  # an upload's multipart envelope around a file of MINERVA_MAX_FILE_BYTES


def body_limit(path: bytes) -> int:
    """The largest body a path takes: uploads a file's worth, everything else MINERVA_MAX_BODY_BYTES."""
    from django.conf import settings

    return settings.MAX_FILE_BYTES + MULTIPART_SLACK if path == b"/v1/files" else settings.MAX_BODY_BYTES


def key_missing(path: bytes, authorization: bytes, x_api_key: bytes = b"") -> bool:
    """An API request (/v1, Ollama's /api) without a key (a bearer key, or Anthropic's x-api-key), while keys are
    required: the view refuses it whatever its body."""
    from access.services import auth_required

    has_key = authorization.startswith(b"Bearer ") or bool(x_api_key)
    return path.startswith((b"/v1/", b"/api/")) and not has_key and auth_required()


class GuardedRequest(WebRequest):
    refused = b""
    received = 0
    handed_over = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Twisted would also parse every form and multipart upload into `args`, reading the whole file into memory
        # on the event loop; daphne never looks at them (Django parses the body itself).
        self._parsePOSTFormSubmission = False

    def gotLength(self, length):
        self.requestHeaders.removeHeader(BODY_REFUSED)
        # Twisted keeps the request line's path on the channel until the body is in (the request gets it then).
        self.guard_path = getattr(self.channel, "_path", b"").split(b"?", 1)[0]
        authorization = (self.requestHeaders.getRawHeaders(b"Authorization") or [b""])[0]
        x_api_key = (self.requestHeaders.getRawHeaders(b"x-api-key") or [b""])[0]
        if length is not None and length > body_limit(self.guard_path):
            self._refuse(b"too-large")
        elif length != 0 and key_missing(self.guard_path, authorization, x_api_key):
            self._refuse(b"no-key")
        else:
            super().gotLength(length)

    def handleContentChunk(self, data):
        if self.refused:
            return
        self.received += len(data)
        if self.received > body_limit(self.guard_path):  # a chunked body has no Content-Length to check
            self.content.close()
            self._refuse(b"too-large")
            return
        super().handleContentChunk(data)

    def _refuse(self, reason: bytes) -> None:
        self.refused = reason
        self.requestHeaders.setRawHeaders(BODY_REFUSED, [reason])
        self.requestHeaders.removeHeader(b"Expect")  # no "100 Continue": the body is not wanted
        self.content = _Empty()
        self.channel.persistent = False  # the unread rest of the body makes the connection useless afterwards
        reactor.callLater(0, self._hand_over)  # after Twisted's header handling, which is still on the stack

    def _hand_over(self) -> None:
        # As if the body had ended: Twisted would wait for the rest; what still arrives is buffered, then dropped.
        if self.channel is not None and not self.handed_over:
            self.channel.allContentReceived()

    def requestReceived(self, command, path, version):
        self.handed_over = True
        super().requestReceived(command, path, version)


class _Empty:
    """The body of a refused request: nothing, whatever arrives."""

    closed = False

    def write(self, data):
        pass

    def read(self, size=-1):
        return b""

    def seek(self, offset, whence=0):
        return 0

    def tell(self):
        return 0

    def close(self):
        pass


class GuardedFactory(HTTPFactory):
    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = GuardedRequest
        return protocol


def server_from_string(reactor, description: str):
    """daphne's endpoints, with `--fd` (the socket `serve` listens on) in the socket's own address family: Twisted's
    fd parser would take an IPv6 socket for IPv4."""
    if description.startswith("fd:fileno="):
        fileno = int(description.removeprefix("fd:fileno="))
        sock = socket.socket(fileno=fileno)
        family = sock.family
        sock.detach()  # the descriptor stays open, for Twisted
        return AdoptedStreamServerEndpoint(reactor, fileno, family)
    return serverFromString(reactor, description)


if __name__ == "__main__":
    daphne_server.HTTPFactory = GuardedFactory  # daphne's Server builds its factory by this name in run()
    daphne_server.serverFromString = server_from_string
    CommandLineInterface.entrypoint()
