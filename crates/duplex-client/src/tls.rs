//! One rustls client configuration for HTTPS, wss:// and TLS on raw TCP: the ring provider,
//! Mozilla's roots (webpki-roots) and any extra CA certificates you trust (a private CA, or a
//! self-signed server certificate).

use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use crate::Error;

/// Builds the client's TLS configuration; `extra_ca_pem` holds PEM certificates to trust besides
/// the public roots.
pub(crate) fn client_config(extra_ca_pem: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for pem in extra_ca_pem {
        let mut any = false;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert =
                cert.map_err(|e| Error::Tls(format!("cannot read a CA certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Tls(format!("cannot trust a CA certificate: {e}")))?;
            any = true;
        }
        if !any {
            return Err(Error::Tls("the CA file holds no PEM certificate".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
