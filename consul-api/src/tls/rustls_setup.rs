//! The rustls side of [`TlsConfig`] (feature `tls`): the client configuration the settings
//! make, the agent's certificate verifier, and refusals explained by the setting to fix.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, ServerName, UnixTime,
    pem::{self, PemObject},
};

use super::TlsConfig;
use crate::error::{Error, Result};

impl TlsConfig {
    /// The rustls configuration for an agent whose address has host `host`.
    pub(crate) fn client_config(&self, host: &str) -> Result<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("cannot set up TLS: {e}")))?;
        let verifier = if self.insecure_skip_verify {
            tracing::warn!(
                "CONSUL_HTTP_SSL_VERIFY=false: the Consul agent's certificate is NOT verified; \
                 anyone on the path can impersonate the agent and read the ACL token"
            );
            AgentVerifier {
                provider,
                webpki: None,
                name: None,
            }
        } else {
            let roots = Arc::new(self.roots()?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| Error::Config(format!("cannot set up TLS verification: {e}")))?;
            let name = match &self.server_name {
                Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| {
                    Error::Config(format!(
                        "CONSUL_TLS_SERVER_NAME {name:?} is not a DNS name or IP address"
                    ))
                })?),
                None => {
                    ServerName::try_from(host).map_err(|_| {
                        Error::Config(format!(
                            "the agent's host {host:?} cannot be checked against a certificate: \
                             set CONSUL_TLS_SERVER_NAME"
                        ))
                    })?;
                    None
                }
            };
            AgentVerifier {
                provider,
                webpki: Some(webpki),
                name,
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "CONSUL_CLIENT_CERT")?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    Error::Config(format!(
                        "cannot read a private key from CONSUL_CLIENT_KEY {}: {}",
                        key.display(),
                        pem_reason(&e)
                    ))
                })?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    Error::Config(format!(
                        "CONSUL_CLIENT_CERT {} and CONSUL_CLIENT_KEY {} are not a usable pair: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?
            }
            (Some(cert), None) => {
                return Err(Error::Config(format!(
                    "CONSUL_CLIENT_CERT is set ({}) but CONSUL_CLIENT_KEY is not: set both",
                    cert.display()
                )));
            }
            (None, Some(key)) => {
                return Err(Error::Config(format!(
                    "CONSUL_CLIENT_KEY is set ({}) but CONSUL_CLIENT_CERT is not: set both",
                    key.display()
                )));
            }
            (None, None) => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The CAs to verify the agent with: `ca_file`, else every file of `ca_path`, else the
    /// system's roots.
    fn roots(&self) -> Result<RootCertStore> {
        let mut store = RootCertStore::empty();
        let mut add = |certs: Vec<CertificateDer<'static>>, what: &str| -> Result<()> {
            for cert in certs {
                store.add(cert).map_err(|e| {
                    Error::Config(format!("{what} holds a certificate that is not a CA: {e}"))
                })?;
            }
            Ok(())
        };
        if let Some(file) = &self.ca_file {
            add(
                read_certs(file, "CONSUL_CACERT")?,
                &format!("CONSUL_CACERT {}", file.display()),
            )?;
        } else if let Some(dir) = &self.ca_path {
            let mut files = Vec::new();
            walk(dir, &mut files)?;
            if files.is_empty() {
                return Err(Error::Config(format!(
                    "CONSUL_CAPATH {} holds no file",
                    dir.display()
                )));
            }
            for file in files {
                add(
                    read_certs(&file, "the CONSUL_CAPATH file")?,
                    &format!("CONSUL_CAPATH file {}", file.display()),
                )?;
            }
        } else {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::debug!(error = %e, "a system CA certificate could not be loaded");
            }
            // Some system bundles hold certificates webpki cannot use: skip those, as Go does.
            let (_added, _skipped) = store.add_parsable_certificates(native.certs);
            if store.is_empty() {
                return Err(Error::Config(
                    "no CA certificate to verify the agent with: the system has none; set \
                     CONSUL_CACERT or CONSUL_CAPATH"
                        .into(),
                ));
            }
        }
        Ok(store)
    }

    /// Where the CAs come from, for errors: `CONSUL_CACERT /path`, ...
    fn ca_source(&self) -> String {
        match (&self.ca_file, &self.ca_path) {
            (Some(file), _) => format!("CONSUL_CACERT {}", file.display()),
            (None, Some(dir)) => format!("CONSUL_CAPATH {}", dir.display()),
            (None, None) => "the system's roots (CONSUL_CACERT and CONSUL_CAPATH unset)".into(),
        }
    }

    /// A failed TLS exchange with the agent at `host`, said in terms of these settings.
    pub(crate) fn explain(&self, error: &rustls::Error, host: &str) -> String {
        let name = self.server_name.as_deref().unwrap_or(host);
        let name_setting = if self.server_name.is_some() {
            "CONSUL_TLS_SERVER_NAME"
        } else {
            "the host of CONSUL_HTTP_ADDR"
        };
        match error {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                    "the agent's certificate for server name {name:?} is not signed by a CA in \
                     {} ({cert:?}): check that setting",
                    self.ca_source()
                ),
                CertificateError::NotValidForName => format!(
                    "the agent's certificate is not valid for server name {name:?} \
                     ({name_setting}): connect by a name the certificate holds, or set \
                     CONSUL_TLS_SERVER_NAME to it"
                ),
                CertificateError::NotValidForNameContext {
                    expected,
                    presented,
                } => format!(
                    "the agent's certificate is not valid for server name {:?} \
                     ({name_setting}); it holds {}: connect by one of those names, or set \
                     CONSUL_TLS_SERVER_NAME to it",
                    expected.to_str(),
                    presented
                        .iter()
                        .map(|name| plain_name(name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => format!(
                    "the agent's certificate for server name {name:?} is outside its validity \
                     period ({cert:?})"
                ),
                other => format!(
                    "the agent's certificate for server name {name:?} was refused ({other:?}); \
                     CAs from {}",
                    self.ca_source()
                ),
            },
            rustls::Error::AlertReceived(alert) => match &self.client_cert {
                None => format!(
                    "the agent ended the TLS session with alert {alert:?}: it requires a client \
                     certificate (verify_incoming) and none is configured: set \
                     CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY"
                ),
                Some(cert) => format!(
                    "the agent ended the TLS session with alert {alert:?}: it refused the client \
                     certificate CONSUL_CLIENT_CERT {} (is it signed by a CA the agent trusts, \
                     and still valid?)",
                    cert.display()
                ),
            },
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                format!(
                    "the agent's port did not answer in TLS ({error}): is it the agent's HTTP \
                     port? use its HTTPS port, or an http:// address"
                )
            }
            other => format!("TLS failed: {other}"),
        }
    }
}

