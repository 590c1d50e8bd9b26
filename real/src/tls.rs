//! Authenticated, encrypted peer links: mutual TLS 1.3 (rustls, ring) with certificates
//! from a cluster CA that `gallocy` generates (rcgen). A member's certificate names it
//! (`node-<id>.gallocy`); a connection's hello must claim the id its certificate names.
//! docs/security.md has the design, why TLS and not Noise, and revocation.

use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use mio::net::TcpStream;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber,
};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

/// A daemon's credentials (paths relative to its configuration file's directory).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA's certificate: the only root peers are checked against.
    pub ca: PathBuf,
    /// This member's certificate, and its private key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Revoked members' certificates (`gallocy cluster revoke`); read again when it
    /// changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The same files, relative paths taken from `dir`.
    pub fn resolved(&self, dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join(&self.ca),
            cert: dir.join(&self.cert),
            key: dir.join(&self.key),
            crl: self.crl.as_ref().map(|crl| dir.join(crl)),
        }
    }
}

/// The name a member's certificate carries, and the name a connection to it checks.
pub fn member_name(node: u64) -> String {
    format!("node-{node}.gallocy")
}

/// Whether the certificate (DER) names member `node`. The chain was checked in the
/// handshake; this binds the id a hello claims to the certificate that said it.
pub fn cert_names_member(cert: &CertificateDer<'_>, node: u64) -> bool {
    let Ok(end_entity) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(member_name(node)) else {
        return false;
    };
    end_entity.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The CRL file's bytes; None when there is none.
fn crl_bytes(files: &TlsFiles) -> Option<Vec<u8>> {
    std::fs::read(files.crl.as_ref()?).ok()
}

/// The TLS configurations of a daemon's peer links, rebuilt when the CRL changes.
pub struct PeerTls {
    files: TlsFiles,
    /// The CRL in force (None: none yet), and the last content that failed to load.
    crl_loaded: Option<Vec<u8>>,
    crl_failed: Option<Vec<u8>>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl PeerTls {
    pub fn load(files: &TlsFiles) -> Result<PeerTls, String> {
        let crl = crl_bytes(files);
        let (server, client) = build_configs(files, crl.as_deref())?;
        Ok(PeerTls {
            files: files.clone(),
            crl_loaded: crl,
            crl_failed: None,
            server,
            client,
        })
    }

    /// Reads the CRL again if its content changed. Fails closed: a CRL that does not
    /// load, or one that disappeared, keeps the configuration in force (reported once
    /// per content; tried again when it changes).
    pub fn refresh(&mut self) -> Result<bool, String> {
        let crl = crl_bytes(&self.files);
        if crl == self.crl_loaded || (crl.is_some() && crl == self.crl_failed) {
            return Ok(false);
        }
        let Some(bytes) = crl else {
            self.crl_failed = None;
            self.crl_loaded = None;
            return Err("the CRL file is gone; the revocations loaded stay in force".into());
        };
        match build_configs(&self.files, Some(&bytes)) {
            Ok((server, client)) => {
                self.server = server;
                self.client = client;
                self.crl_loaded = Some(bytes);
                self.crl_failed = None;
                Ok(true)
            }
            Err(why) => {
                self.crl_failed = Some(bytes);
                Err(why)
            }
        }
    }

    /// The client side's configuration (tests make their own connections with it).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    pub fn accept(&self, tcp: TcpStream) -> Result<TlsStream, String> {
        let conn =
            rustls::ServerConnection::new(self.server.clone()).map_err(|e| format!("TLS: {e}"))?;
        Ok(TlsStream {
            tcp,
            conn: conn.into(),
        })
    }

    pub fn connect(&self, tcp: TcpStream, node: u64) -> Result<TlsStream, String> {
        let name = ServerName::try_from(member_name(node)).map_err(|e| e.to_string())?;
        let conn =
            ClientConnection::new(self.client.clone(), name).map_err(|e| format!("TLS: {e}"))?;
        Ok(TlsStream {
            tcp,
            conn: conn.into(),
        })
    }
}

fn read_error(path: &Path, e: impl std::fmt::Display) -> String {
    format!("cannot read {}: {e}", path.display())
}

/// The CA certificates in `path`: the roots peers are checked against.
fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(path).map_err(|e| read_error(path, e))? {
        let ca = ca.map_err(|e| read_error(path, e))?;
        roots
            .add(ca)
            .map_err(|e| format!("{}: not a CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(roots)
}

/// The server and client configurations from `files`, with `crl` (the CRL file's
/// content, if there is one) as the revocations.
fn build_configs(
    files: &TlsFiles,
    crl: Option<&[u8]>,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(load_roots(&files.ca)?);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| read_error(&files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_error(&files.cert, e))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| read_error(&files.key, e))?;
    let crls: Vec<CertificateRevocationListDer<'static>> = match crl {
        Some(bytes) => {
            let path = files.crl.as_deref().unwrap_or(Path::new("crl"));
            let crls: Vec<_> = CertificateRevocationListDer::pem_slice_iter(bytes)
                .collect::<Result<_, _>>()
                .map_err(|e| read_error(path, e))?;
            // A file caught half-copied, or of the wrong kind, must not read as "no
            // revocations".
            if crls.is_empty() {
                return Err(format!("{}: no CRL in the file", path.display()));
            }
            crls
        }
        None => Vec::new(),
    };
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(crls.clone())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| format!("peer verifier: {e}"))?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| format!("peer verifier: {e}"))?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    Ok((Arc::new(server), Arc::new(client)))
}

