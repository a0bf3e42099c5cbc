//! Test certificates made at test time with rcgen: a cluster CA, a foreign CA that the cluster
//! does not trust, and leaf certificates for 127.0.0.1 and localhost, written as PEM files.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use tessera_collective::CollectiveTls;
use tessera_tls::{ClientTls, ServerTls, TlsFiles};

/// A certificate authority and the directory its files go to.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    /// `ca.pem`: the CA's certificate, what peers trust.
    pub cert: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `dir/name-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let cert = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert, issuer.pem()).context("write CA certificate")?;
        Ok(Self { issuer, dir: dir.to_path_buf(), cert })
    }

    /// A leaf certificate for 127.0.0.1 and localhost, good as server and client (so one file
    /// pair serves a process's listener and its outgoing mutual TLS), written as
    /// `dir/name.pem` and `dir/name-key.pem`. `ca` in the result is this CA.
    pub fn leaf(&self, name: &str) -> anyhow::Result<TlsFiles> {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_path, key_path) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}-key.pem")));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(TlsFiles { cert: cert_path, key: key_path, ca: Some(self.cert.clone()) })
    }
}

/// A rank's collective TLS from its files, as a worker builds it (`CollectiveTlsFiles`).
pub fn collective_tls(files: &TlsFiles) -> CollectiveTls {
    CollectiveTls {
        server: ServerTls::mutual(files, &[]).expect("server TLS").config(),
        client: ClientTls::mutual(files, &[]).expect("client TLS").config(),
    }
}
