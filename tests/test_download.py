"""helpers.download against a loopback HTTP server: mirror order, watchdog, md5, cache, extraction.

Offline: every URL points at 127.0.0.1 (a ThreadingHTTPServer started per test), and a tiny archive in
torchvision's CIFAR-10 layout stands in for the 170 MB one.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import os
import pickle
import socket
import subprocess
import tarfile
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from helpers import download
from helpers.download import (
    CIFAR10_FILENAME,
    CIFAR10_FOLDER,
    CIFAR10_MIRRORS,
    DownloadError,
    download_cifar10,
    extract_archive,
    extract_local_archive,
    fetch_archive,
    mirror_urls,
)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
PER_BATCH = 2
# Test-sized thresholds: a stalled copy is abandoned after one 0.3 s window; a good one takes ms.
FAST = {"connect_timeout": 2.0, "read_timeout": 2.0, "min_speed": 1e4, "speed_window": 0.3, "progress": False}


@dataclass
class FakeArchive:
    """A small cifar-10-python.tar.gz: its bytes, md5, and the md5 of each file inside."""

    data: bytes
    md5: str
    member_md5: dict[str, str]
    train_labels: list[int]


@dataclass
class Mirror:
    """The loopback server's base URL and the paths it was asked for."""

    base: str
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture(scope="module")
def fake() -> FakeArchive:
    """Pickled dicts like the real batches (keys 'data' uint8 [n, 3072] and 'labels'; meta 'label_names')."""
    rng = np.random.default_rng(0)
    buffer, member_md5, train_labels = io.BytesIO(), {}, []
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:

        def add(name: str, content: dict) -> None:
            blob = pickle.dumps(content, protocol=2)
            member_md5[name] = hashlib.md5(blob).hexdigest()
            info = tarfile.TarInfo(f"{CIFAR10_FOLDER}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        for index, name in enumerate([*TRAIN_BATCHES, "test_batch"]):
            labels = [(2 * index + k) % 10 for k in range(PER_BATCH)]
            train_labels += labels if name != "test_batch" else []
            add(name, {"batch_label": name, "labels": labels,
                       "data": rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)})
        add("batches.meta", {"label_names": CLASSES, "num_cases_per_batch": PER_BATCH, "num_vis": 3072})
    data = buffer.getvalue()
    return FakeArchive(data, hashlib.md5(data).hexdigest(), member_md5, train_labels)


@pytest.fixture
def mirror(fake, monkeypatch):
    """A loopback server: /404, /stall* (headers and 16 bytes, then silence), /wrong, /slow, /good."""
    monkeypatch.setenv("no_proxy", "*")  # loopback only, never through a proxy from the environment
    monkeypatch.delenv(download.URLS_ENV, raising=False)
    monkeypatch.delenv(download.CACHE_ENV, raising=False)
    release = threading.Event()
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            requests.append(self.path)
            if self.path.startswith("/good"):
                self._send_head(len(fake.data))
                self.wfile.write(fake.data)
            elif self.path.startswith("/wrong"):
                self._send_head(len(fake.data))
                self.wfile.write(bytes(len(fake.data)))
            elif self.path.startswith("/stall"):
                self._send_head(len(fake.data))
                self.wfile.write(fake.data[:16])
                release.wait(10)  # until the test ends
            elif self.path.startswith("/slow"):  # the whole file, in 4 parts 0.15 s apart
                self._send_head(len(fake.data))
                step = -(-len(fake.data) // 4)
                for start in range(0, len(fake.data), step):
                    self.wfile.write(fake.data[start:start + step])
                    release.wait(0.15)
            else:
                self.send_error(404)

        def _send_head(self, length: int) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Mirror(f"http://127.0.0.1:{server.server_address[1]}", requests)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def cifar10(fake, monkeypatch):
    """torchvision's CIFAR10, told the md5s of the fake files.

    CIFAR10 checks every batch against the md5s of the real dataset (in _check_integrity and
    _load_meta). Swapping those lists for the fake files' md5s, rather than stubbing the check,
    keeps torchvision's own integrity check and reading code in the test, unchanged.
    """
    from torchvision.datasets import CIFAR10  # deferred: slow to import, only two tests need it

    monkeypatch.setattr(CIFAR10, "train_list", [[n, fake.member_md5[n]] for n in TRAIN_BATCHES])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", fake.member_md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": fake.member_md5["batches.meta"]})
    return CIFAR10


