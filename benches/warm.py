#!/usr/bin/env python3
"""Warm throughput against concurrency: ocicache serving cached blobs from its folder, side
by side with nginx serving the same files from disk (`sendfile on`), in one run (stdlib
only; `warm.sh` builds the binary and calls it).

Builds (once, then reused) a warm cache under DIR/cache: one 64 MiB blob and 1,000 blobs of
1 MiB, random bytes, each stored under blobs/sha256/<2 hex>/<hex> with its real sha256.
ocicache serves that folder (its one upstream, on port 9 of 127.0.0.1, is never contacted:
the run checks its log for it); nginx serves the same files, a regex location mapping
/v2/<name>/blobs/sha256:<hex> to blobs/sha256/<2 hex>/<hex>. Both log every request, as in
production (ocicache at `info`, nginx's access log).

The load: a client of its own (asyncio, one process), C keep-alive connections opened
before the timer starts, each sending GETs one after the other for D seconds: of the 64 MiB
blob, or of the 1 MiB blobs in rotation (connection i starts at blob i). Per concurrency and
workload it runs nginx and ocicache one after the other (alternating which goes first) and
prints:
  MB/s      10^6 bytes of body received by all connections in the window / the window
            (bytes of transfers still under way at its end count too)
  reqs      responses completed in the window
  ttfb p50/p99  ms from writing a request to the first byte of its response
  rss       peaks during the step, sampled every 50 ms from /proc/PID/status (nginx: the
            sums over master and workers): VmRSS, and for ocicache also its parts RssAnon
            (its own heap and stacks) and RssFile (pages of the page cache mapped into
            it: ocicache serves committed blobs from memory maps, and every mapped page it
            touched counts in its RSS, though that memory is the page cache's)
Every response must be 200 with the expected length, else the step is marked `ERR`.

  cpu       the server's CPU seconds (utime + stime, all its processes) per GB (10^9
            bytes) of body sent in the step: far less sensitive than MB/s to other work
            on the machine
  hwm       ocicache's VmHWM at the end of the step: the process's peak RSS since it
            started (so over this and every earlier step)
With --repeat N, each step runs N times (alternating which server goes first) and the end
prints the spread of the ratios.

Usage: warm.py BINARY DIR [--seconds D] [--clients 1,10,100,500] [--workloads 64MiB,1MiB]
                          [--repeat N]
"""

import argparse
import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

BIG = 64 << 20
SMALL = 1 << 20
N_SMALL = 1000
NAME = "library/warm"


