//! TLS to the agent: the settings Consul's CLI and Go `api` read (`CONSUL_CACERT`,
//! `CONSUL_CAPATH`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`, `CONSUL_TLS_SERVER_NAME`,
//! `CONSUL_HTTP_SSL_VERIFY`). With the `tls` feature (on by default) they make a rustls
//! configuration (ring, no OpenSSL) and failed handshakes are explained in those settings'
//! terms; without it an `https` address is refused with an error that names the feature.

use std::path::PathBuf;

#[cfg(feature = "tls")]
mod rustls_setup;
#[cfg(feature = "tls")]
pub(crate) use rustls_setup::rustls_error;

/// How to speak TLS to the agent. Paths are read when a [`Client`](crate::Client) is made,
/// so a missing or unreadable file is reported then, by the setting's name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file of the CA(s) that sign the agent's certificate (`CONSUL_CACERT`). Takes
    /// precedence over `ca_path`; with neither, the system's roots are used.
    pub ca_file: Option<PathBuf>,
    /// Directory of PEM files of CAs (`CONSUL_CAPATH`).
    pub ca_path: Option<PathBuf>,
    /// PEM client certificate for an agent with `verify_incoming` (`CONSUL_CLIENT_CERT`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert` (`CONSUL_CLIENT_KEY`).
    pub client_key: Option<PathBuf>,
    /// The name the agent's certificate must hold, instead of the address's host
    /// (`CONSUL_TLS_SERVER_NAME`).
    pub server_name: Option<String>,
    /// Accept any certificate (`CONSUL_HTTP_SSL_VERIFY=false`). Loudly warned about.
    pub insecure_skip_verify: bool,
}

impl TlsConfig {
    /// Whether any TLS setting is given (they are unused with an `http` address).
    pub fn is_set(&self) -> bool {
        *self != TlsConfig::default()
    }
}
