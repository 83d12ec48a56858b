//! Test certificates, made at run time with rcgen (never committed keys): a CA, the agent's
//! certificate and key, and a client certificate for `verify_incoming`, as PEM files in a
//! fresh directory of their own. The agent reads them at the same path whoever runs it (the
//! container mounts the directory where it is on the host). The agent's certificate can be
//! re-issued in place, for rotation faults. The directory is removed on drop.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

use crate::error::{Error, Result};

/// The names the agent's certificate holds by default: how tests reach it (`127.0.0.1`,
/// `localhost`) and the name Consul's own tooling expects (`server.dc1.consul`).
pub const AGENT_NAMES: &[&str] = &["127.0.0.1", "localhost", "server.dc1.consul"];

/// A CA: its certificate (for signing) and key.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Result<Ca> {
        let key = KeyPair::generate().map_err(pki_error)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_error)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).map_err(pki_error)?;
        Ok(Ca { cert, key })
    }

    /// A leaf certificate for `names`, for `usage`, and its key.
    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(pki_error)?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).map_err(pki_error)?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(pki_error)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn pki_error(e: rcgen::Error) -> Error {
    Error::Certificates(e)
}

/// Which CA signs a re-issued agent certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issuer {
    /// The CA clients trust (`ca.pem`): an ordinary rotation.
    SameCa,
    /// A new CA nobody trusts: a rotation gone wrong.
    UnknownCa,
}

/// A CA and the certificates it signed, as files in a directory of their own.
pub struct TestPki {
    dir: PathBuf,
    ca: Ca,
    /// Serialises re-issues of the agent's files.
    reissue: Mutex<()>,
}

impl fmt::Debug for TestPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestPki").field("dir", &self.dir).finish()
    }
}

impl TestPki {
    /// A new CA, an agent certificate for [`AGENT_NAMES`] and a client certificate, written
    /// under the system's temp directory.
    pub fn new() -> Result<TestPki> {
        TestPki::for_agent_names(AGENT_NAMES)
    }

    /// Like [`TestPki::new`], with an agent certificate for `names` only.
    pub fn for_agent_names(names: &[&str]) -> Result<TestPki> {
        let dir =
            crate::owner::temp_dir("testbed-pki-", &format!("{:08x}", rand::random::<u32>()))?;
        let pki = TestPki {
            dir,
            ca: Ca::new("testbed CA")?,
            reissue: Mutex::new(()),
        };
        write_atomically(&pki.ca_file(), &pki.ca.cert.pem())?;
        pki.reissue_agent(names, Issuer::SameCa)?;
        let (cert, key) = pki
            .ca
            .issue(&["testbed client"], ExtendedKeyUsagePurpose::ClientAuth)?;
        write_atomically(&pki.client_cert(), &cert)?;
        write_atomically(&pki.client_key(), &key)?;
        let other = Ca::new("testbed other CA")?.cert.pem();
        write_atomically(&pki.other_ca_file(), &other)?;
        Ok(pki)
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (`CONSUL_CACERT`, and the agent's `ca_file`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The certificate of an unrelated CA, for "wrong CA" tests.
    pub fn other_ca_file(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }

    /// The agent's certificate (`cert_file`).
    pub fn agent_cert(&self) -> PathBuf {
        self.dir.join("agent.pem")
    }

    /// The agent's key (`key_file`).
    pub fn agent_key(&self) -> PathBuf {
        self.dir.join("agent-key.pem")
    }

    /// A client certificate signed by the CA (`CONSUL_CLIENT_CERT`).
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    /// The client certificate's key (`CONSUL_CLIENT_KEY`).
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client-key.pem")
    }

    /// The CA that signed the agent's current certificate (this CA, or after a rotation to
    /// [`Issuer::UnknownCa`] that one).
    pub fn agent_ca_file(&self) -> PathBuf {
        self.dir.join("agent-ca.pem")
    }

    /// Replace the agent's certificate and key by new ones for `names`, signed by `issuer`.
    /// Each file is replaced atomically; a running agent picks them up on reload (SIGHUP).
    /// The certificate also holds a name of its own, returned, so that whoever checks which
    /// certificate the agent serves can tell this one from the earlier ones.
    pub fn reissue_agent(&self, names: &[&str], issuer: Issuer) -> Result<String> {
        let _guard = self.reissue.lock().unwrap_or_else(|e| e.into_inner());
        let marker = format!("r{:08x}.rotation.testbed", rand::random::<u32>());
        let mut all = names.to_vec();
        all.push(&marker);
        let rogue;
        let ca = match issuer {
            Issuer::SameCa => &self.ca,
            Issuer::UnknownCa => {
                rogue = Ca::new("testbed rogue CA")?;
                &rogue
            }
        };
        let (cert, key) = ca.issue(&all, ExtendedKeyUsagePurpose::ServerAuth)?;
        write_atomically(&self.agent_ca_file(), &ca.cert.pem())?;
        write_atomically(&self.agent_key(), &key)?;
        write_atomically(&self.agent_cert(), &cert)?;
        Ok(marker)
    }

    /// Client TLS settings that trust this CA, with the client certificate when
    /// `client_cert`.
    pub fn client_tls(&self, client_cert: bool) -> consul_api::TlsConfig {
        consul_api::TlsConfig {
            ca_file: Some(self.ca_file()),
            client_cert: client_cert.then(|| self.client_cert()),
            client_key: client_cert.then(|| self.client_key()),
            ..consul_api::TlsConfig::default()
        }
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Write `text` to `path` through a temporary file and a rename, so that a reader sees the
/// old file or the new one, never half of one.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_exist_and_go_away() {
        let pki = TestPki::new().unwrap();
        let dir = pki.dir().to_owned();
        for file in [
            pki.ca_file(),
            pki.other_ca_file(),
            pki.agent_cert(),
            pki.agent_key(),
            pki.agent_ca_file(),
            pki.client_cert(),
            pki.client_key(),
        ] {
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{}", file.display());
        }
        let before = std::fs::read_to_string(pki.agent_cert()).unwrap();
        pki.reissue_agent(&["localhost"], Issuer::UnknownCa)
            .unwrap();
        assert_ne!(before, std::fs::read_to_string(pki.agent_cert()).unwrap());
        assert_ne!(
            std::fs::read_to_string(pki.ca_file()).unwrap(),
            std::fs::read_to_string(pki.agent_ca_file()).unwrap()
        );
        drop(pki);
        assert!(!dir.exists());
    }
}
