"""One file from a URL or a Hugging Face hub repo into a local cache: verified, renamed into place only when whole."""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from utils.errors import UserError
from utils.files import WriteError, atomic_write_bytes, temporary_beside

CACHE_ENV = "CLIP_CACHE"  # where URL downloads are kept; hub files stay in huggingface_hub's own cache
BASE_ENV = "CLIP_DOWNLOAD_BASE"  # a mirror that serves the table's files under their own names
# Seconds to connect and between two reads. Without a network the first attempt fails at once (DNS or a refused
# connection); a silently dropped route costs this long, once: there is no retry loop.
TIMEOUT_S = 10
_CHUNK = 1 << 20


class DownloadError(UserError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clip-pytorch").expanduser()


def offline() -> bool:
    """huggingface_hub's switch, honoured by URL downloads as well, read at call time (not at import)."""
    return any(os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_path(url: str) -> Path:
    """CLIP_CACHE/<host>/<path>: one place per URL (the query is dropped: signed URLs change it per request)."""
    parts = urllib.parse.urlsplit(url)
    segments = [s for s in urllib.parse.unquote(parts.path).split("/") if s not in ("", ".", "..")]
    if not segments:
        raise DownloadError(f"{url} names no file; give the URL of the weight file itself")
    return cache_dir().joinpath(parts.netloc.replace(":", "_") or "local", *segments)


def mirrored(url: str) -> str:
    """`url` fetched from CLIP_DOWNLOAD_BASE when that is set: the base plus the file's own name."""
    base = os.environ.get(BASE_ENV, "").strip()
    if not base:
        return url
    return base.rstrip("/") + "/" + urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]


def split_checksum(url: str) -> tuple[str, str]:
    """`URL#sha256=HEX` (pip's way of pinning a file) -> (URL, HEX); any other URL -> (URL, '')."""
    url, _, fragment = url.partition("#")
    key, _, value = fragment.partition("=")
    return url, value.lower() if key == "sha256" else ""


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp(target: Path) -> Path:
    return target.with_name(f".{target.name}.sha256")


def _stamp_of(target: Path, sha256: str) -> str:
    stat = target.stat()
    return json.dumps({"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})


def _verified(target: Path, sha256: str) -> bool:
    """Whether `target` matches `sha256`. Hashing a GB takes seconds, so a match is stamped beside the file with
    its size and mtime, and a file that neither changed since nor lost its stamp is not hashed again."""
    try:
        if _stamp(target).read_text() == _stamp_of(target, sha256):
            return True
    except OSError:
        pass
    if not _sha256_of(target).startswith(sha256):
        return False
    with contextlib.suppress(WriteError):  # a read-only cache still works, hashing each time
        atomic_write_bytes(_stamp_of(target, sha256).encode(), _stamp(target))
    return True


def fetch_url(url: str, sha256: str = "", *, use_mirror: bool = False) -> Path:
    """The local copy of `url`, downloaded into the cache when it is not there yet.

    `sha256` (all of it or a published prefix) is checked on the download and on every later use, so a cached file
    that does not match is refused rather than loaded. `use_mirror`: fetch through CLIP_DOWNLOAD_BASE when set (the
    cache place stays that of `url`, so a file is found again whichever way it came).
    """
    url, pinned = split_checksum(url)
    sha256 = (sha256 or pinned).lower()
    target = cache_path(url)
    if target.is_file():
        if sha256 and not _verified(target, sha256):
            raise DownloadError(f"{target} does not match the sha256 {sha256} published for {url}; it was not "
                                "downloaded by this project. Delete it to download the file again.")
        return target
    source = mirrored(url) if use_mirror else url
    hint = f"put the file at {target} by hand" + (f", or set {BASE_ENV} to a mirror that holds "
                                                   f"{target.name}" if use_mirror else "")
    if offline():
        raise DownloadError(f"HF_HUB_OFFLINE is set, so {source} was not downloaded; {hint}")
    _download(source, target, sha256, hint)
    return target


def _download(source: str, target: Path, sha256: str, hint: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target, so the final rename is atomic; the leading dot keeps it out of listings.
    fd, part = temporary_beside(target, ".part")  # the mode a new file gets, not mkstemp's 0600
    try:
        h = hashlib.sha256()
        done = 0
        request = urllib.request.Request(source, headers={"User-Agent": "clip-pytorch"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            print(f"downloading {source} -> {target}", file=sys.stderr)
            from tqdm import tqdm

            # disable=None: a bar on a terminal only, so logs and tests are not filled with carriage returns
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                      disable=None) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        # http.client returns b"" when a server closes early instead of raising, so the length is checked here.
        if total is not None and done != total:
            raise DownloadError(f"the connection to {source} closed after {done} of {total} bytes; nothing was "
                                f"kept. Run again, or {hint}")
        if sha256 and not h.hexdigest().startswith(sha256):
            raise DownloadError(f"{source} gave a file whose sha256 is {h.hexdigest()}, not the published "
                                f"{sha256}; nothing was kept. Run again, or {hint}")
        os.replace(part, target)
        if sha256:
            with contextlib.suppress(WriteError):
                atomic_write_bytes(_stamp_of(target, sha256).encode(), _stamp(target))
    except urllib.error.URLError as e:
        reason = e.reason if not isinstance(e, urllib.error.HTTPError) else f"HTTP {e.code} {e.reason}"
        raise DownloadError(f"could not download {source} ({reason}); {hint}") from e
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, a full disk
        raise DownloadError(f"could not download {source} ({type(e).__name__}: {e}); {hint}") from e
    finally:
        if os.path.exists(part):
            os.unlink(part)


def fetch_hub(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """The local copy of `filename` in hub repo `repo_id` (huggingface_hub's cache), or None when the repo has no
    such file. HF_ENDPOINT and HF_HUB_OFFLINE are read now, so a change after import counts."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    where = f"{repo_id}/{filename}" + (f" at revision {revision}" if revision else "")
    unreachable = (f"could not fetch {where} (no answer from {endpoint}) and it is not in huggingface_hub's cache; "
                   "run again with a network, set HF_ENDPOINT to a mirror, or download the repo's files into a "
                   "folder and set model_path to that folder")
    cached = try_to_load_from_cache(repo_id, filename, revision=revision)  # a path, None, or "known missing"
    if not offline() and not isinstance(cached, str):
        # With no copy cached, hf_hub_download retries an unreachable hub with backoff for half a minute or
        # more; one plain request first turns "no network" into an answer within seconds.
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint),
                                 timeout=TIMEOUT_S)
        except Exception as e:  # connection refused, DNS, timeouts, proxies, a hub that is down
            status = getattr(getattr(e, "response", None), "status_code", None)
            if isinstance(e, HfHubHTTPError) and status is not None and status < 500 and status != 429:
                pass  # the hub answered; hf_hub_download says what it meant (and caches a missing file as missing)
            elif cached is not None:
                return None  # the cache remembers that the repo lacks this file
            else:
                raise DownloadError(unreachable if status is None else
                                    unreachable.replace("no answer", f"HTTP {status}")) from e
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=endpoint,
                                    local_files_only=offline(), etag_timeout=TIMEOUT_S))
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError as e:
        if cached is not None:
            return None  # offline, and the cache remembers that the repo lacks this file
        if offline():
            raise DownloadError(unreachable.replace(f"no answer from {endpoint}", "HF_HUB_OFFLINE is set")) from e
        raise DownloadError(unreachable) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise DownloadError(f"{endpoint} has no repo {repo_id}" + (f" at revision {revision}" if revision else "")
                            + " (or it is private or gated: log in with `hf auth login`)") from e
    except OSError as e:  # an HTTP error of the hub, a full disk
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DownloadError(f"could not fetch {where} from {endpoint} ({first})") from e
