//! Seeding the real registry through its push API: blobs, manifests, whole images and
//! indexes, and deleting them again.

use super::layers::{host_oci_arch, layer_file_path, make_layer, sha256_digest, split_platform};
use super::{absolute_url, header, http_request, Registry};
use super::{OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST};

/// What `Registry::push_image` pushed.
#[derive(Clone, Debug)]
pub struct PushedImage {
    pub repo: String,
    pub tag: String,
    pub manifest_digest: String,
    /// Manifest bytes exactly as pushed (hash them to get `manifest_digest`).
    pub manifest: Vec<u8>,
    pub media_type: String,
    pub config_digest: String,
    pub config: Vec<u8>,
    /// Compressed layer digests, in manifest order.
    pub layer_digests: Vec<String>,
    /// Compressed layer bytes as pushed, in manifest order.
    pub layer_blobs: Vec<Vec<u8>>,
    /// sha256 of each uncompressed tar (the config's rootfs.diff_ids).
    pub diff_ids: Vec<String>,
    /// Platform architecture written into the config (`amd64`, `arm64`, ...).
    pub arch: String,
}

impl PushedImage {
    /// Every digest a full pull must fetch: manifest, config, layers.
    pub fn all_digests(&self) -> Vec<String> {
        let mut v = vec![self.manifest_digest.clone(), self.config_digest.clone()];
        v.extend(self.layer_digests.iter().cloned());
        v
    }
}

impl Registry {
    // ---------------- seeding through the push API ----------------

    /// Upload a blob (POST upload session, then monolithic PUT with digest).
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        let start = format!("{}/v2/{repo}/blobs/uploads/", self.url());
        let (st, h, body) = http_request("POST", &start, &[], b"");
        assert_eq!(st, 202, "POST {start}: {}", String::from_utf8_lossy(&body));
        let loc = header(&h, "location").expect("upload Location header");
        let loc = absolute_url(&self.url(), loc);
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={digest}");
        let (st, h, body) = http_request(
            "PUT",
            &put,
            &[("Content-Type", "application/octet-stream")],
            data,
        );
        assert_eq!(
            st,
            201,
            "PUT blob {digest} to {repo}: {}",
            String::from_utf8_lossy(&body)
        );
        if let Some(d) = header(&h, "docker-content-digest") {
            assert_eq!(d, digest, "registry computed a different blob digest");
        }
        digest
    }

    /// PUT a manifest (or index) under `reference` (tag or digest).
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let digest = sha256_digest(bytes);
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.url());
        let (st, h, body) = http_request("PUT", &url, &[("Content-Type", media_type)], bytes);
        assert_eq!(st, 201, "PUT {url}: {}", String::from_utf8_lossy(&body));
        if let Some(d) = header(&h, "docker-content-digest") {
            assert_eq!(d, digest, "registry computed a different manifest digest");
        }
        digest
    }

    /// Push a single-platform OCI image for the host's architecture. Each
    /// entry of `layers` is the content of one file, `layer_file_path(i)`,
    /// packed as its own gzip tar layer. Deterministic: the same inputs give
    /// the same digests.
    pub fn push_image(&self, repo: &str, tag: &str, layers: &[Vec<u8>]) -> PushedImage {
        self.push_image_for_arch(repo, tag, layers, host_oci_arch())
    }

    /// Like `push_image` but for the given platform (`"arm64"`, `"arm/v7"`).
    pub fn push_image_for_arch(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        arch: &str,
    ) -> PushedImage {
        let (architecture, variant) = split_platform(arch);
        let mut layer_digests = Vec::new();
        let mut layer_blobs = Vec::new();
        let mut diff_ids = Vec::new();
        let mut history = Vec::new();
        let mut layer_descs = Vec::new();
        for (i, content) in layers.iter().enumerate() {
            let (tar, gz) = make_layer(i, content);
            diff_ids.push(sha256_digest(&tar));
            let d = self.push_blob(repo, &gz);
            layer_descs.push(serde_json::json!({
                "mediaType": OCI_LAYER_GZIP,
                "digest": d,
                "size": gz.len(),
            }));
            history.push(serde_json::json!({
                "created": "1970-01-01T00:00:00Z",
                "created_by": format!("ocicache test: ADD {} /", layer_file_path(i)),
            }));
            layer_digests.push(d);
            layer_blobs.push(gz);
        }
        let mut config = serde_json::json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "WorkingDir": "/",
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": history,
        });
        if let Some(v) = &variant {
            config["variant"] = serde_json::Value::String(v.clone());
        }
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = self.push_blob(repo, &config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layer_descs,
        }))
        .unwrap();
        let manifest_digest = self.push_manifest(repo, tag, OCI_MANIFEST, &manifest);
        PushedImage {
            repo: repo.to_string(),
            tag: tag.to_string(),
            manifest_digest,
            manifest,
            media_type: OCI_MANIFEST.to_string(),
            config_digest,
            config,
            layer_digests,
            layer_blobs,
            diff_ids,
            arch: arch.to_string(),
        }
    }

    /// Push an OCI image index under `tag` in `repo`. Each image must already
    /// be in `repo` (the registry checks). `arch` is `"amd64"`, `"arm64"`,
    /// `"arm/v7"`, ...; os is always linux.
    pub fn push_index(
        &self,
        repo: &str,
        tag: &str,
        manifests: &[(&PushedImage, &str)],
    ) -> (String, Vec<u8>) {
        let entries: Vec<serde_json::Value> = manifests
            .iter()
            .map(|(img, arch)| {
                let (architecture, variant) = split_platform(arch);
                let mut platform =
                    serde_json::json!({ "architecture": architecture, "os": "linux" });
                if let Some(v) = variant {
                    platform["variant"] = serde_json::Value::String(v);
                }
                serde_json::json!({
                    "mediaType": img.media_type,
                    "digest": img.manifest_digest,
                    "size": img.manifest.len(),
                    "platform": platform,
                })
            })
            .collect();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": entries,
        }))
        .unwrap();
        let digest = self.push_manifest(repo, tag, OCI_INDEX, &index);
        (digest, index)
    }

    /// DELETE a manifest by digest (delete is enabled in the config).
    pub fn delete_manifest(&self, repo: &str, digest: &str) -> u16 {
        let url = format!("{}/v2/{repo}/manifests/{digest}", self.url());
        http_request("DELETE", &url, &[], b"").0
    }

    /// DELETE a blob by digest.
    pub fn delete_blob(&self, repo: &str, digest: &str) -> u16 {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.url());
        http_request("DELETE", &url, &[], b"").0
    }
}
