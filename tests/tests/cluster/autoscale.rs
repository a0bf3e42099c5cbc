//! Autoscaling as Kubernetes would do it, on 127.0.0.1: `tessera group` units (one per pod of
//! `deploy/k8s/base`, each a whole TP=2 group) are added and removed by the
//! HorizontalPodAutoscaler's formula over the coordinator's own gauges, the ones
//! `deploy/k8s/overlays/autoscale` names. Groups stay whole and no running stream is cut.

use std::io::{Read, Write};

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;
use tessera_tests::ChildGuard;

use crate::support::*;

/// The metrics and targets of `deploy/k8s/overlays/autoscale/group-hpa.yaml` (type `Value`).
const TARGETS: [(&str, f64); 2] = [("tessera_queued_requests_per_group", 1.0), ("tessera_kv_utilisation", 0.7)];
/// The HPA's default tolerance: no change while every ratio is within 10% of 1.
const TOLERANCE: f64 = 0.1;
const MIN_GROUPS: u32 = 1;
const MAX_GROUPS: u32 = 4;

/// The HorizontalPodAutoscaler's rule (Kubernetes docs, "Algorithm details"): for each metric
/// `desired = ceil(current * value / target)`, no change when the ratio is within the
/// tolerance, the largest proposal over metrics, clamped to [min, max].
fn hpa_desired(current: u32, values: &[(f64, f64)]) -> u32 {
    let proposals = values.iter().map(|&(value, target)| {
        let ratio = value / target;
        if (ratio - 1.0).abs() <= TOLERANCE {
            current
        } else {
            (f64::from(current) * ratio).ceil() as u32
        }
    });
    proposals.max().unwrap_or(current).clamp(MIN_GROUPS, MAX_GROUPS)
}

#[test]
fn the_hpa_formula_matches_the_documented_examples() {
    // 2 groups, 3 queued per group against a target of 1: 6 groups, capped at 4.
    assert_eq!(hpa_desired(2, &[(3.0, 1.0), (0.1, 0.7)]), 4);
    // 2 groups at 1.5 queued per group: ceil(3) = 3.
    assert_eq!(hpa_desired(2, &[(1.5, 1.0), (0.0, 0.7)]), 3);
    // Within 10% of the target: stay.
    assert_eq!(hpa_desired(3, &[(1.05, 1.0), (0.0, 0.7)]), 3);
    // Idle: down to the minimum, never zero.
    assert_eq!(hpa_desired(3, &[(0.0, 1.0), (0.01, 0.7)]), 1);
    // KV pressure alone scales up: 2 groups at 0.9 of capacity against 0.7 -> ceil(2.57) = 3.
    assert_eq!(hpa_desired(2, &[(0.0, 1.0), (0.9, 0.7)]), 3);
}

/// One `tessera group` unit (a pod) of two ranks registered in `etcd`.
struct Unit {
    name: String,
    process: ChildGuard,
}

fn start_unit(etcd: &str, name: &str) -> Unit {
    let process = group_unit(etcd, name, &["--kv-capacity-tokens", "65536", "--drain-timeout-secs", "60"]);
    Unit { name: name.to_string(), process }
}

/// The coordinator's gauges, read the way an HPA's metrics pipeline reads them.
fn scrape_gauges(port: u16) -> Vec<(f64, f64)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read the metrics");
    TARGETS
        .iter()
        .map(|(name, target)| {
            let line = text.lines().find(|l| l.split(' ').next() == Some(*name)).unwrap_or_else(|| panic!("no {name} in\n{text}"));
            let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line:?}"));
            (value, *target)
        })
        .collect()
}

