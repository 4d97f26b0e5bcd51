"""lab/report.py - turns a lab run (data.json) into figures, a summary table and a self-contained HTML report.

    model = build(data)        per-second series, per-phase figures, checks
    html(model)                the report: inline SVG charts, inline CSS, one small inline script; no external asset
    summary_text(model)        the table printed to the terminal

Latency is the client's, measured by lab/loadgen.py from each request's intended send time; a request
that failed (not 2xx/3xx, timeout, connection error) counts in the error rate and, with its latency, in
the percentiles.
"""

import html as htmlmod
import json
import math

METRICS = ("p50", "p99", "p999", "error_rate")
METRIC_LABEL = {"p50": "p50", "p99": "p99", "p999": "p99.9", "error_rate": "errors"}
RUN_COLOR = {"rr": "#d9480f", "autoscale": "#1864ab", "autoscale_noreports": "#868e96"}
RUN_DASH = {"rr": "6 4", "autoscale": "", "autoscale_noreports": "2 3"}
BACKEND_COLORS = ("#2b8a3e", "#c2255c", "#5f3dc4", "#e67700", "#0b7285", "#862e9c", "#364fc7", "#a61e4d",
                  "#5c940d", "#d6336c", "#1098ad", "#f08c00", "#495057", "#7048e8", "#099268", "#e8590c")
ELIGIBLE = ("active", "healthy", "half_open")
NOISY = 0.25  # cores used by other processes, on average, above which a run's latency figures are flagged


