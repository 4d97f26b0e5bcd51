#!/usr/bin/env python3
"""A strict stand-in for Consul's health HTTP API, for tests (Consul is not packaged by Debian and cannot run here).

Serves plain HTTP on 127.0.0.1 and answers as a Consul agent does, after these references:
  https://developer.hashicorp.com/consul/api-docs/health#list-service-instances-for-service
  https://developer.hashicorp.com/consul/api-docs/features/blocking
  https://developer.hashicorp.com/consul/api-docs/api-structure (authentication, X-Consul-Index)

- GET /v1/health/service/<service> only (other paths 404 with a text body, other methods 405); query parameters
  `index`, `wait`, `tag`, `dc`, `passing`, `stale`, `consistent`, `cached`, `near`, `filter` are known, any other is
  ignored as Consul ignores them; `index` must be an unsigned integer and `wait` a Go duration ("10s", "500ms",
  "1m"), else 400 with Consul's text ("Invalid index", "Invalid wait time"); `wait` is capped at 10 minutes;
  a `dc` other than --dc answers 500 "No path to datacenter".
- ACL: with --token, the request's token (`X-Consul-Token`, or `Authorization: Bearer <token>`) must be it;
  an unknown token answers 403 "ACL not found", none answers 403 "Permission denied" (the anonymous token has no
  rights: default-deny policy).
- Answers a JSON list of {"Node": {...}, "Service": {...}, "Checks": [...]} with `X-Consul-Index` (the service's
  modify index), `X-Consul-KnownLeader: true`, `X-Consul-LastContact: 0`, `Content-Type: application/json`.
  `tag` keeps the instances having that tag; `passing` (any value but "false"/"0") keeps only those whose checks
  all pass (an instance with a warning or critical check is left out, as Consul's `passing` filter does).
- Blocking: with `index` >= the current index, the answer waits until the service changes or `wait` (default 5 min)
  plus a random jitter of up to wait/16 has passed, then answers with the current index (unchanged on timeout).
  The index is the Raft index of the service's last change; it only grows (but see --index-from).

Test controls (not Consul's API, under /__test/, no ACL):
  PUT  /__test/service/<name>   body: a JSON list of instances {"id","node","address","service_address","port",
                                "tags","weights":{"Passing","Warning"},"status": passing|warning|critical}; replaces
                                the service's instances and bumps the index (the instances' order is kept)
  POST /__test/fault            body: {"mode": "slow"|"malformed"|"no_index"|"zero_index"|"error500"|"none",
                                "count": n, "delay": s}: the next n answers of the health endpoint are delayed by
                                `delay` s / are not JSON / lack X-Consul-Index / carry index 0 / are 500s
  GET  /__test/requests         every health request seen: {t, path, query, token_header, bearer, answer, index}
--state FILE keeps the services and the index in FILE (read at start, written on every change), so that a restart
(the registry going away and coming back) keeps them; --index-from N starts the index at N whatever FILE says (a
server whose index is lower than before: a restored snapshot).

    fake_consul.py --port 8500 --token T --state /tmp/consul.json
"""
import argparse
import json
import os
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

