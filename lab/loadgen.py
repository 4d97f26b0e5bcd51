#!/usr/bin/env python3
"""lab/loadgen.py - the lab's HTTP load generator: open loop (fixed rate) or closed loop.

    python3 lab/loadgen.py SPEC.json

SPEC (written by lab/lab):
    host, port, path          the gateway
    t0                        time.monotonic() value of second 0 (shared with lab/lab, same clock)
    segments                  [{"start": s, "end": e, "mode": "open", "rate_from": r0, "rate_to": r1}
                               | {"start": s, "end": e, "mode": "closed", "concurrency": c}, ...]
                              seconds from t0; negative starts are warm-up (sent, not recorded)
    timeout                   seconds a request may take before it counts as a client timeout
    max_conns                 connections the open loop may open (beyond them requests wait, and
                              the wait counts in their latency)
    out                       where to write the results (JSON)

Open loop: every request has an intended send time (evenly spaced at the current rate; a linear ramp
between rate_from and rate_to).  Its latency is measured FROM THAT INTENDED TIME, so a slow gateway
cannot hide its slowness by slowing the sender down (no coordinated omission, as wrk2).
Closed loop: `concurrency` clients each send the next request when the previous answer arrived.

Per request it records: intended time (s from t0), latency (s), HTTP status (or -1 timeout, -2 connect
error, -3 connection closed without an answer), and the backend named by the X-Backend header.

Python 3 standard library only.
"""

import asyncio
import collections
import json
import resource
import signal
import sys
import time

mono = time.monotonic

TIMEOUT, CONNECT_ERROR, CLOSED = -1, -2, -3


def open_loop_times(seg):
    """Intended send times of one open-loop segment (rate varies linearly from rate_from to rate_to)."""
    s, e = float(seg["start"]), float(seg["end"])
    r0, r1 = float(seg["rate_from"]), float(seg["rate_to"])
    out = []
    span = e - s
    if span <= 0:
        return out
    t = s
    while t < e:
        r = r0 + (r1 - r0) * (t - s) / span
        if r <= 0.001:  # no load: jump ahead
            t += 0.01
            continue
        out.append(t)
        # midpoint rule: the rate half an interval later, so ramps are followed closely
        step = 1.0 / r
        rm = r0 + (r1 - r0) * min(span, t + step / 2 - s) / span
        t += 1.0 / max(rm, 0.001)
    return out


class Gen:
    def __init__(self, spec):
        self.host = spec["host"]
        self.port = int(spec["port"])
        self.t0 = float(spec["t0"])
        self.timeout = float(spec.get("timeout", 5.0))
        self.max_conns = int(spec.get("max_conns", 2000))
        self.request = ("GET %s HTTP/1.1\r\nHost: lab\r\nUser-Agent: lab-loadgen\r\n\r\n"
                        % spec.get("path", "/")).encode()
        self.idle = []
        self.busy = set()
        self.nconns = 0          # open + connecting
        self.connecting = 0
        self.pending = collections.deque()  # intended times waiting for a connection
        self.backends = {}
        # results (recorded only for t >= 0)
        self.r_t, self.r_lat, self.r_st, self.r_be = [], [], [], []
        self.warm_done = 0
        self.max_pending = 0
        self.peak_conns = 0
        self.connect_errors = 0

    # -- results -------------------------------------------------------------------------------
    def record(self, t, status, backend, now=None):
        if t < 0:
            self.warm_done += 1
            return
        if now is None:
            now = mono()
        be = -1
        if backend is not None:
            be = self.backends.get(backend)
            if be is None:
                be = self.backends[backend] = len(self.backends)
        self.r_t.append(t)
        self.r_lat.append(now - self.t0 - t)
        self.r_st.append(status)
        self.r_be.append(be)

    # -- connections ---------------------------------------------------------------------------
    def pump(self):
        while self.pending and self.idle:
            self.idle.pop().send(self.pending.popleft())
        want = len(self.pending) - self.connecting
        while want > 0 and self.nconns < self.max_conns:
            self.open_conn()
            want -= 1
        if len(self.pending) > self.max_pending:
            self.max_pending = len(self.pending)

    def open_conn(self):
        self.nconns += 1
        self.connecting += 1
        self.peak_conns = max(self.peak_conns, self.nconns)
        asyncio.ensure_future(self._connect())

    async def _connect(self):
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Conn(self), self.host, self.port)
        except OSError:
            self.connecting -= 1
            self.nconns -= 1
            self.connect_errors += 1
            if self.pending:  # the oldest waiting request fails; the others retry with new connections
                self.record(self.pending.popleft(), CONNECT_ERROR, None)
            await asyncio.sleep(0.01)
            self.pump()

    def conn_ready(self, conn):
        self.connecting -= 1
        self.free(conn)

    def free(self, conn):
        self.busy.discard(conn)
        if self.pending:
            conn.send(self.pending.popleft())
        else:
            self.idle.append(conn)

    def conn_gone(self, conn):
        self.nconns -= 1
        self.busy.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if self.pending:
            self.pump()

    async def sweeper(self):
        """Times out requests (sent or still waiting for a connection) older than `timeout`."""
        while True:
            await asyncio.sleep(0.1)
            now = mono() - self.t0
            limit = now - self.timeout
            for c in [c for c in self.busy if c.t is not None and c.t < limit]:
                t = c.t
                c.t = None
                self.record(t, TIMEOUT, None)
                c.transport.abort()
            while self.pending and self.pending[0] < limit:
                self.record(self.pending.popleft(), TIMEOUT, None)

    # -- load ----------------------------------------------------------------------------------
    async def open_loop(self, times):
        t0 = self.t0
        i, n = 0, len(times)
        while i < n:
            now = mono() - t0
            if times[i] > now:
                await asyncio.sleep(times[i] - now)
                now = mono() - t0
            while i < n and times[i] <= now:
                self.pending.append(times[i])
                i += 1
            self.pump()

    async def closed_client(self, start, end):
        loop = asyncio.get_running_loop()
        now = mono() - self.t0
        if start > now:
            await asyncio.sleep(start - now)
        conn = None
        while True:
            t = mono() - self.t0
            if t >= end:
                break
            if conn is None or conn.dead:
                try:
                    _, conn = await loop.create_connection(lambda: Conn(self, True), self.host, self.port)
                except OSError:
                    self.record(t, CONNECT_ERROR, None)
                    await asyncio.sleep(0.01)
                    conn = None
                    continue
                self.nconns += 1
                self.peak_conns = max(self.peak_conns, self.nconns)
            fut = loop.create_future()
            conn.waiter = fut
            conn.send(t)
            await fut
        if conn is not None and not conn.dead:
            conn.transport.close()

    async def run(self, segments):
        sweeper = asyncio.ensure_future(self.sweeper())
        tasks = []
        times = []
        for seg in segments:
            if seg["mode"] == "open":
                times.extend(open_loop_times(seg))
            else:
                for _ in range(int(seg["concurrency"])):
                    tasks.append(asyncio.ensure_future(self.closed_client(seg["start"], seg["end"])))
        times.sort()
        if times:
            tasks.append(asyncio.ensure_future(self.open_loop(times)))
        self.scheduled = len(times)
        await asyncio.gather(*tasks)
        # let the last requests finish (or time out)
        deadline = mono() + self.timeout + 0.5
        while (self.busy or self.pending) and mono() < deadline:
            await asyncio.sleep(0.05)
        sweeper.cancel()
        for c in list(self.busy) + self.idle:
            if c.t is not None:
                self.record(c.t, TIMEOUT, None)
                c.t = None
            c.transport.abort()


