#!/usr/bin/env python3
"""A strict stand-in for the Kubernetes API server's `scale` subresource, for tests (no real API server can run here).

Serves HTTPS only (certificate and key given), and answers as the API server does, refusing what it would refuse:
- only /apis/apps/v1/namespaces/<ns>/{deployments,statefulsets}/<name>/scale of the objects given with --object;
  anything else 404 (a Status object, as the API server answers);
- `Authorization: Bearer <token>` must match --token exactly, else 401;
- GET needs `Accept` to allow application/json, else 406; answers an autoscaling/v1 Scale;
- PATCH needs `Content-Type: application/merge-patch+json` exactly, else 415; the body must be JSON of exactly
  {"spec": {"replicas": <integer >= 0>}}, else 422; sets the replicas and bumps resourceVersion;
- other methods 405.
--fail-patch N answers 500 to the first N PATCH requests that are otherwise valid (to exercise retries).
Every request is kept (time, method, path, headers that matter, body, answer) and served, without TLS client checks,
as JSON on GET /__test/requests; GET /__test/objects shows the replicas.

EndpointSlices (discovery.k8s.io/v1), list and watch as the API server serves them, after
  https://kubernetes.io/docs/reference/using-api/api-concepts/ (efficient detection of changes, resource versions,
  watch bookmarks, retrieving large results sets in chunks, 410 Gone) and
  https://kubernetes.io/docs/reference/kubernetes-api/service-resources/endpoint-slice-v1/:
- GET /apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices, bearer token checked (401 otherwise);
  `labelSelector` of equality terms (`k=v`, `k==v`, comma-separated; anything else 400 BadRequest);
- a list answers an EndpointSliceList whose metadata.resourceVersion is the store's current version; `limit` pages
  it with a `continue` token, which is refused with 410 Expired once the store has been compacted past it;
- `watch=1` (or true) answers 200 with a chunked stream (Transfer-Encoding: chunked), one JSON event per chunk,
  each ending in a newline: {"type": ADDED|MODIFIED|DELETED, "object": <EndpointSlice>} for every change after the
  request's `resourceVersion` (without one, or "0", ADDED events for every current slice first); a resourceVersion
  older than the oldest kept change gets an ERROR event whose object is a Status with code 410 (reason Expired) and
  the stream ends; `allowWatchBookmarks=true` adds a BOOKMARK event (an object with only metadata.resourceVersion)
  every --bookmark-interval seconds; the stream ends cleanly (zero-length chunk) after `timeoutSeconds` (default
  1800 s, the server's --min-request-timeout);
- resource versions are one counter for the whole store (slices of other services move it too), as etcd's revision.
Test controls (no token): PUT /__test/endpointslices/<ns>/<name> (body: the slice; it is created or replaced, gets a
new resourceVersion and is sent to the watches), DELETE /__test/endpointslices/<ns>/<name>, POST /__test/compact
(a list continue token or a new watch from a version before now answers 410; watches already open go on), POST /__test/token (body: the token now required),
POST /__test/watch-fault {"mode": "cut"|"malformed"|"gone_http"|"slow", "count": n, "delay": s}: the next n watch
events are cut in the middle, connection closed (cut) / are a line that is not JSON (malformed); the next n watch
requests answer HTTP 410 (gone_http) / wait `delay` s before their header (slow, lists too).

    fake_k8s_api.py --port 26430 --cert srv.crt --key srv.key --token T --object deployments/shop/api=2
"""
import argparse
import json
import re
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PATH = re.compile(r"^/apis/apps/v1/namespaces/([a-z0-9.-]+)/(deployments|statefulsets)/([a-z0-9.-]+)/scale$")
SLICES = re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/([a-z0-9.-]+)/endpointslices$")
TERM = re.compile(r"^([a-zA-Z0-9./_-]+)(==|=)([a-zA-Z0-9._-]*)$")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--object", action="append", default=[], help="kind/namespace/name=replicas")
    ap.add_argument("--fail-patch", type=int, default=0)
    ap.add_argument("--bookmark-interval", type=float, default=1.0)
    args = ap.parse_args()
    token = [args.token]

    lock = threading.RLock()
    cond = threading.Condition(lock)
    objects, requests = {}, []
    slices, history, store = {}, [], {"rv": 100, "oldest": 100}
    wfault = {"mode": "none", "count": 0, "delay": 0}
    for spec in args.object:
        key, replicas = spec.split("=")
        objects[tuple(key.split("/"))] = {"replicas": int(replicas), "rv": 1}
    failed = [0]

    def status_obj(code, reason, message):
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                "reason": reason, "code": code}

    def scale_obj(key, o):
        kind, ns, name = key
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": ns, "resourceVersion": str(o["rv"])},
                "spec": {"replicas": o["replicas"]}, "status": {"replicas": o["replicas"]}}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % a))
            sys.stderr.flush()

        def answer(self, code, obj, record=None):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            if record is not None:
                record["answer"] = code
                with lock:
                    requests.append(record)

        def handle_any(self, method):
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
            if method == "GET" and self.path == "/__test/requests":
                with lock:
                    return self.answer(200, requests)
            if method == "GET" and self.path == "/__test/objects":
                with lock:
                    return self.answer(200, {"/".join(k): v["replicas"] for k, v in objects.items()})
            rec = {"t": time.time(), "method": method, "path": self.path, "body": raw.decode("utf-8", "replace"),
                   "authorization": self.headers.get("Authorization"), "accept": self.headers.get("Accept"),
                   "content_type": self.headers.get("Content-Type")}
            if self.path.startswith("/__test/"):
                return self.test_control(method, raw)
            url = urlsplit(self.path)
            es = SLICES.match(url.path)
            if es:
                rec["path"] = url.path
                rec["query"] = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                if self.headers.get("Authorization") != "Bearer " + token[0]:
                    return self.answer(401, status_obj(401, "Unauthorized", "Unauthorized"), rec)
                if method != "GET":
                    return self.answer(405, status_obj(405, "MethodNotAllowed", method + " is not supported"), rec)
                return self.slices(es.group(1), rec["query"], rec)
            m = PATH.match(self.path)
            key = m and (m.group(2), m.group(1), m.group(3))
            if not m or key not in objects:
                return self.answer(404, status_obj(404, "NotFound", "the server could not find the requested resource"), rec)
            if self.headers.get("Authorization") != "Bearer " + token[0]:
                return self.answer(401, status_obj(401, "Unauthorized", "Unauthorized"), rec)
            o = objects[key]
            if method == "GET":
                accept = self.headers.get("Accept", "")
                if "application/json" not in accept and "*/*" not in accept:
                    return self.answer(406, status_obj(406, "NotAcceptable", "only application/json"), rec)
                with lock:
                    return self.answer(200, scale_obj(key, o), rec)
            if method != "PATCH":
                return self.answer(405, status_obj(405, "MethodNotAllowed", method + " is not supported"), rec)
            if self.headers.get("Content-Type") != "application/merge-patch+json":
                return self.answer(415, status_obj(415, "UnsupportedMediaType",
                                                   "the body of the request was in an unknown format"), rec)
            try:
                patch = json.loads(raw)
                ok = (isinstance(patch, dict) and list(patch) == ["spec"] and isinstance(patch["spec"], dict)
                      and list(patch["spec"]) == ["replicas"] and type(patch["spec"]["replicas"]) is int
                      and patch["spec"]["replicas"] >= 0)
            except ValueError:
                ok = False
            if not ok:
                return self.answer(422, status_obj(422, "Invalid", "expected exactly {\"spec\":{\"replicas\":n}}"), rec)
            with lock:
                if failed[0] < args.fail_patch:
                    failed[0] += 1
                    return self.answer(500, status_obj(500, "InternalError", "failing on purpose"), rec)
                o["replicas"] = patch["spec"]["replicas"]
                o["rv"] += 1
                return self.answer(200, scale_obj(key, o), rec)

        def do_GET(self):
            self.handle_any("GET")

        def do_DELETE(self):
            self.handle_any("DELETE")

        def test_control(self, method, raw):
            m = re.match(r"^/__test/endpointslices/([a-z0-9.-]+)/([a-z0-9.-]+)$", self.path)
            with cond:
                if m and method in ("PUT", "DELETE"):
                    key = (m.group(1), m.group(2))
                    if method == "DELETE" and key not in slices:
                        return self.answer(404, status_obj(404, "NotFound", "no such slice"))
                    store["rv"] += 1
                    if method == "PUT":
                        obj = json.loads(raw)
                        obj.setdefault("metadata", {}).update({"name": key[1], "namespace": key[0],
                                                               "resourceVersion": str(store["rv"])})
                        obj["kind"], obj["apiVersion"] = "EndpointSlice", "discovery.k8s.io/v1"
                        kind = "MODIFIED" if key in slices else "ADDED"
                        slices[key] = obj
                    else:
                        obj = json.loads(json.dumps(slices.pop(key)))
                        obj["metadata"]["resourceVersion"] = str(store["rv"])
                        kind = "DELETED"
                    history.append((store["rv"], kind, key[0], obj))
                    cond.notify_all()
                    return self.answer(200, {"resourceVersion": str(store["rv"])})
                if self.path == "/__test/compact" and method == "POST":
                    # watches already open go on from where they are (the API server's watch cache); new requests
                    # for an older version get 410
                    store["oldest"] = store["rv"]
                    return self.answer(200, {"compacted": str(store["rv"])})
                if self.path == "/__test/token" and method == "POST":
                    token[0] = raw.decode().strip()
                    return self.answer(200, {})
                if self.path == "/__test/watch-fault" and method == "POST":
                    f = json.loads(raw)
                    wfault.update({"mode": f["mode"], "count": f.get("count", 1), "delay": f.get("delay", 0)})
                    return self.answer(200, {})
            return self.answer(404, status_obj(404, "NotFound", "no such test control"))

        def slices(self, ns, q, rec):
            sel = {}
            for term in filter(None, q.get("labelSelector", "").split(",")):
                t = TERM.match(term)
                if not t:
                    return self.answer(400, status_obj(400, "BadRequest",
                                                       "unable to parse requirement: " + term), rec)
                sel[t.group(1)] = t.group(3)

            def matches(o_ns, obj):
                labels = obj.get("metadata", {}).get("labels", {})
                return o_ns == ns and all(labels.get(k) == v for k, v in sel.items())

            with cond:
                mode = wfault["mode"] if wfault["count"] > 0 else "none"
                delay = wfault["delay"]
                if mode == "slow" or (q.get("watch") in ("1", "true") and mode == "gone_http"):
                    wfault["count"] -= 1
            if mode == "slow":
                time.sleep(delay)
            if q.get("watch") not in ("1", "true"):
                with cond:
                    items = sorted(((k, o) for k, o in slices.items() if matches(k[0], o)), key=lambda x: x[0])
                    rv = store["rv"]
                    start = 0
                    if q.get("continue"):
                        try:
                            c_rv, start = (int(x) for x in q["continue"].split(":"))
                        except ValueError:
                            return self.answer(400, status_obj(400, "BadRequest", "invalid continue token"), rec)
                        if c_rv < store["oldest"]:
                            return self.answer(410, status_obj(410, "Expired", "The provided continue parameter "
                                                               "is too old to display a consistent list result."), rec)
                        rv = c_rv
                    limit = int(q.get("limit") or 0) or len(items) + 1
                    page = [o for _, o in items[start:start + limit]]
                    md = {"resourceVersion": str(rv)}
                    if start + limit < len(items):
                        md["continue"] = "%d:%d" % (rv, start + limit)
                    return self.answer(200, {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                                             "metadata": md, "items": page}, rec)
            if mode == "gone_http":
                return self.answer(410, status_obj(410, "Gone", "too old resource version"), rec)
            rec["answer"] = 200
            with cond:
                requests.append(rec)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(data):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            deadline = time.time() + float(q.get("timeoutSeconds") or 1800)
            bookmarks = q.get("allowWatchBookmarks") == "true"
            since = q.get("resourceVersion") or "0"
            try:
                with cond:
                    if since == "0":
                        sent = store["rv"]
                        first = [{"type": "ADDED", "object": o} for k, o in sorted(slices.items()) if matches(k[0], o)]
                    else:
                        sent = int(since)
                        first = []
                        if sent < store["oldest"]:
                            first = [{"type": "ERROR", "object": status_obj(410, "Expired", "too old resource version: "
                                                                            "%d (%d)" % (sent, store["oldest"]))}]
                            deadline = 0
                for ev in first:
                    chunk(json.dumps(ev).encode() + b"\n")
                next_bookmark = time.time() + args.bookmark_interval
                while time.time() < deadline:
                    with cond:
                        todo = [h for h in history if h[0] > sent]
                        if not todo:
                            cond.wait(max(0.01, min(deadline, next_bookmark) - time.time()))
                            todo = [h for h in history if h[0] > sent]
                        cur = store["rv"]
                        mode = wfault["mode"] if wfault["count"] > 0 else "none"
                    for rv, kind, o_ns, obj in todo:
                        sent = rv
                        if not matches(o_ns, obj):
                            continue
                        data = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                        if mode in ("cut", "malformed"):
                            with cond:
                                wfault["count"] -= 1
                            if mode == "cut":
                                self.wfile.write(b"%x\r\n%s" % (len(data), data[: len(data) // 2]))
                                self.wfile.flush()
                                self.close_connection = True
                                return
                            data = b"{\"type\": \"MODIFIED\", \"object\": <html>502 Bad Gateway</html>\n"
                        chunk(data)
                    if bookmarks and time.time() >= next_bookmark:
                        sent = max(sent, cur)
                        chunk(json.dumps({"type": "BOOKMARK", "object": {
                            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                            "metadata": {"resourceVersion": str(sent)}}}).encode() + b"\n")
                        next_bookmark = time.time() + args.bookmark_interval
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def do_PATCH(self):
            self.handle_any("PATCH")

        def do_PUT(self):
            self.handle_any("PUT")

        def do_POST(self):
            self.handle_any("POST")

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    sys.stderr.write("listening on 127.0.0.1:%d\n" % args.port)
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
