//! Test harness: a real etcd on loopback, and a TCP proxy whose connections a test can cut.
//!
//! Shared by every test crate that needs etcd (the registry's suite, the cross-process tests).
//! [`EtcdServer::start`] fails the test (it does not skip it) when the `etcd` binary is missing:
//! a suite that silently did nothing would hide exactly the bugs it exists to catch.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// How long a fresh etcd may take to elect itself leader and answer.
const STARTUP_LIMIT: Duration = Duration::from_secs(30);

/// A single-member etcd with its own data directory; killed when dropped.
pub struct EtcdServer {
    child: Child,
    data: TempDir,
    client_addr: SocketAddr,
    peer_addr: SocketAddr,
    /// Another address it also serves clients on (same port), for processes in a network
    /// namespace that cannot reach this one's loopback.
    also: Option<IpAddr>,
    /// Clients must speak TLS and present a certificate of this CA.
    tls: Option<EtcdTls>,
}

/// PEM files of a TLS etcd: its certificate and key (also what the harness's own client
/// presents), and the CA it trusts for client certificates (and clients for its certificate).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports and waits until it serves reads.
    pub async fn start() -> Self {
        Self::start_serving(None, None).await
    }

    /// [`EtcdServer::start`], also serving clients on `host` (an address of this machine, such
    /// as a veth end), at the same port: see [`EtcdServer::url_on`].
    pub async fn start_also_on(host: IpAddr) -> Self {
        Self::start_serving(Some(host), None).await
    }

    /// [`EtcdServer::start`] with TLS on the client port and client certificates required
    /// (`--client-cert-auth`): its URL is `https://`.
    pub async fn start_tls(tls: EtcdTls) -> Self {
        Self::start_serving(None, Some(tls)).await
    }

    /// Turns on etcd's authentication with a `root` user of this password: from then on
    /// every client must log in.
    pub async fn enable_auth(&self, password: &str) {
        let mut client = self.client().await;
        client.user_add("root", password, None).await.expect("add the root user");
        client.user_grant_role("root", "root").await.expect("grant root the root role");
        client.auth_enable().await.expect("enable authentication");
    }

    async fn start_serving(also: Option<IpAddr>, tls: Option<EtcdTls>) -> Self {
        // Ports are found by binding port 0 and releasing it; another process could take one
        // in between, so a server that dies at startup is retried on fresh ports.
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let mut server = Self::spawn(also, tls.clone());
            match server.wait_ready().await {
                Ok(()) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!("etcd did not start on loopback after 3 attempts (TLS: {}); its log:\n{last_log}", tls.is_some());
    }

    /// Kills etcd (SIGKILL, as a crash) and starts it again on the same ports and data
    /// directory, returning once it serves reads: an outage as long as etcd's own restart.
    /// Leases survive it (etcd extends them by their TTL when it recovers).
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = launch(&self.data, &self.client_urls(), self.peer_addr, self.tls.as_ref());
        if let Err(log) = self.wait_ready().await {
            panic!("etcd did not come back after a restart; its log:\n{log}");
        }
    }

    fn spawn(also: Option<IpAddr>, tls: Option<EtcdTls>) -> Self {
        let data = tempfile::tempdir().expect("temporary etcd data directory");
        let client_addr = free_port();
        let peer_addr = free_port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let urls = [Some(client_addr.ip()), also]
            .into_iter()
            .flatten()
            .map(|ip| format!("{scheme}://{}", SocketAddr::new(ip, client_addr.port())));
        let child = launch(&data, &urls.collect::<Vec<_>>().join(","), peer_addr, tls.as_ref());
        Self { child, data, client_addr, peer_addr, also, tls }
    }

    /// Every URL it serves clients on, comma-separated as etcd's flags take them.
    fn client_urls(&self) -> String {
        let hosts = [Some(self.client_addr.ip()), self.also].into_iter().flatten();
        hosts.map(|ip| self.url_on(ip)).collect::<Vec<_>>().join(",")
    }
}