/// Every coordinator group is one unit's two ranks: the group's workers share the unit's
/// name, and no unit's ranks are spread over two groups.
fn assert_groups_whole(status: &pb::ClusterStatusResponse, units: &[&str]) {
    let mut groups: std::collections::BTreeMap<u32, Vec<&str>> = std::collections::BTreeMap::new();
    for w in status.workers.iter().filter(|w| !w.model.is_empty()) {
        groups.entry(w.group).or_default().push(&w.id);
    }
    assert_eq!(groups.len(), units.len(), "one group per unit: {groups:?}");
    for members in groups.values() {
        let unit = members[0].rsplit_once("-r").map(|(u, _)| u).expect("unit rank id");
        assert!(units.contains(&unit), "{members:?} is not a unit's group");
        assert_eq!(members.len(), 2, "{members:?}");
        assert!(members.iter().all(|m| m.starts_with(&format!("{unit}-r"))), "a group spans units: {members:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpa_driven_scaling_keeps_groups_whole_and_cuts_no_stream() {
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "autoscale");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let metrics = format!("127.0.0.1:{port}");
    // One sequence per group at a time, so extra requests queue and the queue signal is exact.
    let coordinator = coordinator_with(&dir, &etcd.url(), 2, &["--max-batch", "1", "--metrics-listen", &metrics]).expect("coordinator");
    let mut client = connect(&coordinator.url).await;
    let mut units = vec![start_unit(&etcd.url(), "pod-0")];
    until_serving_groups(&mut client, 1).await;

    // A long stream and two short ones for the first group; a longer one for the group the
    // scaling adds. What each generates alone on an idle cluster is the reference.
    let lengths = [600u32, 50, 50, 1500];
    let request = |i: usize| greedy(prompt(&format!("Request {i}: once upon a time")), lengths[i]);
    let mut alone = Vec::new();
    for i in 0..lengths.len() {
        alone.push(generate(&mut client, request(i)).await.expect("idle run").tokens());
    }
    assert_eq!(hpa_desired(1, &scrape_gauges(port)), 1, "an idle cluster keeps its one group");

    // Load: three streams on a group that runs one at a time, so two wait.
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push((i, Vec::new(), client.generate(request(i)).await.expect("generate").into_inner()));
    }
    let desired = until_desired(port, 1, |d| d > 1).await;
    assert_eq!(desired, 2, "two waiting on one group ask for one more");
    for g in 1..desired {
        units.push(start_unit(&etcd.url(), &format!("pod-{g}")));
    }
    until_serving_groups(&mut client, desired).await;
    assert_groups_whole(&cluster_status(&client).await, &unit_names(&units));

    // The new group takes the next stream while the first one works its queue.
    let mut stream = client.generate(request(3)).await.expect("generate").into_inner();
    let first = first_tokens(&mut stream).await;
    streams.push((3, first, stream));

    // Scale down as soon as the formula says so (once the first group's queue shrinks); a
    // StatefulSet removes its highest ordinals first, here the unit running the long stream.
    let target = until_desired(port, desired, |d| d < desired).await;
    let status = cluster_status(&client).await;
    let mut leaving = Vec::new();
    while units.len() > target as usize {
        let unit = units.pop().expect("a unit");
        let busy = status.workers.iter().any(|w| w.id.starts_with(&format!("{}-r", unit.name)) && w.sequences > 0);
        assert!(busy, "unit {} runs a stream when it is scaled away: {:?}", unit.name, status.workers);
        sigterm(&unit.process);
        leaving.push(unit);
    }
    for unit in leaving {
        let exit = exit_of(unit.process).await;
        assert!(exit.success(), "unit {} exited with {exit:?} after draining", unit.name);
    }
    until_serving_groups(&mut client, target).await;
    assert_groups_whole(&cluster_status(&client).await, &unit_names(&units));

    // Every stream finished in full, with the tokens it has alone on an idle cluster.
    for (i, mut tokens, stream) in streams {
        let (rest, finished) = rest_of(stream).await;
        tokens.extend(rest);
        assert_eq!(finished.map(|f| f.reason), Some(pb::FinishReason::Length as i32), "stream {i}");
        assert_eq!(tokens, alone[i], "stream {i}");
    }
}

fn unit_names(units: &[Unit]) -> Vec<&str> {
    units.iter().map(|u| u.name.as_str()).collect()
}

/// Scrapes the coordinator every [`POLL`] until the HPA formula from `current` groups gives a
/// count `wanted` accepts, and returns it.
async fn until_desired(port: u16, current: u32, wanted: impl Fn(u32) -> bool) -> u32 {
    let wait = async {
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            let gauges = tokio::task::spawn_blocking(move || scrape_gauges(port)).await.expect("scrape");
            let desired = hpa_desired(current, &gauges);
            if wanted(desired) {
                eprintln!("gauges {gauges:?}: {current} -> {desired} groups");
                return desired;
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait).await.expect("the metrics never asked for the change")
}
