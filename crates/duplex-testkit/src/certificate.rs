//! A self-signed certificate for `localhost`, made in the test (rcgen), as PEM files a server
//! can be configured with.

use std::path::PathBuf;

use rustls_pki_types::pem::PemObject as _;
use tempfile::TempDir;

/// A certificate and its key in a temporary folder (removed on drop).
#[derive(Debug)]
pub struct TestCertificate {
    _dir: TempDir,
    /// The PEM certificate file (`tls_cert`).
    pub cert: PathBuf,
    /// The PEM private key file (`tls_key`).
    pub key: PathBuf,
    /// The certificate as PEM text, for a client to trust.
    pub pem: String,
    /// The certificate in DER, for a rustls root store.
    pub der: Vec<u8>,
}

impl TestCertificate {
    /// A fresh self-signed certificate for `localhost`.
    pub fn localhost() -> TestCertificate {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a self-signed certificate");
        let dir = tempfile::tempdir().expect("a temporary folder");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, certified.cert.pem()).expect("write the certificate");
        std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write the key");
        TestCertificate {
            _dir: dir,
            cert,
            key,
            pem: certified.cert.pem(),
            der: certified.cert.der().to_vec(),
        }
    }

    /// A self-signed certificate for `localhost` and 127.0.0.1 made the usual way, by
    /// `openssl req -x509` (which marks it a CA, as `CA:TRUE`): what users hand to `--ca-cert`.
    pub fn openssl_localhost() -> TestCertificate {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("the openssl command (Debian's openssl package) makes the test certificate");
        assert!(status.success(), "openssl req -x509 failed");
        let pem = std::fs::read_to_string(&cert).expect("read the certificate");
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("a PEM certificate")
            .to_vec();
        TestCertificate {
            _dir: dir,
            cert,
            key,
            pem,
            der,
        }
    }

    /// The `(cert, key)` pair for [`duplex_server::Config::tls`].
    pub fn config(&self) -> Option<(PathBuf, PathBuf)> {
        Some((self.cert.clone(), self.key.clone()))
    }
}
