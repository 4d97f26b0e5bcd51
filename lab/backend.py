#!/usr/bin/env python3
"""lab/backend.py - one lab backend: a small HTTP/1.1 server whose behaviour changes at run time.

    python3 lab/backend.py --name b1 --port 27101 --ctl-port 27201 [--settings JSON]

Service port (what the gateway proxies to): answers `200` after a latency drawn from the current
distribution, or fails the way it is told to.  Every answer carries `X-Backend: <name>`.

Control port (for the lab, never proxied):
    GET  /state                 settings and counters as JSON
    POST /set?key=value&...     change settings (GET works too); `reset=1` first restores the start settings
Settings:
    latency_ms     median service time (ms)                         default 10
    jitter         uniform spread around it, fraction (0.2 = +-20 %)  default 0.2
    tail_rate      share of requests that get tail_ms added           default 0
    tail_ms        extra latency of those                             default 0
    error_rate     share of requests that fail with error_kind        default 0
    error_kind     500 | 503 | hang | reset | refuse                  default 500
                   hang: read the request, never answer (until the peer closes)
                   reset: close the connection without an answer
                   refuse: stop listening and close every connection (error_rate ignored): connection refused
    max_concurrency  requests served at once; 0 = unlimited           default 0
    queue_limit    requests waiting beyond max_concurrency; more get 503; 0 = unlimited   default 0
    report         1: every 200 carries its load, `endpoint-load-metrics: TEXT cpu_utilization=U` (ORCA),
                   U = requests in service or queued after this one / max_concurrency       default 0
Counters: requests (accepted on the service port), by outcome (ok, http_500, http_503, hang, reset,
overflow_503), connections, in-flight, queued, max_queued.

Python 3 standard library only; listens on 127.0.0.1 only.  Exits on SIGTERM/SIGINT, and when its
parent dies (PR_SET_PDEATHSIG, set by lab/lab).
"""

import argparse
import asyncio
import collections
import json
import random
import signal
import sys
import time
import urllib.parse

HOST = "127.0.0.1"
DEFAULTS = {
    "latency_ms": 10.0,
    "jitter": 0.2,
    "tail_rate": 0.0,
    "tail_ms": 0.0,
    "error_rate": 0.0,
    "error_kind": "500",
    "max_concurrency": 0,
    "queue_limit": 0,
    "report": 0,
}
KINDS = ("500", "503", "hang", "reset", "refuse")
RANGES = {
    "latency_ms": (0.0, 600000.0),
    "jitter": (0.0, 1.0),
    "tail_rate": (0.0, 1.0),
    "tail_ms": (0.0, 600000.0),
    "error_rate": (0.0, 1.0),
    "max_concurrency": (0, 100000),
    "queue_limit": (0, 1000000),
    "report": (0, 1),
}


def validate(settings):
    """A checked copy of settings (raises ValueError naming the key)."""
    out = {}
    for k, v in settings.items():
        if k == "error_kind":
            v = str(v)
            if v not in KINDS:
                raise ValueError("error_kind must be one of %s (got %r)" % ("|".join(KINDS), v))
            out[k] = v
        elif k in RANGES:
            lo, hi = RANGES[k]
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise ValueError("%s must be a number (got %r)" % (k, v))
            if not lo <= x <= hi:
                raise ValueError("%s must be between %s and %s (got %r)" % (k, lo, hi, v))
            out[k] = int(x) if isinstance(lo, int) else x
        else:
            raise ValueError("unknown setting %r (valid: %s)" % (k, ", ".join(sorted(DEFAULTS))))
    return out


def response(status, name, body=b"", close=False, extra=""):
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error",
              503: "Service Unavailable"}.get(status, "X")
    head = "HTTP/1.1 %d %s\r\nX-Backend: %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s%s\r\n" % (
        status, reason, name, len(body), extra, "Connection: close\r\n" if close else "")
    return head.encode() + body


