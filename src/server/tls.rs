//! TLS for clients (rustls, ALPN `h2` and `http/1.1`).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use super::StartError;

/// Loads the PEM certificate chain and key into an acceptor.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, StartError> {
    let cert_error = |problem: String| StartError::file("tls.cert", cert, problem);
    let key_error = |problem: String| StartError::file("tls.key", key, problem);
    let certs = rustls_pemfile::certs(
        &mut std::fs::read(cert)
            .map_err(|e| cert_error(e.to_string()))?
            .as_slice(),
    )
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| cert_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error("no certificate in the file".into()));
    }
    let key = rustls_pemfile::private_key(
        &mut std::fs::read(key)
            .map_err(|e| key_error(e.to_string()))?
            .as_slice(),
    )
    .map_err(|e| key_error(e.to_string()))?
    .ok_or_else(|| key_error("no private key in the file".into()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(StartError::Tls)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(StartError::Tls)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