/// A TLS connection over a non-blocking TCP stream. `read` yields plaintext (driving
/// the handshake as records come), `write` takes plaintext (rustls buffers at most its
/// limit, 64 KiB, before `WouldBlock`), `push` sends what rustls holds.
pub struct TlsStream {
    pub tcp: TcpStream,
    conn: Connection,
}

impl TlsStream {
    pub fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.conn.read_tls(&mut self.tcp)? == 0 {
                return Ok(0);
            }
            if let Err(e) = self.conn.process_new_packets() {
                // Tell the peer why (an alert), then give up.
                let _ = self.push();
                return Err(std::io::Error::new(ErrorKind::InvalidData, e));
            }
            self.push()?;
        }
    }

    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut taken = self.conn.writer().write(bytes)?;
        self.push()?;
        if taken == 0 && !bytes.is_empty() {
            taken = self.conn.writer().write(bytes)?;
            if taken == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            self.push()?;
        }
        Ok(taken)
    }

    /// Sends the records rustls holds, until the socket would block.
    pub fn push(&mut self) -> std::io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Records are waiting for the socket.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    pub fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The certificate the peer presented (after the handshake).
    pub fn peer_cert(&self) -> Option<&CertificateDer<'static>> {
        self.conn.peer_certificates()?.first()
    }
}

// -------------------------------------------------------------------------------------
// Credentials: the cluster CA and what it issues.

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const ISSUED_FILE: &str = "issued.txt";
const CRL_FILE: &str = "crl.pem";

/// The CA's parameters: the same every time, so a CA re-made from its key signs
/// certificates and CRLs that verify against the certificate first written.
fn ca_params() -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(Vec::new()).map_err(|e| e.to_string())?;
    params.distinguished_name.remove(DnType::CommonName);
    params
        .distinguished_name
        .push(DnType::CommonName, "gallocy cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = KeyIdMethod::Sha256;
    Ok(params)
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("write {}: {e}", path.display()))
}

