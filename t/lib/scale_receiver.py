#!/usr/bin/env python3
"""A strict receiver of resty.autoscale scaling webhooks for the tests (docs/scaling.md, "The webhook contract").

Checks every POST against the contract with Python's own hmac: method, Content-Type, the X-Autoscale-Signature over
the raw body, Idempotency-Key equal to the body's idempotency_key, every body field and its type. Answers 500 to the
first --fail calls (to exercise retries), 401 to a bad signature, 400 to a broken contract, 409 to a fencing token lower
than one already seen for the service, and a repeated idempotency key with the first answer without applying it again.
Every call is kept (arrival time, verdict) and served as JSON on GET /calls.

    scale_receiver.py --port 26401 --secret S [--fail N]
"""
import argparse
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIELDS = {"service": str, "current": int, "desired": int, "reason": str, "decision_id": str,
          "idempotency_key": str, "gateway": str, "fencing_token": int, "ts": (int, float)}

lock = threading.Lock()
calls, applied, fences = [], {}, {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--fail", type=int, default=0)
    args = ap.parse_args()
    secret = args.secret.encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def answer(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path != "/calls":
                return self.answer(404, {"error": "not found"})
            with lock:
                return self.answer(200, calls)

        def do_POST(self):
            arrived = time.time()
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            call = {"t": arrived, "path": self.path, "body": raw.decode("utf-8", "replace")}
            expected = "sha256=" + hmac.new(secret, raw, hashlib.sha256).hexdigest()
            call["verified"] = hmac.compare_digest(expected, self.headers.get("X-Autoscale-Signature", ""))
            status, obj = 200, {"ok": True}
            try:
                d = json.loads(raw)
                bad = [k for k, ty in FIELDS.items() if not isinstance(d.get(k), ty) or isinstance(d.get(k), bool)]
                bad += [k for k in d if k not in FIELDS]
            except ValueError:
                d, bad = {}, ["body is not JSON"]
            with lock:
                n = len(calls) + 1
                if not call["verified"]:
                    status, obj = 401, {"error": "bad signature"}
                elif self.headers.get("Content-Type") != "application/json" or bad:
                    status, obj = 400, {"error": "contract", "fields": bad}
                elif self.headers.get("Idempotency-Key") != d["idempotency_key"]:
                    status, obj = 400, {"error": "Idempotency-Key header differs from the body"}
                elif d["idempotency_key"] in applied:
                    status, obj = applied[d["idempotency_key"]]
                    obj = dict(obj, replay=True)
                elif n <= args.fail:
                    status, obj = 500, {"error": "failing on purpose (%d of %d)" % (n, args.fail)}
                elif d["fencing_token"] < fences.get(d["service"], 0):
                    status, obj = 409, {"error": "stale fencing token"}
                else:
                    fences[d["service"]] = d["fencing_token"]
                    applied[d["idempotency_key"]] = (200, {"ok": True, "applied": d["desired"]})
                    obj = {"ok": True, "applied": d["desired"]}
                call["status"] = status
                call["decision"] = d
                calls.append(call)
            self.answer(status, obj)

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
