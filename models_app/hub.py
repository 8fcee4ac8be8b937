"""GGUF files from the Hugging Face Hub (or a mirror at HF_ENDPOINT): which files `repo[:quant or file]` names, and
a resumable, sha256-verified download of each, with progress. No Django: `pulls.py` drives it."""

import errno
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers

from .metadata import SPLIT_RE

logger = logging.getLogger(__name__)

DEFAULT_QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0")  # what a bare repo pulls, first found (as llama.cpp's -hf)
REF_RE = re.compile(r"^(?:(?:https?://)?(?:hf\.co|huggingface\.co)/)?(?P<repo>[\w.-]{1,96}/[\w.-]{1,96})"
                    r"(?::(?P<selector>[^\s:@]{1,255}))?(?:@(?P<revision>[\w./-]{1,255}))?$")  # fmt: skip
# A quant label in a file name: Q4_K_M, IQ2_XXS, Q8_0, TQ1_0, UD-Q4_K_XL, F16, BF16, MXFP4 ...
QUANT_RE = re.compile(
    r"(?:^|[-_.])((?:UD-)?(?:I?Q\d(?:_[A-Z0-9]{1,4}){0,3}|TQ\d_\d|BF16|F16|F32|FP16|FP32|MXFP4(?:_MOE)?))(?=[-_.]|$)",
    re.IGNORECASE,
)
HASH_CHUNK = 8 << 20


class HubError(Exception):
    """A pull that cannot go on; `status` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class NotOnHub(HubError):
    status = 404


class DigestMismatch(HubError):
    status = 502


class NoDiskSpace(HubError):
    status = 507


class HubUnreachable(HubError):
    status = 502


@dataclass(frozen=True)
class Ref:
    """What `models pull` was given: a repository, and optionally a quant or file and a revision."""

    repo: str
    selector: str = ""
    revision: str = "main"

    @classmethod
    def parse(cls, text: str) -> "Ref":
        match = REF_RE.match(text.strip())
        if match is None or not repo_name_ok(match["repo"]):
            raise HubError(f"{text!r} is not a Hugging Face model: expected owner/repo[:QUANT or file.gguf][@revision]")
        return cls(match["repo"], match["selector"] or "", match["revision"] or "main")

    def __str__(self) -> str:
        return self.repo + (f":{self.selector}" if self.selector else "") + (
            f"@{self.revision}" if self.revision != "main" else "")  # fmt: skip


@dataclass(frozen=True)
class HubFile:
    name: str  # the path in the repository
    size: int
    sha256: str  # of the file's content (LFS)

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"


@dataclass(frozen=True)
class Resolved:
    """The files a ref names at one commit: one GGUF, or every part of a split one."""

    ref: Ref
    repo: str  # as the Hub spells it (`ref.repo` may differ in case)
    commit: str
    files: list[HubFile]
    quant: str

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def repo_name_ok(repo: str) -> bool:
    """`owner/name` of letters, digits, `_.-`, neither part `.` or `..`: it becomes two folders on disk."""
    parts = repo.split("/")
    return bool(re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", repo, re.ASCII)) and not {".", ".."} & set(parts)


def endpoint() -> str:
    """HF_ENDPOINT (a mirror), read on each call so that it needs no restart."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def token() -> str | None:
    """HF_TOKEN for gated and private repositories (else huggingface_hub's stored login)."""
    return os.environ.get("HF_TOKEN") or None


def quant_of(filename: str) -> str | None:
    """The quant label a GGUF file's name carries, upper-cased (`Q4_K_M`), or None."""
    name = Path(filename).name
    split = SPLIT_RE.match(name)
    stem = split["stem"] if split else name.removesuffix(".gguf")
    found = QUANT_RE.findall(stem) or QUANT_RE.findall(str(Path(filename).parent))
    return found[-1].upper() if found else None