def pct(sorted_vals, q):
    """Nearest-rank percentile of a sorted list."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(math.ceil(q * len(sorted_vals))) - 1))
    return sorted_vals[k]


def is_error(st):
    return not 200 <= st < 400


def stats(lats, errs):
    lats = sorted(lats)
    n = len(lats)
    return {
        "n": n,
        "p50": pct(lats, 0.50) * 1000 if n else None,
        "p99": pct(lats, 0.99) * 1000 if n else None,
        "p999": pct(lats, 0.999) * 1000 if n else None,
        "max": lats[-1] * 1000 if n else None,
        "errors": errs,
        "error_rate": 100.0 * errs / n if n else None,
    }


def build(data):
    sc = data["scenario"]
    dur = sc["duration"]
    nsec = int(math.ceil(dur))
    names = sc["backend_names"]
    model = {"scenario": sc, "meta": data.get("meta", {}), "nsec": nsec, "runs": [], "backend_names": names}
    for run in data["runs"]:
        c = run["client"]
        be_names = c.get("backends", [])
        per = [[] for _ in range(nsec)]
        per_err = [0] * nsec
        served = [dict() for _ in range(nsec)]
        phase_lat = {p["name"]: [] for p in sc["phases"]}
        phase_err = {p["name"]: 0 for p in sc["phases"]}
        bounds = [(p["start"], p["end"], p["name"]) for p in sc["phases"]]
        statuses = {}
        for t, lat, st, be in zip(c["t"], c["lat"], c["st"], c["be"]):
            s = int(t)
            if s >= nsec:
                continue
            err = is_error(st)
            per[s].append(lat)
            if err:
                per_err[s] += 1
            statuses[st] = statuses.get(st, 0) + 1
            if be >= 0:
                bn = be_names[be]
                served[s][bn] = served[s].get(bn, 0) + 1
            for a, b, pn in bounds:
                if a <= t < b:
                    phase_lat[pn].append(lat)
                    if err:
                        phase_err[pn] += 1
                    break
        series = {"p50": [], "p99": [], "p999": [], "error_rate": [], "offered": []}
        for s in range(nsec):
            st = stats(per[s], per_err[s])
            for m in ("p50", "p99", "p999", "error_rate"):
                series[m].append(st[m])
            series["offered"].append(st["n"])
        # traffic share per backend: every attempt the gateway made (retries included), from its access log
        share = {n: [] for n in names}
        fail_share = {n: [] for n in names}
        ps = run["attempts"].get("per_second", {})
        for s in range(nsec):
            b = ps.get(str(s), {})
            tot = sum(b.get(n, 0) for n in names)
            for n in names:
                share[n].append(100.0 * b.get(n, 0) / tot if tot else None)
                fail_share[n].append(100.0 * b.get(n + ":fail", 0) / tot if tot else None)
        phase_share = {}
        for p in sc["phases"]:
            tot = {n: 0 for n in names}
            for s in range(int(p["start"]), min(nsec, int(math.ceil(p["end"])))):
                for n in names:
                    tot[n] += ps.get(str(s), {}).get(n, 0)
            all_ = sum(tot.values())
            phase_share[p["name"]] = {n: (100.0 * tot[n] / all_ if all_ else None) for n in names}
        # instances: backends accepting connections; for resty.autoscale also the peers it keeps eligible
        inst_t, inst_up, inst_elig, inst_desired = [], [], [], []
        ewma = {n: [] for n in names}
        for smp in run["timeline"]:
            if smp["t"] < 0 or smp["t"] > dur:
                continue
            inst_t.append(smp["t"])
            inst_up.append(sum(1 for v in smp["backends"].values() if v))
            inst_desired.append(smp.get("desired"))
            peers = smp.get("peers")
            if peers is not None:
                inst_elig.append(sum(1 for v in peers.values() if v.get("state", "active") in ELIGIBLE))
                for n in names:
                    v = peers.get(n, {}).get("ewma")
                    ewma[n].append((smp["t"], v * 1000 if isinstance(v, (int, float)) else None))
            else:
                inst_elig.append(None)
        phases = []
        for p in sc["phases"]:
            st = stats(phase_lat[p["name"]], phase_err[p["name"]])
            st["name"] = p["name"]
            st["share"] = phase_share[p["name"]]
            phases.append(st)
        allst = stats([x for v in phase_lat.values() for x in v], sum(phase_err.values()))
        model["runs"].append({
            "variant": run["variant"], "label": run["label"], "series": series, "share": share,
            "fail_share": fail_share, "inst": (inst_t, inst_up, inst_elig), "desired": inst_desired, "ewma": ewma, "phases": phases,
            "all": allst, "statuses": statuses, "actions": run["actions"], "events": run.get("events", []),
            "events_supported": run.get("events_supported"), "served": run.get("served", {}),
            "error_log": run.get("error_log", {}), "client_meta": {k: c.get(k) for k in (
                "scheduled", "peak_conns", "max_pending", "connect_errors", "cpu_seconds", "warmup_requests")},
            "gateway_conf": run.get("gateway_conf", ""),
            "other_cpu": [v for t, v in run.get("other_cpu", []) if 0 <= t <= dur],
        })
    model["checks"] = evaluate_checks(model)
    return model


def run_of(model, variant):
    for r in model["runs"]:
        if r["variant"] == variant:
            return r
    return None


def phase_of(run, name):
    for p in run["phases"]:
        if p["name"] == name:
            return p
    return None


def evaluate_checks(model):
    out = []
    for c in model["scenario"].get("checks", []):
        r = run_of(model, c["variant"])
        res = dict(c)
        res["ok"] = None
        if r is None:
            res["value"] = None
            res["text"] = "not run"
            out.append(res)
            continue
        v = phase_of(r, c["phase"])[c["metric"]]
        unit = "%" if c["metric"] == "error_rate" else " ms"
        other = run_of(model, c["relative_to_variant"]) if "relative_to_variant" in c else None
        if "relative_to_variant" in c and other is None:
            res["value"] = None
            res["text"] = "%s not run" % c["relative_to_variant"]
            out.append(res)
            continue
        if other is not None:
            base = phase_of(other, c["phase"])[c["metric"]]
            res["base"] = base
            res["measured"] = v
            value = v / base if v is not None and base else None
            res["value"] = value
            res["text"] = ("%s %s in '%s' = %s x %s's (%s / %s)" % (
                r["label"], METRIC_LABEL[c["metric"]], c["phase"], fmt(value, 2), other["label"],
                fmt(v) + unit, fmt(base) + unit))
            res["limit_text"] = "<= %s x" % c["max"]
        elif "relative_to" in c:
            base = phase_of(r, c["relative_to"])[c["metric"]]
            res["base"] = base
            res["measured"] = v
            value = v / base if v is not None and base else None
            res["value"] = value
            res["text"] = ("%s %s in '%s' = %s x '%s' (%s / %s)" % (
                r["label"], METRIC_LABEL[c["metric"]], c["phase"], fmt(value, 2), c["relative_to"],
                fmt(v) + unit, fmt(base) + unit))
            res["limit_text"] = "<= %s x" % c["max"]
        else:
            value = v
            res["value"] = value
            res["text"] = "%s %s in '%s' = %s%s" % (r["label"], METRIC_LABEL[c["metric"]], c["phase"],
                                                     fmt(value, 3 if unit == "%" else 1), unit)
            res["limit_text"] = "<= %s%s" % (c["max"], unit)
        res["ok"] = value is not None and value <= c["max"]
        out.append(res)
    return out


def fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return "-"
    if digits == 1 and abs(v) >= 100:
        return "%.0f" % v
    return "%.*f" % (digits, v)


def ratio(a, b):
    if a is None or b is None:
        return None
    if b == 0:
        return None if a == 0 else float("inf")
    return a / b


# ------------------------------------------------------------------------------------------------
# terminal summary
# ------------------------------------------------------------------------------------------------
def summary_rows(model):
    rr, au = run_of(model, "rr"), run_of(model, "autoscale")
    rows = []
    for p in model["scenario"]["phases"]:
        a = phase_of(rr, p["name"]) if rr else None
        b = phase_of(au, p["name"]) if au else None
        row = {"phase": p["name"], "secs": "%g-%g" % (p["start"], p["end"]), "load": p.get("load")}
        for m in METRICS:
            row[m] = (a and a[m], b and b[m], ratio(b and b[m], a and a[m]))
        row["n"] = (a and a["n"], b and b["n"])
        rows.append(row)
    return rows


def summary_text(model):
    sc = model["scenario"]
    out = []
    out.append("%s — %s" % (sc["name"], sc["title"]))
    unit = "req/s" if sc["load"]["mode"] == "open" else "clients"
    out.append("client latency in ms (from the intended send time), errors in % of client requests; "
               "RR = nginx round robin, AS = resty.autoscale, AS/RR = ratio")
    hdr = "%-16s %-9s %6s | %-22s | %-22s | %-22s | %-24s" % (
        "phase", "seconds", unit[:6], "p50  RR / AS  (AS/RR)", "p99  RR / AS  (AS/RR)", "p99.9 RR / AS (AS/RR)",
        "errors %  RR / AS")
    out.append(hdr)
    out.append("-" * len(hdr))
    for r in summary_rows(model):
        cells = []
        for m in ("p50", "p99", "p999"):
            a, b, q = r[m]
            cells.append("%6s / %6s (%5s)" % (fmt(a), fmt(b), fmt(q, 2) if q is not None else "-"))
        a, b, q = r["error_rate"]
        cells.append("%8s / %8s" % (fmt(a, 3), fmt(b, 3)))
        out.append("%-16s %-9s %6s | %-22s | %-22s | %-22s | %-24s" % (
            r["phase"][:16], r["secs"], fmt(r["load"], 0) if r["load"] is not None else "-", *cells))
    if model["checks"]:
        out.append("")
        out.append("checks:")
        for c in model["checks"]:
            mark = {True: "PASS", False: "FAIL", None: "n/a "}[c["ok"]]
            out.append("  %s  %s  (target %s)" % (mark, c["text"], c.get("limit_text", "")))
    notes = []
    for r in model["runs"]:
        cm = r["client_meta"]
        el = r["error_log"]
        oc = r["other_cpu"]
        notes.append("%s: %d requests, statuses %s, peak client connections %s; other processes on the machine "
                     "used %s cores on average, %s at most%s" % (
            r["label"], r["all"]["n"], ", ".join("%s:%d" % (status_name(k), v) for k, v in sorted(
                r["statuses"].items(), key=lambda kv: int(kv[0]))), cm.get("peak_conns"),
            fmt(sum(oc) / len(oc), 2) if oc else "-", fmt(max(oc), 2) if oc else "-",
            ("; gateway error.log: %s" % ", ".join("%s %d" % (k, v) for k, v in el.items() if k != "samples"))
            if any(k != "samples" for k in el) else ""))
    out.append("")
    out.extend(notes)
    noisy = [r["label"] for r in model["runs"] if r["other_cpu"] and sum(r["other_cpu"]) / len(r["other_cpu"]) > NOISY]
    if noisy:
        out.append("WARNING: other processes used more than %.2f cores on average during the %s run(s): the "
                   "latency figures are noisy; run again on a quiet machine" % (NOISY, " and ".join(noisy)))
    m = model["meta"]
    if m.get("command"):
        out.append("command: %s   (%s, %s s, %s CPUs, library %s)" % (
            m["command"], m.get("started"), m.get("elapsed"), m.get("cpus"),
            m.get("library", {}).get("git", "?")))
    return "\n".join(out) + "\n"


def status_name(st):
    st = int(st)
    return {-1: "timeout", -2: "connect-error", -3: "closed"}.get(st, str(st))


# ------------------------------------------------------------------------------------------------
# SVG charts
# ------------------------------------------------------------------------------------------------
W, H = 920, 270
ML, MR, MT, MB = 62, 16, 34, 34


def esc(s):
    return htmlmod.escape(str(s), quote=True)


def nice_ticks(lo, hi, n=5):
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    t = math.ceil(lo / step) * step
    out = []
    while t <= hi + 1e-9:
        out.append(round(t, 10))
        t += step
    return out


def chart(cid, title, ylabel, series, model, log=False, ymax=None, ymin=None, events=None, note=None):
    """One SVG line chart. series: [{"name", "color", "dash", "points": [(x, y|None)], "step"}]."""
    xmax = max(1.0, float(model["scenario"]["duration"]))
    vals = [y for s in series for _, y in s["points"] if y is not None and (y > 0 or not log)]
    if log:
        lo = ymin if ymin else max(0.1, min(vals) if vals else 1.0)
        hi = max(vals) if vals else 10.0
        lo = 10 ** math.floor(math.log10(lo))
        hi = 10 ** math.ceil(math.log10(max(hi, lo * 10)))
    else:
        lo = ymin if ymin is not None else 0.0
        hi = ymax if ymax is not None else (max(vals) if vals else 1.0)
        if hi <= lo:
            hi = lo + 1.0
        hi *= 1.0 if ymax is not None else 1.08
    pw, ph = W - ML - MR, H - MT - MB

    def X(x):
        return ML + pw * x / xmax

    def Y(y):
        if log:
            y = max(y, lo)
            return MT + ph * (1 - (math.log10(y) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))
        return MT + ph * (1 - (min(y, hi) - lo) / (hi - lo))

    o = ['<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %d %d" width="%d" height="%d" role="img" '
         'aria-label="%s">' % (W, H, W, H, esc(title))]
    o.append('<rect x="0" y="0" width="%d" height="%d" fill="#fff"/>' % (W, H))
    # phases: alternating bands and names
    for i, p in enumerate(model["scenario"]["phases"]):
        x0, x1 = X(p["start"]), X(min(p["end"], xmax))
        if i % 2:
            o.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#f1f3f5"/>' % (x0, MT, x1 - x0, ph))
        o.append('<text x="%.1f" y="%d" font-size="10" fill="#868e96">%s</text>' % (x0 + 3, MT + 11, esc(p["name"])))
    # grid and axes
    if log:
        ticks = [10 ** e for e in range(int(round(math.log10(lo))), int(round(math.log10(hi))) + 1)]
    else:
        ticks = nice_ticks(lo, hi)
    for t in ticks:
        y = Y(t)
        o.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#dee2e6" stroke-width="1"/>' % (ML, W - MR, y, y))
        o.append('<text x="%d" y="%.1f" font-size="11" text-anchor="end" fill="#495057">%s</text>' % (
            ML - 5, y + 4, esc(("%g" % t) if t < 100000 else "%.0e" % t)))
    for t in nice_ticks(0, xmax, 10):
        x = X(t)
        o.append('<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#adb5bd"/>' % (x, x, MT + ph, MT + ph + 4))
        o.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle" fill="#495057">%g</text>' % (
            x, MT + ph + 16, t))
    o.append('<text x="%d" y="%d" font-size="11" text-anchor="end" fill="#495057">seconds</text>' % (W - MR, H - 4))
    o.append('<text x="14" y="%d" font-size="11" fill="#495057" transform="rotate(-90 14 %d)" '
             'text-anchor="middle">%s</text>' % (MT + ph // 2, MT + ph // 2, esc(ylabel)))
    o.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#adb5bd"/>' % (ML, MT, pw, ph))
    # what the lab did (backend changes), as ticks at the top
    for r in model["runs"][:1]:
        for a in r["actions"]:
            x = X(max(0.0, a["t"]))
            o.append('<line class="action" x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#495057" stroke-width="1" '
                     'stroke-dasharray="2 3"><title>%s</title></line>' % (
                         x, x, MT, MT + ph, esc("%.1fs %s: %s" % (a["t"], a["backend"], a["set"]))))
    # data
    o.append('<clipPath id="clip-%s"><rect x="%d" y="%d" width="%d" height="%d"/></clipPath>' % (
        cid, ML - 1, MT - 2, pw + 2, ph + 4))
    o.append('<g class="data" clip-path="url(#clip-%s)">' % cid)
    for s in series:
        segs, cur = [], []
        prev = None
        for x, y in s["points"]:
            if y is None or (log and y <= 0):
                if cur:
                    segs.append(cur)
                cur = []
                prev = None
                continue
            px, py = X(min(x, xmax)), Y(y)
            if s.get("step") and prev is not None:
                cur.append((px, prev))
            cur.append((px, py))
            prev = py
        if cur:
            segs.append(cur)
        for sg in segs:
            if len(sg) == 1:
                sg = [sg[0], (sg[0][0] + 1.5, sg[0][1])]
            o.append('<polyline class="series" data-series="%s" fill="none" stroke="%s" stroke-width="%s" '
                     '%s stroke-linejoin="round" points="%s"/>' % (
                         esc(s["name"]), s["color"], s.get("width", 1.8),
                         'stroke-dasharray="%s"' % s["dash"] if s.get("dash") else "",
                         " ".join("%.1f,%.1f" % pt for pt in sg)))
    for ev in events or []:
        x = X(min(max(ev["t"], 0.0), xmax))
        o.append('<circle class="event" cx="%.1f" cy="%d" r="4" fill="%s" stroke="#fff"><title>%s</title></circle>' % (
            x, MT + ph - 6, ev.get("color", "#000"), esc(ev["label"])))
    o.append('</g>')
    # legend
    lx = ML
    for s in series:
        if s.get("legend") is False:
            continue
        o.append('<line x1="%d" x2="%d" y1="14" y2="14" stroke="%s" stroke-width="2.5" %s/>' % (
            lx, lx + 22, s["color"], 'stroke-dasharray="%s"' % s["dash"] if s.get("dash") else ""))
        o.append('<text x="%d" y="18" font-size="11" fill="#212529">%s</text>' % (lx + 26, esc(s["name"])))
        lx += 36 + 6.2 * len(s["name"])
    if note:
        o.append('<text x="%d" y="18" font-size="11" fill="#868e96" text-anchor="end">%s</text>' % (
            W - MR, esc(note)))
    o.append('</svg>')
    return ('<figure class="chart" id="chart-%s" data-metric="%s"><figcaption>%s</figcaption>%s</figure>'
            % (cid, cid, esc(title), "".join(o)))


def per_second(vals):
    return [(s + 0.5, v) for s, v in enumerate(vals)]


def charts(model):
    out = []
    runs = model["runs"]
    for m, title in (("p50", "Client latency p50"), ("p99", "Client latency p99"), ("p999", "Client latency p99.9")):
        series = [{"name": r["label"], "color": RUN_COLOR[r["variant"]], "dash": RUN_DASH[r["variant"]],
                   "points": per_second(r["series"][m])} for r in runs]
        out.append(chart(m, title + " per second (ms, log scale)", "ms", series, model, log=True))
    series = [{"name": r["label"], "color": RUN_COLOR[r["variant"]], "dash": RUN_DASH[r["variant"]],
               "points": per_second(r["series"]["error_rate"])} for r in runs]
    emax = max([v for r in runs for v in r["series"]["error_rate"] if v is not None] + [0.0])
    out.append(chart("errors", "Client-visible errors per second (% of requests)", "%", series, model,
                     ymax=max(1.0, emax * 1.1)))
    series = []
    for i, n in enumerate(model["backend_names"]):
        for r in runs:
            series.append({"name": "%s %s" % (n, "RR" if r["variant"] == "rr" else "AS"),
                           "color": BACKEND_COLORS[i % len(BACKEND_COLORS)], "dash": RUN_DASH[r["variant"]],
                           "points": per_second(r["share"][n]), "width": 1.6})
    out.append(chart("share", "Traffic share per backend (% of the gateway's attempts, retries included; "
                     "dashed = round robin)", "% of attempts", series, model, ymax=100))
    series = []
    for r in runs:
        t, up, el = r["inst"]
        series.append({"name": "%s: backends accepting" % ("RR" if r["variant"] == "rr" else "AS"),
                       "color": RUN_COLOR[r["variant"]], "dash": RUN_DASH[r["variant"]], "step": True,
                       "points": list(zip(t, up))})
        if r["variant"] == "autoscale" and any(v is not None for v in el):
            series.append({"name": "AS: peers in rotation", "color": "#2f9e44", "dash": "", "step": True,
                           "points": list(zip(t, el)), "width": 2.4})
        desired = r.get("desired") or []
        if r["variant"] == "autoscale" and any(v is not None for v in desired):
            series.append({"name": "AS: desired (scaling decision)", "color": "#e8590c", "dash": "2,3", "step": True,
                           "points": [(x, y) for x, y in zip(t, desired) if y is not None], "width": 1.8})
    nmax = len(model["backend_names"])
    out.append(chart("instances", "Instances over time", "instances", series, model, ymax=nmax + 1,
                     note="no scaling in this scenario" if not model["scenario"].get("requires") else None))
    # decisions: the balancer's estimate per peer (what P2C compares), and its recorded events
    series, events = [], []
    au = run_of(model, "autoscale")
    if au:
        for i, n in enumerate(model["backend_names"]):
            series.append({"name": "%s estimate" % n, "color": BACKEND_COLORS[i % len(BACKEND_COLORS)],
                           "points": au["ewma"][n]})
        for e in au["events"]:
            if e.get("event") in ("config",) or "t" not in e:
                continue
            color = {"ejected": "#e03131", "healthy": "#2f9e44", "half_open": "#f08c00"}.get(e.get("event"), "#495057")
            events.append({"t": e["t"], "color": color, "label": "%.1fs %s %s %s" % (
                e["t"], e.get("event"), e.get("backend") or "", e.get("reason") or "")})
    note = "round robin takes no decisions; dots = resty.autoscale events" if au else "resty.autoscale not run"
    out.append(chart("decisions", "Decisions: resty.autoscale's peak-EWMA latency estimate per backend (ms, log "
                     "scale) and its events", "ms", series, model, log=True, events=events, note=note))
    series = [{"name": "%s (sent)" % r["label"], "color": RUN_COLOR[r["variant"]], "dash": RUN_DASH[r["variant"]],
               "points": per_second(r["series"]["offered"])} for r in runs]
    out.append(chart("load", "Offered load: requests per second by intended send time", "req/s", series, model))
    return out


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#212529;margin:24px auto;max-width:960px;padding:0 12px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dee2e6;padding-bottom:4px}
.sub{color:#495057;margin:0 0 16px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #dee2e6;padding:3px 7px;text-align:right} th{background:#f8f9fa}
td.l,th.l{text-align:left}
.good{color:#2b8a3e;font-weight:600} .bad{color:#c92a2a;font-weight:600}
figure.chart{margin:14px 0} figcaption{font-weight:600;margin-bottom:4px}
svg{max-width:100%;height:auto;font-family:system-ui,sans-serif}
pre{background:#f8f9fa;border:1px solid #dee2e6;padding:8px;overflow-x:auto;font-size:12px}
details{margin:8px 0}
body.only > *:not(.keep){display:none}
"""

