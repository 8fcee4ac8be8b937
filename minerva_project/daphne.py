"""daphne as `serve` runs it (`python -m minerva_project.daphne`, daphne's own options), with a guard where Twisted
reads a request. Twisted reads a whole body before daphne hands the request to Django, so a check in Django comes
too late: a body over the cap, or one sent to the API (/v1, /api, /tokenize, /minerva/api without a staff session's
cookie) without a key while keys are required (or, past 1 MiB, with a key that is not valid), is not read here at all.
The request goes on with an empty body and a marker header, so the view answers it (413, 401) and logs it like any
other, at once instead of after megabytes; the connection closes after that answer."""

import logging
import os
import socket
from urllib.parse import unquote_to_bytes

from daphne import server as daphne_server
from daphne.cli import CommandLineInterface
from daphne.http_protocol import HTTPFactory, WebRequest
from twisted.internet import reactor, threads
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "minerva_project.settings")

BODY_REFUSED = b"x-minerva-body-refused"  # set only here (a client's own is removed): "too-large" or "no-key"
MULTIPART_SLACK = 1024 * 1024  # an upload's multipart envelope around a file of MINERVA_MAX_FILE_BYTES
# A body larger than this (or chunked) is read only once its key is known to be good: a made-up key must not buy
# an upload's 513 MiB. Smaller ones are read as they come (the view checks the key), costing no thread hop.
KEY_CHECK_ABOVE = 1024 * 1024


def body_limit(path: bytes) -> int:
    """The largest body a path takes: uploads a file's worth, everything else MINERVA_MAX_BODY_BYTES."""
    from django.conf import settings

    return settings.MAX_FILE_BYTES + MULTIPART_SLACK if path == b"/v1/files" else settings.MAX_BODY_BYTES


def key_required(path: bytes) -> bool:
    """An API request (/v1, Ollama's /api, llama-server's /tokenize, Minerva's /minerva/api) while keys are
    required."""
    from access.services import auth_required

    api = path.startswith((b"/v1/", b"/api/", b"/minerva/api/")) or path in (b"/tokenize", b"/detokenize")
    return api and auth_required()


def key_missing(path: bytes, authorization: bytes, x_api_key: bytes = b"", cookie: bytes = b"") -> bool:
    """An API request without a key (a bearer key, or Anthropic's x-api-key), while keys are required: the view
    refuses it whatever its body. /minerva/api also takes a staff user's admin session (its cookie), which the
    view checks."""
    from django.conf import settings

    if path.startswith(b"/minerva/api/") and settings.SESSION_COOKIE_NAME.encode() + b"=" in cookie:
        return False
    return not (authorization.startswith(b"Bearer ") or x_api_key) and key_required(path)


def key_valid(authorization: bytes, x_api_key: bytes) -> bool:
    """Whether the key a request carries is one of the active keys (run in a thread: it reads the database). A
    database that cannot answer says yes: the view then answers as it does without a database."""
    from django.db import connections

    from access.services import InvalidApiKey, key_authenticate

    header = authorization.decode("latin-1") if authorization else "Bearer " + x_api_key.decode("latin-1")
    try:
        return key_authenticate(header) is not None
    except InvalidApiKey:
        return False
    except Exception:
        logging.getLogger(__name__).warning("could not check a key before its body; the view will", exc_info=True)
        return True
    finally:
        connections.close_all()  # a thread of Twisted's pool, outside any request's cleanup


class GuardedRequest(WebRequest):
    refused = b""
    received = 0
    handed_over = False
    early: list[bytes] | None = None  # the body's first chunks, while its key is checked
    ended: tuple | None = None  # requestReceived's arguments, when the body ended during that check

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Twisted would also parse every form and multipart upload into `args`, reading the whole file into memory
        # on the event loop; daphne never looks at them (Django parses the body itself).
        self._parsePOSTFormSubmission = False

    def gotLength(self, length):
        self.requestHeaders.removeHeader(BODY_REFUSED)
        # Twisted keeps the request line's path on the channel until the body is in (the request gets it then).
        # Percent-decoded, as Django will route it: /%761/files is /v1/files.
        self.guard_path = unquote_to_bytes(getattr(self.channel, "_path", b"").split(b"?", 1)[0])
        authorization = (self.requestHeaders.getRawHeaders(b"Authorization") or [b""])[0]
        x_api_key = (self.requestHeaders.getRawHeaders(b"x-api-key") or [b""])[0]
        cookie = b"; ".join(self.requestHeaders.getRawHeaders(b"Cookie") or [])
        keyed = authorization.startswith(b"Bearer ") or bool(x_api_key)
        if length is not None and length > body_limit(self.guard_path):
            self._refuse(b"too-large")
        elif length != 0 and key_missing(self.guard_path, authorization, x_api_key, cookie):
            self._refuse(b"no-key")
        elif (length is None or length > KEY_CHECK_ABOVE) and keyed and key_required(self.guard_path):
            # A made-up key would pass the check above: a large body waits, unread, until its key is known.
            expect = (self.requestHeaders.getRawHeaders(b"Expect") or [b""])[0].lower()
            self.early, self.continue_expected = [], expect == b"100-continue" and self.channel._version == b"HTTP/1.1"
            self.requestHeaders.removeHeader(b"Expect")  # "100 Continue" only once the key is good
            self.channel._networkProducer.pauseProducing()
            checked = threads.deferToThread(key_valid, authorization, x_api_key)
            checked.addCallback(self._key_checked, length)
        else:
            super().gotLength(length)

    def _key_checked(self, valid: bool, length: int | None) -> None:
        early, self.early = self.early, None
        if self.channel is None:  # the client left meanwhile
            return
        if not valid:
            self._refuse(b"no-key")
        else:
            super().gotLength(length)
            if self.continue_expected:
                self.channel._send100Continue()
            for data in early:
                self.handleContentChunk(data)
            self.channel._networkProducer.resumeProducing()
        if self.ended is not None:  # the whole body came with the head: the channel is done with it already
            self.requestReceived(*self.ended)

    def handleContentChunk(self, data):
        if self.early is not None:  # what came with the head, before the transport paused
            self.early.append(data)
            return
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
        if self.early is not None:  # a small chunked body, whole in the head's packet: its key is being checked
            self.ended = (command, path, version)
            return
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
