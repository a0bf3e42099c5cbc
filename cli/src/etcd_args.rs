//! Flags that secure the connection to etcd, shared by `coordinator` and `worker`: TLS with a
//! CA and optionally a client certificate, and etcd's user authentication.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tessera_registry::EtcdSecurity;

/// Largest certificate, key or password file read: a typo naming a huge file must not be read
/// whole.
const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Args, Debug, Clone, Default)]
pub struct EtcdSecurityArgs {
    /// CA certificate (PEM) that etcd's server certificate must chain to: TLS to etcd, with
    /// https:// --etcd URLs (which need it).
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an etcd that requires one (--client-cert-auth); with
    /// --etcd-key.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user, for an etcd with authentication enabled; its password comes from
    /// --etcd-password-file.
    #[arg(long, value_name = "NAME", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password (a trailing newline is ignored), so the password
    /// never shows in a process list.
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
}

impl EtcdSecurityArgs {
    /// The files read into what the registry needs.
    pub fn security(&self) -> anyhow::Result<EtcdSecurity> {
        let ca_pem = self.etcd_ca.as_deref().map(|p| read_bounded(p, "--etcd-ca")).transpose()?;
        let identity_pem = match (&self.etcd_cert, &self.etcd_key) {
            (Some(cert), Some(key)) => Some((read_bounded(cert, "--etcd-cert")?, read_bounded(key, "--etcd-key")?)),
            _ => None,
        };
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(name), Some(file)) => {
                let bytes = read_bounded(file, "--etcd-password-file")?;
                let password = String::from_utf8(bytes).context("--etcd-password-file is not UTF-8")?;
                let password = password.strip_suffix('\n').map(|p| p.strip_suffix('\r').unwrap_or(p)).unwrap_or(&password).to_string();
                anyhow::ensure!(!password.is_empty(), "--etcd-password-file is empty");
                Some((name.clone(), password))
            }
            _ => None,
        };
        Ok(EtcdSecurity { ca_pem, identity_pem, user })
    }
}

fn read_bounded(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let size = std::fs::metadata(path).with_context(|| format!("{flag} {}", path.display()))?.len();
    anyhow::ensure!(size <= MAX_FILE_BYTES, "{flag} {} is {size} bytes, more than {MAX_FILE_BYTES}", path.display());
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}
