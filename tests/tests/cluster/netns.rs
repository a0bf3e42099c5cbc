//! Another host on this machine for tests that need a real network between processes: a
//! network namespace joined to this one by a veth pair, whose link a test can cut. Needs root
//! (or CAP_NET_ADMIN) and iproute2's `ip`; [`Host::create`] says why it cannot where it cannot.

use std::net::Ipv4Addr;
use std::process::Command;

use tessera_tests::{tessera_bin, ChildGuard};

/// A network namespace joined to this one by a veth pair: another host on a link the test
/// can cut. Deleted (with its veth pair) when dropped.
pub struct Host {
    namespace: String,
    /// This side's end of the veth pair: the one taken down to cut the link.
    link: String,
    /// This side's address on the link, and the far side's.
    pub near: Ipv4Addr,
    pub far: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Host {
    /// Makes the namespace and its link; `Err` says why it cannot be made here.
    pub fn create() -> Result<Self, String> {
        let pid = std::process::id();
        let namespace = format!("tessera-partition-{pid}");
        ip(&["netns", "add", &namespace])?;
        // From here on, Drop cleans up whatever was made.
        // A /30 of 10.213.0.0/16 picked by process id, so parallel test runs do not collide.
        let (block, base) = (((pid / 64) % 256) as u8, ((pid % 64) * 4) as u8);
        let host = Self {
            namespace,
            link: format!("tsp{}", pid % 10_000_000),
            near: Ipv4Addr::new(10, 213, block, base + 1),
            far: Ipv4Addr::new(10, 213, block, base + 2),
        };
        let inside = host.inside();
        let (near_mac, far_mac) = (host.mac(host.near), host.mac(host.far));
        ip(&[
            "link",
            "add",
            &host.link,
            "address",
            &near_mac,
            "type",
            "veth",
            "peer",
            "name",
            &inside,
            "address",
            &far_mac,
            "netns",
            &host.namespace,
        ])?;
        ip(&["addr", "add", &format!("{}/30", host.near), "dev", &host.link])?;
        ip(&["-n", &host.namespace, "addr", "add", &format!("{}/30", host.far), "dev", &inside])?;
        ip(&["-n", &host.namespace, "link", "set", "lo", "up"])?;
        ip(&["-n", &host.namespace, "link", "set", &inside, "up"])?;
        host.link_up()?;
        Ok(host)
    }

    /// The far side's end of the veth pair.
    fn inside(&self) -> String {
        format!("{}i", self.link)
    }

    /// A locally administered MAC address made from an IPv4 address.
    fn mac(&self, ip: Ipv4Addr) -> String {
        let [a, b, c, d] = ip.octets();
        format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
    }

    /// Brings this side's end up, with fixed neighbour entries both ways: address resolution
    /// that failed during a cut would otherwise keep the mended link unusable for seconds.
    fn link_up(&self) -> Result<(), String> {
        ip(&["link", "set", &self.link, "up"])?;
        let (near, far) = (self.near.to_string(), self.far.to_string());
        ip(&["neigh", "replace", &far, "lladdr", &self.mac(self.far), "dev", &self.link, "nud", "permanent"])?;
        let inside = self.inside();
        ip(&["-n", &self.namespace, "neigh", "replace", &near, "lladdr", &self.mac(self.near), "dev", &inside, "nud", "permanent"])
    }

    /// Takes the link down: packets either way are lost, connections stay open and hang.
    pub fn cut(&self) {
        ip(&["link", "set", &self.link, "down"]).expect("cut the link");
    }

    pub fn mend(&self) {
        self.link_up().expect("mend the link");
    }

    /// Starts `tessera worker <extra>` inside the namespace, registered in etcd at `etcd` (a
    /// URL on [`Host::near`]) and serving on the far address.
    pub fn worker(&self, etcd: &str, id: &str, lease_ttl_secs: u64, extra: &[&str]) -> ChildGuard {
        let (listen, ttl) = (format!("{}:0", self.far), lease_ttl_secs.to_string());
        let bin = tessera_bin().as_os_str().to_str().expect("UTF-8 binary path");
        let mut args = vec!["netns", "exec", &self.namespace, bin, "worker", "--listen", &listen, "--id", id, "--etcd", etcd];
        args.extend_from_slice(&["--lease-ttl-secs", &ttl, "--insecure"]);
        args.extend_from_slice(extra);
        let (guard, line) = tessera_tests::spawn_tessera(std::path::Path::new("ip"), &args).expect("start the worker in its namespace");
        assert!(line.starts_with(&self.far.to_string()), "the worker serves on the far address, not {line:?}");
        guard
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = ip(&["netns", "del", &self.namespace]);
    }
}
