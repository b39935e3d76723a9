#!/usr/bin/env python3
"""Prints compare.sh's table: the figures, ocicache's ratios to each peer, and the targets.

Usage: report.py WORKDIR   (reads WORKDIR/results.tsv and WORKDIR/meta.txt)
"""

import os
import sys

TARGETS = ["ocicache", "regproxy", "nginx-cache", "nginx-disk", "upstream"]
TITLES = {
    "ocicache": "ocicache",
    "regproxy": "registry-proxy",
    "nginx-cache": "nginx-cache",
    "nginx-disk": "nginx-disk",
    "upstream": "upstream",
}

# key, label, higher is better?
METRICS = [
    ("cold_mbps", "1 cold, 1 client: MB/s (median of pulls)", True),
    ("cold_ttfb_ms", "1 cold, 1 client: TTFB ms", False),
    ("cold_cpu", "1 cold: server CPU s/GiB", False),
    ("warm_mbps", "2 warm, 1 client: MB/s (median of 5)", True),
    ("warm_cpu", "2 warm: server CPU s/GiB", False),
    ("c20_wall_s", "3 20 cold clients: wall s", False),
    ("c20_ttfb_med_ms", "3 20 cold clients: TTFB median ms", False),
    ("c20_ttfb_max_ms", "3 20 cold clients: TTFB max ms", False),
    ("c20_upstream_gets", "3 20 cold clients: upstream blob GETs", False),
    ("c20_upstream_blobs", "3 20 cold clients: upstream bytes/blob", False),
    ("c20_rss_mib", "3 20 cold clients: peak RSS MiB", False),
    ("tag_rps", "4 manifest by tag: req/s", True),
    ("tag_p99_ms", "4 manifest by tag: p99 ms", False),
    ("tag_upstream", "4 manifest by tag: upstream requests", False),
    ("digest_rps", "4 manifest by digest: req/s", True),
    ("digest_p99_ms", "4 manifest by digest: p99 ms", False),
    ("digest_upstream", "4 manifest by digest: upstream requests", False),
    ("floor_rps", "4 floor, nginx return 200: req/s", True),
    ("floor_p99_ms", "4 floor, nginx return 200: p99 ms", False),
    ("ctr_cold_s", "5 containerd pull, cold: s", False),
    ("ctr_warm_s", "5 containerd pull, warm: s", False),
    ("ctr_warm_upstream", "5 containerd warm: upstream requests", False),
    ("cold_cpu_idle", "1 cold: server CPU s/GiB until idle", False),
    ("cold_upstream_gets", "1 cold: upstream blob GETs", False),
]


def fmt(v):
    if v is None:
        return "-"
    if v == int(v) and abs(v) >= 10:
        return f"{int(v)}"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    if abs(v) >= 10:
        return f"{v:.2f}"
    return f"{v:.3g}" if v else "0"