/// The rustls error somewhere in `error`'s chain, if any (rustls errors travel inside
/// `io::Error`s, whose `source` skips them).
pub(crate) fn rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        // An `io::Error` may wrap another one: look inside each.
        let mut io = e.downcast_ref::<std::io::Error>();
        while let Some(inner) = io.and_then(std::io::Error::get_ref) {
            if let Some(found) = inner.downcast_ref::<rustls::Error>() {
                return Some(found);
            }
            io = inner.downcast_ref::<std::io::Error>();
        }
        current = e.source();
    }
    None
}

/// `consul.example` for rustls's `DnsName("consul.example")`; other forms as they are.
fn plain_name(presented: &str) -> &str {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|rest| rest.strip_suffix("\")"))
        .unwrap_or(presented)
}

/// Every file under `dir`, recursively (Go's `rootcerts.LoadCAPath` walks the tree too).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::Config(format!("cannot read CONSUL_CAPATH {}: {e}", dir.display())))?;
    let mut paths: Vec<PathBuf> = entries
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::Config(format!("cannot read CONSUL_CAPATH {}: {e}", dir.display())))?;
    paths.sort();
    for path in paths {
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// The certificates of a PEM file; an error naming `setting` when there is none.
fn read_certs(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::Config(format!(
                "cannot read certificates from {setting} {}: {}",
                path.display(),
                pem_reason(&e)
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{setting} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::Io(io) => io.to_string(),
        pem::Error::NoItemsFound => "no PEM item of the expected kind".into(),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// How the agent's certificate is checked: by webpki against the CAs, for the address's
/// host or a fixed name (`CONSUL_TLS_SERVER_NAME`, like Go's `tls.Config.ServerName`), or not
/// at all (`CONSUL_HTTP_SSL_VERIFY=false`). The handshake's signatures are checked in every
/// case, so the session is at least with the holder of the certificate's key.
struct AgentVerifier {
    provider: Arc<CryptoProvider>,
    /// `None`: any certificate is accepted.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// The name to check instead of the address's host.
    name: Option<ServerName<'static>>,
}

impl fmt::Debug for AgentVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentVerifier")
            .field("verify", &self.webpki.is_some())
            .field("name", &self.name)
            .finish()
    }
}

impl ServerCertVerifier for AgentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match &self.webpki {
            Some(webpki) => webpki.verify_server_cert(
                end_entity,
                intermediates,
                self.name.as_ref().unwrap_or(server_name),
                ocsp_response,
                now,
            ),
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the system's temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("consul-api-tls-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ca_and_client(dir: &Scratch) -> (PathBuf, PathBuf, PathBuf) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let client = rcgen::CertificateParams::new(vec!["client".to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (
            dir.write("ca.pem", &ca.pem()),
            dir.write("client.pem", &client.pem()),
            dir.write("client-key.pem", &key.serialize_pem()),
        )
    }

    fn error_of(tls: &TlsConfig) -> String {
        tls.client_config("127.0.0.1").unwrap_err().to_string()
    }

    #[test]
    fn good_settings_make_a_configuration() {
        let dir = Scratch::new("good");
        let (ca, cert, key) = ca_and_client(&dir);
        let tls = TlsConfig {
            ca_file: Some(ca),
            client_cert: Some(cert),
            client_key: Some(key),
            ..TlsConfig::default()
        };
        let config = tls.client_config("127.0.0.1").unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        let named = TlsConfig {
            server_name: Some("server.dc1.consul".into()),
            ..tls
        };
        named.client_config("127.0.0.1").unwrap();
        let capath = TlsConfig {
            ca_path: Some(dir.0.join("sub")),
            ..TlsConfig::default()
        };
        std::fs::create_dir_all(dir.0.join("sub/deeper")).unwrap();
        std::fs::copy(dir.0.join("ca.pem"), dir.0.join("sub/deeper/ca.pem")).unwrap();
        capath.client_config("127.0.0.1").unwrap();
    }

    #[test]
    fn bad_settings_are_named() {
        let dir = Scratch::new("bad");
        let (ca, cert, key) = ca_and_client(&dir);
        let missing = dir.0.join("missing.pem");
        let err = error_of(&TlsConfig {
            ca_file: Some(missing.clone()),
            ..TlsConfig::default()
        });
        assert!(err.contains("CONSUL_CACERT"), "{err}");
        assert!(err.contains(&missing.display().to_string()), "{err}");

        let err = error_of(&TlsConfig {
            ca_file: Some(ca.clone()),
            client_cert: Some(cert.clone()),
            ..TlsConfig::default()
        });
        assert!(err.contains("CONSUL_CLIENT_KEY is not"), "{err}");
        let err = error_of(&TlsConfig {
            ca_file: Some(ca.clone()),
            client_key: Some(key.clone()),
            ..TlsConfig::default()
        });
        assert!(err.contains("CONSUL_CLIENT_CERT is not"), "{err}");

        let err = error_of(&TlsConfig {
            ca_file: Some(key.clone()),
            ..TlsConfig::default()
        });
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let err = error_of(&TlsConfig {
            ca_file: Some(ca.clone()),
            client_cert: Some(cert),
            client_key: Some(ca),
            ..TlsConfig::default()
        });
        assert!(err.contains("CONSUL_CLIENT_KEY"), "{err}");

        std::fs::create_dir_all(dir.0.join("cas")).unwrap();
        std::fs::copy(dir.0.join("ca.pem"), dir.0.join("cas/ca.pem")).unwrap();
        dir.write("cas/notes.txt", "not a certificate");
        let err = error_of(&TlsConfig {
            ca_path: Some(dir.0.join("cas")),
            ..TlsConfig::default()
        });
        assert!(err.contains("CONSUL_CAPATH"), "{err}");
        assert!(err.contains("notes.txt"), "{err}");

        let err = error_of(&TlsConfig {
            server_name: Some("not a name!".into()),
            ..TlsConfig::default()
        });
        assert!(err.contains("CONSUL_TLS_SERVER_NAME"), "{err}");
    }

    #[test]
    fn refusals_name_the_setting_to_fix() {
        let tls = TlsConfig {
            ca_file: Some("/etc/consul/ca.pem".into()),
            ..TlsConfig::default()
        };
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let text = tls.explain(&unknown, "127.0.0.1");
        assert!(text.contains("CONSUL_CACERT /etc/consul/ca.pem"), "{text}");
        assert!(text.contains("\"127.0.0.1\""), "{text}");
        let named = TlsConfig {
            server_name: Some("server.dc1.consul".into()),
            ..tls.clone()
        };
        let text = named.explain(&unknown, "127.0.0.1");
        assert!(text.contains("\"server.dc1.consul\""), "{text}");

        let wrong_host = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        let text = tls.explain(&wrong_host, "127.0.0.1");
        assert!(
            text.contains("not valid for server name \"127.0.0.1\""),
            "{text}"
        );
        assert!(text.contains("CONSUL_TLS_SERVER_NAME"), "{text}");

        let context = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("127.0.0.1").unwrap(),
            presented: vec!["DnsName(\"consul.example\")".into()],
        });
        let text = tls.explain(&context, "127.0.0.1");
        assert!(text.contains("it holds consul.example:"), "{text}");

        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        let text = tls.explain(&alert, "127.0.0.1");
        assert!(
            text.contains("CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY"),
            "{text}"
        );
    }
}
