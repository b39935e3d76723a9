#!/usr/bin/env python3
"""Start-up of ocicache on a large cache: how soon it serves, how soon its index is whole,
and what the index costs in memory (stdlib only; `index.sh` builds the binary and calls it).

Builds (once, then reused) a synthetic cache of N blobs under DIR/cache-N: each blob is the
decimal text of its number (a few bytes: 1-byte blobs could only have 256 distinct digests),
stored under blobs/sha256/<2 hex>/<hex> with the real sha256 of its content, so
`ocicache cache verify` agrees. Files are written in order, so their mtimes (the recency the
scan restores) follow their numbers.

Then starts `ocicache serve` twice, on loopback, with an upstream that is never contacted:
on an empty cache (the baseline RSS), then on the N blobs, and prints:
  v2_s         seconds from the start of the process until `GET /v2/` answers 200
  blob_s       seconds until a GET of the newest blob (the last in the scan's order), sent
               as soon as /v2/ answers, has its whole body; `*` when /readyz still
               answered 503 right after it (served before the scan was done)
  ready_s      seconds until `GET /readyz` answers 200 (the index scan is done)
  rss_mib      VmRSS once ready (after a settle of 1 s)
  peak_mib     VmHWM then: the peak, which includes the scan's transient list
  bytes_blob   (RSS with N blobs - RSS empty) / N

Usage: index.py BINARY DIR N [N...]
"""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time


def build_cache(path, n):
    marker = os.path.join(path, "bench-blobs")
    if os.path.exists(marker) and open(marker).read().strip() == str(n):
        return
    blobs = os.path.join(path, "blobs", "sha256")
    for i in range(256):
        os.makedirs(os.path.join(blobs, "%02x" % i), exist_ok=True)
    t = time.monotonic()
    for i in range(n):
        data = str(i).encode()
        hexd = hashlib.sha256(data).hexdigest()
        fd = os.open(os.path.join(blobs, hexd[:2], hexd), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
    with open(marker, "w") as f:
        f.write(str(n))
    print("# built %d blobs in %.1f s under %s" % (n, time.monotonic() - t, path), file=sys.stderr)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path):
    """The HTTP status and body of GET path, or (None, None) when nothing answers yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n" % path.encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body
    except (OSError, IndexError, ValueError):
        return None, None


def status(port, path):
    return get(port, path)[0]


def status_kib(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no " + field)


def run(binary, cache, workdir, newest=None):
    port = free_port()
    conf = os.path.join(workdir, "bench-%d.toml" % port)
    with open(conf, "w") as f:
        f.write(
            'listen = "127.0.0.1:%d"\n[cache]\ndir = "%s"\nmax_size = "1TiB"\n'
            '[log]\nlevel = "warn"\n'
            '[[upstreams]]\nname = "docker.io"\nurl = "http://127.0.0.1:9"\ndefault = true\n'
            % (port, cache)
        )
    log = open(os.path.join(workdir, "bench-%d.log" % port), "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([binary, "serve", "--config", conf], stdout=log, stderr=log)
    try:
        v2 = ready = blob = None
        while ready is None:
            if proc.poll() is not None:
                raise RuntimeError("ocicache exited: see %s" % log.name)
            if v2 is None and status(port, "/v2/") == 200:
                v2 = time.monotonic() - t0
                if newest is not None:
                    data = str(newest).encode()
                    path = "/v2/library/x/blobs/sha256:" + hashlib.sha256(data).hexdigest()
                    code, body = get(port, path)
                    if (code, body) != (200, data):
                        raise RuntimeError("blob %d: %s %r" % (newest, code, body))
                    blob = "%.3f" % (time.monotonic() - t0)
                    if status(port, "/readyz") == 503:
                        blob += "*"
            if v2 is not None and status(port, "/readyz") == 200:
                ready = time.monotonic() - t0
            time.sleep(0.005)
        time.sleep(1)
        return v2, blob, ready, status_kib(proc.pid, "VmRSS"), status_kib(proc.pid, "VmHWM")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    binary, workdir, counts = sys.argv[1], sys.argv[2], [int(a) for a in sys.argv[3:]]
    os.makedirs(workdir, exist_ok=True)
    empty = os.path.join(workdir, "cache-empty")
    os.makedirs(empty, exist_ok=True)
    _, _, _, base, base_peak = run(binary, empty, workdir)
    print("blobs\tv2_s\tblob_s\tready_s\trss_mib\tpeak_mib\tbytes_blob")
    print("0\t-\t-\t-\t%.1f\t%.1f\t-" % (base / 1024, base_peak / 1024))
    for n in counts:
        cache = os.path.join(workdir, "cache-%d" % n)
        build_cache(cache, n)
        v2, blob, ready, rss, peak = run(binary, cache, workdir, newest=n - 1)
        print(
            "%d\t%.3f\t%s\t%.3f\t%.1f\t%.1f\t%.0f"
            % (n, v2, blob, ready, rss / 1024, peak / 1024, (rss - base) * 1024 / n)
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
