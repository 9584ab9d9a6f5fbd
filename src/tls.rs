//! TLS on the protocol port (rustls), with optional client-certificate authentication.

use std::sync::Arc;

use anyhow::Context as _;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Builds the acceptor `config` describes.
pub fn acceptor(config: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_pem)
        .with_context(|| format!("reading {}", config.cert_pem.display()))?
        .collect::<Result<_, _>>()
        .context("parsing the certificate chain")?;
    let key = PrivateKeyDer::from_pem_file(&config.key_pem)
        .with_context(|| format!("reading {}", config.key_pem.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &config.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading {}", path.display()))?
            {
                roots.add(cert.context("parsing a client CA")?).context("adding a client CA")?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.client_cert_required {
                verifier.build()
            } else {
                verifier.allow_unauthenticated().build()
            }
            .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder.with_single_cert(certs, key).context("server certificate and key")?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}
