//! An image reference resolved into every digest of the image, through this service (the
//! cache, tag TTLs, the upstream when needed): what a pin keeps and a sync fetches. One walk
//! (index, then the platforms' manifests, then their blobs) serves both: the admin API's
//! pins (`resolve_image`, every platform) and `warm` (the platforms asked for, with the
//! blobs' sizes for its progress). Manifests are read with [`ManifestDoc`] and platforms
//! chosen with [`platform_wanted`], as `ocicache prefetch` does from outside.

use std::sync::Arc;

use super::{Answer, Manifest, Manifests};
use crate::cache::inventory::ImageDigests;
use crate::error::{Error, UpstreamError};
use crate::prefetch::{platform_wanted, ManifestDoc};
use crate::reference::{Digest, Name, Reference};
use crate::upstream::Upstream;

/// An image walked from its reference.
#[derive(Debug)]
pub struct Walked {
    /// What the reference resolved to, as the service answered it (stale or not).
    pub top: Answer<Arc<Manifest>>,
    /// Whether `top` is an index.
    pub index: bool,
    /// The top manifest first, then (for an index) the platforms' manifests walked, each once.
    pub manifests: Vec<Digest>,
    /// The configs and layers of the manifests walked, each once, with the sizes their
    /// descriptors announce.
    pub blobs: Vec<(Digest, u64)>,
}

impl Manifests {
    /// Walks `reference` of `name` on `up`: the manifest it names (a tag as the public API
    /// would answer it) and, for an index, the manifests of the `platforms` wanted
    /// (`os/arch[/variant]`; empty: all), fetched and cached if missing, with the blobs each
    /// names. Blobs are not fetched. `on_manifest` is called as each manifest is resolved.
    pub async fn walk_image(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        platforms: &[String],
        mut on_manifest: impl FnMut(),
    ) -> Result<Walked, Error> {
        let top = self.get(up, name, reference, None).await?;
        on_manifest();
        let doc = parse(up, &top.value)?;
        let index = doc.is_index(&top.value.media_type);
        let mut manifests = vec![top.value.digest.clone()];
        let mut images = Vec::new();
        if index {
            let wanted = doc.manifests.iter();
            for m in wanted.filter(|m| platform_wanted(platforms, m.platform.as_ref())) {
                let digest = Digest::parse(&m.digest)
                    .map_err(|e| protocol(up, format!("index {}: {e}", top.value.digest)))?;
                if manifests.contains(&digest) {
                    continue;
                }
                let child = self.get(up, name, &Reference::Digest(digest), None).await?;
                on_manifest();
                manifests.push(child.value.digest.clone());
                images.push(parse(up, &child.value)?);
            }
        } else {
            images.push(doc);
        }
        let mut blobs: Vec<(Digest, u64)> = Vec::new();
        for d in images.iter().flat_map(|doc| doc.blobs()) {
            let digest =
                Digest::parse(&d.digest).map_err(|e| protocol(up, format!("manifest: {e}")))?;
            if !blobs.iter().any(|(b, _)| *b == digest) {
                blobs.push((digest, d.size));
            }
        }
        Ok(Walked {
            top,
            index,
            manifests,
            blobs,
        })
    }

    /// Resolves `reference` of `name` on `up` into every digest of the image, all platforms
    /// of an index included, and the top manifest's media type. Blobs are not fetched.
    pub async fn resolve_image(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
    ) -> Result<(ImageDigests, String), Error> {
        let walked = self.walk_image(up, name, reference, &[], || {}).await?;
        let image = ImageDigests {
            manifests: walked.manifests,
            blobs: walked.blobs.into_iter().map(|(d, _)| d).collect(),
        };
        Ok((image, walked.top.value.media_type.clone()))
    }
}

fn parse(up: &Upstream, m: &Manifest) -> Result<ManifestDoc, Error> {
    serde_json::from_slice(&m.bytes)
        .map_err(|e| protocol(up, format!("manifest {}: not a manifest: {e}", m.digest)))
}

fn protocol(up: &Upstream, message: String) -> Error {
    Error::upstream(&up.name, UpstreamError::Protocol(message))
}
