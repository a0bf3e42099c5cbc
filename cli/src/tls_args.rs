//! TLS flags of `coordinator`, `up` and `worker`, and the rule that a listener off loopback
//! speaks TLS unless `--insecure` says otherwise.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;
use tessera_tls::TlsFiles;

#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This process's certificate chain (PEM). With --tls-key it turns on TLS for what this
    /// process serves; re-read when the file changes.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): coordinator and workers, and workers among themselves, then speak
    /// mutual TLS and refuse any peer whose certificate it did not sign. Needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Allow serving plaintext on an address other than loopback (a private network you trust).
    #[arg(long)]
    pub insecure: bool,
}

impl TlsArgs {
    /// The certificate files, or `None` without --tls-cert.
    pub fn files(&self) -> Option<TlsFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: self.tls_ca.clone() }),
            _ => None,
        }
    }

    /// Refuses to serve `what` in plaintext on `ip` unless it is loopback or --insecure was
    /// given.
    pub fn check_plaintext(&self, what: &str, ip: IpAddr, tls: bool) -> anyhow::Result<()> {
        anyhow::ensure!(
            tls || self.insecure || ip.is_loopback(),
            "{what} on {ip} would be plaintext off loopback: pass --tls-cert and --tls-key{}, or --insecure for a network you trust",
            if what.contains("worker") || what.contains("collective") { " and --tls-ca" } else { "" }
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_off_loopback_needs_insecure() {
        let plain = TlsArgs::default();
        let lan: IpAddr = "10.0.0.5".parse().expect("IP");
        assert!(plain.check_plaintext("the gRPC API", "127.0.0.1".parse().expect("IP"), false).is_ok());
        assert!(plain.check_plaintext("the gRPC API", "::1".parse().expect("IP"), false).is_ok());
        assert!(plain.check_plaintext("the gRPC API", lan, false).is_err());
        assert!(plain.check_plaintext("the gRPC API", "0.0.0.0".parse().expect("IP"), false).is_err());
        assert!(plain.check_plaintext("the gRPC API", lan, true).is_ok());
        let insecure = TlsArgs { insecure: true, ..TlsArgs::default() };
        assert!(insecure.check_plaintext("the gRPC API", lan, false).is_ok());
    }
}
