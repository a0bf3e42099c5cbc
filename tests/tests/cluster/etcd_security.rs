//! A cluster on a secured etcd: TLS with client certificates required (`--client-cert-auth`)
//! and etcd's user authentication on. Coordinator and workers connect with `--etcd-ca`,
//! `--etcd-cert`/`--etcd-key` and `--etcd-user`/`--etcd-password-file`; a worker without the
//! client certificate or with a wrong password is refused, and no log holds the password.

use tessera_etcd_harness::{EtcdServer, EtcdTls};
use tessera_model::fixture::demo;
use tessera_tests::certs::TestCa;
use tessera_tests::{spawn_logged, tessera_bin};

use crate::support::*;

const PASSWORD: &str = "correct-horse-battery";

fn path(p: &std::path::Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_serves_over_an_etcd_with_tls_client_certificates_and_users() {
    let dir = scratch("etcd-security");
    let ca = TestCa::new(&dir, "etcd").expect("CA");
    let server = ca.leaf("etcd-server").expect("server certificate");
    let client = ca.leaf("tessera").expect("client certificate");
    let etcd = EtcdServer::start_tls(EtcdTls { cert: server.cert.clone(), key: server.key.clone(), ca: ca.cert.clone() }).await;
    assert!(etcd.url().starts_with("https://"), "{}", etcd.url());
    etcd.enable_auth(PASSWORD).await;
    let password_file = dir.join("etcd-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");
    let wrong_file = dir.join("wrong-password");
    std::fs::write(&wrong_file, "not-the-password\n").expect("password file");

    let (ca_pem, cert, key, pw, wrong) = (path(&ca.cert), path(&client.cert), path(&client.key), path(&password_file), path(&wrong_file));
    let secured = ["--etcd-ca", &ca_pem, "--etcd-cert", &cert, "--etcd-key", &key, "--etcd-user", "root", "--etcd-password-file", &pw];
    let model = fixture(&demo(), "etcd-security");
    let coordinator = coordinator_with(&model, &etcd.url(), 1, &secured).expect("coordinator on the secured etcd");
    let mut client_api = connect(&coordinator.url).await;
    let (_worker, _) = etcd_worker_with(&etcd.url(), "w-secured", 2, 65536, &secured).expect("worker on the secured etcd");
    until_serving_groups(&mut client_api, 1).await;
    let done = generate(&mut client_api, greedy(prompt("Once upon a time"), 4)).await.expect("generate");
    assert_eq!(done.tokens().len(), 4);

    // Refused: no client certificate; a wrong password. Each worker exits with an error, and
    // neither log holds a password.
    let no_cert = ["--etcd-ca", &ca_pem, "--etcd-user", "root", "--etcd-password-file", &pw];
    let bad_password =
        ["--etcd-ca", &ca_pem, "--etcd-cert", &cert, "--etcd-key", &key, "--etcd-user", "root", "--etcd-password-file", &wrong];
    for (name, flags) in [("w-no-cert", &no_cert[..]), ("w-bad-password", &bad_password[..])] {
        let log = dir.join(format!("{name}.log"));
        let url = etcd.url();
        let mut args = vec!["worker", "--listen", "127.0.0.1:0", "--id", name, "--etcd", &url];
        args.extend_from_slice(flags);
        let (worker, _, _) = spawn_logged(tessera_bin(), &args, &log, 1).expect("the worker starts serving");
        let exit = exit_of(worker).await;
        let text = std::fs::read_to_string(&log).expect("worker log");
        assert!(!exit.success(), "{name} must be refused by etcd: {exit:?}\n{text}");
        assert!(text.contains("etcd"), "{name}'s error names etcd:\n{text}");
        assert!(!text.contains(PASSWORD) && !text.contains("not-the-password"), "{name}'s log holds a password:\n{text}");
    }
    let status = cluster_status(&client_api).await;
    let ids: Vec<&str> = status.workers.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["w-secured"], "only the worker with the right credentials registered");
}
