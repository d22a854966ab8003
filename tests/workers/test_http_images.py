"""http(s):// image URIs (workers/storage.fetch_http) against a local HTTP server: fetched, retried
on 503, refused over the size cap, missing objects and timeouts become error rows whose message
carries no query string (presigned URLs keep their signature there)."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from tests.pipeline_helpers import png_bytes

PNG = png_bytes(3)


class Handler(BaseHTTPRequestHandler):
    hits: dict = {}

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        Handler.hits[path] = Handler.hits.get(path, 0) + 1
        if path == "/ok.png" or (path == "/flaky.png" and Handler.hits[path] > 1):
            self._send(200, PNG)
        elif path == "/flaky.png":
            self._send(503, b"busy")
        elif path == "/big.png":
            self._send(200, b"x" * 5000)
        elif path == "/slow.png":
            threading.Event().wait(2.0)
            self._send(200, PNG)
        else:
            self._send(404, b"nope")

    def _send(self, code: int, body: bytes):
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_uris_become_ok_or_error_rows(http_server, monkeypatch):
    import workers.storage as storage
    from workers.preprocess import ImageChecker

    monkeypatch.setattr(storage, "HTTP_TIMEOUT_S", 0.5)
    monkeypatch.setattr(storage, "HTTP_RETRY_DELAYS_S", (0.05,))
    uris = {"ok": f"{http_server}/ok.png?X-Amz-Signature=SECRET123", "flaky": f"{http_server}/flaky.png",
            "missing": f"{http_server}/gone.png?token=SECRET123", "big": f"{http_server}/big.png",
            "slow": f"{http_server}/slow.png"}
    checker = ImageChecker(image_column=None, image_uri_column="url", max_image_bytes=4000)
    out = checker(pa.table({"id": list(uris), "url": list(uris.values())}))
    rows = {r["id"]: r for r in out.to_pylist()}
    assert rows["ok"]["status"] == "ok" and rows["flaky"]["status"] == "ok"      # 503 then 200: retried
    assert Handler.hits["/flaky.png"] == 2
    assert rows["missing"]["status"] == "error" and "missing image object" in rows["missing"]["error"]
    assert "over the 4000-byte limit" in rows["big"]["error"]
    assert rows["slow"]["status"] == "error" and "cannot fetch" in rows["slow"]["error"]
    assert Handler.hits["/slow.png"] == 2                                         # one retry, then given up
    assert not any("SECRET123" in (r["error"] or "") for r in rows.values())