# Runs in the browser: counts the points each chart really rendered (the report test reads these
# attributes with headless Chromium), and `?only=<chart>` shows one chart alone (for screenshots).
SCRIPT = """
(function(){
  var figs = document.querySelectorAll('figure.chart'), total = 0;
  for (var i = 0; i < figs.length; i++) {
    var f = figs[i], pts = 0, lines = f.querySelectorAll('polyline.series');
    for (var j = 0; j < lines.length; j++) {
      var l = lines[j], n = l.points.numberOfItems, b = l.getBBox();
      if (b.width > 0 || b.height > 0) pts += n;
    }
    var box = f.querySelector('svg').getBoundingClientRect();
    f.setAttribute('data-rendered-points', pts);
    f.setAttribute('data-rendered-lines', lines.length);
    f.setAttribute('data-rendered-events', f.querySelectorAll('circle.event').length);
    f.setAttribute('data-rendered-size', Math.round(box.width) + 'x' + Math.round(box.height));
    total += pts;
  }
  document.body.setAttribute('data-charts', figs.length);
  document.body.setAttribute('data-points', total);
  var m = /[?&]only=([a-z0-9]+)/.exec(location.search);
  if (m) {
    var keep = document.getElementById('chart-' + m[1]);
    if (keep) { document.body.appendChild(keep); keep.className += ' keep'; document.body.className += ' only';
                document.body.style.margin = '0'; document.body.style.padding = '4px'; }
  }
})();
"""


