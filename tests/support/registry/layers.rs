//! Deterministic test data: digests, pseudo-random bytes, and reproducible tar and gzip
//! layers, so the same inputs always give the same digests.

use std::io::Write;

use sha2::{Digest, Sha256};

/// `"sha256:<hex>"` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Deterministic pseudo-random bytes (splitmix64-seeded xorshift64*).
/// Random data does not compress, so gzip layers stay about `len` bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    // splitmix64 so that small / zero seeds still give a good, non-zero state
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut state = z ^ (z >> 31);
    if state == 0 {
        state = 0x2545_F491_4F6C_DD1D;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Path (inside the image's root filesystem, no leading slash) of the file
/// that layer `index` of a `push_image` image holds.
pub fn layer_file_path(index: usize) -> String {
    format!("data/layer{index}.bin")
}

fn tar_header(path: &str, size: u64, mode: u32, typeflag: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    assert!(
        path.len() < 100,
        "tar path too long for this tiny writer: {path}"
    );
    h[..path.len()].copy_from_slice(path.as_bytes());
    fn octal(field: &mut [u8], value: u64) {
        // width-1 octal digits, NUL terminated
        let s = format!("{:0width$o}", value, width = field.len() - 1);
        assert!(s.len() == field.len() - 1, "tar field overflow");
        field[..s.len()].copy_from_slice(s.as_bytes());
        field[s.len()] = 0;
    }
    octal(&mut h[100..108], mode as u64); // mode
    octal(&mut h[108..116], 0); // uid
    octal(&mut h[116..124], 0); // gid
    octal(&mut h[124..136], size); // size
    octal(&mut h[136..148], 0); // mtime: fixed, for reproducible layers
    h[148..156].copy_from_slice(b"        "); // checksum placeholder
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root"); // uname
    h[297..301].copy_from_slice(b"root"); // gname
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    let s = format!("{sum:06o}");
    h[148..154].copy_from_slice(s.as_bytes());
    h[154] = 0;
    h[155] = b' ';
    h
}

/// A reproducible uncompressed ustar archive holding the directories leading
/// to `path` and one regular file `path` (mode 0644, uid/gid 0, mtime 0).
pub fn make_tar(path: &str, content: &[u8]) -> Vec<u8> {
    let path = path.trim_start_matches('/');
    let mut out = Vec::with_capacity(content.len() + 4096);
    let parts: Vec<&str> = path.split('/').collect();
    for i in 1..parts.len() {
        let dir = format!("{}/", parts[..i].join("/"));
        out.extend_from_slice(&tar_header(&dir, 0, 0o755, b'5'));
    }
    out.extend_from_slice(&tar_header(path, content.len() as u64, 0o644, b'0'));
    out.extend_from_slice(content);
    let pad = (512 - content.len() % 512) % 512;
    out.resize(out.len() + pad, 0);
    out.resize(out.len() + 1024, 0); // end-of-archive marker
    out
}

/// Deterministic gzip (mtime 0, no file name) of `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new().mtime(0).write(
        Vec::with_capacity(data.len() / 2 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// One image layer: `(uncompressed tar, gzip-compressed tar)` holding the
/// single file `layer_file_path(index)` with `content`.
pub fn make_layer(index: usize, content: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let tar = make_tar(&layer_file_path(index), content);
    let gz = gzip(&tar);
    (tar, gz)
}

/// OCI architecture name of the host (`amd64`, `arm64`, ...).
pub fn host_oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// Split `"arch"` or `"arch/variant"` (a leading `"linux/"` is accepted).
pub(super) fn split_platform(p: &str) -> (String, Option<String>) {
    let p = p.strip_prefix("linux/").unwrap_or(p);
    match p.split_once('/') {
        Some((a, v)) => (a.to_string(), Some(v.to_string())),
        None => (p.to_string(), None),
    }
}
