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

PATH = re.compile(r"^/apis/apps/v1/namespaces/([a-z0-9.-]+)/(deployments|statefulsets)/([a-z0-9.-]+)/scale$")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--object", action="append", default=[], help="kind/namespace/name=replicas")
    ap.add_argument("--fail-patch", type=int, default=0)
    args = ap.parse_args()

    lock = threading.RLock()
    objects, requests = {}, []
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
            m = PATH.match(self.path)
            key = m and (m.group(2), m.group(1), m.group(3))
            if not m or key not in objects:
                return self.answer(404, status_obj(404, "NotFound", "the server could not find the requested resource"), rec)
            if self.headers.get("Authorization") != "Bearer " + args.token:
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

        def do_PATCH(self):
            self.handle_any("PATCH")

        def do_PUT(self):
            self.handle_any("PUT")

        def do_POST(self):
            self.handle_any("POST")

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    sys.stderr.write("listening on 127.0.0.1:%d\n" % args.port)
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
