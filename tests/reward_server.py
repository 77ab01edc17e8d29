"""A real HTTP reward server for the remote-reward tests: ``python -m tests.reward_server PORT``, on 127.0.0.1.

Routes (all JSON):
- ``POST /score``: ``{"completions": [...], "solution": [...]}`` -> ``{"rewards": [1.0 if the completion equals
  the solution (case-insensitive) else 0.0]}``, after a short pause (so concurrent requests overlap);
- ``POST /flaky``: like /score, but the first two requests are answered 503;
- ``POST /slow``: answers after 3 s (for timeouts);
- ``GET /v1/models`` and ``POST /v1/chat/completions``: an OpenAI-compatible judge that answers "yes" when the
  ``Answer:`` line of the prompt is one to three words, else "no";
- ``GET /stats``: requests served per route and the most chat requests that were in flight at once.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATS = {"requests": {}, "in_flight": 0, "max_in_flight": 0}
LOCK = threading.Lock()


def _score(body: dict) -> dict:
    sols = body.get("solution") or [""] * len(body["completions"])
    return {"rewards": [float(c.strip().lower() == str(s).strip().lower()) for c, s in zip(body["completions"], sols)]}


def _judge(body: dict) -> dict:
    text = body["messages"][-1]["content"]
    m = re.search(r"^Answer: (.*)$", text, re.M)
    words = m.group(1).split() if m else []
    verdict = "yes" if 1 <= len(words) <= 3 else "no"
    return {"id": "cmpl-1", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": verdict}}]}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):   # quiet
        pass

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _count(self) -> int:
        with LOCK:
            STATS["requests"][self.path] = STATS["requests"].get(self.path, 0) + 1
            return STATS["requests"][self.path]

    def do_GET(self):
        self._count()
        if self.path == "/stats":
            with LOCK:
                return self._send(200, STATS)
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "tiny-judge", "object": "model"}]})
        self._send(404, {"error": "not found"})

    def do_POST(self):
        n = self._count()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/score":
            time.sleep(0.05)
            return self._send(200, _score(body))
        if self.path == "/flaky":
            return self._send(503, {"error": "warming up"}) if n <= 2 else self._send(200, _score(body))
        if self.path == "/slow":
            time.sleep(3)
            return self._send(200, _score(body))
        if self.path == "/v1/chat/completions":
            with LOCK:
                STATS["in_flight"] += 1
                STATS["max_in_flight"] = max(STATS["max_in_flight"], STATS["in_flight"])
            try:
                time.sleep(0.05)
                return self._send(200, _judge(body))
            finally:
                with LOCK:
                    STATS["in_flight"] -= 1
        self._send(404, {"error": "not found"})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("serving", flush=True)
    server.serve_forever()