def cls_ratio(q, lower_is_better=True):
    if q is None:
        return ""
    return "good" if q < 0.9 else ("bad" if q > 1.1 else "")


def html(model):
    sc = model["scenario"]
    meta = model["meta"]
    o = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
         '<meta name="viewport" content="width=device-width, initial-scale=1">'
         '<title>lab: %s</title><style>%s</style></head><body>' % (esc(sc["name"]), CSS)]
    o.append('<h1>%s</h1>' % esc(sc["title"]))
    o.append('<p class="sub">scenario <b>%s</b> · %d backends · %s load · %s s per run · both runs on the same '
             'backends and load, one after the other · %s</p>' % (
                 esc(sc["name"]), len(model["backend_names"]), esc(sc["load"]["mode"]), fmt(sc["duration"], 0),
                 esc(meta.get("started", ""))))
    if sc.get("description"):
        o.append('<p>%s</p>' % esc(sc["description"]))
    # summary
    o.append('<h2>Summary</h2>')
    o.append('<table><tr><th class="l">phase</th><th>s</th><th>%s</th>' % (
        "req/s" if sc["load"]["mode"] == "open" else "clients"))
    for m in ("p50", "p99", "p999"):
        o.append('<th>%s RR</th><th>%s AS</th><th>AS/RR</th>' % (METRIC_LABEL[m], METRIC_LABEL[m]))
    o.append('<th>errors RR</th><th>errors AS</th></tr>')
    for r in summary_rows(model):
        o.append('<tr><td class="l">%s</td><td>%s</td><td>%s</td>' % (
            esc(r["phase"]), r["secs"], fmt(r["load"], 0) if r["load"] is not None else "-"))
        for m in ("p50", "p99", "p999"):
            a, b, q = r[m]
            o.append('<td>%s</td><td>%s</td><td class="%s">%s</td>' % (fmt(a), fmt(b), cls_ratio(q),
                                                                      fmt(q, 2) if q is not None else "-"))
        a, b, q = r["error_rate"]
        o.append('<td>%s%%</td><td>%s%%</td></tr>' % (fmt(a, 3), fmt(b, 3)))
    o.append('</table><p class="sub">Client latency in ms, measured from each request\'s intended send time '
             '(open loop: no coordinated omission). RR = nginx round robin, AS = resty.autoscale.</p>')
    for r in model["runs"]:
        oc = r["other_cpu"]
        if oc and sum(oc) / len(oc) > NOISY:
            o.append('<p class="bad">Other processes used %s cores on average (of %s) during the %s run: its latency '
                     'figures are noisy.</p>' % (fmt(sum(oc) / len(oc), 2), esc(meta.get("cpus", "?")), esc(r["label"])))
    if model["checks"]:
        o.append('<table><tr><th class="l">check</th><th class="l">measured</th><th>target</th><th>result</th></tr>')
        for c in model["checks"]:
            res = {True: '<span class="good">PASS</span>', False: '<span class="bad">FAIL</span>',
                   None: 'n/a'}[c["ok"]]
            o.append('<tr><td class="l">%s</td><td class="l">%s</td><td>%s</td><td>%s</td></tr>' % (
                esc(c.get("what", "")), esc(c["text"]), esc(c.get("limit_text", "")), res))
        o.append('</table>')
    # charts
    o.append('<h2>Charts</h2><p class="sub">Dashed = nginx round robin, solid = resty.autoscale. Grey bands and '
             'labels mark the phases; dotted vertical lines are the lab\'s changes to the backends.</p>')
    o.extend(charts(model))
    # traffic share per phase
    o.append('<h2>Traffic share per phase</h2><table><tr><th class="l">phase</th>')
    for n in model["backend_names"]:
        o.append('<th>%s RR</th><th>%s AS</th>' % (n, n))
    o.append('</tr>')
    for p in sc["phases"]:
        o.append('<tr><td class="l">%s</td>' % esc(p["name"]))
        for n in model["backend_names"]:
            for r in model["runs"]:
                o.append('<td>%s%%</td>' % fmt(phase_of(r, p["name"])["share"][n]))
        o.append('</tr>')
    o.append('</table>')
    # decisions
    o.append('<h2>Decisions</h2>')
    for r in model["runs"]:
        if r["variant"] == "rr":
            o.append('<p>nginx round robin: static rotation; nginx marks a server failed for <code>fail_timeout=10s'
                     '</code> after <code>max_fails=1</code> failure (defaults) and does not report it.</p>')
            continue
        if not r["events_supported"]:
            o.append('<p>%s: this build of the library records no events (no <code>autoscale.events</code>); '
                     'its decisions show in the per-peer estimates above and in the traffic share.</p>'
                     % esc(r["label"]))
            continue
        evs = [e for e in r["events"] if e.get("event") != "config"]
        o.append('<p>%s: %d events.</p>' % (esc(r["label"]), len(evs)))
        if evs:
            o.append('<table><tr><th>s</th><th class="l">event</th><th class="l">backend</th><th class="l">reason'
                     '</th><th class="l">details</th></tr>')
            for e in evs[:200]:
                det = ", ".join("%s=%s" % (k, v) for k, v in e.items() if k not in (
                    "seq", "time", "t", "event", "backend", "peer", "reason", "upstream"))
                o.append('<tr><td>%s</td><td class="l">%s</td><td class="l">%s</td><td class="l">%s</td>'
                         '<td class="l">%s</td></tr>' % (fmt(e.get("t")), esc(e.get("event")), esc(e.get("backend")),
                                                        esc(e.get("reason", "")), esc(det)))
            o.append('</table>')
    # the run
    o.append('<h2>How this was produced</h2>')
    o.append('<p><code>%s</code> — %s, %s s, %s CPUs. Library: %s.</p>' % (
        esc(meta.get("command", "")), esc(meta.get("started", "")), esc(meta.get("elapsed", "")),
        esc(meta.get("cpus", "")), esc(", ".join("%s" % v for v in meta.get("library", {}).values()))))
    o.append('<p>Both gateways: 2 workers, keepalive 64 to the backends, <code>proxy_connect_timeout %s; '
             'proxy_send_timeout %s; proxy_read_timeout %s; proxy_next_upstream %s; proxy_next_upstream_tries %s'
             '</code>.</p>' % (esc(meta.get("timeouts", {}).get("connect")), esc(meta.get("timeouts", {}).get("send")),
                               esc(meta.get("timeouts", {}).get("read")), esc(meta.get("next_upstream")),
                               esc(meta.get("tries"))))
    o.append('<table><tr><th class="l">run</th><th>requests</th><th class="l">client statuses</th>'
             '<th>peak conns</th><th>loadgen CPU s</th><th>other processes, cores avg / max</th>'
             '<th class="l">served by each backend (its own counters)</th>'
             '<th class="l">gateway error.log</th></tr>')
    for r in model["runs"]:
        served = "; ".join("%s: %s" % (n, ", ".join("%s %s" % kv for kv in sorted(c.items())))
                           for n, c in sorted(r["served"].items()))
        el = ", ".join("%s %s" % (k, v) for k, v in r["error_log"].items() if k != "samples") or "clean"
        oc = r["other_cpu"]
        o.append('<tr><td class="l">%s</td><td>%d</td><td class="l">%s</td><td>%s</td><td>%s</td><td>%s</td>'
                 '<td class="l">%s</td><td class="l">%s</td></tr>' % (
                     esc(r["label"]), r["all"]["n"], esc(", ".join("%s: %d" % (status_name(k), v) for k, v in sorted(
                         r["statuses"].items(), key=lambda kv: int(kv[0])))),
                     esc(r["client_meta"].get("peak_conns")), esc(r["client_meta"].get("cpu_seconds")),
                     "%s / %s" % (fmt(sum(oc) / len(oc), 2), fmt(max(oc), 2)) if oc else "-",
                     esc(served), esc(el)))
    o.append('</table>')
    o.append('<details><summary>Scenario file</summary><pre>%s</pre></details>' % esc(json.dumps(
        {k: v for k, v in sc.items() if k not in ("backend_names", "duration", "time_scale")}, indent=2)))
    for r in model["runs"]:
        o.append('<details><summary>Gateway nginx.conf: %s</summary><pre>%s</pre></details>' % (
            esc(r["label"]), esc(r["gateway_conf"])))
    o.append('<script>%s</script></body></html>' % SCRIPT)
    return "".join(o)