class Backend:
    def __init__(self, name, port, start_settings):
        self.name = name
        self.port = port
        self.start = dict(DEFAULTS)
        self.start.update(start_settings)
        self.s = dict(self.start)
        self.counts = collections.Counter()
        self.inflight = 0
        self.queue = collections.deque()
        self.max_queued = 0
        self.server = None
        self.conns = set()
        self.bodies = {st: response(st, name, b"%d\n" % st) for st in (200, 500, 503)}
        self.rng = random.Random()

    # -- settings ------------------------------------------------------------------------------
    async def apply(self, changes, reset=False):
        if reset:
            self.s = dict(self.start)
        self.s.update(changes)
        if self.s["error_kind"] == "refuse" and self.s["error_rate"] > 0:
            await self.stop_listening()
        else:
            await self.listen()

    async def listen(self):
        if self.server is None:
            loop = asyncio.get_running_loop()
            self.server = await loop.create_server(lambda: Service(self), HOST, self.port,
                                                   reuse_address=True, backlog=4096)

    async def stop_listening(self):
        if self.server is not None:
            self.server.close()
            self.server = None
            for c in list(self.conns):
                c.transport.abort()

    # -- serving -------------------------------------------------------------------------------
    def draw_latency(self):
        s = self.s
        ms = s["latency_ms"]
        if s["jitter"]:
            ms *= 1.0 + s["jitter"] * (2.0 * self.rng.random() - 1.0)
        if s["tail_rate"] and self.rng.random() < s["tail_rate"]:
            ms += s["tail_ms"]
        return ms / 1000.0

    def request(self, conn):
        """One request read on a service connection."""
        self.counts["requests"] += 1
        s = self.s
        if s["error_rate"] and self.rng.random() < s["error_rate"]:
            kind = s["error_kind"]
            if kind == "hang":
                self.counts["hang"] += 1
                return                         # never answered; the peer gives up and closes
            if kind in ("reset", "refuse"):
                self.counts["reset"] += 1
                conn.transport.abort()
                return
            status = int(kind)
            self.counts["http_%d" % status] += 1
            conn.reply(self.bodies[status])     # fails fast, like a crashing handler
            return
        mc = s["max_concurrency"]
        if mc and self.inflight >= mc:
            ql = s["queue_limit"]
            if ql and len(self.queue) >= ql:
                self.counts["overflow_503"] += 1
                conn.reply(self.bodies[503])
                return
            self.queue.append(conn)
            if len(self.queue) > self.max_queued:
                self.max_queued = len(self.queue)
            return
        self.serve(conn)

    def serve(self, conn):
        self.inflight += 1
        asyncio.get_running_loop().call_later(self.draw_latency(), self.done, conn)

    def done(self, conn):
        self.inflight -= 1
        mc = self.s["max_concurrency"]
        if not conn.closed:
            self.counts["ok"] += 1
            if self.s["report"] and mc:
                extra = "endpoint-load-metrics: TEXT cpu_utilization=%.3f\r\n" % ((self.inflight + len(self.queue)) / mc)
                conn.reply(response(200, self.name, b"200\n", extra=extra))
            else:
                conn.reply(self.bodies[200])
        while self.queue and (not mc or self.inflight < mc):
            nxt = self.queue.popleft()
            if not nxt.closed:
                self.serve(nxt)

    def state(self):
        return {
            "name": self.name, "port": self.port, "listening": self.server is not None,
            "settings": self.s, "counts": dict(self.counts), "inflight": self.inflight,
            "queued": len(self.queue), "max_queued": self.max_queued, "connections": len(self.conns),
            "time": time.monotonic(),
        }


class Service(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection on the service port (requests without bodies)."""

    def __init__(self, backend):
        self.b = backend
        self.buf = b""
        self.closed = False
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.b.conns.add(self)
        self.b.counts["connections"] += 1

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.transport.abort()
                return
            self.buf = self.buf[end + 4:]
            self.b.request(self)
            if self.closed:
                return

    def reply(self, data):
        if not self.closed:
            self.transport.write(data)

    def connection_lost(self, exc):
        self.closed = True
        self.b.conns.discard(self)


class Control(asyncio.Protocol):
    """The control port: one request per connection, answered as JSON."""

    def __init__(self, backend):
        self.b = backend
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        line = self.buf.split(b"\r\n", 1)[0].decode("latin-1")
        asyncio.ensure_future(self.handle(line))

    async def handle(self, line):
        try:
            method, target, _ = line.split(" ", 2)
            url = urllib.parse.urlsplit(target)
            args = dict(urllib.parse.parse_qsl(url.query))
            if url.path == "/state":
                status, body = 200, self.b.state()
            elif url.path == "/set":
                reset = args.pop("reset", "0") not in ("0", "", "false")
                changes = validate(args)
                await self.b.apply(changes, reset)
                status, body = 200, self.b.state()
            else:
                status, body = 404, {"error": "unknown path %s (use /state or /set)" % url.path}
        except ValueError as e:
            status, body = 400, {"error": str(e)}
        except OSError as e:
            status, body = 500, {"error": "listen: %s" % e}
        self.transport.write(response(status, self.b.name, json.dumps(body).encode() + b"\n", close=True))
        self.transport.close()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ctl-port", type=int, required=True)
    ap.add_argument("--settings", default="{}", help="start settings, JSON")
    ap.add_argument("--run-dir", help="ignored; names the lab run in ps")
    a = ap.parse_args()
    b = Backend(a.name, a.port, validate(json.loads(a.settings)))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    ctl = await loop.create_server(lambda: Control(b), HOST, a.ctl_port, reuse_address=True)
    await b.apply({})
    print("backend %s listening on %s:%d (control %d)" % (a.name, HOST, a.port, a.ctl_port), flush=True)
    await stop.wait()
    ctl.close()
    await b.stop_listening()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except (OSError, ValueError) as e:
        print("backend: %s" % e, file=sys.stderr)
        sys.exit(1)