def refused_url() -> str:
    """A loopback URL nothing listens on (a port just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar"


def test_falls_through_bad_copies_to_the_good_one(tmp_path, fake, mirror, cifar10):
    urls = [mirror.url(p) for p in ("/404", "/stall", "/wrong", "/good")]
    root = download_cifar10(tmp_path / "data", urls, fake.md5, **FAST)  # why each failed: the next test
    assert root == tmp_path / "data"
    assert mirror.requests == ["/404", "/stall", "/wrong", "/good"]
    assert set(os.listdir(root)) == {CIFAR10_FILENAME, CIFAR10_FOLDER}  # no temp files or folders
    train, test = cifar10(str(root), train=True), cifar10(str(root), train=False)
    assert (len(train), len(test)) == (5 * PER_BATCH, PER_BATCH)
    assert train.data.shape == (5 * PER_BATCH, 32, 32, 3)
    assert train.targets == fake.train_labels
    assert train.classes == CLASSES


def test_report_names_the_copy_used_and_why_others_failed(tmp_path, fake, mirror):
    urls = [mirror.url(p) for p in ("/404", "/stall", "/wrong", "/good")]
    report = fetch_archive(tmp_path, urls, fake.md5, **FAST)
    assert report.url == urls[-1]
    assert report.bytes == len(fake.data)
    assert 0 <= report.seconds < 1
    reasons = dict(report.failed)
    assert reasons[urls[0]] == "HTTP 404"
    assert reasons[urls[1]].startswith("too slow: 0.00 MB/s over ")
    assert reasons[urls[2]].startswith(f"md5 mismatch: expected {fake.md5}, found ")


def test_second_call_downloads_nothing(tmp_path, fake, mirror):
    urls = [mirror.url("/good")]
    download_cifar10(tmp_path, urls, fake.md5, **FAST)
    assert len(mirror.requests) == 1
    download_cifar10(tmp_path, urls, fake.md5, **FAST)
    (tmp_path / CIFAR10_FILENAME).unlink()  # the extracted files alone are enough
    download_cifar10(tmp_path, urls, fake.md5, **FAST)
    assert len(mirror.requests) == 1


def test_all_copies_bad_raises_one_line_with_each_reason(tmp_path, fake, mirror):
    urls = [mirror.url("/404"), refused_url(), mirror.url("/stall"), mirror.url("/wrong"),
            mirror.url("/stall-last")]
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as caught:
        download_cifar10(root, urls, fake.md5, **{**FAST, "read_timeout": 0.5})
    message = str(caught.value)
    assert "\n" not in message
    expected = ["HTTP 404", "connection refused", "too slow: ", "md5 mismatch: ",
                "timed out after 0.5 s without data; 16 bytes received"]  # the last: no watchdog
    for (url, reason), start in zip(caught.value.attempts, expected, strict=True):
        assert reason.startswith(start), (url, reason)
        assert f"{url} ({reason})" in message
    assert "--data-dir" in message and "CIFAR10_URLS" in message
    assert os.listdir(root) == []  # no archive, no temp file, no half-extracted folder


def test_urls_come_from_the_environment(tmp_path, fake, mirror, monkeypatch):
    assert mirror_urls({}) == list(CIFAR10_MIRRORS)
    assert mirror_urls({"CIFAR10_URLS": " ,\n "}) == list(CIFAR10_MIRRORS)
    assert mirror_urls({"CIFAR10_URLS": "http://a/x.tgz,http://b/y.tgz\n\thttp://c/z , http://d"}) == [
        "http://a/x.tgz", "http://b/y.tgz", "http://c/z", "http://d"]
    assert CIFAR10_MIRRORS[-1] == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    monkeypatch.setenv("CIFAR10_URLS", f"{mirror.url('/404')}, {mirror.url('/good')}")
    download_cifar10(tmp_path, md5=fake.md5, **FAST)  # urls=None: the environment's
    assert mirror.requests == ["/404", "/good"]


def test_file_url_works_like_a_mirror(tmp_path, fake):
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "copy.tar.gz").write_bytes(fake.data)
    urls = [(tmp_path / "share" / "missing.tar.gz").as_uri(), (tmp_path / "share" / "copy.tar.gz").as_uri()]
    report = fetch_archive(tmp_path / "data", urls, fake.md5, **FAST)
    assert report.url == urls[1] and "No such file" in report.failed[0][1]
    assert (tmp_path / "data" / CIFAR10_FILENAME).read_bytes() == fake.data


def test_cache_is_filled_then_used_without_requests(tmp_path, fake, mirror, monkeypatch, cifar10):
    cache = tmp_path / "drive" / "MyDrive" / "cifar10-course" / "cache"  # made with its parents
    download_cifar10(tmp_path / "first", [mirror.url("/good")], fake.md5, cache_dir=cache, **FAST)
    assert (cache / CIFAR10_FILENAME).read_bytes() == fake.data
    assert os.listdir(cache) == [CIFAR10_FILENAME]
    monkeypatch.setenv("CIFAR_CACHE_DIR", str(cache))  # cache_dir=None: the environment's
    root = download_cifar10(tmp_path / "second", [mirror.url("/good")], fake.md5, **FAST)
    assert len(mirror.requests) == 1
    assert len(cifar10(str(root), train=False)) == PER_BATCH


def test_bad_cache_is_skipped(tmp_path, fake, mirror):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CIFAR10_FILENAME).write_bytes(b"truncated")
    report = fetch_archive(tmp_path / "data", [mirror.url("/good")], fake.md5, tmp_path / "cache", **FAST)
    assert report.url == mirror.url("/good")
    assert "md5 mismatch" in report.failed[0][1]
    assert (tmp_path / "cache" / CIFAR10_FILENAME).read_bytes() == fake.data  # replaced by the good one


def test_archive_with_wrong_md5_in_root_is_replaced(tmp_path, fake, mirror):
    (tmp_path / CIFAR10_FILENAME).write_bytes(fake.data[:1000])  # e.g. an interrupted download
    report = fetch_archive(tmp_path, [mirror.url("/good")], fake.md5, **FAST)
    assert mirror.requests == ["/good"]
    assert report.failed == ((str(tmp_path / CIFAR10_FILENAME),
                              f"md5 mismatch: expected {fake.md5}, found "
                              f"{hashlib.md5(fake.data[:1000]).hexdigest()}; file removed"),)
    assert (tmp_path / CIFAR10_FILENAME).read_bytes() == fake.data


def test_archive_with_right_md5_in_root_is_extracted_without_requests(tmp_path, fake, mirror):
    (tmp_path / CIFAR10_FILENAME).write_bytes(fake.data)
    download_cifar10(tmp_path, [mirror.url("/good")], fake.md5, **FAST)
    assert mirror.requests == []
    assert (tmp_path / CIFAR10_FOLDER / "batches.meta").is_file()


def test_without_download_a_bad_local_archive_is_kept_and_no_mirror_is_asked(tmp_path, mirror, monkeypatch):
    from helpers.dataset import load_cifar10

    truncated = b"an interrupted copy"
    (tmp_path / CIFAR10_FILENAME).write_bytes(truncated)
    monkeypatch.setenv("CIFAR10_URLS", mirror.url("/good"))
    with pytest.raises(DownloadError, match="pass --download"):
        load_cifar10(tmp_path, download=False)
    assert mirror.requests == []
    assert (tmp_path / CIFAR10_FILENAME).read_bytes() == truncated


def test_a_good_local_archive_is_extracted_without_the_network(tmp_path, fake):
    (tmp_path / CIFAR10_FILENAME).write_bytes(fake.data)
    assert extract_local_archive(tmp_path, fake.md5) == tmp_path
    assert (tmp_path / CIFAR10_FOLDER / "batches.meta").is_file()
    (tmp_path / CIFAR10_FOLDER / "data_batch_3").unlink()  # a half-deleted copy is repaired from it
    extract_local_archive(tmp_path, fake.md5)
    assert (tmp_path / CIFAR10_FOLDER / "data_batch_3").is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / CIFAR10_FILENAME).write_bytes(fake.data[:10])
    with pytest.raises(DownloadError, match="is not the CIFAR-10 archive"):
        extract_local_archive(other, fake.md5)
    assert not (other / CIFAR10_FOLDER).exists()


def test_last_copy_may_be_slow_and_warns_once(tmp_path, fake, mirror, caplog):
    caplog.set_level(logging.WARNING, logger="helpers.download")
    settings = {**FAST, "min_speed": 1e9, "speed_window": 0.1}  # every window is "too slow"
    report = fetch_archive(tmp_path, [mirror.url("/slow")], fake.md5, **settings)
    assert report.url == mirror.url("/slow") and report.failed == ()
    warnings = [r.getMessage() for r in caplog.records if "is slow" in r.getMessage()]
    assert len(warnings) == 1 and "left" in warnings[0] and "CIFAR10_URLS" in warnings[0]


def test_interrupt_leaves_no_partial_file(tmp_path, fake, mirror, monkeypatch):
    class Interrupting:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def update(self, n: int) -> None:
            raise KeyboardInterrupt

        def close(self) -> None:
            pass

    monkeypatch.setattr(download, "tqdm", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        fetch_archive(tmp_path, [mirror.url("/good")], fake.md5, **FAST)
    assert os.listdir(tmp_path) == []


def test_partial_file_of_a_killed_download_is_removed_and_a_live_ones_kept(tmp_path, fake, mirror):
    with subprocess.Popen(["sleep", "30"]) as other:  # another process downloading right now
        dead = tmp_path / f".{CIFAR10_FILENAME}.part{_dead_pid()}"  # a SIGKILLed downloader's
        live = tmp_path / f".{CIFAR10_FILENAME}.part{other.pid}"
        dead.write_bytes(b"half")
        live.write_bytes(b"half")
        fetch_archive(tmp_path, [mirror.url("/good")], fake.md5, **FAST)
        other.kill()
    assert not dead.exists() and live.exists()
    assert (tmp_path / CIFAR10_FILENAME).is_file()


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_unsafe_archive_is_not_extracted(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(f"{CIFAR10_FOLDER}/../../escaped")
        tar.addfile(info, io.BytesIO())
    (tmp_path / "root").mkdir()
    with pytest.raises(DownloadError, match="unsafe path"):
        extract_archive(archive, tmp_path / "root")
    assert os.listdir(tmp_path / "root") == []
    assert sorted(os.listdir(tmp_path)) == ["evil.tar.gz", "root"]


def test_archive_without_the_batches_is_not_extracted(tmp_path):
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo(f"{CIFAR10_FOLDER}/data_batch_1"), io.BytesIO())
    with pytest.raises(DownloadError, match="lacks"):
        extract_archive(archive, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["other.tar.gz"]

