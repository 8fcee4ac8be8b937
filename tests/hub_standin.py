"""A local stand-in for the Hugging Face Hub: the routes huggingface_hub calls to pull a file (model info with
the files' sizes and LFS sha256, HEAD and ranged GET on resolve URLs, with the headers it reads), serving real
files from disk, and faults on demand (a connection cut mid-file, a corrupted byte). Reached via HF_ENDPOINT."""

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 20


@dataclass
class HubFile:
    path: Path  # the bytes served
    size: int
    sha256: str


@dataclass
class StandIn:
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    cut_after: dict[str, int] = field(default_factory=dict)  # file -> close the next GET's connection after N bytes
    corrupt: set[str] = field(default_factory=set)  # files served with one byte flipped (same size)
    gates: dict[str, tuple[int, threading.Event]] = field(default_factory=dict)  # file -> wait after N bytes
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: str, name: str, path: Path, *, sha256: str | None = None) -> HubFile:
        """Serve `path` as `name` in `repo` (`sha256`: what the Hub claims, else the real one)."""
        if sha256 is None:
            sha256 = _sha256(path)
        file = HubFile(path, path.stat().st_size, sha256)
        self.repos.setdefault(repo, {})[name] = file
        return file

    def canonical(self, repo: str) -> str:
        return next((r for r in self.repos if r.lower() == repo.lower()), repo)

    def ranges(self, name: str) -> list[str | None]:
        """The Range header of every GET of `name`."""
        return [r for method, path, r in self.requests if method == "GET" and path.endswith("/" + name)]


_hashes: dict[Path, str] = {}


def _sha256(path: Path) -> str:
    if path not in _hashes:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        _hashes[path] = digest.hexdigest()
    return _hashes[path]


INFO_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/?]+)(?:/revision/(?P<rev>[^/?]+))?(?:\?.*)?$")
RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)$")


def start(hub: StandIn) -> StandIn:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self._handle(body=True)

        def do_HEAD(self) -> None:
            self._handle(body=False)

        def _handle(self, *, body: bool) -> None:
            hub.requests.append((self.command, self.path.split("?")[0], self.headers.get("Range")))
            if match := INFO_RE.match(self.path):
                return self._info(match["repo"])
            if match := RESOLVE_RE.match(self.path):
                return self._file(match["repo"], match["file"], body=body)
            self._json(404, {"error": "not found"})

        def _json(self, status: int, data: dict, headers: dict | None = None) -> None:
            raw = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(raw)

        def _info(self, repo: str) -> None:
            repo = hub.canonical(repo)  # the Hub finds a repository whatever the case of its name
            if repo not in hub.repos:
                return self._json(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            siblings = [{"rfilename": name, "size": f.size, "blobId": f.sha256[:40],
                         "lfs": {"size": f.size, "sha256": f.sha256, "pointerSize": 134}}
                        for name, f in hub.repos[repo].items()]  # fmt: skip
            self._json(200, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings})

        def _file(self, repo: str, name: str, *, body: bool) -> None:
            file = hub.repos.get(hub.canonical(repo), {}).get(name)
            if file is None:
                return self._json(404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})  # fmt: skip
            start_at, status = 0, 200
            if match := re.match(r"bytes=(\d+)-$", self.headers.get("Range", "")):
                start_at, status = int(match[1]), 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(file.size - start_at))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{file.sha256}"')
            self.send_header("X-Linked-Etag", f'"{file.sha256}"')
            self.send_header("X-Linked-Size", str(file.size))
            self.send_header("X-Repo-Commit", COMMIT)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start_at}-{file.size - 1}/{file.size}")
            self.end_headers()
            if not body:
                return
            cut = hub.cut_after.pop(name, None)
            gate = hub.gates.pop(name, None)
            sent = start_at
            with file.path.open("rb") as f:
                f.seek(start_at)
                while chunk := f.read(CHUNK):
                    if name in hub.corrupt and sent <= file.size // 2 < sent + len(chunk):
                        i = file.size // 2 - sent
                        chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                    if cut is not None and sent + len(chunk) > cut:
                        self.wfile.write(chunk[: cut - sent])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)  # cut mid-file: the client sees a short body
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if gate is not None and sent >= gate[0]:
                        self.wfile.flush()
                        gate[1].wait(60)  # until the test opens it
                        gate = None

    hub.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.server.daemon_threads = True
    threading.Thread(target=hub.server.serve_forever, name="hub-standin", daemon=True).start()
    return hub
