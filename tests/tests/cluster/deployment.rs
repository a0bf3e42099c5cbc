//! What the Kubernetes manifests (`deploy/k8s`) rely on, shown with real processes: a group
//! unit (one pod's `tessera group`) fails whole when one rank dies, so the kubelet restarts the
//! whole group; a coordinator started before its weights waits for them instead of exiting.

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::{demo, write_fixture, WriteOptions};
use tessera_tests::{spawn_logged, tessera_bin, until_logged, STARTUP_PATIENCE};

use crate::support::*;

/// The pid of the running process whose command line holds `needle` as one argument.
fn pid_with_arg(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        cmdline.split(|&b| b == 0).any(|arg| arg == needle.as_bytes()).then_some(pid)
    })
}

/// Whether `pid` still runs (a zombie counts as gone: it only waits to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_whose_rank_dies_stops_its_other_ranks_and_fails() {
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "unit-crash");
    let coordinator = coordinator(&dir, &etcd.url(), 2).expect("coordinator");
    let mut client = connect(&coordinator.url).await;
    let unit = group_unit(&etcd.url(), "pod-crash", &[]);
    until_serving_groups(&mut client, 1).await;

    let r0 = pid_with_arg("pod-crash-r0").expect("rank 0 runs");
    let r1 = pid_with_arg("pod-crash-r1").expect("rank 1 runs");
    let killed = std::process::Command::new("kill").args(["-KILL", &r1.to_string()]).status().expect("run kill");
    assert!(killed.success());

    let exit = exit_of(unit).await;
    assert!(!exit.success(), "a unit that lost a rank must fail so its pod restarts whole: {exit:?}");
    assert!(!alive(r0), "rank 0 was stopped with its unit");
    until_status(&client, "the group is gone", |s| s.models.first().is_some_and(|m| m.serving_groups == 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_waits_for_its_model_directory_instead_of_exiting() {
    let etcd = EtcdServer::start().await;
    let root = scratch("model-wait");
    let model = root.join("models").join("demo");
    let log = root.join("coordinator.log");
    let args = [
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd.url(),
        "--tp",
        "1",
        "--model-wait-secs",
        "120",
        "--model",
        model.to_str().expect("utf-8 path"),
    ];
    let start = {
        let log = log.clone();
        let args = args.map(str::to_string);
        tokio::task::spawn_blocking(move || spawn_logged(tessera_bin(), &args, &log, 1))
    };
    until_logged(&log, "waiting for the model directory to appear", STARTUP_PATIENCE).expect("the coordinator waits");
    assert!(!start.is_finished(), "no address before the model is there");

    // The weights Job's way: written beside, then renamed into place whole.
    let written = write_fixture(&demo(), &root.join("incoming"), &WriteOptions::default()).expect("write the model");
    std::fs::create_dir_all(root.join("models")).expect("models dir");
    std::fs::rename(&written, &model).expect("move the model into place");

    let (_coordinator, lines, _) = start.await.expect("join").expect("the coordinator starts once the model is there");
    let url = format!("http://{}", lines[0]);
    let mut client = connect(&url).await;
    let _worker = etcd_worker(&etcd.url(), "w-late", 2).expect("worker");
    until_serving_groups(&mut client, 1).await;
    let done = generate(&mut client, greedy(prompt("Once upon a time"), 4)).await.expect("generate");
    assert_eq!(done.tokens().len(), 4);
}
