"""helpers.download against loopback HTTP servers: mirror order, speed guard, timeout, md5, cache, extraction.

Offline: every URL points at 127.0.0.1 (a ThreadingHTTPServer started per test) or at a local file, and
a tiny archive in torchvision's CIFAR-10 layout stands in for the 170 MB one. Thresholds (timeout,
min_speed, speed_window) are passed small as arguments; nothing inside the module is patched.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from helpers.download import (
    CACHE_ENV,
    CIFAR10_FILENAME,
    CIFAR10_FOLDER,
    URLS_ENV,
    DownloadError,
    download_cifar10,
    extract_local_archive,
)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
PER_BATCH = 2
QUICK = {"timeout": 2.0, "progress": False}  # default speed guard: 1 MB/s over 15 s, never reached here


@dataclass
class FakeArchive:
    """A small cifar-10-python.tar.gz: its files, bytes and md5, and the training labels inside."""

    files: dict[str, bytes]
    data: bytes
    md5: str
    train_labels: list[int]


@dataclass
class Mirror:
    """The loopback server's base URL, the paths asked for, and the /hook route's callback."""

    base: str
    requests: list[str] = field(default_factory=list)
    hook: Callable[[], None] = lambda: None

    def url(self, path: str) -> str:
        return self.base + path


def tar_gz(files: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = ()) -> bytes:
    """A gzipped tar holding files under cifar-10-batches-py/, then the extra (empty) members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"{CIFAR10_FOLDER}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for info in extra:
            tar.addfile(info, io.BytesIO())
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def fake() -> FakeArchive:
    """Pickled dicts like the real batches (keys 'data' uint8 [n, 3072] and 'labels'; meta 'label_names')."""
    rng = np.random.default_rng(0)
    files, train_labels = {}, []
    for index, name in enumerate([*TRAIN_BATCHES, "test_batch"]):
        labels = [(2 * index + k) % 10 for k in range(PER_BATCH)]
        train_labels += labels if name != "test_batch" else []
        pixels = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        files[name] = pickle.dumps({"batch_label": name, "labels": labels, "data": pixels}, protocol=2)
    files["batches.meta"] = pickle.dumps({"label_names": CLASSES, "num_cases_per_batch": PER_BATCH})
    data = tar_gz(files)
    return FakeArchive(files, data, md5(data), train_labels)


@pytest.fixture
def mirror(fake, monkeypatch):
    """A loopback server; its routes, by path prefix:

    /good the archive; /wrong as many zero bytes; /404; /throttled the archive in 4 kB pieces 10 ms
    apart (~400 kB/s); /stall 16 bytes, then silence until the test ends (at most 5 s), then the rest
    of the good archive, so a client without a timeout gets a good copy there; /hook half the archive,
    then mirror.hook() is called, then silence.
    """
    monkeypatch.setenv("no_proxy", "*")  # loopback only, never through a proxy from the environment
    monkeypatch.delenv(URLS_ENV, raising=False)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    release = threading.Event()
    mirror = Mirror("")
    data = fake.data

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            mirror.requests.append(self.path)
            try:
                self.serve(self.path.split("?")[0])
            except OSError:  # the client hung up: abandoned, timed out or interrupted
                pass

        def serve(self, path: str) -> None:
            if path not in ("/good", "/wrong", "/throttled", "/stall", "/hook"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if path == "/good":
                self.wfile.write(data)
            elif path == "/wrong":
                self.wfile.write(bytes(len(data)))
            elif path == "/throttled":
                for start in range(0, len(data), 4096):
                    self.wfile.write(data[start:start + 4096])
                    release.wait(0.01)
            elif path == "/stall":
                self.wfile.write(data[:16])
                release.wait(5)
                self.wfile.write(data[16:])
            else:
                self.wfile.write(data[:len(data) // 2])
                release.wait(0.2)  # the client has written it to its temporary file
                mirror.hook()
                release.wait(5)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    mirror.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield mirror
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def cifar10(fake, monkeypatch):
    """torchvision's CIFAR10, told the md5s of the fake files.

    CIFAR10 checks every batch against the md5s of the real dataset. Swapping those lists for the fake
    files' md5s, rather than stubbing the check, keeps torchvision's own checks and reading code.
    """
    from torchvision.datasets import CIFAR10  # deferred: slow to import

    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(fake.files[n])] for n in TRAIN_BATCHES])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(fake.files["test_batch"])]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(fake.files["batches.meta"])})
    return CIFAR10


@pytest.fixture
def logs(caplog):
    """The levels of the records helpers.download logs at WARNING or above."""
    caplog.set_level(logging.INFO, logger="helpers.download")
    return lambda: [r.levelname for r in caplog.records
                    if r.name == "helpers.download" and r.levelno >= logging.WARNING]


