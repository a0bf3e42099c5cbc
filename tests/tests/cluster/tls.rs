//! TLS on a real cluster: the client API (gRPC and HTTP) over TLS, plaintext and strangers'
//! clients refused and logged; with a cluster CA, mutual TLS between coordinator and workers and
//! on the collective (TP=2 across two worker processes); a worker whose certificate another CA
//! signed never joins a group, and the coordinator's log says why.

use std::path::{Path, PathBuf};

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_tests::certs::TestCa;
use tessera_tests::{spawn_logged, tessera_bin, until_logged, ChildGuard};
use tonic::transport::Channel;

use crate::support::*;
use crate::tls_client::*;

struct Certs {
    cluster: TestCa,
    foreign: TestCa,
}

fn certs(dir: &Path) -> Certs {
    Certs { cluster: TestCa::new(dir, "cluster").expect("cluster CA"), foreign: TestCa::new(dir, "foreign").expect("foreign CA") }
}

fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(std::ffi::OsString::from).collect()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_api_speaks_tls_and_the_cluster_mutual_tls() {
    let dir = scratch("tls-api");
    let certs = certs(&dir);
    let leaf = certs.cluster.leaf("node").expect("leaf");
    let model = fixture(&demo(), "tls-api");
    let log = dir.join("up.log");
    // TP=2 over two worker processes: the coordinator dials both over mutual TLS, and the two
    // ranks' collective rendezvous runs mutual TLS too.
    let mut args = os(&["up", "--threads", "1", "--port", "0", "--http-port", "0", "--workers", "2", "--tp", "2"]);
    args.extend(os(&["--tls-cert", path(&leaf.cert), "--tls-key", path(&leaf.key), "--tls-ca", path(&certs.cluster.cert), "--model"]));
    args.push(model.into_os_string());
    let (_up, lines, _stdout) = spawn_logged(tessera_bin(), &args, &log, 2).expect("tessera up with TLS");
    let grpc = lines[0].rsplit(' ').next().expect("URL").to_string();
    let api = lines[1].rsplit(' ').next().expect("URL").to_string();
    assert!(grpc.starts_with("https://") && api.starts_with("https://"), "{lines:?}");

    // A client trusting the cluster CA generates over TLS.
    let mut client = InferenceClient::new(tls_channel(&grpc, &certs.cluster.cert).await.expect("TLS channel"));
    let out = generate(&mut client, greedy(prompt("Hello"), 8)).await.expect("generate over TLS");
    assert_eq!(out.tokens().len(), 8);
    assert_eq!(out.started.and_then(|s| s.placement).map(|p| p.tp), Some(2));

    // Plaintext to the TLS port fails, and so does a client that trusts another CA.
    let plain = async {
        let channel = Channel::from_shared(grpc.replace("https://", "http://"))?.connect().await?;
        InferenceClient::new(channel).list_models(pb::ListModelsRequest {}).await?;
        anyhow::Ok(())
    };
    assert!(tokio::time::timeout(PATIENCE, plain).await.expect("answered in time").is_err(), "plaintext gRPC must fail");
    assert!(
        tls_channel(&grpc, &certs.foreign.cert).await.is_err(),
        "a server certificate from the cluster CA must not satisfy a foreign CA"
    );
    until_logged(&log, "refused a connection: TLS handshake failed", PATIENCE).expect("the refused plaintext client is logged");

    // The HTTP API: TLS with the CA works, plaintext gets no HTTP answer, a foreign CA fails.
    let http_addr = socket_of(&api);
    let (status, body) = https(http_addr, &certs.cluster.cert, "GET", "/v1/models", None).await.expect("HTTPS");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"demo\""), "{body}");
    assert!(http(http_addr, "GET", "/v1/models", None, None).await.is_err(), "plaintext HTTP must get no HTTP answer");
    assert!(https(http_addr, &certs.foreign.cert, "GET", "/v1/models", None).await.is_err());
}

