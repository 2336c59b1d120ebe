"""``moas download`` against a local HTTP server on 127.0.0.1 serving fixture JSON and images."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image

from moas.cli import main
from moas.data.download import DanbooruDownloader, DownloadSettings, caption_from_post
from moas.data.filters import QualityThresholds
from moas.errors import MoasError

SMALL = QualityThresholds(min_long_edge=48, min_short_edge=32)
NAME = re.compile(r"^\d+_[0-9a-f]{32}\.(png|jpg|txt)$")


def _img(seed: int, fmt: str = "PNG", flat: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.full((40, 56, 3), 128, np.uint8) if flat else rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


class Server:
    """Routes: path → callable(handler); hit counts per path; pages of posts at /posts.json."""

    def __init__(self) -> None:
        self.routes: dict = {}
        self.pages: list[list[dict]] = []
        self.hits: Counter = Counter()
        self.auth: list[str | None] = []
        self.release = threading.Event()
        self.hanging = threading.Event()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                url = urlparse(self.path)
                srv.hits[url.path] += 1
                if url.path == "/posts.json":
                    srv.auth.append(self.headers.get("Authorization"))
                    page = int(parse_qs(url.query).get("page", ["1"])[0])
                    if page <= len(srv.pages) and srv.pages[page - 1] == "fail":
                        return srv.send(self, 500, b"error", "text/plain")
                    body = json.dumps(srv.pages[page - 1] if page <= len(srv.pages) else []).encode()
                    return srv.send(self, 200, body, "application/json")
                route = srv.routes.get(url.path)
                if route is None:
                    return srv.send(self, 404, b"missing", "text/plain")
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def send(h, status: int, body: bytes, ctype: str, headers: dict | None = None, length: int | None = None):
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def post(pid: int, body: bytes, ext: str = "png", **kw) -> dict:
    p = {
        "id": pid,
        "md5": md5(body),
        "file_ext": ext,
        "file_url": f"/img/{pid}.{ext}",
        "file_size": len(body),
        "rating": "g",
        "score": 10,
        "tag_string": "1girl solo original character_name",
        "tag_string_character": "character_name",
        "tag_string_general": "1girl solo",
    }
    p.update(kw)
    return p


def ok(body: bytes, ctype: str = "image/png"):
    return lambda h: Server.send(h, 200, body, ctype)


def build_world(s: Server) -> dict[int, str]:
    """Posts covering every filter and failure mode; returns id → expected outcome."""
    a, b = _img(1), _img(2, "JPEG")
    flaky = {"429": _img(11), "421": _img(21)}
    posts, expect = [], {}

    def add(p: dict, outcome: str, route=None) -> None:
        posts.append(p)
        expect[p["id"]] = outcome
        if route is not None:
            s.routes[urlparse(p["file_url"]).path] = route

    add(post(1, a), "ok", ok(a))
    add(post(2, b, "jpg"), "ok", ok(b, "image/jpeg"))
    add(post(3, _img(3), rating="e"), "rating")
    add(post(4, _img(4), score=2), "low_score")
    add(post(5, _img(5), tag_string="1girl nude solo character"), "nsfw_tags")
    add(post(6, _img(6), tag_string="scenery landscape sky"), "not_anime")
    add(post(7, _img(7), file_url="file:///etc/passwd"), "bad_url")
    add(post(8, _img(8), ext="gif"), "bad_extension")
    add(post(9, _img(9), file_size=10**9), "too_large")
    add(post(10, a), "duplicate", ok(a))  # same bytes as post 1

    state = Counter()

    def after(code: int, key: str, body: bytes):
        def route(h):
            state[key] += 1
            if state[key] == 1:
                return Server.send(h, code, b"slow down", "text/plain", {"Retry-After": "1"})
            return Server.send(h, 200, body, "image/png")

        return route

    add(post(11, flaky["429"]), "ok", after(429, "429", flaky["429"]))
    add(post(12, _img(12)), "http_error", lambda h: Server.send(h, 503, b"down", "text/plain"))

    def slow(h):
        time.sleep(1.5)
        Server.send(h, 200, _img(13), "image/png")

    add(post(13, _img(13)), "timeout", slow)
    add(post(14, _img(14)), "bad_content_type", ok(_img(14), "text/html"))
    html = b"<!DOCTYPE html><html>login required</html>"
    add(post(15, html), "not_an_image", ok(html))
    add(post(16, _img(16), md5="0" * 32), "md5_mismatch", ok(_img(16)))
    t = _img(17)
    add(post(17, t), "network_error", lambda h: Server.send(h, 200, t[:100], "image/png", length=len(t)))
    big = _img(18) * 40
    add(post(18, big, file_size=None), "too_large", ok(big))
    add(post(19, _img(19, flat=True)), "low_color_variance", ok(_img(19, flat=True)))
    cut = _img(20)[:-200]
    add(post(20, cut), "truncated", ok(cut))
    add(post(21, flaky["421"]), "ok", after(421, "421", flaky["421"]))
    # A hostile server-given path never becomes a file name.
    add(post(22, _img(22), file_url="/img/..%2F..%2Fescape.png"), "ok", ok(_img(22)))
    s.pages = [posts[:12], posts[12:]]
    return expect


def settings(s: Server, **kw) -> DownloadSettings:
    base = dict(
        base_url=s.url,
        target=100,
        timeout=(2.0, 0.5),
        retries=2,
        backoff=0.0,
        max_file_bytes=len(_img(18)) * 10,
        thresholds=SMALL,
    )
    base.update(kw)
    return DownloadSettings(**base)


def test_every_filter_and_failure_mode(server, tmp_path):
    expect = build_world(server)
    t0 = time.perf_counter()
    dl = DanbooruDownloader(tmp_path / "out", settings(server))
    rep = dl.run(progress=False)
    want_ok = [i for i, o in expect.items() if o == "ok"]
    assert rep.downloaded == len(want_ok) and rep.present == 0
    assert dict(rep.failures) == dict(Counter(o for o in expect.values() if o != "ok"))
    assert rep.successes + sum(rep.failures.values()) == rep.total == len(expect)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert all(NAME.match(f) for f in files), files  # nothing partial, no server-given names
    assert sorted(int(f.split("_")[0]) for f in files if not f.endswith(".txt")) == want_ok
    assert server.hits["/img/11.png"] == 2 and server.hits["/img/21.png"] == 2  # retried once each
    assert time.perf_counter() - t0 >= 2.0  # both Retry-After: 1 were honoured
    assert server.hits["/img/12.png"] == 3  # 503: bounded retries (1 + 2)
    assert server.hits["/img/3.png"] == 0 and server.hits["/img/10.png"] == 0  # filtered before download
    cap = (tmp_path / "out" / f"1_{md5(_img(1))}.txt").read_text()
    assert cap.strip() == "character name, 1girl, solo"
    report = json.loads(dl.write_report(tmp_path / "r.json").read_text())
    assert report["successes"] + report["failures"] == report["total"]


def test_caption_from_tag_string_only():
    assert caption_from_post({"tag_string": "long_hair smile"}) == "long hair, smile"


def test_target_met_is_skipped_and_over_target_trimmed_deterministically(server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(5):
        (out / f"{i}_{md5(_img(i))}.png").write_bytes(_img(i))
        (out / f"{i}_{md5(_img(i))}.txt").write_text("x")
    rep = DanbooruDownloader(out, settings(server, target=3)).run(progress=False)
    assert rep.skipped_run and rep.trimmed == 2 and server.hits["/posts.json"] == 0
    kept = sorted(p.name.split("_")[0] for p in out.glob("*.png"))
    assert kept == ["2", "3", "4"]  # sorted reverse, the last ones removed
    assert sorted(p.name.split("_")[0] for p in (out / ".trimmed").glob("*.png")) == ["0", "1"]
    assert len(list((out / ".trimmed").glob("*.txt"))) == 2  # moved, not deleted


def test_api_failure_is_one_sentence_and_keeps_files(server, tmp_path, monkeypatch, capsys):
    server.pages = [[post(1, _img(1))]]
    server.routes["/img/1.png"] = ok(_img(1))
    monkeypatch.chdir(tmp_path)
    server.pages = [[post(1, _img(1))], "fail"]  # page 2 answers HTTP 500
    code = main(
        [
            "download",
            "--base_url",
            server.url,
            "--out",
            "out",
            "--quiet",
            "--retries",
            "0",
            "--min_long_edge",
            "48",
            "--min_short_edge",
            "32",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "moas: error:" in err and "Traceback" not in err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    assert json.loads((tmp_path / "logs" / "download_report.json").read_text())["successes"] == 1
    with pytest.raises(MoasError, match="http"):
        DanbooruDownloader(tmp_path, DownloadSettings(base_url="ftp://x"))


def test_credentials_from_env_file_go_in_a_header_not_the_url(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DANBOORU_LOGIN", raising=False)
    monkeypatch.delenv("DANBOORU_API_KEY", raising=False)
    (tmp_path / ".env").write_text("DANBOORU_LOGIN=alice\nDANBOORU_API_KEY=s3cret\n")
    server.pages = [[]]
    DanbooruDownloader(tmp_path / "out", settings(server)).run(progress=False)
    assert server.auth == ["Basic " + base64.b64encode(b"alice:s3cret").decode()]
    monkeypatch.delenv("DANBOORU_LOGIN")
    monkeypatch.delenv("DANBOORU_API_KEY")


def test_resume_after_kill_9(server, tmp_path):
    bodies = {i: _img(100 + i) for i in range(1, 5)}
    server.pages = [[post(i, bodies[i]) for i in range(1, 5)]]
    for i in (1, 2, 4):
        server.routes[f"/img/{i}.png"] = ok(bodies[i])

    def hang(h):  # headers and half the body, then stall until released
        b = bodies[3]
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(len(b)))
        h.end_headers()
        h.wfile.write(b[: len(b) // 2])
        h.wfile.flush()
        server.hanging.set()
        server.release.wait(30)

    server.routes["/img/3.png"] = hang
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        sys.executable,
        "-m",
        "moas",
        "download",
        "--base_url",
        server.url,
        "--out",
        str(out),
        "--quiet",
        "--timeout",
        "30",
        "--min_long_edge",
        "48",
        "--min_short_edge",
        "32",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert server.hanging.wait(60), "the download never reached image 3"
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    names = sorted(p.name for p in out.iterdir())
    assert any(n.endswith(".part") for n in names)  # the kill interrupted image 3
    assert sorted(n.split("_")[0] for n in names if n.endswith(".png")) == ["1", "2"]
    server.release.set()
    server.routes["/img/3.png"] = ok(bodies[3])
    rep = DanbooruDownloader(out, settings(server)).run(progress=False)
    assert rep.present == 2 and rep.downloaded == 2 and rep.total == 4
    names = sorted(p.name for p in out.iterdir())
    assert all(NAME.match(n) for n in names) and len(names) == 8
    for i, b in bodies.items():
        assert (out / f"{i}_{md5(b)}.png").read_bytes() == b