def refused_url() -> str:
    """A loopback URL nothing listens on (a port just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar"


def archive_md5(root: Path) -> str:
    return md5((root / CIFAR10_FILENAME).read_bytes())


# ----------------------------------------------------------------------------- mirrors


def test_mirrors_are_tried_in_order_and_the_result_loads(tmp_path, fake, mirror, cifar10, logs):
    root = download_cifar10(tmp_path / "data", [mirror.url("/404"), mirror.url("/good")], fake.md5, **QUICK)
    assert root == tmp_path / "data"
    assert mirror.requests == ["/404", "/good"]
    assert logs() == ["WARNING"]  # one line for the skipped mirror
    assert sorted(os.listdir(root)) == sorted([CIFAR10_FILENAME, CIFAR10_FOLDER])  # nothing temporary left
    train, test = cifar10(str(root), train=True), cifar10(str(root), train=False)
    assert (len(train), len(test)) == (5 * PER_BATCH, PER_BATCH)
    assert train.data.shape == (5 * PER_BATCH, 32, 32, 3)
    assert train.targets == fake.train_labels
    assert train.classes == CLASSES


def test_a_copy_with_the_wrong_md5_is_skipped(tmp_path, fake, mirror):
    download_cifar10(tmp_path, [mirror.url("/wrong"), mirror.url("/good")], fake.md5, **QUICK)
    assert mirror.requests == ["/wrong", "/good"]
    assert archive_md5(tmp_path) == fake.md5


def test_a_slow_mirror_is_abandoned_for_the_next(tmp_path, fake, mirror):
    # /throttled would deliver a good copy in ~0.1 s, at ~400 kB/s: under min_speed, so it is left.
    urls = [mirror.url("/throttled"), mirror.url("/good")]
    download_cifar10(tmp_path, urls, fake.md5, min_speed=1e6, speed_window=0.03, **QUICK)
    assert mirror.requests == ["/throttled", "/good"]
    assert archive_md5(tmp_path) == fake.md5


def test_the_last_mirror_may_be_slow_and_warns_once(tmp_path, fake, mirror, logs):
    download_cifar10(tmp_path, [mirror.url("/throttled")], fake.md5, min_speed=1e9, speed_window=0.02,
                     **QUICK)  # every window of ~0.1 s of transfer is too slow
    assert mirror.requests == ["/throttled"]
    assert archive_md5(tmp_path) == fake.md5
    assert logs() == ["WARNING"]


def test_a_stalled_mirror_times_out(tmp_path, fake, mirror):
    # Without the timeout /stall would deliver a good copy after 5 s, and /good would never be asked.
    download_cifar10(tmp_path, [mirror.url("/stall"), mirror.url("/good")], fake.md5,
                     **{**QUICK, "timeout": 0.3})
    assert mirror.requests == ["/stall", "/good"]
    assert archive_md5(tmp_path) == fake.md5


def test_all_copies_bad_raise_one_error_naming_each(tmp_path, fake, mirror):
    urls = [mirror.url("/404"), refused_url(), mirror.url("/wrong"), mirror.url("/stall")]
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as caught:
        download_cifar10(root, urls, fake.md5, **{**QUICK, "timeout": 0.3})
    attempts = caught.value.attempts
    assert [where for where, _ in attempts] == urls
    assert all(isinstance(reason, str) and reason for _, reason in attempts)
    assert "404" in attempts[0][1]
    message = str(caught.value)
    assert "\n" not in message and all(url in message for url in urls)
    assert mirror.requests == ["/404", "/wrong", "/stall"]
    assert os.listdir(root) == []  # no archive, no temporary file, no half-extracted folder


def test_urls_come_from_the_environment_split_on_spaces_and_commas(tmp_path, fake, mirror, monkeypatch,
                                                                   logs):
    share = tmp_path / "share"
    share.mkdir()
    (share / "copy.tar.gz").write_bytes(fake.data)
    missing, copy = (share / "missing.tar.gz").as_uri(), (share / "copy.tar.gz").as_uri()
    monkeypatch.setenv(URLS_ENV, f" {mirror.url('/404')},{mirror.url('/wrong')} ,\t{missing}\n{copy} ")
    download_cifar10(tmp_path / "data", md5=fake.md5, **QUICK)  # urls=None: the environment's
    assert mirror.requests == ["/404", "/wrong"]
    assert logs() == ["WARNING"] * 3  # 404, wrong md5, missing file; then the file:// copy is used
    assert archive_md5(tmp_path / "data") == fake.md5


def test_a_second_call_downloads_nothing(tmp_path, fake, mirror):
    download_cifar10(tmp_path, [mirror.url("/good")], fake.md5, **QUICK)
    (tmp_path / CIFAR10_FILENAME).unlink()  # the extracted files alone are enough
    assert download_cifar10(tmp_path, [mirror.url("/good")], fake.md5, **QUICK) == tmp_path
    assert mirror.requests == ["/good"]


def test_a_progress_bar_is_drawn_unless_progress_is_false(tmp_path, fake, mirror, capsys):
    download_cifar10(tmp_path / "a", [mirror.url("/good")], fake.md5, timeout=2.0)
    assert capsys.readouterr().err  # tqdm's bar, on stderr outside a notebook
    download_cifar10(tmp_path / "b", [mirror.url("/good")], fake.md5, timeout=2.0, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs POSIX signals")
def test_ctrl_c_during_a_download_leaves_no_temporary_file(tmp_path, fake, mirror):
    seen = []

    def interrupt() -> None:  # from the server's thread, halfway through the body
        seen.append(os.listdir(tmp_path))
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    mirror.hook = interrupt
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's: KeyboardInterrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            download_cifar10(tmp_path, [mirror.url("/hook"), mirror.url("/good")], fake.md5, **QUICK)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0] != [CIFAR10_FILENAME]  # a partial file was there
    assert os.listdir(tmp_path) == []
    assert mirror.requests == ["/hook"]


# ----------------------------------------------------------------------------- archive in root, cache


def test_a_good_archive_in_root_is_used_without_the_network(tmp_path, fake, mirror):
    (tmp_path / CIFAR10_FILENAME).write_bytes(fake.data)
    download_cifar10(tmp_path, [mirror.url("/good")], fake.md5, **QUICK)
    assert mirror.requests == []
    assert (tmp_path / CIFAR10_FOLDER / "batches.meta").read_bytes() == fake.files["batches.meta"]


def test_a_wrong_archive_in_root_is_replaced(tmp_path, fake, mirror):
    (tmp_path / CIFAR10_FILENAME).write_bytes(fake.data[:1000])  # e.g. an interrupted download
    download_cifar10(tmp_path, [mirror.url("/good")], fake.md5, **QUICK)
    assert mirror.requests == ["/good"]
    assert archive_md5(tmp_path) == fake.md5


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_cached_archive_is_used_without_requests(tmp_path, fake, mirror, monkeypatch, cifar10, how):
    cache = tmp_path / "My Drive" / "cache"  # a file:// URL with a space, read through urllib
    cache.mkdir(parents=True)
    (cache / CIFAR10_FILENAME).write_bytes(fake.data)
    if how == "environment":
        monkeypatch.setenv(CACHE_ENV, str(cache))
    root = download_cifar10(tmp_path / "data", [mirror.url("/good")], fake.md5,
                            cache_dir=cache if how == "argument" else None, **QUICK)
    assert mirror.requests == []
    assert archive_md5(root) == fake.md5
    assert len(cifar10(str(root), train=False)) == PER_BATCH


def test_the_cache_is_filled_after_a_download(tmp_path, fake, mirror):
    cache = tmp_path / "drive" / "My Drive" / "cache"  # made with its parents
    download_cifar10(tmp_path / "data", [mirror.url("/good")], fake.md5, cache_dir=cache, **QUICK)
    assert os.listdir(cache) == [CIFAR10_FILENAME]
    assert md5((cache / CIFAR10_FILENAME).read_bytes()) == fake.md5


def test_relative_root_and_cache_work_both_ways(tmp_path, fake, mirror, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI's default --data-dir is the relative "data"
    download_cifar10("data", [mirror.url("/good")], fake.md5, cache_dir="cache", **QUICK)
    assert md5((tmp_path / "cache" / CIFAR10_FILENAME).read_bytes()) == fake.md5
    download_cifar10("data2", [mirror.url("/good")], fake.md5, cache_dir="cache", **QUICK)
    assert mirror.requests == ["/good"]
    assert archive_md5(tmp_path / "data2") == fake.md5


def test_a_bad_cached_archive_is_skipped_and_replaced(tmp_path, fake, mirror):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CIFAR10_FILENAME).write_bytes(b"truncated")
    download_cifar10(tmp_path / "data", [mirror.url("/good")], fake.md5, tmp_path / "cache", **QUICK)
    assert mirror.requests == ["/good"]
    assert archive_md5(tmp_path / "data") == fake.md5
    assert os.listdir(tmp_path / "cache") == [CIFAR10_FILENAME]
    assert md5((tmp_path / "cache" / CIFAR10_FILENAME).read_bytes()) == fake.md5


def test_a_cache_that_cannot_be_written_only_warns(tmp_path, fake, mirror, logs):
    cache = tmp_path / "not-a-folder"
    cache.write_bytes(b"")  # a file: no folder can be made there, as root or not
    download_cifar10(tmp_path / "data", [mirror.url("/good")], fake.md5, cache_dir=cache, **QUICK)
    assert archive_md5(tmp_path / "data") == fake.md5
    assert logs() == ["WARNING"]
    assert cache.read_bytes() == b""


# ----------------------------------------------------------------------------- extraction


def test_a_good_local_archive_is_extracted_offline_and_repairs_the_tree(tmp_path, fake, cifar10):
    (tmp_path / CIFAR10_FILENAME).write_bytes(fake.data)
    assert extract_local_archive(tmp_path, fake.md5) == tmp_path
    (tmp_path / CIFAR10_FOLDER / "data_batch_3").unlink()  # a half-deleted tree is replaced whole
    extract_local_archive(tmp_path, fake.md5)
    assert sorted(os.listdir(tmp_path)) == sorted([CIFAR10_FILENAME, CIFAR10_FOLDER])
    assert cifar10(str(tmp_path), train=True).targets == fake.train_labels


def test_a_bad_local_archive_is_kept_and_raises_without_the_network(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv(URLS_ENV, mirror.url("/good"))
    (tmp_path / CIFAR10_FILENAME).write_bytes(b"an interrupted copy")
    with pytest.raises(DownloadError) as caught:
        extract_local_archive(tmp_path)
    assert [where for where, _ in caught.value.attempts] == [str(tmp_path / CIFAR10_FILENAME)]
    assert (tmp_path / CIFAR10_FILENAME).read_bytes() == b"an interrupted copy"
    assert os.listdir(tmp_path) == [CIFAR10_FILENAME]
    assert mirror.requests == []


@pytest.mark.parametrize(("name", "kind", "link"), [
    (f"{CIFAR10_FOLDER}/../../../evil", tarfile.REGTYPE, ""),  # from root's scratch folder to tmp_path/a
    ("{tmp}/a/evil", tarfile.REGTYPE, ""),  # absolute
    ("evil", tarfile.REGTYPE, ""),  # outside cifar-10-batches-py/
    (f"{CIFAR10_FOLDER}/link", tarfile.SYMTYPE, "{tmp}/a/secret"),
    (f"{CIFAR10_FOLDER}/near", tarfile.SYMTYPE, "data_batch_1"),
    (f"{CIFAR10_FOLDER}/hard", tarfile.LNKTYPE, f"{CIFAR10_FOLDER}/data_batch_1"),
], ids=["dotdot", "absolute", "outside", "symlink-out", "symlink-in", "hardlink"])
def test_an_archive_with_an_unsafe_member_extracts_nothing(tmp_path, fake, name, kind, link):
    root = tmp_path / "a" / "root"
    root.mkdir(parents=True)
    member = tarfile.TarInfo(name.format(tmp=tmp_path))
    member.type, member.linkname = kind, link.format(tmp=tmp_path)
    data = tar_gz(fake.files, (member,))
    (root / CIFAR10_FILENAME).write_bytes(data)
    with pytest.raises(DownloadError):
        extract_local_archive(root, md5(data))
    assert os.listdir(root) == [CIFAR10_FILENAME]  # no folder, no scratch folder left
    assert os.listdir(tmp_path / "a") == ["root"]


def test_an_archive_lacking_a_file_extracts_nothing(tmp_path, fake, mirror):
    files = {name: blob for name, blob in fake.files.items() if name != "test_batch"}
    data = tar_gz(files)
    (tmp_path / CIFAR10_FILENAME).write_bytes(data)
    with pytest.raises(DownloadError):
        download_cifar10(tmp_path, [mirror.url("/good")], md5(data), **QUICK)
    assert os.listdir(tmp_path) == [CIFAR10_FILENAME]
    assert mirror.requests == []


# ----------------------------------------------------------------------------- import


def test_importing_the_module_opens_no_socket_and_writes_no_file(tmp_path):
    code = """if True:
        import os, sys
        events = []
        def hook(event, args):
            writes = event == "open" and (set(str(args[1] or "")) & set("wax+")
                                          or args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes or event.startswith(("socket.", "urllib.", "http.", "os.mkdir", "os.rename",
                                           "os.remove", "shutil.", "tempfile.", "subprocess.")):
                events.append((event, str(args)[:200]))
        sys.addaudithook(hook)
        import helpers.download
        print(events)
    """
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
    assert os.listdir(tmp_path) == []
