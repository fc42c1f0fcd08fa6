"""`study serve`: the task pages on localhost, answers appended to ``answers.csv``.

For lab studies without a crowd platform. Bound to 127.0.0.1 only (the pages are not meant
for the network), and only the pages and faces are served: the key, the manifest and the
answers stay private to the folder.
"""

from __future__ import annotations

import csv
import html
import os
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from rafdata.study.keyfile import ANSWER_COLUMNS, ANSWERS_FILE, CHOICES, QUESTIONS, read_manifest

HOST = "127.0.0.1"
# What a worker may fetch: the index, item pages, face images. Nothing else (never key.csv).
_PUBLIC = re.compile(r"^/(index\.html|items/[0-9a-f]+\.html|images/t[0-9]+\.png)$")
_TYPES = {".html": "text/html; charset=utf-8", ".png": "image/png"}


class AnswerBook:
    """answers.csv of one study: appended under a lock, one answer per worker and item."""

    def __init__(self, folder: Path, items: list[str]):
        self.path = folder / ANSWERS_FILE
        self.items = set(items)
        self.order = list(items)
        self.lock = threading.Lock()
        self.seen: set[tuple[str, str]] = set()
        if self.path.exists():  # a restarted server keeps refusing repeats
            with open(self.path, newline="") as f:
                self.seen = {(r["worker"], r["item"]) for r in csv.DictReader(f)}

    def record(self, answer: dict[str, str]) -> str | None:
        """Append one answer; the problem as a sentence if it is refused."""
        if answer["item"] not in self.items:
            return "unknown item"
        if not answer["worker"] or len(answer["worker"]) > 100:
            return "a worker id (at most 100 characters) is needed"
        if any(answer[q] not in CHOICES for q in QUESTIONS):
            return "answer both questions"
        with self.lock:
            if (answer["worker"], answer["item"]) in self.seen:
                return "this worker already answered this item"
            new = not self.path.exists()
            with open(self.path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(ANSWER_COLUMNS)
                w.writerow([answer[c] for c in ANSWER_COLUMNS])
                f.flush()
                os.fsync(f.fileno())  # an answer acknowledged to the worker is on disk
            self.seen.add((answer["worker"], answer["item"]))
        return None


def _handler(folder: Path, book: AnswerBook) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's name
            pass  # quiet: answers.csv is the record

        def _send(self, status: int, body: bytes, ctype: str = _TYPES[".html"]) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _page(self, status: int, text: str, next_item: str | None = None,
                  worker: str = "") -> None:
            href = f"/items/{next_item}.html?{urlencode({'worker': worker})}"
            nxt = (f'<p><a id="next" href="{html.escape(href)}">Next item</a></p>'
                   if next_item else "")
            body = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>'
                    f'Study</title></head><body><p id="message">{html.escape(text)}</p>{nxt}'
                    '<p><a href="/index.html">Back to the list</a></p></body></html>')
            self._send(status, body.encode())

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = "/index.html" if self.path in ("/", "") else self.path.split("?")[0]
            if not _PUBLIC.match(path) or not (folder / path[1:]).is_file():
                return self._page(HTTPStatus.NOT_FOUND, "not found")
            self._send(HTTPStatus.OK, (folder / path[1:]).read_bytes(),
                       _TYPES[Path(path).suffix])

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/answer":
                return self._page(HTTPStatus.NOT_FOUND, "not found")
            n = int(self.headers.get("Content-Length") or 0)
            if n > 10_000:
                return self._page(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "answer too large")
            form = parse_qs(self.rfile.read(n).decode("utf-8", "replace"))
            answer = {c: form.get(c, [""])[0].strip() for c in ANSWER_COLUMNS}
            problem = book.record(answer)
            if problem:
                return self._page(HTTPStatus.BAD_REQUEST, f"not recorded: {problem}")
            i = book.order.index(answer["item"])  # the batch's order: go on to the next item
            nxt = book.order[i + 1] if i + 1 < len(book.order) else None
            self._page(HTTPStatus.OK, "Thank you, your answer was recorded.", nxt,
                       answer["worker"])

    return Handler


def make_server(folder: str | Path, port: int = 0) -> ThreadingHTTPServer:
    """A server for study ``folder`` on 127.0.0.1:``port`` (0: any free port), not started;
    call ``serve_forever`` (``server_address`` has the port)."""
    folder = Path(folder)
    manifest = read_manifest(folder)  # a folder that is not a study fails here, in one line
    return ThreadingHTTPServer((HOST, port), _handler(folder, AnswerBook(folder,
                                                                         manifest["items"])))