def build_cache(path):
    """Writes the blobs once; returns (big digest hex, [small digest hex])."""
    index = os.path.join(path, "bench-blobs")
    if os.path.exists(index):
        hexes = open(index).read().split()
        if len(hexes) == 1 + N_SMALL:
            return hexes[0], hexes[1:]
    t = time.monotonic()
    blobs = os.path.join(path, "blobs", "sha256")
    hexes = []
    for size in [BIG] + [SMALL] * N_SMALL:
        data = os.urandom(size)
        h = hashlib.sha256(data).hexdigest()
        os.makedirs(os.path.join(blobs, h[:2]), exist_ok=True)
        with open(os.path.join(blobs, h[:2], h), "wb") as f:
            f.write(data)
        hexes.append(h)
    with open(index, "w") as f:
        f.write("\n".join(hexes) + "\n")
    print("# built 1 + %d blobs in %.1f s under %s" % (N_SMALL, time.monotonic() - t, path),
          file=sys.stderr)
    return hexes[0], hexes[1:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(port, path):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n" % path.encode())
            return int(s.recv(64).split()[1])
    except (OSError, IndexError, ValueError):
        return None


def wait_status(port, path, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if status(port, path) == 200:
            return
        time.sleep(0.05)
    raise SystemExit("nothing answered 200 on %s within %d s" % (path, timeout))


def proc_kib(pid, field):
    try:
        for line in open("/proc/%d/status" % pid):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Sampler(threading.Thread):
    """Peaks of a few /proc/PID/status fields (KiB, summed over `pids()`) while it runs."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(0.05):
            now = dict.fromkeys(self.FIELDS, 0)
            for pid in self.pids():
                for f in self.FIELDS:
                    now[f] += proc_kib(pid, f)
            for f in self.FIELDS:
                self.peak[f] = max(self.peak[f], now[f])

    def stop(self):
        self.stopping.set()
        self.join()
        return {f: v / 1024 for f, v in self.peak.items()}


def cpu_seconds(pids):
    """utime + stime of `pids`, in seconds."""
    ticks = 0
    for pid in pids:
        try:
            fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def loadavg():
    return " ".join(open("/proc/loadavg").read().split()[:3])


# --- the load generator ---------------------------------------------------------------

# One receive buffer for every connection: the loop is single-threaded and a body's bytes
# are only counted, so each read may overwrite the last.
BUF = bytearray(1 << 20)


class Conn(asyncio.BufferedProtocol):
    """One keep-alive connection sending GETs one after the other; counts what arrives."""

    def __init__(self, run):
        self.run = run
        self.transport = None
        self.head = b""
        self.left = 0  # body bytes still due for the current response (after its head)
        self.in_body = False
        self.sent_at = None
        self.expected = 0
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def send(self, path, expected):
        self.expected = expected
        self.head = b""
        self.in_body = False
        self.sent_at = time.perf_counter()
        self.transport.write(b"GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % path)

    def get_buffer(self, sizehint):
        return BUF

    def buffer_updated(self, n):
        run = self.run
        if self.sent_at is None:
            return
        now = time.perf_counter()
        if not self.in_body:
            if not self.head:
                run.ttfb.append(now - self.sent_at)
            self.head += bytes(BUF[:n])
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, body = self.head[:end], len(self.head) - end - 4
            lines = head.split(b"\r\n")
            length = None
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if lines[0].split()[1] != b"200" or length != self.expected:
                run.errors.append(lines[0].decode(errors="replace") + " length %s" % length)
                self.transport.close()
                return
            self.in_body = True
            self.left = length
            n = body
        if run.counting:
            run.bytes += n
        self.left -= n
        if self.left <= 0:
            if run.counting:
                run.reqs += 1
            self.sent_at = None
            run.next(self)

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(exc)
        if self.run.counting and not self.run.stopping:
            self.run.errors.append("connection lost: %s" % exc)


class Run:
    def __init__(self, paths, expected):
        self.paths = paths
        self.expected = expected
        self.bytes = 0
        self.reqs = 0
        self.ttfb = []
        self.errors = []
        self.counting = False
        self.stopping = False
        self.cursor = {}

    def next(self, conn):
        if self.stopping:
            conn.transport.close()
            return
        i = self.cursor[conn] = (self.cursor[conn] + 1) % len(self.paths)
        conn.send(self.paths[i], self.expected)


async def load(port, paths, expected, clients, seconds):
    loop = asyncio.get_running_loop()
    run = Run(paths, expected)
    conns = []
    for i in range(clients):
        _, c = await loop.create_connection(lambda: Conn(run), "127.0.0.1", port)
        run.cursor[c] = (i - 1) % len(paths)
        conns.append(c)
    run.counting = True
    start = time.perf_counter()
    for c in conns:
        run.next(c)
    await asyncio.sleep(seconds)
    run.counting = False
    elapsed = time.perf_counter() - start
    run.stopping = True
    for c in conns:
        c.transport.close()
    await asyncio.gather(*(c.done for c in conns))
    run.ttfb.sort()

    def pct(p):
        if not run.ttfb:
            return float("nan")
        return run.ttfb[min(len(run.ttfb) - 1, int(p * len(run.ttfb)))] * 1000

    return {
        "mbs": run.bytes / elapsed / 1e6,
        "reqs": run.reqs,
        "p50": pct(0.50),
        "p99": pct(0.99),
        "errors": run.errors,
    }


# --- the servers -----------------------------------------------------------------------


def start_ocicache(binary, work, cache):
    port = free_port()
    conf = os.path.join(work, "ocicache.toml")
    with open(conf, "w") as f:
        f.write('listen = "127.0.0.1:%d"\n[cache]\ndir = "%s"\nmax_size = "100GiB"\n'
                '[log]\nlevel = "info"\n'
                '[[upstreams]]\nname = "docker.io"\nurl = "http://127.0.0.1:9"\ndefault = true\n'
                % (port, cache))
    log = open(os.path.join(work, "ocicache.log"), "w")
    p = subprocess.Popen([binary, "serve", "--config", conf], stdout=log, stderr=subprocess.STDOUT)
    wait_status(port, "/readyz")
    return p, port


def start_nginx(work, cache):
    port = free_port()
    d = os.path.join(work, "nginx")
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write("""worker_processes auto;
daemon off;
master_process on;
user root;
pid %(d)s/nginx.pid;
error_log %(w)s/nginx.error.log warn;
events { worker_connections 4096; }
http {
  access_log %(w)s/nginx.access.log;
  client_body_temp_path %(d)s/client_temp;
  proxy_temp_path %(d)s/proxy_temp;
  fastcgi_temp_path %(d)s/fastcgi_temp;
  uwsgi_temp_path %(d)s/uwsgi_temp;
  scgi_temp_path %(d)s/scgi_temp;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:%(port)d backlog=4096;
    default_type application/octet-stream;
    location = /v2/ { return 200 "{}"; }
    location ~ "^/v2/.+/blobs/sha256:(?<p>[0-9a-f]{2})(?<r>[0-9a-f]{62})$" {
      alias %(cache)s/blobs/sha256/$p/$p$r;
    }
  }
}
""" % {"d": d, "w": work, "port": port, "cache": cache})
    log = open(os.path.join(work, "nginx.log"), "w")
    p = subprocess.Popen(["nginx", "-p", d, "-c", conf], stdout=log, stderr=subprocess.STDOUT)
    wait_status(port, "/v2/")
    return p, port


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def run_step(a, wname, c, paths, expected, step, oci, oci_port, ngx, ngx_port):
    """One step: nginx and ocicache one after the other (which goes first alternates with
    `step`); prints its line and returns ocicache's ratio."""
    res = {}
    order = [("nginx", ngx_port), ("ocicache", oci_port)]
    if step % 2:
        order.reverse()
    for name, port in order:
        pids = {"nginx": lambda: [ngx.pid] + children(ngx.pid),
                "ocicache": lambda: [oci.pid]}[name]
        sampler = Sampler(pids)
        sampler.start()
        cpu = cpu_seconds(pids())
        res[name] = asyncio.run(load(port, paths, expected, c, a.seconds))
        res[name]["rss"] = sampler.stop()
        gb = res[name]["mbs"] * a.seconds / 1e3
        res[name]["cpu"] = (cpu_seconds(pids()) - cpu) / gb if gb else float("nan")
    n, o = res["nginx"], res["ocicache"]
    flag = " ERR" if n["errors"] or o["errors"] else ""
    ratio = o["mbs"] / n["mbs"] if n["mbs"] else float("nan")
    print("%-6s %7d | %10.0f %7d %8.1f %8.1f %8.1f %6.2f | %13.0f %7d %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f %6.2f | %5.2f%s"
          % (wname, c, n["mbs"], n["reqs"], n["p50"], n["p99"], n["rss"]["VmRSS"], n["cpu"],
             o["mbs"], o["reqs"], o["p50"], o["p99"], o["rss"]["VmRSS"],
             o["rss"]["RssAnon"], o["rss"]["RssFile"], o["rss"]["VmHWM"], o["cpu"], ratio,
             flag),
          flush=True)
    for name in order:
        for e in res[name[0]]["errors"][:3]:
            print("#   %s: %s" % (name[0], e))
    return ratio


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("dir")
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--clients", default="1,10,100,500")
    ap.add_argument("--workloads", default="64MiB,1MiB")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each step this many times, alternating which server goes first")
    a = ap.parse_args()
    clients = [int(c) for c in a.clients.split(",")]
    work = os.path.abspath(a.dir)
    cache = os.path.join(work, "cache")
    os.makedirs(cache, exist_ok=True)
    big, small = build_cache(cache)
    # The page cache holds every file (as it would on a warm mirror with the memory): read
    # them once so that the first server measured does not pay for the disk.
    for h in [big] + small:
        with open(os.path.join(cache, "blobs", "sha256", h[:2], h), "rb") as f:
            while f.read(8 << 20):
                pass

    oci, oci_port = start_ocicache(a.binary, work, cache)
    ngx, ngx_port = start_nginx(work, cache)
    workloads = {
        "64MiB": ([b"/v2/%s/blobs/sha256:%s" % (NAME.encode(), big.encode())], BIG),
        "1MiB": ([b"/v2/%s/blobs/sha256:%s" % (NAME.encode(), h.encode()) for h in small], SMALL),
    }
    print("# %s, %d cores, load average %s at the start"
          % (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.cpu_count(), loadavg()))
    print("# %d s per step; ocicache pid %d, nginx pid %d" % (a.seconds, oci.pid, ngx.pid))
    print("%-6s %7s | %9s %7s %8s %8s %8s %6s | %9s %7s %8s %8s %8s %8s %8s %8s %6s | %5s"
          % ("blob", "clients", "nginx MB/s", "reqs", "ttfb p50", "p99", "rss MiB", "cpu",
             "ocicache MB/s", "reqs", "ttfb p50", "p99", "rss MiB", "anon", "file", "hwm",
             "cpu", "ratio"))
    step = 0
    ratios = []
    try:
        for wname in a.workloads.split(","):
            paths, expected = workloads[wname]
            for c in clients:
                for _ in range(a.repeat):
                    ratio = run_step(a, wname, c, paths, expected, step, oci, oci_port,
                                     ngx, ngx_port)
                    ratios.append((wname, c, ratio))
                    step += 1
    finally:
        stop(oci)
        stop(ngx)
    print("# load average %s at the end" % loadavg())
    if a.repeat > 1:
        for wname in a.workloads.split(","):
            for c in clients:
                rs = [r for w, k, r in ratios if (w, k) == (wname, c)]
                if rs:
                    print("# %s x %d clients: ratio %.2f-%.2f over %d runs"
                          % (wname, c, min(rs), max(rs), len(rs)))
    upstream = [l for l in open(os.path.join(work, "ocicache.log")) if "127.0.0.1:9" in l]
    print("# ocicache log lines naming the upstream: %d" % len(upstream))


if __name__ == "__main__":
    main()
