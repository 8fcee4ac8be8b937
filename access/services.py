"""API keys: create, revoke, authenticate a request; per-key rate limits kept in Redis (shared by every process)."""

import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.utils import timezone

from core.errors import MinervaError
from core.redis import get_redis

from .models import ApiKey

logger = logging.getLogger(__name__)

KEY_PREFIX = "sk-mnrv-"
VISIBLE = len(KEY_PREFIX) + 8  # what is stored and shown: sk-mnrv-abcd1234
WINDOW_SECONDS = 60


class InvalidApiKey(MinervaError):
    status, code = 401, "invalid_api_key"


class RateLimited(MinervaError):
    status, type, code = 429, "requests", "rate_limit_exceeded"


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def key_create(*, name: str, models: list[str] | None = None, rpm: int | None = None, tpm: int | None = None,
               expires: datetime | None = None, staff: bool = False) -> tuple[ApiKey, str]:  # fmt: skip
    """Create a key; return the row and the full key, which is not stored and cannot be shown again."""
    while True:
        raw = KEY_PREFIX + secrets.token_urlsafe(32).replace("-", "x").replace("_", "y")
        if not ApiKey.objects.filter(prefix=raw[:VISIBLE]).exists():
            break
    key = ApiKey.objects.create(name=name, prefix=raw[:VISIBLE], hashed=_hash(raw), models=models or [], rpm=rpm,
                                tpm=tpm, expires=expires, staff=staff)  # fmt: skip
    return key, raw


def key_revoke(*, key: ApiKey) -> None:
    """Revoke a key from now on."""
    key.revoked = timezone.now()
    key.save(update_fields=["revoked"])


def auth_required(host: str | None = None) -> bool:
    """Whether requests need a key: MINERVA_AUTH on/off, else only when listening beyond loopback (MINERVA_HOST,
    which `serve` sets to the address it binds, for every process it starts)."""
    if settings.AUTH in ("on", "off"):
        return settings.AUTH == "on"
    return auth_required_without_override(host or settings.HOST)


def auth_required_without_override(host: str) -> bool:
    """Whether listening on `host` reaches beyond this machine (so keys are required by default)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return True


FORWARDED_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")
_proxy_warned = False


def auth_proxy_warn(meta: dict) -> None:
    """Say once per process that keys are optional while a reverse proxy forwards requests: a proxy on this
    machine reaches daphne on loopback, so keys stay optional unless MINERVA_AUTH=on."""
    global _proxy_warned
    if not _proxy_warned and any(h in meta for h in FORWARDED_HEADERS) and not auth_required():
        _proxy_warned = True
        logger.warning(
            "A request came through a proxy (it carries X-Forwarded-For, Forwarded or X-Real-IP) while API keys are "
            "optional: anyone who can reach the proxy can use every model. Set MINERVA_AUTH=on behind a proxy."
        )


def key_authenticate(header: str) -> ApiKey | None:
    """The active key an Authorization header carries; None when there is none and keys are optional."""
    raw = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    if not raw:
        if auth_required():
            raise InvalidApiKey("You didn't provide an API key. Send it as 'Authorization: Bearer sk-mnrv-...'.")
        return None
    key = ApiKey.objects.filter(prefix=raw[:VISIBLE]).first()
    if key is None and not auth_required():  # SDKs insist on sending some key; with keys optional, ignore it
        return None
    # The lookup is by the public prefix; the secret part is checked in constant time.
    if key is None or not hmac.compare_digest(key.hashed, _hash(raw)) or not key.active:
        raise InvalidApiKey("Incorrect API key provided, or the key was revoked or has expired.")
    return key


@dataclass
class Limits:
    """What a key has left in this minute, sent back as x-ratelimit-* headers."""

    rpm: int | None
    tpm: int | None
    requests: int
    tokens: int
    reset: int  # seconds until the window ends

    def headers(self) -> dict[str, str]:
        headers = {}
        for kind, limit, used in (("requests", self.rpm, self.requests), ("tokens", self.tpm, self.tokens)):
            if limit is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
                headers[f"x-ratelimit-reset-{kind}"] = f"{self.reset}s"
        return headers


def _window_keys(prefix: str) -> tuple[str, str, int]:
    window = int(time.time()) // WINDOW_SECONDS
    reset = WINDOW_SECONDS - int(time.time()) % WINDOW_SECONDS
    return f"minerva:rl:{prefix}:req:{window}", f"minerva:rl:{prefix}:tok:{window}", reset


def rate_limit_check(*, key: ApiKey) -> Limits:
    """Count one request against the key's minute; raise RateLimited (with headers) past rpm or tpm."""
    requests_key, tokens_key, reset = _window_keys(key.prefix)
    pipe = get_redis().pipeline()
    pipe.incr(requests_key).expire(requests_key, WINDOW_SECONDS * 2).get(tokens_key)
    requests, _, tokens = pipe.execute()
    limits = Limits(rpm=key.rpm, tpm=key.tpm, requests=requests, tokens=int(tokens or 0), reset=reset)
    if key.rpm is not None and requests > key.rpm:
        raise _limited(f"Rate limit reached: {key.rpm} requests per minute.", limits)
    if key.tpm is not None and limits.tokens >= key.tpm:
        raise _limited(f"Rate limit reached: {key.tpm} tokens per minute.", limits)
    return limits