fn write_public(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

/// A cluster's certificate authority, kept in one directory (its key never leaves it).
pub struct ClusterCa {
    dir: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl ClusterCa {
    /// A new CA in `dir` (which must not hold one).
    pub fn create(dir: &Path) -> Result<ClusterCa, String> {
        if dir.join(CA_KEY_FILE).exists() {
            return Err(format!("{} already holds a CA", dir.display()));
        }
        crate::cluster::create_private_dir(dir)?;
        let key = KeyPair::generate().map_err(|e| format!("CA key: {e}"))?;
        let cert = ca_params()?
            .self_signed(&key)
            .map_err(|e| format!("CA certificate: {e}"))?;
        write_private(&dir.join(CA_KEY_FILE), &key.serialize_pem())?;
        write_public(&dir.join(CA_CERT_FILE), &cert.pem())?;
        write_public(&dir.join(ISSUED_FILE), "")?;
        Ok(ClusterCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        })
    }

    pub fn open(dir: &Path) -> Result<ClusterCa, String> {
        let key_path = dir.join(CA_KEY_FILE);
        let pem = std::fs::read_to_string(&key_path).map_err(|e| read_error(&key_path, e))?;
        let key = KeyPair::from_pem(&pem).map_err(|e| format!("{}: {e}", key_path.display()))?;
        let cert = ca_params()?
            .self_signed(&key)
            .map_err(|e| format!("CA certificate: {e}"))?;
        Ok(ClusterCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        })
    }

    /// Issues member `node`'s certificate and key into `out` (ca.pem, node.pem,
    /// node-key.pem) and records its serial; the files, relative to `out`.
    pub fn issue(&self, node: u64, out: &Path) -> Result<TlsFiles, String> {
        let mut params = CertificateParams::new(vec![member_name(node)])
            .map_err(|e| format!("certificate of node {node}: {e}"))?;
        params.distinguished_name.remove(DnType::CommonName);
        params
            .distinguished_name
            .push(DnType::CommonName, member_name(node));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        // Unique per issue: the node, then the time (a re-issued member gets a new one).
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_nanos() as u64;
        let mut serial = [0u8; 16];
        serial[..8].copy_from_slice(&node.to_be_bytes());
        serial[8..].copy_from_slice(&nanos.to_be_bytes());
        serial[0] &= 0x7f; // positive
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let key = KeyPair::generate().map_err(|e| format!("key of node {node}: {e}"))?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| format!("certificate of node {node}: {e}"))?;
        std::fs::create_dir_all(out).map_err(|e| format!("create {}: {e}", out.display()))?;
        write_public(&out.join("ca.pem"), &self.cert.pem())?;
        write_public(&out.join("node.pem"), &cert.pem())?;
        write_private(&out.join("node-key.pem"), &key.serialize_pem())?;
        let issued = self.dir.join(ISSUED_FILE);
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&issued)
            .map_err(|e| format!("write {}: {e}", issued.display()))?;
        writeln!(log, "{node} {}", hex(&serial)).map_err(|e| e.to_string())?;
        Ok(TlsFiles {
            ca: "ca.pem".into(),
            cert: "node.pem".into(),
            key: "node-key.pem".into(),
            crl: Some("crl.pem".into()),
        })
    }

    /// Revokes every certificate issued to `node`: writes the CA's CRL (every member
    /// revoked so far) and returns it, to copy beside each member's credentials.
    pub fn revoke(&self, node: u64) -> Result<String, String> {
        let issued = std::fs::read_to_string(self.dir.join(ISSUED_FILE))
            .map_err(|e| read_error(&self.dir.join(ISSUED_FILE), e))?;
        let revoked_path = self.dir.join("revoked.txt");
        let mut revoked: Vec<u64> = std::fs::read_to_string(&revoked_path)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        if !issued
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&node.to_string()))
        {
            return Err(format!("this CA issued no certificate to node {node}"));
        }
        if !revoked.contains(&node) {
            revoked.push(node);
        }
        let now = time::OffsetDateTime::now_utc();
        let revoked_certs = issued
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let id: u64 = words.next()?.parse().ok()?;
                let serial = unhex(words.next()?)?;
                revoked.contains(&id).then(|| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
            })
            .collect();
        let crl = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(365 * 100),
            crl_number: SerialNumber::from_slice(&(now.unix_timestamp() as u64).to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.cert, &self.key)
        .map_err(|e| format!("CRL: {e}"))?;
        let pem = crl.pem().map_err(|e| format!("CRL: {e}"))?;
        write_public(&self.dir.join(CRL_FILE), &pem)?;
        let list: Vec<String> = revoked.iter().map(u64::to_string).collect();
        write_public(&revoked_path, &(list.join("\n") + "\n"))?;
        Ok(pem)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crl_that_does_not_load_or_disappears_keeps_the_revocations_in_force() {
        let dir = std::env::temp_dir().join(format!("gy-tls-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = ClusterCa::create(&dir.join("ca")).unwrap();
        let home = dir.join("node1");
        let files = ca.issue(1, &home).unwrap().resolved(&home);
        ca.issue(2, &dir.join("node2")).unwrap();
        let mut tls = PeerTls::load(&files).unwrap();
        assert_eq!(tls.refresh(), Ok(false), "no CRL yet, nothing changed");
        let crl = files.crl.clone().unwrap();
        // Half a copy, or a file of the wrong kind: refused once, then quiet.
        std::fs::write(&crl, "-----BEGIN X509 CRL-----\n").unwrap();
        assert!(tls.refresh().is_err());
        assert_eq!(tls.refresh(), Ok(false));
        std::fs::write(&crl, "").unwrap();
        assert!(tls.refresh().unwrap_err().contains("no CRL in the file"));
        // The real one loads.
        std::fs::write(&crl, ca.revoke(2).unwrap()).unwrap();
        assert_eq!(tls.refresh(), Ok(true));
        assert_eq!(tls.refresh(), Ok(false));
        // Gone: reported, the loaded revocations stay.
        std::fs::remove_file(&crl).unwrap();
        assert!(tls.refresh().unwrap_err().contains("stay in force"));
        assert_eq!(tls.refresh(), Ok(false));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn certificates_name_their_member_only() {
        let dir = std::env::temp_dir().join(format!("gy-tls-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = ClusterCa::create(&dir.join("ca")).unwrap();
        let files = ca
            .issue(7, &dir.join("node7"))
            .unwrap()
            .resolved(&dir.join("node7"));
        let first_cert = |path: &Path| {
            CertificateDer::pem_file_iter(path)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
        };
        let cert = first_cert(&files.cert);
        assert!(cert_names_member(&cert, 7));
        assert!(!cert_names_member(&cert, 1));
        assert!(!cert_names_member(&cert, 77));
        // A CA re-made from its key (`open`) issues certificates that verify against
        // the CA certificate first written.
        let reopened = ClusterCa::open(&dir.join("ca")).unwrap();
        let again = reopened
            .issue(8, &dir.join("node8"))
            .unwrap()
            .resolved(&dir.join("node8"));
        let cert8 = first_cert(&again.cert);
        let roots = load_roots(&dir.join("ca").join(CA_CERT_FILE)).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        let name = ServerName::try_from(member_name(8)).unwrap();
        let now = rustls::pki_types::UnixTime::now();
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            verifier.as_ref(),
            &cert8,
            &[],
            &name,
            &[],
            now,
        )
        .expect("a certificate from the re-opened CA verifies against ca.pem");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