HEALTH = re.compile(r"^/v1/health/service/([^/]+)$")
DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)$")
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
MAX_WAIT = 600


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token")
    ap.add_argument("--dc", default="dc1")
    ap.add_argument("--state")
    ap.add_argument("--index-from", type=int)
    args = ap.parse_args()

    cond = threading.Condition()
    st = {"index": 10, "services": {}}
    if args.state and os.path.exists(args.state):
        with open(args.state) as f:
            st = json.load(f)
    if args.index_from is not None:
        st["index"] = args.index_from
        for s in st["services"].values():
            s["index"] = min(s["index"], args.index_from)
    fault = {"mode": "none", "count": 0, "delay": 0}
    requests = []

    def save():
        if args.state:
            tmp = args.state + ".tmp"
            with open(tmp, "w") as f:
                json.dump(st, f)
            os.replace(tmp, args.state)

    def entry(name, i):
        checks = [{"Node": i["node"], "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
                   "ServiceID": "", "ServiceName": ""},
                  {"Node": i["node"], "CheckID": "service:" + i["id"], "Name": "Service '%s' check" % name,
                   "Status": i.get("status", "passing"), "ServiceID": i["id"], "ServiceName": name}]
        return {"Node": {"ID": "", "Node": i["node"], "Address": i.get("address", "127.0.0.1"),
                         "Datacenter": args.dc, "TaggedAddresses": {}, "Meta": {}},
                "Service": {"ID": i["id"], "Service": name, "Tags": i.get("tags", []),
                            "Address": i.get("service_address", ""), "Port": i["port"],
                            "Weights": i.get("weights", {"Passing": 1, "Warning": 1}), "Meta": {},
                            "EnableTagOverride": False},
                "Checks": checks}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % a))
            sys.stderr.flush()

        def send(self, code, body, ctype="text/plain; charset=utf-8", headers=()):
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self):
            return self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))

        def do_PUT(self):
            m = re.match(r"^/__test/service/([^/]+)$", self.path)
            if not m:
                return self.send(405, "method PUT not allowed")
            instances = json.loads(self.body())
            with cond:
                st["index"] += 1
                st["services"][unquote(m.group(1))] = {"index": st["index"], "instances": instances}
                save()
                cond.notify_all()
            self.send(200, "true")

        def do_POST(self):
            if self.path != "/__test/fault":
                return self.send(405, "method POST not allowed")
            f = json.loads(self.body())
            with cond:
                fault.update({"mode": f["mode"], "count": f.get("count", 1), "delay": f.get("delay", 0)})
            self.send(200, "true")

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path == "/__test/requests":
                with cond:
                    return self.send(200, json.dumps(requests), "application/json")
            m = HEALTH.match(url.path)
            if not m:
                return self.send(404, "404 page not found")
            q = parse_qs(url.query, keep_blank_values=True)
            one = {k: v[-1] for k, v in q.items()}
            auth = self.headers.get("Authorization", "")
            token = self.headers.get("X-Consul-Token") or (auth[7:] if auth.startswith("Bearer ") else None)
            rec = {"t": time.time(), "path": url.path, "query": one, "token_header": "X-Consul-Token" in self.headers,
                   "bearer": auth.startswith("Bearer ")}
            with cond:
                requests.append(rec)

            def answer(code, body, ctype="text/plain; charset=utf-8", headers=()):
                rec["answer"] = code
                self.send(code, body, ctype, headers)

            if args.token is not None and token != args.token:
                return answer(403, "Permission denied" if not token else "ACL not found")
            index = 0
            if "index" in one:
                if not re.match(r"^\d+$", one["index"]):
                    return answer(400, "Invalid index")
                index = int(one["index"])
            wait = 300.0
            if "wait" in one:
                d = DURATION.match(one["wait"])
                if not d:
                    return answer(400, "Invalid wait time")
                wait = min(float(d.group(1)) * UNITS[d.group(2)], MAX_WAIT)
            if one.get("dc", args.dc) != args.dc:
                return answer(500, "No path to datacenter")
            name = unquote(m.group(1))
            with cond:
                mode = fault["mode"] if fault["count"] > 0 else "none"
                if mode != "none":
                    fault["count"] -= 1
                delay = fault["delay"]

                def current():
                    s = st["services"].get(name)
                    return s["index"] if s else st["index"]

                if index > 0 and index >= current():
                    deadline = time.time() + wait + random.uniform(0, wait / 16)
                    while current() <= index and time.time() < deadline:
                        cond.wait(deadline - time.time())
                idx = current()
                svc = st["services"].get(name, {"instances": []})
                out = [entry(name, i) for i in svc["instances"]]
            if "tag" in one:
                out = [e for e in out if one["tag"] in e["Service"]["Tags"]]
            if "passing" in one and one["passing"] not in ("false", "0"):
                out = [e for e in out if all(c["Status"] == "passing" for c in e["Checks"])]
            rec["index"] = idx
            if mode == "slow":
                time.sleep(delay)
            if mode == "error500":
                return answer(500, "rpc error making call: No cluster leader")
            headers = [("X-Consul-Index", str(idx)), ("X-Consul-KnownLeader", "true"), ("X-Consul-LastContact", "0")]
            if mode == "no_index":
                headers = headers[1:]
            if mode == "zero_index":
                headers[0] = ("X-Consul-Index", "0")
            body = json.dumps(out)
            if mode == "malformed":
                body = body[: len(body) // 2] + "<html>proxy error</html>"
            answer(200, body, "application/json", headers)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    sys.stderr.write("listening on 127.0.0.1:%d\n" % args.port)
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
