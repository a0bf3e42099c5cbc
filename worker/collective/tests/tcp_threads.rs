//! The TCP backend with each rank on its own thread, over loopback: results, ordering of
//! mixed operations, protocol mismatches, and peers that die.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{
    assert_close_to_reference, assert_identical, exact_value, float_value, on_tcp_group, on_threads, rank_order_sum, tcp_configs,
};
use tessera_collective::{Collective, CollectiveError, TcpCollective, TcpConfig};

/// Lengths on both sides of the default direct/ring switch-over at 2, 3 and 4 ranks (2 MiB of
/// direct traffic: 524_288, 262_144 and 174_762 values), including ones that do not split
/// evenly into chunks and ring pieces.
const LENGTHS: [usize; 12] = [0, 1, 7, 1000, 100_003, 174_762, 174_763, 262_144, 262_145, 524_288, 524_289, (1 << 20) + 5];

#[test]
fn all_reduce_is_identical_on_every_rank_and_close_to_exact() {
    for world in [2, 3, 4] {
        let results = on_tcp_group(world, |mut comm| {
            LENGTHS
                .iter()
                .map(|&len| {
                    let mut data: Vec<f32> = (0..len).map(|i| float_value(comm.rank(), i)).collect();
                    comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
                    data
                })
                .collect::<Vec<_>>()
        });
        for (k, &len) in LENGTHS.iter().enumerate() {
            let per_rank: Vec<Vec<f32>> = results.iter().map(|r| r[k].clone()).collect();
            assert_identical(&per_rank);
            assert_close_to_reference(&per_rank[0], world, float_value);
            if len * 4 * (world - 1) <= TcpCollective::DEFAULT_RING_THRESHOLD {
                // The direct exchange adds in rank order, like a sequential loop.
                let expected = rank_order_sum(world, len, float_value);
                assert!(per_rank[0].iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}

#[test]
fn ring_handles_buffers_smaller_than_the_group() {
    let results = on_tcp_group(4, |mut comm| {
        comm.set_ring_threshold(0);
        [1usize, 2, 3, 5, 9]
            .iter()
            .map(|&len| {
                let mut data: Vec<f32> = (0..len).map(|i| exact_value(comm.rank(), i)).collect();
                comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
                let local: Vec<f32> = (0..len).map(|i| exact_value(comm.rank(), i)).collect();
                let mut gathered = vec![0f32; len * 4];
                comm.all_gather(&local, &mut gathered).expect("all_gather");
                (data, gathered)
            })
            .collect::<Vec<_>>()
    });
    for (k, len) in [1usize, 2, 3, 5, 9].into_iter().enumerate() {
        let sum = rank_order_sum(4, len, exact_value);
        let gathered: Vec<f32> = (0..4).flat_map(|r| (0..len).map(move |i| exact_value(r, i))).collect();
        for rank in &results {
            assert_eq!(rank[k].0, sum, "all_reduce of {len}");
            assert_eq!(rank[k].1, gathered, "all_gather of {len}");
        }
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    // The last two take the ring at every group size, the others the direct exchange.
    const LOCAL: [usize; 6] = [0, 1, 5, 100_000, 600_000, 600_001];
    for world in [2, 3, 4] {
        let results = on_tcp_group(world, move |mut comm| {
            LOCAL
                .iter()
                .map(|&m| {
                    let local: Vec<f32> = (0..m).map(|i| float_value(comm.rank(), i)).collect();
                    let mut out = vec![f32::NAN; m * world];
                    comm.all_gather(&local, &mut out).expect("all_gather");
                    out
                })
                .collect::<Vec<_>>()
        });
        for (k, &m) in LOCAL.iter().enumerate() {
            let expected: Vec<f32> = (0..world).flat_map(|r| (0..m).map(move |i| float_value(r, i))).collect();
            for rank in &results {
                assert_eq!(rank[k], expected, "world {world}, {m} per rank");
            }
        }
    }
}

#[test]
fn send_before_recv_ring_pass_does_not_deadlock() {
    // 16_380 values make a message of exactly 64 KiB with its header, the largest one the
    // engine thread writes itself; the larger ones go through the sender thread.
    const SIZES: [usize; 6] = [0, 1, 1000, 16_380, 16_381, 1 << 20];
    for world in [2, 3, 4] {
        let results = on_tcp_group(world, move |mut comm| {
            let rank = comm.rank();
            SIZES
                .iter()
                .map(|&len| {
                    let mine: Vec<f32> = (0..len).map(|i| exact_value(rank + 50, i)).collect();
                    let mut theirs = vec![0f32; len];
                    comm.send((rank + 1) % world, &mine).expect("send");
                    comm.recv((rank + world - 1) % world, &mut theirs).expect("recv");
                    theirs
                })
                .collect::<Vec<_>>()
        });
        for (rank, got) in results.iter().enumerate() {
            let prev = (rank + world - 1) % world;
            for (k, &len) in SIZES.iter().enumerate() {
                let expected: Vec<f32> = (0..len).map(|i| exact_value(prev + 50, i)).collect();
                assert_eq!(got[k], expected, "world {world}, rank {rank}, {len} values");
            }
        }
    }
}

#[test]
fn queued_sends_stay_ordered_with_collectives() {
    // Rank 0's large send is still being written by its sender thread when the all-reduce
    // starts; the all-reduce bytes must not overtake it.
    let results = on_tcp_group(2, |mut comm| {
        let big: Vec<f32> = (0..(1 << 20)).map(|i| exact_value(7, i)).collect();
        let mut small = vec![comm.rank() as f32 + 1.0; 3];
        let mut received = vec![0f32; big.len()];
        if comm.rank() == 0 {
            comm.send(1, &big).expect("send");
            comm.all_reduce_sum(&mut small).expect("all_reduce_sum");
            comm.send(1, &small).expect("send small");
        } else {
            comm.recv(0, &mut received).expect("recv");
            comm.all_reduce_sum(&mut small).expect("all_reduce_sum");
            let mut echo = [0f32; 3];
            comm.recv(0, &mut echo).expect("recv small");
            assert_eq!(echo, [3.0; 3]);
            assert_eq!(received, big);
        }
        small
    });
    assert_eq!(results, vec![vec![3.0; 3], vec![3.0; 3]]);
}

#[test]
fn without_spinning_every_wait_blocks_and_results_are_unchanged() {
    // With no spin budget the direct exchange hands unwritten bytes to the sender thread and
    // blocks on reads at once: the fallback path, taken deterministically.
    let configs: Vec<_> =
        tcp_configs(3).into_iter().map(|(config, listener)| (TcpConfig { spin: Duration::ZERO, ..config }, listener)).collect();
    let results = on_threads(configs, |rank, (config, listener)| {
        let mut comm = TcpCollective::connect(config, listener).expect("connect");
        let mut out = Vec::new();
        for len in [1usize, 1000, 262_144, 262_145] {
            let mut data: Vec<f32> = (0..len).map(|i| exact_value(rank, i)).collect();
            comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
            out.push(data);
            let mine: Vec<f32> = (0..len).map(|i| exact_value(rank + 9, i)).collect();
            let mut theirs = vec![0f32; len];
            comm.send((rank + 1) % 3, &mine).expect("send");
            comm.recv((rank + 2) % 3, &mut theirs).expect("recv");
            out.push(theirs);
        }
        out
    });
    for (rank, got) in results.iter().enumerate() {
        for (k, len) in [1usize, 1000, 262_144, 262_145].into_iter().enumerate() {
            assert_eq!(got[2 * k], rank_order_sum(3, len, exact_value), "all_reduce of {len}");
            let prev: Vec<f32> = (0..len).map(|i| exact_value((rank + 2) % 3 + 9, i)).collect();
            assert_eq!(got[2 * k + 1], prev, "recv of {len}");
        }
    }
}

#[test]
fn many_small_all_reduces_stay_in_step() {
    let results = on_tcp_group(3, |mut comm| {
        (0..2000)
            .map(|step| {
                let mut data = [(comm.rank() * 1000 + step) as f32; 4];
                comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
                data[3]
            })
            .collect::<Vec<_>>()
    });
    let expected: Vec<f32> = (0..2000).map(|s| (3 * s + 3000) as f32).collect();
    assert!(results.iter().all(|r| *r == expected));
}

/// Runs `body` on every rank of a fresh group and keeps every connection open until all ranks
/// have finished, so each sees its peers' errors rather than their disconnection.
fn mismatch<T, F>(world: usize, body: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(&mut TcpCollective) -> T + Send + Sync + 'static,
{
    let done = Arc::new(Barrier::new(world));
    on_tcp_group(world, move |mut comm| {
        let result = body(&mut comm);
        done.wait();
        result
    })
}

fn is_protocol<T>(r: &Result<T, CollectiveError>) -> bool {
    matches!(r, Err(CollectiveError::Protocol(_)))
}

#[test]
fn mismatched_calls_are_protocol_errors() {
    // Different lengths, direct exchange.
    let r = mismatch(2, |comm| comm.all_reduce_sum(&mut vec![1.0; 10 + comm.rank()]));
    assert!(r.iter().all(is_protocol), "{r:?}");
    // Different lengths, ring.
    let r = mismatch(3, |comm| comm.all_reduce_sum(&mut vec![1.0; 600_000 + comm.rank() / 2]));
    assert!(r.iter().any(is_protocol), "{r:?}");
    assert!(r.iter().all(Result::is_err), "{r:?}");
    // Different operations.
    let r =
        mismatch(2, |comm| if comm.rank() == 0 { comm.all_reduce_sum(&mut [1.0; 4]) } else { comm.all_gather(&[1.0; 4], &mut [0.0; 8]) });
    assert!(r.iter().all(is_protocol), "{r:?}");
    // Send and receive of different lengths.
    let r = mismatch(2, |comm| if comm.rank() == 0 { comm.send(1, &[1.0; 5]) } else { comm.recv(0, &mut [0.0; 6]) });
    assert!(is_protocol(&r[1]), "{r:?}");
    // A group that failed stays failed.
    let r = mismatch(2, |comm| {
        let first = comm.all_reduce_sum(&mut vec![1.0; 1 + comm.rank()]);
        let second = comm.all_reduce_sum(&mut [1.0]);
        (first.is_err(), matches!(second, Err(CollectiveError::PeerLost)))
    });
    assert!(r.iter().all(|&(a, b)| a && b), "{r:?}");
}

#[test]
fn a_dead_peer_gives_io_errors_not_hangs() {
    // Small and large all-reduce, receive, and then every later call.
    for len in [4usize, 1 << 20] {
        let results = on_tcp_group(2, move |mut comm| {
            if comm.rank() == 1 {
                drop(comm);
                return Vec::new();
            }
            vec![comm.all_reduce_sum(&mut vec![1.0; len]), comm.recv(1, &mut [0.0; 4])]
        });
        assert!(matches!(results[0][0], Err(CollectiveError::Io { peer: 1, .. })), "{:?}", results[0]);
        assert!(matches!(results[0][1], Err(CollectiveError::PeerLost)), "{:?}", results[0]);
    }
    let results = on_tcp_group(2, |mut comm| {
        if comm.rank() == 1 {
            drop(comm);
            return Ok(());
        }
        comm.recv(1, &mut [0.0; 4])
    });
    assert!(matches!(results[0], Err(CollectiveError::Io { peer: 1, .. })), "{:?}", results[0]);
}

#[test]
fn a_dead_peer_fails_every_survivor_of_a_ring() {
    // Rank 2 dies; rank 0 reads from it directly, rank 1 only through rank 0, which must pass
    // the failure on by closing its connections.
    let results = on_tcp_group(3, |mut comm| {
        if comm.rank() == 2 {
            drop(comm);
            return None;
        }
        Some(comm.all_reduce_sum(&mut vec![1.0; 1 << 20]))
    });
    assert!(matches!(results[0], Some(Err(CollectiveError::Io { .. }))), "{:?}", results[0]);
    assert!(matches!(results[1], Some(Err(CollectiveError::Io { .. }))), "{:?}", results[1]);
}

#[test]
fn rendezvous_ignores_stray_connections() {
    let configs = tcp_configs(2);
    let target = configs[0].0.peers[0];
    let mut stray = TcpStream::connect(target).expect("stray connect");
    stray.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("stray write");
    let results = on_threads(configs, |_, (config, listener)| {
        let mut comm = TcpCollective::connect(config, listener).expect("connect");
        let mut data = [comm.rank() as f32; 2];
        comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
        data
    });
    assert_eq!(results, vec![[1.0; 2], [1.0; 2]]);
}

#[test]
fn a_group_of_one_needs_no_peers() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let config = TcpConfig::new(0, vec![listener.local_addr().expect("addr")]);
    let mut comm = TcpCollective::connect(config, listener).expect("connect");
    let mut data = [1.0, 2.0];
    comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
    assert_eq!(data, [1.0, 2.0]);
    let mut out = [0.0; 2];
    comm.all_gather(&data, &mut out).expect("all_gather");
    assert_eq!(out, data);
    assert!(matches!(comm.send(0, &data), Err(CollectiveError::InvalidArgument(_))));
}

#[test]
fn bad_configurations_are_rejected() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let config = TcpConfig::new(1, vec![listener.local_addr().expect("addr")]);
    assert!(matches!(TcpCollective::connect(config, listener), Err(CollectiveError::InvalidArgument(_))));
}

/// A rank blocked on a peer that never sends (hung, or cut off by the network) is freed by its
/// interrupt, fired from another thread: the blocked call fails at once, while the peer is
/// still connected and silent.
#[test]
fn an_interrupt_ends_a_call_blocked_on_a_silent_peer() {
    let (interrupts, interrupt) = std::sync::mpsc::channel::<tessera_collective::Interrupt>();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let finished = std::sync::Mutex::new(Some(finished));
    // Fires rank 0's interrupt from outside the rank, as a reset RPC does.
    let firing = std::thread::spawn(move || interrupt.recv().expect("rank 0's interrupt").fire());
    let results = on_threads(tcp_configs(2), move |rank, (config, listener)| {
        let mut comm = TcpCollective::connect(config, listener).expect("connect");
        if rank == 0 {
            interrupts.send(comm.interrupt().expect("a TCP group can be interrupted")).expect("hand over");
            let mut out = [0f32; 4];
            let blocked = comm.recv(1, &mut out);
            done.send(()).expect("tell rank 1");
            blocked.is_err()
        } else {
            // Stays connected, sending nothing, until rank 0's call has returned.
            let finished = finished.lock().expect("lock").take().expect("one silent rank");
            finished.recv().expect("rank 0 returns");
            true
        }
    });
    firing.join().expect("fired");
    assert_eq!(results, vec![true, true], "the blocked receive failed");
}
