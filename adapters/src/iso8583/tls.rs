//! TLS to the host (rustls, ring): the `tls` table of the config.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsConnector;

use crate::AdapterError;

/// TLS to the host: `tls = { ca_file = "...", server_name = "...", client_cert_file = "...",
/// client_key_file = "..." }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificates the host's certificate must chain to (the system's
    /// roots are not used).
    pub ca_file: PathBuf,
    /// The name the host's certificate must carry (a DNS name or an IP address); default: the
    /// host part of `host_addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM certificate chain presented to a host that asks for a client certificate; with
    /// `client_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Reads the files and builds the connector and the name to verify, or names what is
    /// wrong.
    pub(crate) fn connector(
        &self,
        host_addr: &str,
    ) -> Result<(TlsConnector, ServerName<'static>), AdapterError> {
        let fail = |message: String| AdapterError::Config(format!("iso8583: tls.{message}"));
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&self.ca_file)
            .map_err(|e| fail(format!("ca_file {}: {e}", self.ca_file.display())))?;
        for cert in certs {
            let cert =
                cert.map_err(|e| fail(format!("ca_file {}: {e}", self.ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|e| fail(format!("ca_file {}: {e}", self.ca_file.display())))?;
        }
        if roots.is_empty() {
            return Err(fail(format!("ca_file {}: no certificate", self.ca_file.display())));
        }
        // ring, the workspace's rustls provider (as for the server's TLS, `src/tls.rs`); rustls
        // 0.23.48 (the fuzz crate's lockfile) deprecates it for lacking post-quantum key exchange.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(format!("protocol versions: {e}")))?
            .with_root_certificates(roots);
        let config = match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert_file), Some(key_file)) => {
                let chain = CertificateDer::pem_file_iter(cert_file)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| fail(format!("client_cert_file {}: {e}", cert_file.display())))?;
                if chain.is_empty() {
                    return Err(fail(format!(
                        "client_cert_file {}: no certificate",
                        cert_file.display()
                    )));
                }
                let key = PrivateKeyDer::from_pem_file(key_file)
                    .map_err(|e| fail(format!("client_key_file {}: {e}", key_file.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| fail(format!("client_cert_file and client_key_file: {e}")))?
            }
            _ => {
                return Err(fail(
                    "client_cert_file and client_key_file go together: set both or neither".into(),
                ))
            }
        };
        let host = host_addr.rsplit_once(':').map_or(host_addr, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = self.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|e| fail(format!("server_name {name:?}: {e}")))?;
        Ok((TlsConnector::from(Arc::new(config)), server_name))
    }
}
