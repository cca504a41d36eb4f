"""The server's HTTP side (--metrics-port): Prometheus /metrics, the labeling and
leaderboard pages, and the small JSON API those pages call.

A stdlib threaded HTTP server in a background thread (no extra dependency; the pages are
plain files, no build step). JSON requests and replies are the Feedback protos in their
standard JSON mapping; each runs the Feedback servicer's own code on the server's event
loop, so the page and a gRPC client get the same validation, statuses and store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rlhfkit.server.errors import REQUEST_ERRORS, http_status_for
from rlhfkit.v1 import feedback_pb2 as fb_pb

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PAGES = {"/": "label.html", "/label": "label.html", "/leaderboard": "leaderboard.html"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
# Drawn when the server was given no --feedback-prompts file. A file's line is {"prompt": TEXT}
# or, TRL's conversational prompt, {"prompt": [{"role": ..., "content": ...}, ...]}.
DEFAULT_PROMPTS = ["the cat", "Write a haiku about the sea.", "Explain what a reward model is, in one sentence.",
                   "count the words: the quick brown fox\nanswer:", "Give three tips for writing clear code."]
# JSON route -> (request message, Feedback servicer method)
API = {"/api/comparisons": (fb_pb.CreateComparisonRequest, "create_comparison_core"),
       "/api/votes": (fb_pb.SubmitVoteRequest, "submit_vote_core"),
       "/api/leaderboard": (fb_pb.GetLeaderboardRequest, "leaderboard_core")}


class HttpSide:
    def __init__(self, config, metrics, feedback, registry, loop: asyncio.AbstractEventLoop,
                 prompts: list[str] | None = None, tokens=None):
        host, port = config.host, config.metrics_port
        side = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                side.handle(self, "GET")

            def do_POST(self):
                side.handle(self, "POST")

            def log_message(self, fmt, *args):  # the access log goes to debug, not stderr
                log.debug("%s " + fmt, self.address_string(), *args)

        self.metrics, self.feedback, self.registry, self.loop = metrics, feedback, registry, loop
        self.prompts = [self.drawable(p) for p in prompts or DEFAULT_PROMPTS]
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_port
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rlhfkit-http", daemon=True)
        self._thread.start()

    @staticmethod
    def drawable(prompt) -> dict:
        """What GET /api/prompt answers for one prompt (checked by app.read_prompts): {"prompt":
        text} or {"messages": [...]}, the fields of CreateComparisonRequest the page then sends."""
        return {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}

    def shutdown(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h: BaseHTTPRequestHandler, method: str):
        path = h.path.split("?", 1)[0]
        try:
            if method == "GET" and path == "/metrics":
                return self.reply(h, 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
            if method == "GET" and (path in PAGES or path.startswith("/static/")):
                name = PAGES.get(path) or path.removeprefix("/static/")
                files = {p.name: p for p in STATIC.iterdir()}  # only files that are there: no path tricks
                if name not in files:
                    return self.error(h, 404, "NOT_FOUND", f"no page {path}")
                return self.reply(h, 200, files[name].read_bytes(), CONTENT_TYPES.get(files[name].suffix, "text/plain"))
            if method == "GET" and path == "/api/prompt":
                return self.json(h, 200, random.choice(self.prompts))
            if method == "GET" and path == "/api/models":
                models, roles, _ = self.registry.snapshot()
                return self.json(h, 200, {"models": sorted(n for n, m in models.items() if m.kind == "policy"),
                                          "roles": roles})
            if path in API and (method == "POST" or path == "/api/leaderboard"):
                return self.call(h, *API[path])
            return self.error(h, 404, "NOT_FOUND", f"no route {method} {path}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def call(self, h, message_type, method: str):
        try:
            length = int(h.headers.get("Content-Length") or 0)
            body = json.loads(h.rfile.read(length) or b"{}") if length else {}
            request = ParseDict(body, message_type())
        except (ValueError, ParseError) as e:
            return self.error(h, 400, "INVALID_ARGUMENT", f"request body: {e}")
        future = asyncio.run_coroutine_threadsafe(getattr(self.feedback, method)(request), self.loop)
        try:
            response = future.result(timeout=600)
        except REQUEST_ERRORS as e:
            status, code = http_status_for(e)
            self.metrics.rpc_errors.labels(f"http:{method.removesuffix('_core')}", code).inc()
            return self.error(h, status, code, str(e))
        return self.json(h, 200, MessageToDict(response, preserving_proto_field_name=True,
                                               always_print_fields_with_no_presence=True))

    def json(self, h, status: int, obj):
        self.reply(h, status, json.dumps(obj).encode(), "application/json")

    def error(self, h, status: int, code: str, message: str):
        self.json(h, status, {"code": code, "error": message})

    @staticmethod
    def reply(h, status: int, body: bytes, content_type: str):
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Cache-Control", "no-store")
        h.end_headers()
        h.wfile.write(body)