def resolve(ref: Ref) -> Resolved:
    """Ask the Hub which files `ref` names, with their sizes and sha256; NotOnHub lists what exists instead."""
    try:
        info = HfApi(endpoint=endpoint(), token=token()).model_info(ref.repo, revision=ref.revision,
                                                                    files_metadata=True)  # fmt: skip
    except GatedRepoError:
        raise HubError(f"{ref.repo} is gated: accept its terms on the Hub and set HF_TOKEN", status=403) from None
    except RepositoryNotFoundError:
        raise NotOnHub(f"no model {ref.repo} on {endpoint()} (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise NotOnHub(f"{ref.repo} has no revision {ref.revision!r}") from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
        raise HubUnreachable(f"cannot reach {endpoint()}: {exc}") from None
    ggufs = {s.rfilename: s for s in info.siblings or [] if s.rfilename.lower().endswith(".gguf")}
    models = {n: s for n, s in ggufs.items() if "mmproj" not in Path(n).name.lower()}  # vision projectors apart
    if not models:
        raise NotOnHub(f"{ref.repo} has no GGUF file; Minerva pulls GGUF models (look for a repository named *-GGUF)")
    chosen = _choose(ref, models)
    files = [n for n in models if _same_model(n, chosen)] if SPLIT_RE.match(Path(chosen).name) else [chosen]
    hub_files = []
    for name in sorted(files):
        sibling = models[name]
        if sibling.lfs is None or not sibling.size:
            raise HubError(f"{name} in {ref.repo} has no LFS sha256 on the Hub, so it cannot be verified", status=502)
        hub_files.append(HubFile(name, sibling.lfs.size or sibling.size, sibling.lfs.sha256))
    if SPLIT_RE.match(Path(chosen).name) and len(files) != int(SPLIT_RE.match(Path(chosen).name)["count"]):
        raise NotOnHub(f"{ref.repo} lacks parts of the split model {chosen}: found {len(files)}")
    repo = info.id if info.id and info.id.lower() == ref.repo.lower() and repo_name_ok(info.id) else ref.repo
    return Resolved(ref, repo, info.sha or ref.revision, hub_files, quant_of(chosen) or "")


def _choose(ref: Ref, models: dict) -> str:
    """The file (a split model's first part) that the selector names."""
    wanted = ref.selector.lower()
    firsts = [n for n in sorted(models) if not (s := SPLIT_RE.match(Path(n).name)) or s["no"] == "00001"]
    if wanted.endswith(".gguf"):
        for name in firsts + sorted(models):
            if name.lower() == wanted or Path(name).name.lower() == wanted:
                return _first_part(name, models)
        raise NotOnHub(f"{ref.repo} has no file {ref.selector}; its GGUF files: {', '.join(firsts)}")
    by_quant: dict[str, str] = {}
    for name in firsts:
        by_quant.setdefault((quant_of(name) or Path(name).stem).upper(), name)
    if wanted:
        if wanted.upper() in by_quant:
            return by_quant[wanted.upper()]
        raise NotOnHub(f"{ref.repo} has no quant {ref.selector}; it has: {', '.join(by_quant)}")
    for quant in DEFAULT_QUANTS:
        if quant in by_quant:
            return by_quant[quant]
    if len(by_quant) == 1:
        return next(iter(by_quant.values()))
    raise NotOnHub(f"{ref.repo} has several quants; pick one with {ref.repo}:QUANT, one of: {', '.join(by_quant)}")


def _first_part(name: str, models: dict) -> str:
    split = SPLIT_RE.match(Path(name).name)
    if not split or split["no"] == "00001":
        return name
    return next(n for n in models if _same_model(n, name) and SPLIT_RE.match(Path(n).name)["no"] == "00001")


def _same_model(a: str, b: str) -> bool:
    """Whether two files are parts of one split GGUF."""
    sa, sb = SPLIT_RE.match(Path(a).name), SPLIT_RE.match(Path(b).name)
    return bool(sa and sb) and Path(a).parent == Path(b).parent and (sa["stem"], sa["count"]) == (
        sb["stem"], sb["count"])  # fmt: skip


# ------------------------------------------------------------------------------------------- download


def free_bytes(folder: Path) -> int:
    """Free space where the files go (a function of its own so the tests can make a disk full)."""
    return shutil.disk_usage(folder).free


def partial_path(dest: Path) -> Path:
    """Where a file's bytes gather until they are verified (not `.gguf`, so a scan never registers it)."""
    return dest.with_name(dest.name + ".partial")


def space_check(resolved: Resolved, folder: Path) -> None:
    """NoDiskSpace, with the partial files removed, unless what is left to download fits in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    have = 0
    for file in resolved.files:
        dest = folder / Path(file.name).name
        if dest.exists() and dest.stat().st_size == file.size:
            have += file.size
        elif partial_path(dest).exists():
            have += min(partial_path(dest).stat().st_size, file.size)
    need, free = resolved.size - have, free_bytes(folder)
    if need > free:
        for file in resolved.files:
            partial_path(folder / Path(file.name).name).unlink(missing_ok=True)
        raise NoDiskSpace(
            f"not enough disk space for {resolved.ref}: {_gib(need)} to download, {_gib(free)} free in {folder}"
        )


Progress = Callable[[HubFile, int], None]  # (file, bytes completed so far)


def fetch(resolved: Resolved, file: HubFile, dest: Path, *, progress: Progress) -> None:
    """Download one file to its partial file (`dest` + `.partial`), resuming what an earlier try left there; a
    file already complete at `dest` is left alone (`verify` checks it all the same)."""
    if dest.exists() and dest.stat().st_size == file.size:
        progress(file, file.size)
        return
    _fetch(resolved, file, partial_path(dest), progress)


def verify(file: HubFile, dest: Path) -> None:
    """Check the downloaded bytes against the Hub's sha256, then give them their name; DigestMismatch (and the
    bytes removed: resuming them would keep the wrong byte) if they differ."""
    source = dest if dest.exists() and dest.stat().st_size == file.size else partial_path(dest)
    digest = sha256_of(source)
    if digest != file.sha256:
        source.unlink(missing_ok=True)
        raise DigestMismatch(
            f"{file.name}: its sha256 is {digest}, the Hub says {file.sha256}; the download was removed, pull again"
        )
    if source != dest:
        os.replace(source, dest)


def _fetch(resolved: Resolved, file: HubFile, partial: Path, progress: Progress) -> None:
    url = hf_hub_url(resolved.repo, file.name, revision=resolved.commit, endpoint=endpoint())
    headers = build_hf_headers(token=token(), library_name="minerva")
    try:
        location = get_hf_file_metadata(url, token=token(), endpoint=endpoint()).location
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
        raise HubUnreachable(f"cannot reach {url}: {exc}") from None
    if urlparse(location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # a CDN's signed URL: the token is not for it
    have = partial.stat().st_size if partial.exists() else 0
    if have > file.size:
        have = 0
    with partial.open("r+b" if partial.exists() else "wb") as out:
        out.truncate(have)
        out.seek(have)
        if have:
            logger.info("resuming %s at %d of %d bytes", file.name, have, file.size)
        try:
            # huggingface_hub's http_get retries a cut connection itself, asking for the rest with a Range header.
            http_get(location, out, resume_size=have, headers=headers, expected_size=file.size,
                     tqdm_class=_bar(file, progress), displayed_filename=file.name)  # fmt: skip
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                out.close()
                partial.unlink(missing_ok=True)
                raise NoDiskSpace(
                    f"the disk filled up while downloading {file.name}; the partial file was removed"
                ) from None
            if isinstance(exc, HfHubHTTPError | httpx2.HTTPError):
                raise HubUnreachable(f"downloading {file.name} failed: {exc}; pull again to resume") from None
            raise HubError(f"downloading {file.name} failed: {exc}; pull again to resume", status=502) from None
        except (HfHubHTTPError, httpx2.HTTPError) as exc:
            raise HubUnreachable(f"downloading {file.name} failed: {exc}; pull again to resume") from None


def _bar(file: HubFile, progress: Progress) -> type:
    """A tqdm stand-in for http_get that hands its count to `progress`."""

    class Bar:
        def __init__(self, *, initial: int = 0, **kwargs):
            self.n = initial
            progress(file, self.n)

        def update(self, n: int) -> None:
            self.n += n
            progress(file, self.n)

        def close(self) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

    return Bar


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"
