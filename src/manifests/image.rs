//! An image reference resolved into every digest of the image, through this service (the
//! cache, tag TTLs, the upstream when needed): what a pin keeps and a sync fetches.

use std::sync::Arc;

use super::Manifests;
use crate::cache::inventory::ImageDigests;
use crate::error::Error;
use crate::reference::{Name, Reference};
use crate::upstream::Upstream;

impl Manifests {
    /// Resolves `reference` of `name` on `up`: the manifest it names (a tag as the public
    /// API would answer it) and, for an index, every child manifest (fetched and cached if
    /// missing), with the config and layer digests of each. Blobs are not fetched.
    pub async fn resolve_image(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
    ) -> Result<(ImageDigests, String), Error> {
        let top = self.get(up, name, reference, None).await?.value;
        let image = ImageDigests::walk(&top.digest, &top.bytes, |d| async move {
            let child = self.get(up, name, &Reference::Digest(d), None).await?;
            Ok::<_, Error>(Some(child.value.bytes.clone()))
        })
        .await?;
        Ok((image, top.media_type.clone()))
    }
}
