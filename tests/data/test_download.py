"""lem.download against a real HTTP server on 127.0.0.1: full, resumed, corrupt, missing, zips."""
import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lem.data import download as dl
from lem.data import DataError

PAYLOAD = bytes(range(256)) * 1200  # 300 KiB


class Files(BaseHTTPRequestHandler):
    """Serves server.files; honours Range; the first server.cuts[path] answers stop half-way."""

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        rest = body[start:]
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        if srv.cuts.get(self.path, 0) > 0:
            srv.cuts[self.path] -= 1
            self.wfile.write(rest[:len(rest) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(rest)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)  # no back-off waits in tests
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    srv.files, srv.cuts, srv.requests, srv.ranges = {}, {}, [], True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_full_download_checks_sha256(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    path = dl.download(server.url + "/a.bin", tmp_path / "sub" / "a.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "a.bin.part").exists()
    dl.download(server.url + "/a.bin", path, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert len(server.requests) == 1  # already there and verified: not fetched again


def test_resume_after_the_server_cut_the_connection(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.cuts["/a.bin"] = 1
    path = dl.download(server.url + "/a.bin", tmp_path / "a.bin", md5=hashlib.md5(PAYLOAD).hexdigest(), chunk_size=4096)
    assert path.read_bytes() == PAYLOAD
    (first, first_range), (second, second_range) = server.requests
    assert first_range is None
    assert second_range is not None and int(second_range[len("bytes="):-1]) >= len(PAYLOAD) // 4


def test_interrupted_part_file_is_continued_by_the_next_call(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:1000])
    dl.download(server.url + "/a.bin", tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert server.requests == [("/a.bin", "bytes=1000-")]


def test_server_that_ignores_range_restarts_cleanly(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.ranges = False
    (tmp_path / "a.bin.part").write_bytes(b"x" * 1000)
    dl.download(server.url + "/a.bin", tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_whole_part_file_is_finished_on_416(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD)
    dl.download(server.url + "/a.bin", tmp_path / "a.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_oversized_part_file_is_dropped_and_refetched(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD + b"junk")
    dl.download(server.url + "/a.bin", tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_checksum_mismatch_removes_the_file_and_says_what_to_do(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    url = server.url + "/a.bin"
    with pytest.raises(DataError) as e:
        dl.download(url, tmp_path / "a.bin", sha256="0" * 64)
    assert url in str(e.value) and str(tmp_path) in str(e.value) and "sha256" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_404_fails_at_once_naming_url_and_folder(server, tmp_path):
    url = server.url + "/missing.zip"
    with pytest.raises(DataError) as e:
        dl.download(url, tmp_path / "missing.zip")
    assert "404" in str(e.value) and url in str(e.value) and str(tmp_path) in str(e.value)
    assert len(server.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_gives_up_after_retries(tmp_path, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    url = f"http://127.0.0.1:{srv.server_address[1]}/a.bin"
    srv.server_close()  # nothing listens on that port any more
    with pytest.raises(DataError, match="after 2 tries") as e:
        dl.download(url, tmp_path / "a.bin", retries=2, timeout=5)
    assert url in str(e.value)


def make_zip(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def test_extract_takes_only_the_members_asked_for(tmp_path):
    archive = tmp_path / "archive.zip"
    archive.write_bytes(make_zip({"Archive/A/A_TRAIN.ts": b"train", "Archive/A/A_TEST.ts": b"test",
                                  "Archive/B/B_TRAIN.ts": b"other"}))
    paths = dl.extract(archive, ["A/A_TRAIN.ts", "A/A_TEST.ts"], tmp_path / "out")
    assert [p.read_bytes() for p in paths] == [b"train", b"test"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["A_TEST.ts", "A_TRAIN.ts"]
    with pytest.raises(DataError, match="0 entries named 'C/C_TRAIN.ts'"):
        dl.extract(archive, ["C/C_TRAIN.ts"], tmp_path / "out")


def test_extract_detects_corruption_and_removes_the_archive(tmp_path):
    data = bytearray(make_zip({"A/A_TRAIN.ts": PAYLOAD}))
    data[100] ^= 0xFF  # inside the compressed member
    archive = tmp_path / "archive.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match="not a valid zip") as e:
        dl.extract(archive, ["A/A_TRAIN.ts"], tmp_path / "out", url="http://127.0.0.1:9/archive.zip")
    assert "http://127.0.0.1:9/archive.zip" in str(e.value) and str(tmp_path) in str(e.value)
    assert not archive.exists() and list((tmp_path / "out").iterdir()) == []
    archive.write_bytes(make_zip({"A/A_TRAIN.ts": PAYLOAD})[:-40])  # truncated: no central directory
    with pytest.raises(DataError, match="not a valid zip"):
        dl.extract(archive, ["A/A_TRAIN.ts"], tmp_path / "out")
