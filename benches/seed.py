#!/usr/bin/env python3
"""Seeds the benchmark's upstream registry through its push API (stdlib only).

Pushes, into the registry at URL:
  library/big:v1      one uncompressed tar layer holding BIG_MIB MiB of random bytes
  library/layers:v1   five gzip tar layers of LAYER_MIB MiB each (what containerd pulls)
  library/layers:arm64  a small arm64 image
  library/layers:multi  an OCI index over layers:v1 (host arch) and layers:arm64

and writes into OUTDIR:
  big.blob            the 1 GiB layer blob, byte for byte (served by the nginx-from-disk
                      reference), plus disk/ laid out as the registry's URL paths
  seed.env            KEY=VALUE lines for compare.sh (digests, sizes, paths)

Usage: seed.py URL OUTDIR BIG_MIB LAYER_MIB
"""

import gzip
import hashlib
import http.client
import io
import json
import os
import platform
import sys
import tarfile
import urllib.parse

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

CHUNK = 8 << 20


def host_arch():
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


class Registry:
    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80

    def request(self, method, path, body=None, headers=None, length=None):
        c = http.client.HTTPConnection(self.host, self.port, timeout=600, blocksize=1 << 20)
        headers = dict(headers or {})
        if length is not None:
            headers["Content-Length"] = str(length)
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, r.headers, data

    def push_blob(self, repo, digest, size, body):
        """body: bytes or a binary file object of `size` bytes."""
        st, h, data = self.request("POST", f"/v2/{repo}/blobs/uploads/", b"")
        if st != 202:
            sys.exit(f"POST upload for {repo}: {st} {data[:300]!r}")
        loc = h["Location"]
        u = urllib.parse.urlsplit(loc)
        path = u.path + ("?" + u.query + "&" if u.query else "?") + "digest=" + digest
        st, h, data = self.request(
            "PUT",
            path,
            body,
            {"Content-Type": "application/octet-stream"},
            length=size,
        )
        if st != 201:
            sys.exit(f"PUT blob {digest} to {repo}: {st} {data[:300]!r}")
        return digest

    def push_bytes(self, repo, data):
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        return self.push_blob(repo, d, len(data), data)

    def push_manifest(self, repo, ref, media_type, data):
        st, h, body = self.request(
            "PUT", f"/v2/{repo}/manifests/{ref}", data, {"Content-Type": media_type}
        )
        if st != 201:
            sys.exit(f"PUT manifest {repo}:{ref}: {st} {body[:300]!r}")
        return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_header(name, size):
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uname = ti.gname = "root"
    return ti.tobuf(format=tarfile.USTAR_FORMAT)


def dir_header(name):
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mtime = 0
    ti.mode = 0o755
    ti.uname = ti.gname = "root"
    return ti.tobuf(format=tarfile.USTAR_FORMAT)


def small_tar(name, content):
    out = io.BytesIO()
    out.write(dir_header("data/"))
    out.write(tar_header(name, len(content)))
    out.write(content)
    out.write(b"\0" * ((512 - len(content) % 512) % 512))
    out.write(b"\0" * 1024)
    return out.getvalue()


