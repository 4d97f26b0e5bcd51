#!/usr/bin/env python3
"""tools/soak_report.py - the soak run's samples (logs/soak.json of t/060-soak.t) as a self-contained HTML page: the
time lines of worker RSS, Lua memory, timers and sockets, in-flight requests, peer records and the request rate, with
the reload / kill / steady phases as bands and each reload and SIGKILL as a dashed tick (the charts of lab/report.py).

    tools/soak_report.py soak.json soak.html
"""

import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("lab_report", os.path.join(HERE, "..", "lab", "report.py"))
lab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lab)

COLORS = lab.BACKEND_COLORS


def series_by_worker(samples, field, scale=1.0):
    """One line per worker pid: [(t, value)]; a worker's line ends when it does."""
    lines = {}
    for s in samples:
        for w in s["workers"]:
            v = w.get(field)
            lines.setdefault(w["pid"], []).append((s["t"], None if v is None else v * scale))
    out = []
    for i, (pid, pts) in enumerate(sorted(lines.items())):
        out.append({"name": "pid %d" % pid, "color": COLORS[i % len(COLORS)], "points": pts,
                    "legend": len(lines) <= 8})
    return out


def main(src, dst):
    with open(src) as f:
        d = json.load(f)
    model = {"scenario": {"duration": d["seconds"], "phases": d["phases"]},
             "runs": [{"actions": d["actions"]}]}
    smp = d["samples"]
    r = d["result"]
    flat = r["flat"]
    o = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
         '<meta name="viewport" content="width=device-width, initial-scale=1">'
         '<title>soak: %d s at %d req/s</title><style>%s</style></head><body>' % (d["seconds"], d["rate"], lab.CSS)]
    o.append('<h1>Soak: %d s of keepalive load at %d req/s</h1>' % (d["seconds"], d["rate"]))
    o.append('<p class="sub">t/060-soak.t · gateway with 2 workers · phases: %s · discovery churn every 2 s, '
             'an admin weight change every 3 s, scaling on the request rate</p>' % lab.esc(
                 ", ".join("%s %g-%g s" % (p["name"], p["start"], p["end"]) for p in d["phases"])))
    rows = [("requests sent", r["sent"]), ("answered 200", r["ok"]), ("mean rate (req/s)", "%.0f" % r["rate"]),
            ("failed", r["failed"]), ("of which a killed worker's", r["by_kill"]), ("failed otherwise", r["other"]),
            ("sent again (the connection closed before any byte of the answer)", r["retried"]),
            ("... on a killed worker's connection", r["retried_kill"]),
            ("... on a connection a reload closed", r["retried_reload"]),
            ("connections opened", r["connections"]), ("reloads", r["reloads"]), ("SIGKILLs", r["kills"]),
            ("in flight after the load", r["phantom"]), ("peer records used / addresses", "%d / %d" % (
                r["records"], r["addresses"])), ("scaling calls", r["calls"]),
            ("steady phase: RSS growth per worker (kB)", flat["rss_kb"]),
            ("... of which private (RssAnon)", flat.get("anon_kb")),
            ("... of which shared pages first touched (RssShmem)", flat.get("shmem_kb")),
            ("steady phase: Lua memory growth per worker (kB)", "%.0f" % flat["lua_kb"]),
            ("steady phase: timers growth", flat["timers"]), ("steady phase: sockets growth", flat["sockets"]),
            ("error log (bytes)", r["errlog_bytes"])]
    o.append('<table>%s</table>' % "".join('<tr><td class="l">%s</td><td>%s</td></tr>' % (lab.esc(k), lab.esc(v))
                                           for k, v in rows))
    per_second = [(i + 0.5, v) for i, v in enumerate(d["per_second"])]
    o.append(lab.chart("rate", "Requests answered per second", "req/s",
                       [{"name": "200 answers", "color": "#1864ab", "points": per_second}], model))
    o.append(lab.chart("rss", "Worker RSS", "MB", series_by_worker(smp, "rss", 1 / 1024.0), model))
    o.append(lab.chart("anon", "Worker private RSS (RssAnon)", "MB", series_by_worker(smp, "anon", 1 / 1024.0), model))
    o.append(lab.chart("lua", "Worker Lua memory (collectgarbage count)", "MB",
                       series_by_worker(smp, "lua", 1 / 1024.0), model))
    o.append(lab.chart("sockets", "Worker sockets", "sockets", series_by_worker(smp, "sockets"), model))
    o.append(lab.chart("timers", "Worker timers (running + pending)", "timers", series_by_worker(smp, "timers"), model))
    o.append(lab.chart("inflight", "In flight (all peers) and peer records", "count", [
        {"name": "in flight", "color": "#c92a2a", "points": [(s["t"], s["inflight"]) for s in smp]},
        {"name": "peers", "color": "#2b8a3e", "points": [(s["t"], s["peers"]) for s in smp], "step": True},
        {"name": "records used", "color": "#5f3dc4", "dash": "6 4", "points": [(s["t"], s["records"]) for s in smp],
         "step": True}], model))
    o.append(lab.chart("desired", "Scaling: desired instances", "instances", [
        {"name": "desired", "color": "#e67700", "points": [(s["t"], s.get("desired")) for s in smp], "step": True}],
        model))
    o.append('<script>%s</script></body></html>' % lab.SCRIPT)
    with open(dst, "w") as f:
        f.write("".join(o))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: tools/soak_report.py soak.json soak.html")
    main(sys.argv[1], sys.argv[2])