class Conn(asyncio.Protocol):
    __slots__ = ("g", "transport", "buf", "t", "dead", "waiter", "closed_loop")

    def __init__(self, gen, closed_loop=False):
        self.g = gen
        self.transport = None
        self.buf = b""
        self.t = None          # intended time of the request in flight
        self.dead = False
        self.waiter = None     # closed loop: future resolved when the answer is recorded
        self.closed_loop = closed_loop

    def connection_made(self, transport):
        self.transport = transport
        if not self.closed_loop:
            self.g.conn_ready(self)

    def send(self, t):
        self.t = t
        self.g.busy.add(self)
        self.transport.write(self.g.request)

    def data_received(self, data):
        buf = self.buf + data
        while True:
            he = buf.find(b"\r\n\r\n")
            if he < 0:
                self.buf = buf
                return
            head = buf[:he]
            body_start = he + 4
            try:
                status = int(head[9:12])
            except ValueError:
                status = 0
            lower = head.lower()
            clen = None
            backend = None
            close = False
            for line in lower.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k == b"content-length":
                    clen = int(v)
                elif k == b"x-backend":
                    backend = v.strip().decode()
                elif k == b"connection" and b"close" in v:
                    close = True
                elif k == b"transfer-encoding" and b"chunked" in v:
                    clen = -1
            if clen is None:
                clen = 0
            if clen >= 0:
                end = body_start + clen
                if len(buf) < end:
                    self.buf = buf
                    return
            else:
                z = buf.find(b"\r\n0\r\n\r\n", body_start - 2)
                if z < 0:
                    self.buf = buf
                    return
                end = z + 7
            buf = buf[end:]
            self.complete(status, backend, close)
            if close or self.dead:
                return

    def complete(self, status, backend, close):
        t = self.t
        self.t = None
        if t is not None:
            self.g.record(t, status, backend)
        if close:
            self.transport.close()
            return
        w = self.waiter
        if w is not None:
            self.waiter = None
            self.g.busy.discard(self)
            w.set_result(True)
        else:
            self.g.free(self)

    def connection_lost(self, exc):
        self.dead = True
        if self.t is not None:
            self.g.record(self.t, CLOSED, None)
            self.t = None
        if self.closed_loop:
            self.g.nconns -= 1
            self.g.busy.discard(self)
            w = self.waiter
            if w is not None:
                self.waiter = None
                w.set_result(False)
            return
        self.g.conn_gone(self)


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, int(spec.get("max_conns", 2000)) + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    gen = Gen(spec)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main_task = loop.create_task(gen.run(spec["segments"]))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    cpu0 = time.process_time()
    try:
        loop.run_until_complete(main_task)
        interrupted = False
    except asyncio.CancelledError:
        interrupted = True
    cpu = time.process_time() - cpu0
    names = [None] * len(gen.backends)
    for k, v in gen.backends.items():
        names[v] = k
    out = {
        "t": [round(x, 6) for x in gen.r_t],
        "lat": [round(x, 6) for x in gen.r_lat],
        "st": gen.r_st,
        "be": gen.r_be,
        "backends": names,
        "scheduled": getattr(gen, "scheduled", 0),
        "warmup_requests": gen.warm_done,
        "peak_conns": gen.peak_conns,
        "max_pending": gen.max_pending,
        "connect_errors": gen.connect_errors,
        "cpu_seconds": round(cpu, 3),
        "interrupted": interrupted,
    }
    with open(spec["out"], "w") as f:
        json.dump(out, f, separators=(",", ":"))
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
