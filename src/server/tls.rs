//! TLS for clients (rustls, ALPN `h2` and `http/1.1`).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

/// Loads the PEM certificate chain and key into an acceptor.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(
        &mut std::fs::read(cert)
            .map_err(|e| anyhow::anyhow!("tls.cert {}: {e}", cert.display()))?
            .as_slice(),
    )
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| anyhow::anyhow!("tls.cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("tls.cert {}: no certificate in the file", cert.display());
    }
    let key = rustls_pemfile::private_key(
        &mut std::fs::read(key)
            .map_err(|e| anyhow::anyhow!("tls.key {}: {e}", key.display()))?
            .as_slice(),
    )
    .map_err(|e| anyhow::anyhow!("tls.key {}: {e}", key.display()))?
    .ok_or_else(|| anyhow::anyhow!("tls.key {}: no private key in the file", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| anyhow::anyhow!("tls: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