def write_big_tar(path, mib):
    """An uncompressed tar of one file of `mib` MiB of random bytes; returns (digest, size)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:

        def put(b):
            nonlocal size
            h.update(b)
            f.write(b)
            size += len(b)

        put(dir_header("data/"))
        put(tar_header("data/big.bin", mib << 20))
        left = mib << 20
        while left:
            n = min(CHUNK, left)
            put(os.urandom(n))
            left -= n
        put(b"\0" * 1024)  # content is a multiple of 512: no padding, then the end marker
    return "sha256:" + h.hexdigest(), size


def config_blob(arch, diff_ids):
    return json.dumps(
        {
            "created": "1970-01-01T00:00:00Z",
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        },
        separators=(",", ":"),
    ).encode()


def manifest(config_digest, config_size, layers):
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": t, "digest": d, "size": s} for (t, d, s) in layers],
        },
        separators=(",", ":"),
    ).encode()


def link_disk(outdir, url_path, src=None, data=None):
    """disk/<url path>: what nginx-from-disk serves, the same bytes as the registry."""
    p = os.path.join(outdir, "disk", url_path.lstrip("/"))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    if src is not None:
        os.link(src, p)
    else:
        with open(p, "wb") as f:
            f.write(data)


def main():
    url, outdir, big_mib, layer_mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    reg = Registry(url)
    os.makedirs(outdir, exist_ok=True)
    arch = host_arch()
    env = {}

    # library/big:v1, one uncompressed layer (no gzip: a 1 GiB gzip would take minutes here).
    big = os.path.join(outdir, "big.blob")
    big_digest, big_size = write_big_tar(big, big_mib)
    with open(big, "rb") as f:
        reg.push_blob("library/big", big_digest, big_size, f)
    cfg = config_blob(arch, [big_digest])
    cfg_d = reg.push_bytes("library/big", cfg)
    m = manifest(cfg_d, len(cfg), [(LAYER_TAR, big_digest, big_size)])
    big_manifest = reg.push_manifest("library/big", "v1", OCI_MANIFEST, m)
    link_disk(outdir, f"/v2/library/big/blobs/{big_digest}", src=big)
    env.update(BIG_DIGEST=big_digest, BIG_SIZE=big_size, BIG_FILE=big, BIG_MANIFEST=big_manifest)

    # library/layers:v1, five gzip layers of random bytes (containerd unpacks them).
    layers, diff_ids = [], []
    for i in range(5):
        tar = small_tar(f"data/layer{i}.bin", os.urandom(layer_mib << 20))
        gz = gzip.compress(tar, compresslevel=1, mtime=0)
        d = reg.push_bytes("library/layers", gz)
        layers.append((LAYER_GZIP, d, len(gz)))
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        link_disk(outdir, f"/v2/library/layers/blobs/{d}", data=gz)
    cfg = config_blob(arch, diff_ids)
    cfg_d = reg.push_bytes("library/layers", cfg)
    link_disk(outdir, f"/v2/library/layers/blobs/{cfg_d}", data=cfg)
    m = manifest(cfg_d, len(cfg), layers)
    layers_manifest = reg.push_manifest("library/layers", "v1", OCI_MANIFEST, m)
    link_disk(outdir, "/v2/library/layers/manifests/v1", data=m)
    link_disk(outdir, f"/v2/library/layers/manifests/{layers_manifest}", data=m)
    env.update(
        LAYERS_MANIFEST=layers_manifest,
        LAYERS_BYTES=sum(s for (_, _, s) in layers),
        LAYERS_FIRST=layers[0][1],
    )

    # An arm64 sibling and the multi-arch index over both.
    other = "arm64" if arch != "arm64" else "amd64"
    tar = small_tar("data/other.bin", os.urandom(64 << 10))
    gz = gzip.compress(tar, compresslevel=1, mtime=0)
    d = reg.push_bytes("library/layers", gz)
    cfg2 = config_blob(other, ["sha256:" + hashlib.sha256(tar).hexdigest()])
    cfg2_d = reg.push_bytes("library/layers", cfg2)
    m2 = manifest(cfg2_d, len(cfg2), [(LAYER_GZIP, d, len(gz))])
    m2_d = reg.push_manifest("library/layers", other, OCI_MANIFEST, m2)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": layers_manifest, "size": len(m),
                 "platform": {"architecture": arch, "os": "linux"}},
                {"mediaType": OCI_MANIFEST, "digest": m2_d, "size": len(m2),
                 "platform": {"architecture": other, "os": "linux"}},
            ],
        },
        separators=(",", ":"),
    ).encode()
    env["INDEX_DIGEST"] = reg.push_manifest("library/layers", "multi", OCI_INDEX, index)

    with open(os.path.join(outdir, "seed.env"), "w") as f:
        for k, v in env.items():
            f.write(f"{k}={v}\n")
    print(f"seeded: big {big_size} B {big_digest}; layers:v1 {layers_manifest}; "
          f"layers:multi {env['INDEX_DIGEST']}")


if __name__ == "__main__":
    main()
