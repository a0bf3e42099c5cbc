//! Key files, the one answer to every refused key, and the per-key limits.

use tonic::metadata::MetadataMap;

use super::*;

fn with_key(value: &str) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    metadata.insert("authorization", value.parse().expect("ASCII header"));
    metadata
}

fn state(keys: &ApiKeys, i: usize) -> Arc<KeyState> {
    keys.keys()[i].state.clone()
}

fn refusal(keys: &ApiKeys, metadata: &MetadataMap) -> CoordinatorError {
    keys.admit(metadata).expect_err("refused")
}

#[test]
fn a_key_file_holds_names_digests_and_limits() {
    let text = format!(
        "# team keys\n\nalice {} max_concurrent=4 tokens_per_minute=10000\nbob {}\n",
        digest_hex("alice-key"),
        digest_hex("bob-key")
    );
    let keys = ApiKeys::parse(&text).expect("valid file");
    assert_eq!(keys.names(), ["alice", "bob"]);
    assert_eq!(state(&keys, 0).limits(), KeyLimits { max_concurrent: Some(4), tokens_per_minute: Some(10000) });
    assert_eq!(state(&keys, 1).limits(), KeyLimits::default());
}

#[test]
fn a_bad_key_file_names_its_line() {
    let digest = digest_hex("k");
    for (text, line) in [
        (format!("alice {digest}\nbob 1234\n"), 2),
        (format!("alice {digest} max_concurrent=0\n"), 1),
        (format!("alice {digest} burst=3\n"), 1),
        (format!("alice {digest}\nalice {}\n", digest_hex("other")), 2),
        (format!("alice {digest}\nbob {digest}\n"), 2),
        (format!("al ice {digest}\n"), 1),
    ] {
        match ApiKeys::parse(&text) {
            Err(KeyFileError::Line { line: got, .. }) => assert_eq!(got, line, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    assert!(matches!(ApiKeys::parse("# nothing\n"), Err(KeyFileError::Empty)));
}

#[test]
fn missing_malformed_and_wrong_keys_get_one_answer() {
    let keys = ApiKeys::parse(&format!("alice {}\n", digest_hex("alice-key"))).expect("valid");
    let answers: Vec<String> = [MetadataMap::new(), with_key("alice-key"), with_key("Basic alice-key"), with_key("Bearer wrong")]
        .iter()
        .map(|m| match refusal(&keys, m) {
            CoordinatorError::Unauthenticated(message) => message,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(answers.iter().all(|a| a == UNAUTHENTICATED), "{answers:?}");
    assert!(!UNAUTHENTICATED.contains("alice"));
    assert_eq!(keys.admit(&with_key("Bearer alice-key")).expect("admitted").name(), "alice");
    assert_eq!(keys.admit(&with_key("bearer  alice-key ")).expect("scheme is case-insensitive").name(), "alice");
}

#[test]
fn a_key_runs_at_most_its_concurrent_requests() {
    let keys = ApiKeys::parse(&format!("alice {} max_concurrent=2\n", digest_hex("a"))).expect("valid");
    let auth = with_key("Bearer a");
    let (first, second) = (keys.admit(&auth).expect("first"), keys.admit(&auth).expect("second"));
    assert!(matches!(refusal(&keys, &auth), CoordinatorError::ResourceExhausted(m) if m.contains("2 concurrent")));
    drop(first);
    let third = keys.admit(&auth).expect("a slot was freed");
    assert_eq!(state(&keys, 0).in_flight(), 2);
    drop((second, third));
    assert_eq!(state(&keys, 0).in_flight(), 0);
}

#[test]
fn a_key_over_its_tokens_per_minute_waits() {
    let keys = ApiKeys::parse(&format!("alice {} tokens_per_minute=600\n", digest_hex("a"))).expect("valid");
    let auth = with_key("Bearer a");
    let ticket = keys.admit(&auth).expect("budget left");
    ticket.charge(700);
    drop(ticket);
    // 100 tokens overdrawn at 10 per second: about ten seconds before the next request.
    match refusal(&keys, &auth) {
        CoordinatorError::ResourceExhausted(m) => assert!(m.contains("600 tokens per minute") && m.contains("retry in"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn metrics_name_keys_and_count_their_calls_and_tokens() {
    let keys = ApiKeys::parse(&format!("alice {}\nbob {} max_concurrent=1\n", digest_hex("a"), digest_hex("b"))).expect("valid");
    let ticket = keys.admit(&with_key("Bearer a")).expect("alice");
    ticket.charge(12);
    let bob = keys.admit(&with_key("Bearer b")).expect("bob");
    assert!(keys.admit(&with_key("Bearer b")).is_err());
    let text = keys.prometheus();
    for line in [
        "tessera_api_key_requests_total{key=\"alice\"} 1",
        "tessera_api_key_tokens_total{key=\"alice\"} 12",
        "tessera_api_key_limited_total{key=\"bob\"} 1",
        "tessera_api_key_in_flight{key=\"bob\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
    }
    assert!(!text.contains(&digest_hex("a")));
    drop((ticket, bob));
}

#[test]
fn a_changed_key_file_is_read_again_and_a_broken_one_keeps_the_keys() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("keys");
    std::fs::write(&path, format!("alice {} max_concurrent=1\n", digest_hex("a"))).expect("write");
    let keys = ApiKeys::load(&path).expect("valid file");
    let held = keys.admit(&with_key("Bearer a")).expect("alice");

    // alice stays with her limits (and her running call), bob is added.
    std::fs::write(&path, format!("alice {} max_concurrent=1\nbob {}\n", digest_hex("a"), digest_hex("b"))).expect("write");
    assert_eq!(keys.admit(&with_key("Bearer b")).expect("bob was added").name(), "bob");
    assert!(matches!(refusal(&keys, &with_key("Bearer a")), CoordinatorError::ResourceExhausted(_)), "alice's call still counts");
    drop(held);

    // A file that does not parse changes nothing.
    std::fs::write(&path, "alice not-a-digest\n").expect("write");
    assert!(keys.admit(&with_key("Bearer a")).is_ok() && keys.admit(&with_key("Bearer b")).is_ok());

    // Revoked: bob's key is refused with the one answer.
    std::fs::write(&path, format!("alice {} max_concurrent=1\n", digest_hex("a"))).expect("write");
    assert!(matches!(refusal(&keys, &with_key("Bearer b")), CoordinatorError::Unauthenticated(m) if m == UNAUTHENTICATED));
    assert_eq!(keys.names(), ["alice"]);
}