def _limited(message: str, limits: Limits) -> RateLimited:
    exc = RateLimited(message)
    exc.headers = limits.headers() | {"Retry-After": str(limits.reset)}
    return exc


# Admit a reservation only if it fits the key's minute (or the minute is empty: a request larger than the whole
# limit still runs, alone); atomic, so concurrent admissions cannot all pass. -> {admitted, tokens in the window}
_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local tokens, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if used > 0 and used + tokens > limit then return {0, used} end
used = redis.call('INCRBY', KEYS[1], tokens)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, used}
"""


def tokens_reserve(*, key: ApiKey, tokens: int) -> dict:
    """Reserve a request's most possible tokens in its key's minute before it is queued; raise RateLimited
    (with headers) if they do not fit the key's tpm. Return the reservation for tokens_settle."""
    requests_key, tokens_key, reset = _window_keys(key.prefix)
    redis = get_redis()
    admitted, used = redis.eval(_RESERVE, 1, tokens_key, tokens, key.tpm, WINDOW_SECONDS * 2)
    if not admitted:
        limits = Limits(rpm=key.rpm, tpm=key.tpm, requests=int(redis.get(requests_key) or 0), tokens=used,
                        reset=reset)  # fmt: skip
        raise _limited(f"Rate limit reached: {key.tpm} tokens per minute (this request may use up to {tokens}; "
                       f"{max(0, key.tpm - used)} are left in this minute).", limits)  # fmt: skip
    return {"key": tokens_key, "tokens": tokens}


def tokens_used(*, key: ApiKey) -> int:
    """The tokens counted against the key in this minute (reservations included)."""
    _, tokens_key, _ = _window_keys(key.prefix)
    return int(get_redis().get(tokens_key) or 0)


def tokens_settle(*, reservation: dict, tokens: int) -> None:
    """Replace a reservation by the tokens its request really used, in the minute it was admitted in."""
    delta = tokens - reservation["tokens"]
    if delta:
        get_redis().pipeline().incrby(reservation["key"], delta).expire(
            reservation["key"], WINDOW_SECONDS * 2
        ).execute()


def tokens_record(*, prefix: str, tokens: int) -> None:
    """Count a finished request's tokens against its key's minute (its tokens-per-minute limit)."""
    if prefix and tokens:
        _, tokens_key, _ = _window_keys(prefix)
        get_redis().pipeline().incrby(tokens_key, tokens).expire(tokens_key, WINDOW_SECONDS * 2).execute()


def client_address(meta: dict) -> str:
    """The client's address: X-Forwarded-For is believed only for MINERVA_TRUSTED_PROXIES hops."""
    remote = meta.get("REMOTE_ADDR", "")
    hops = settings.TRUSTED_PROXIES
    forwarded = [a.strip() for a in meta.get("HTTP_X_FORWARDED_FOR", "").split(",") if a.strip()]
    if hops and forwarded:
        return forwarded[-min(hops, len(forwarded))]
    return remote


def staff_key_check(header: str) -> None:
    """Gate for operator endpoints (/metrics): a staff key, unless keys are optional and none is sent."""
    key = key_authenticate(header)
    if key is not None and not key.staff:
        raise InvalidApiKey("This endpoint needs a staff key.")
    if key is None and auth_required():
        raise InvalidApiKey("This endpoint needs a staff key.")
