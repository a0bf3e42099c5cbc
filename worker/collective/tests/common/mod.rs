//! Helpers shared by the integration tests: running one closure per rank on threads, and the
//! input values (the same formulas as in the `tessera-collective-rank` binary).

#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use tessera_collective::{TcpCollective, TcpConfig};

/// Longest any multi-rank test may take before it is declared hung.
pub const HANG_LIMIT: Duration = Duration::from_secs(120);

/// Runs `body(rank, item)` on one thread per item and returns the results in rank order,
/// failing the test if any rank takes longer than [`HANG_LIMIT`].
pub fn on_threads<I, T, F>(items: Vec<I>, body: F) -> Vec<T>
where
    I: Send + 'static,
    T: Send + 'static,
    F: Fn(usize, I) -> T + Send + Sync + 'static,
{
    let world = items.len();
    let body = Arc::new(body);
    let (tx, rx) = mpsc::channel();
    for (rank, item) in items.into_iter().enumerate() {
        let (tx, body) = (tx.clone(), Arc::clone(&body));
        std::thread::Builder::new()
            .name(format!("rank-{rank}"))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(rank, item)));
                let _ = tx.send((rank, result));
            })
            .expect("spawn rank thread");
    }
    drop(tx);
    let mut results: Vec<Option<T>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        let (rank, result) = rx.recv_timeout(HANG_LIMIT).unwrap_or_else(|_| panic!("a rank did not finish within {HANG_LIMIT:?}"));
        match result {
            Ok(value) => results[rank] = Some(value),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    results.into_iter().map(|r| r.expect("every rank reported")).collect()
}

/// Binds one loopback listener per rank and returns each rank's config and listener.
pub fn tcp_configs(world: usize) -> Vec<(TcpConfig, TcpListener)> {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind")).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().expect("local_addr")).collect();
    listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let config = TcpConfig { connect_timeout: Duration::from_secs(30), ..TcpConfig::new(rank, peers.clone()) };
            (config, listener)
        })
        .collect()
}

/// Runs `body(comm)` on one thread per rank of a fresh TCP group over loopback.
pub fn on_tcp_group<T, F>(world: usize, body: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(TcpCollective) -> T + Send + Sync + 'static,
{
    on_threads(tcp_configs(world), move |_, (config, listener)| body(TcpCollective::connect(config, listener).expect("connect")))
}

/// Small integers: sums over a few ranks are exact in any order.
pub fn exact_value(rank: usize, i: usize) -> f32 {
    ((i * 7 + rank * 13) % 1024) as f32 - 512.0
}

/// Values whose sums round.
pub fn float_value(rank: usize, i: usize) -> f32 {
    (i as f32 * 0.37 + rank as f32 * 1.7).sin() * 1.3 + 0.01 * rank as f32
}

/// FNV-1a over the values' bits.
pub fn fnv(values: &[f32]) -> u64 {
    values
        .iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Element-wise sum over ranks of `value(rank, i)`, in f32 and in rank order.
pub fn rank_order_sum(world: usize, len: usize, value: fn(usize, usize) -> f32) -> Vec<f32> {
    (0..len).map(|i| (1..world).fold(value(0, i), |acc, r| acc + value(r, i))).collect()
}

/// Asserts `got` is within 1e-5 relative (to the sum of magnitudes) of the f64 sum.
pub fn assert_close_to_reference(got: &[f32], world: usize, value: fn(usize, usize) -> f32) {
    for (i, &g) in got.iter().enumerate() {
        let exact: f64 = (0..world).map(|r| f64::from(value(r, i))).sum();
        let scale: f64 = (0..world).map(|r| f64::from(value(r, i)).abs()).sum();
        let err = (f64::from(g) - exact).abs();
        assert!(err <= 1e-5 * scale.max(1e-30), "element {i}: got {g}, reference {exact}, error {err}");
    }
}

/// Asserts every rank's buffer has the same bits as rank 0's.
pub fn assert_identical(results: &[Vec<f32>]) {
    for (rank, r) in results.iter().enumerate().skip(1) {
        let same = r.len() == results[0].len() && r.iter().zip(&results[0]).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "rank {rank} differs from rank 0");
    }
}