def main():
    work = sys.argv[1]
    res = {}
    with open(os.path.join(work, "results.tsv")) as f:
        for line in f:
            k, t, v = line.rstrip("\n").split("\t")
            res[(k, t)] = float(v)
    meta = {}
    if os.path.exists(os.path.join(work, "meta.txt")):
        with open(os.path.join(work, "meta.txt")) as f:
            for line in f:
                k, _, v = line.rstrip("\n").partition(" ")
                meta[k] = v
    get = lambda k, t: res.get((k, t))

    size = int(meta.get("big_size", "0"))
    print(
        f"ocicache side-by-side benchmark, {meta.get('mode', '?')} mode: blob {size / 2**20:.0f} MiB "
        f"({size} B), {meta.get('clients', '?')} clients, wrk {meta.get('wrk_duration', '?')}"
    )
    print(
        f"{meta.get('ocicache', '')}; nginx {meta.get('nginx', '?')}; registry {meta.get('registry', '?')}; "
        f"containerd {meta.get('containerd', '?')}; {meta.get('cpu', '')}"
    )
    load = f"load average (1, 5, 15 min) at start {meta.get('load_start', '?')}, at end {meta.get('load_end', '?')}"
    try:
        busy = float(meta.get("load_start", "0").split()[0]) > 1.0
    except ValueError:
        busy = False
    print(load + ("  <- the machine was busy: figures are noisy" if busy else ""))
    print()

    w0 = max(len(m[1]) for m in METRICS) + 2
    cols = [TITLES[t] for t in TARGETS]
    width = 15
    print("Figures".ljust(w0) + "".join(c.rjust(width) for c in cols))
    for k, label, _ in METRICS:
        if not any(get(k, t) is not None for t in TARGETS):
            continue
        print(label.ljust(w0) + "".join(fmt(get(k, t)).rjust(width) for t in TARGETS))
    print()

    peers = [t for t in TARGETS if t != "ocicache"]
    print(
        "ocicache / peer (>1 = ocicache better)".ljust(w0)
        + "".join(TITLES[t].rjust(width) for t in peers)
    )
    for k, label, higher in METRICS:
        o = get(k, "ocicache")
        if o is None:
            continue
        cells = []
        for t in peers:
            p = get(k, t)
            if p is None:
                cells.append("-")
            elif higher:
                cells.append(f"{o / p:.2f}x" if p else "-")
            else:  # lower is better: peer / ocicache
                if o == 0 and p == 0:
                    cells.append("=")
                elif o == 0:
                    cells.append("inf")
                else:
                    cells.append(f"{p / o:.2f}x")
        if all(c == "-" for c in cells):
            continue
        print(label.ljust(w0) + "".join(c.rjust(width) for c in cells))
    print()

    def target(label, ok, detail):
        status = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        print(f"  {status}  {label}: {detail}")
        return ok

    print("Targets (ocicache, ratios from this run)")
    results = []
    g = get("c20_upstream_gets", "ocicache")
    results.append(target("20 cold clients: exactly 1 upstream download",
                          None if g is None else g == 1, f"{fmt(g)} GETs"))
    o, n = get("c20_wall_s", "ocicache"), get("c20_wall_s", "nginx-disk")
    results.append(target("20 cold clients: wall <= 1.2x nginx serving the file from disk",
                          None if o is None or n is None else o <= 1.2 * n,
                          f"{fmt(o)} s vs {fmt(n)} s = {o / n:.2f}x" if o and n else "-"))
    o = get("c20_ttfb_med_ms", "ocicache")
    results.append(target("20 cold clients: median TTFB < 50 ms",
                          None if o is None else o < 50, f"{fmt(o)} ms"))
    o = get("warm_mbps", "ocicache")
    best = max((get("warm_mbps", t) or 0, t) for t in ("regproxy", "nginx-cache"))
    results.append(target("warm MB/s >= best peer's",
                          None if o is None or not best[0] else o >= best[0],
                          f"{fmt(o)} vs {TITLES[best[1]]} {fmt(best[0])} = {o / best[0]:.2f}x"
                          if o and best[0] else "-"))
    o, c = get("cold_mbps", "ocicache"), get("cold_cpu", "ocicache")
    best = max((get("cold_mbps", t) or 0, t) for t in ("regproxy", "nginx-cache"))
    results.append(target("cold 1 client: MB/s >= best peer's, server CPU <= 1.7 s/GiB",
                          None if o is None or c is None or not best[0]
                          else o >= best[0] and c <= 1.7,
                          f"{fmt(o)} vs {TITLES[best[1]]} {fmt(best[0])} = {o / best[0]:.2f}x, "
                          f"{fmt(c)} CPU-s/GiB" if o and c and best[0] else "-"))
    for row, what in (("tag", "by tag"), ("digest", "by digest")):
        o, n = get(f"{row}_rps", "ocicache"), get(f"{row}_rps", "nginx-disk")
        p99, up = get(f"{row}_p99_ms", "ocicache"), get(f"{row}_upstream", "ocicache")
        results.append(target(f"manifest {what}: req/s >= 0.8x nginx from disk, p99 < 2 ms, "
                              "0 upstream requests",
                              None if None in (o, n, p99, up)
                              else o >= 0.8 * n and p99 < 2 and up == 0,
                              f"{fmt(o)} vs {fmt(n)} = {o / n:.2f}x, p99 {fmt(p99)} ms "
                              f"(nginx from disk {fmt(get(f'{row}_p99_ms', 'nginx-disk'))}, "
                              f"harness floor {fmt(get('floor_p99_ms', 'nginx-disk'))}), "
                              f"{fmt(up)} upstream requests" if o and n else "-"))
    o = get("c20_rss_mib", "ocicache")
    results.append(target("peak RSS during the 20-client test < 48 MiB",
                          None if o is None else o < 48, f"{fmt(o)} MiB"))
    passed = sum(1 for r in results if r)
    failed = sum(1 for r in results if r is False)
    print(f"targets: {passed} passed, {failed} failed")


if __name__ == "__main__":
    main()