/// Starts the etcd process of a single-member cluster on these ports and data directory; its
/// log goes on at the end of `etcd.log` there.
fn launch(data: &TempDir, client_urls: &str, peer_addr: SocketAddr, tls: Option<&EtcdTls>) -> Child {
    let peer_url = format!("http://{peer_addr}");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(data.path().join("etcd.log")).expect("etcd log file");
    let log_err = log.try_clone().expect("etcd log file handle");
    let mut command = Command::new("etcd");
    if let Some(tls) = tls {
        command
            .arg(format!("--cert-file={}", tls.cert.display()))
            .arg(format!("--key-file={}", tls.key.display()))
            .arg(format!("--trusted-ca-file={}", tls.ca.display()))
            .arg("--client-cert-auth");
    }
    let spawned = command
        .arg("--name=tessera-test")
        .arg(format!("--data-dir={}", data.path().join("data").display()))
        .arg(format!("--listen-client-urls={client_urls}"))
        .arg(format!("--advertise-client-urls={client_urls}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=tessera-test={peer_url}"))
        .arg("--log-level=warn")
        .arg("--logger=zap")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn();
    match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "the `etcd` binary is not on PATH; these tests need a real etcd. \
                 Run scripts/setup.sh (it installs Debian's etcd-server) and try again."
        ),
        Err(e) => panic!("could not start etcd: {e}"),
    }
}

impl EtcdServer {
    /// Polls with a real client until etcd answers a read (it needs a leader for that), with
    /// a bounded number of attempts. On failure returns etcd's log.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_LIMIT;
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        while Instant::now() < deadline {
            poll.tick().await;
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("etcd exited with {status}\n{}", self.log()));
            }
            let options = self.connect_options().with_connect_timeout(Duration::from_millis(300));
            let probe = async {
                let mut client = Client::connect([self.url()], Some(options)).await?;
                client.get("probe", None).await
            };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), probe).await {
                return Ok(());
            }
        }
        Err(format!("etcd did not answer within {STARTUP_LIMIT:?}\n{}", self.log()))
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn url(&self) -> String {
        self.url_on(self.client_addr.ip())
    }

    /// The client URL on another address it serves (see [`EtcdServer::start_also_on`]).
    pub fn url_on(&self, host: IpAddr) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", SocketAddr::new(host, self.client_addr.port()))
    }

    /// What the harness's own client needs: with TLS, the CA and the server's certificate as
    /// its client certificate (etcd accepts any certificate of its CA).
    fn connect_options(&self) -> ConnectOptions {
        let options = ConnectOptions::new();
        match &self.tls {
            None => options,
            Some(tls) => {
                let read = |p: &PathBuf| std::fs::read(p).expect("read a test certificate file");
                let config = TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(&tls.ca)))
                    .identity(Identity::from_pem(read(&tls.cert), read(&tls.key)));
                options.with_tls(config)
            }
        }
    }

    /// The client address, for a proxy to forward to.
    pub fn addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// A plain etcd client, for doing things behind the registry's back.
    pub async fn client(&self) -> Client {
        Client::connect([self.url()], Some(self.connect_options())).await.expect("connect to test etcd")
    }

    fn log(&self) -> String {
        let mut text = String::new();
        let path: PathBuf = self.data.path().join("etcd.log");
        if let Ok(mut file) = File::open(path) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local address")
}

/// A loopback TCP proxy. `cut` drops every open connection and refuses new ones (accepts and
/// closes them at once) until `restore`: a network partition between one client and etcd.
pub struct Proxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding a fresh loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let open = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tokio::spawn(accept(listener, upstream, open.clone(), connections.clone()));
        Self { addr, open, connections, acceptor }
    }

    /// The proxy's URL, `http://127.0.0.1:PORT`, to hand a client instead of etcd's.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().expect("proxy connections").drain(..) {
            connection.abort();
        }
    }

    /// Accepts and forwards connections again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.acceptor.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, open: Arc<AtomicBool>, connections: Arc<Mutex<Vec<AbortHandle>>>) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        if !open.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        let task = tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
        connections.lock().expect("proxy connections").push(task.abort_handle());
    }
}