fn coordinator_args(etcd: &str, model: &Path, leaf: &tessera_tls::TlsFiles) -> Vec<std::ffi::OsString> {
    let ca = leaf.ca.as_ref().expect("CA");
    let mut args = os(&["coordinator", "--listen", "127.0.0.1:0", "--etcd", etcd, "--tp", "1"]);
    args.extend(os(&["--tls-cert", path(&leaf.cert), "--tls-key", path(&leaf.key), "--tls-ca", path(ca), "--model"]));
    args.push(model.as_os_str().to_owned());
    args
}

/// Starts a worker with mutual TLS; returns it with the address it printed.
fn worker(etcd: &str, id: &str, files: &tessera_tls::TlsFiles, log: PathBuf) -> (ChildGuard, String) {
    let ca = files.ca.as_ref().expect("CA");
    let args = ["worker", "--id", id, "--etcd", etcd, "--lease-ttl-secs", "5", "--kv-capacity-tokens", "65536"];
    let mut args = os(&args);
    args.extend(os(&["--tls-cert", path(&files.cert), "--tls-key", path(&files.key), "--tls-ca", path(ca)]));
    let (worker, lines, _) = spawn_logged(tessera_bin(), &args, &log, 1).expect("tessera worker");
    (worker, lines[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_foreign_certificate_never_joins() {
    let etcd = EtcdServer::start().await;
    let dir = scratch("tls-worker");
    let certs = certs(&dir);
    let model = fixture(&demo(), "tls-worker");
    let log = dir.join("coordinator.log");
    let leaf = certs.cluster.leaf("coordinator").expect("leaf");
    let (_coordinator, lines, _stdout) =
        spawn_logged(tessera_bin(), &coordinator_args(&etcd.url(), &model, &leaf), &log, 1).expect("tessera coordinator");
    let url = format!("https://{}", lines[0]);

    // Trusts the cluster CA, but its own certificate comes from another CA.
    let mut stranger = certs.foreign.leaf("stranger").expect("leaf");
    stranger.ca = Some(certs.cluster.cert.clone());
    let _stranger = worker(&etcd.url(), "stranger", &stranger, dir.join("stranger.log"));
    let said = until_logged(&log, "refused a worker: TLS handshake failed", PATIENCE).expect("the coordinator logs the refusal");
    assert!(said.contains("UnknownIssuer"), "the log says why: {said}");
    let mut client = InferenceClient::new(tls_channel(&url, &certs.cluster.cert).await.expect("TLS channel"));
    let models = client.list_models(pb::ListModelsRequest {}).await.expect("list models").into_inner().models;
    assert_eq!(models[0].serving_groups, 0, "no group may form with the stranger");
    assert!(!said.contains("group serving"));

    // A worker with the cluster's certificate joins, and only it serves.
    let member_log = dir.join("member.log");
    let (_member, member_addr) = worker(&etcd.url(), "member", &certs.cluster.leaf("member").expect("leaf"), member_log.clone());
    until_serving_groups(&mut client, 1).await;
    let out = generate(&mut client, greedy(prompt("Hello"), 4)).await.expect("generate");
    assert_eq!(out.workers(), ["member"]);
    let status = cluster_status(&client).await;
    let stranger = status.workers.iter().find(|w| w.id == "stranger").expect("the stranger is registered");
    assert_ne!(stranger.state, "serving", "{status:?}");

    // The worker plane refuses a caller without a client certificate, even one that trusts the
    // cluster CA, and logs it.
    let anonymous = async {
        let mut health =
            tonic_health::pb::health_client::HealthClient::new(tls_channel(&format!("https://{member_addr}"), &certs.cluster.cert).await?);
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?;
        anyhow::Ok(())
    };
    assert!(
        tokio::time::timeout(PATIENCE, anonymous).await.expect("answered in time").is_err(),
        "a worker must require a client certificate"
    );
    until_logged(&member_log, "refused a connection: TLS handshake failed", PATIENCE).expect("the worker logs the refusal");
}
