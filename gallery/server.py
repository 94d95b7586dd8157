"""A local web page and JSON API over a ``Searcher``.

Built on the standard library (``http.server.ThreadingHTTPServer``): nothing more to install or
keep up to date, one thread per request, and enough for a page on your own machine. The model is
loaded once; searches take a lock (one model, two CPU-bound requests gain nothing from running
together), image files are read without it. Only indexed images are served, by their row number:
no path from a request is ever opened. It is not meant to face the internet (no TLS, no auth).

- ``GET /?q=<sentence>&k=<n>``: the page, with the results of ``q`` when given;
- ``GET /api/search?q=<sentence>&k=<n>``: ``{"query", "k", "results": [{"rank", "score", "path",
  "url"}], "timing_ms"}``;
- ``GET /image/<row>``: the image of index row ``row``.
Bad requests (empty, over-long or unreadable query, bad ``k``) get 400 with ``{"error": ...}``
(or the page with the message); anything else 404.
"""
from __future__ import annotations

import html
import json
import logging
import mimetypes
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from .searcher import Hit, QueryError, Searcher

logger = logging.getLogger(__name__)

MAX_K = 100
IMAGE_ROUTE = re.compile(r"/image/(\d{1,12})")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Person search</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
form {{ margin-bottom: 1em; }}
input[name=q] {{ width: 36em; font-size: 1.05em; padding: .3em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 128px; text-align: center; font-size: .8em; }}
figure img {{ width: 128px; height: 256px; object-fit: contain; background: #eee; border: 1px solid #bbb; }}
figcaption {{ overflow-wrap: anywhere; }}
.error {{ color: #b00; }} .note {{ color: #666; font-size: .85em; }}
</style></head><body>
<h2>Person search</h2>
<form action="/" method="get">
<input name="q" value="{query}" placeholder="a woman in a red coat carrying a black bag" autofocus>
<input name="k" type="number" min="1" max="{max_k}" value="{k}">
<button type="submit">Search</button>
</form>
<p class="note">{count} images indexed under {root} by run {run}</p>
{body}
</body></html>
"""


class SearchServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, searcher: Searcher, address: tuple[str, int], default_k: int = 10):
        super().__init__(address, SearchHandler)
        self.searcher, self.default_k = searcher, default_k
        self.lock = threading.Lock()

    def search(self, query: str, k: int) -> tuple[list[Hit], dict[str, float]]:
        with self.lock:
            hits = self.searcher.search([query], k, strict=True)[0]
            return hits, dict(self.searcher.timing)


class SearchHandler(BaseHTTPRequestHandler):
    server: SearchServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        params = parse_qs(url.query, keep_blank_values=True)
        image = IMAGE_ROUTE.fullmatch(url.path)
        if url.path == "/api/search":
            self._api(params)
        elif url.path == "/":
            self._page(params)
        elif image:
            self._image(int(image.group(1)))
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def _query(self, params: dict[str, list[str]]) -> tuple[str, int]:
        query = params.get("q", [""])[0]
        k = params.get("k", [str(self.server.default_k)])[0]
        if not k.isdigit() or not 1 <= int(k) <= MAX_K:
            raise QueryError(f"k must be a whole number from 1 to {MAX_K}, not '{k[:20]}'")
        return query, int(k)

    def _api(self, params: dict[str, list[str]]) -> None:
        try:
            query, k = self._query(params)
            hits, timing = self.server.search(query, k)
        except QueryError as err:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            return
        results = [{"rank": h.rank, "score": h.score, "path": h.path, "url": f"/image/{h.row}"} for h in hits]
        self._send_json(HTTPStatus.OK, {"query": query, "k": k, "results": results, "timing_ms": timing})

    def _page(self, params: dict[str, list[str]]) -> None:
        status, body, query, k = HTTPStatus.OK, "", params.get("q", [""])[0], self.server.default_k
        if "q" in params:
            try:
                query, k = self._query(params)
                hits, timing = self.server.search(query, k)
                body = _results_html(hits, self.server.searcher.index.root, timing["total"])
            except QueryError as err:
                status, body = HTTPStatus.BAD_REQUEST, f'<p class="error">{html.escape(str(err))}</p>'
        index = self.server.searcher.index
        page = PAGE.format(query=html.escape(query, quote=True), k=k, max_k=MAX_K, count=len(index),
                           root=html.escape(str(index.root)), run=html.escape(index.run.name), body=body)
        self._send(status, page.encode(), "text/html; charset=utf-8")

    def _image(self, row: int) -> None:
        index = self.server.searcher.index
        if row >= len(index):
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        path = index.path(row)
        try:
            data = path.read_bytes()
        except OSError:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "image no longer readable"})
            return
        self._send(HTTPStatus.OK, data, mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                   cache="max-age=3600")

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _send(self, status: HTTPStatus, data: bytes, content_type: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("%s - %s", self.address_string(), format % args)


def _results_html(hits: list[Hit], root: Path, milliseconds: float) -> str:
    figures = []
    for hit in hits:
        name = Path(hit.path).relative_to(root).as_posix()
        figures.append(f'<figure><img src="/image/{hit.row}" alt="{html.escape(name, quote=True)}">'
                       f"<figcaption>{hit.rank}. {hit.score:.3f}<br>{html.escape(name)}</figcaption></figure>")
    return (f'<p class="note">top {len(hits)} in {milliseconds:.0f} ms</p>'
            f'<div class="grid">{"".join(figures)}</div>')


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 7860, default_k: int = 10) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = SearchServer(searcher, (host, port), default_k)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {len(searcher.index)} images on http://{shown}:{server.server_port}/ "
          f"(API: /api/search?q={quote('a man in a black jacket')}&k=10); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
