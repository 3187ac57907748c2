//! `server.tls`: a certificate chain and its private key (PEM files), loaded and checked once
//! at start-up into a rustls server configuration (ring as the crypto provider: a smaller build
//! than aws-lc-rs, and no C toolchain beyond `cc`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS server configuration, ready to accept connections.
pub type TlsConfig = Arc<rustls::ServerConfig>;

/// Load `cert` (a PEM chain, leaf first) and `key` (a PEM private key: PKCS#8, PKCS#1 or
/// SEC1) and check that they belong together. `Err` names the file and the problem.
pub fn load(cert: &Path, key: &Path) -> Result<TlsConfig, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read the certificate `{}`: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{}` is not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("`{}` holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from `{}`: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the certificate and the key do not make a TLS identity: {e}"))?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
