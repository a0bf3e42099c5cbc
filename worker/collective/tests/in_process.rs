//! The in-process backend with real threads: exact rank-order sums, gathers, point-to-point,
//! and peers that leave.

mod common;

use common::{assert_identical, exact_value, float_value, on_threads, rank_order_sum};
use tessera_collective::{Collective, CollectiveError, InProcessGroup};

#[test]
fn all_reduce_equals_rank_order_sum_on_every_rank() {
    for world in [1, 2, 3, 4] {
        for len in [0usize, 1, 7, 1000, 100_003] {
            let results = on_threads(InProcessGroup::new(world), move |rank, mut comm| {
                let mut data: Vec<f32> = (0..len).map(|i| float_value(rank, i)).collect();
                comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
                data
            });
            assert_identical(&results);
            let expected = rank_order_sum(world, len, float_value);
            assert!(
                results[0].iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()),
                "world {world}, len {len}: not the rank-order sum"
            );
        }
    }
}

#[test]
fn repeated_operations_stay_in_step() {
    let results = on_threads(InProcessGroup::new(3), |rank, mut comm| {
        let mut totals = Vec::new();
        for step in 0..200 {
            let mut data = vec![(rank * 1000 + step) as f32; 5];
            comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
            totals.push(data[0]);
        }
        totals
    });
    let expected: Vec<f32> = (0..200).map(|s| (3 * s + 3000) as f32).collect();
    assert!(results.iter().all(|t| *t == expected));
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for world in [1, 2, 4] {
        let results = on_threads(InProcessGroup::new(world), move |rank, mut comm| {
            let local: Vec<f32> = (0..5).map(|i| exact_value(rank, i)).collect();
            let mut out = vec![0f32; 5 * world];
            comm.all_gather(&local, &mut out).expect("all_gather");
            out
        });
        let expected: Vec<f32> = (0..world).flat_map(|r| (0..5).map(move |i| exact_value(r, i))).collect();
        assert!(results.iter().all(|r| *r == expected), "world {world}");
    }
}

#[test]
fn send_recv_ring_pass() {
    let world = 4;
    let results = on_threads(InProcessGroup::new(world), move |rank, mut comm| {
        let mine: Vec<f32> = (0..1000).map(|i| exact_value(rank, i)).collect();
        let mut theirs = vec![0f32; 1000];
        comm.send((rank + 1) % world, &mine).expect("send");
        comm.recv((rank + world - 1) % world, &mut theirs).expect("recv");
        theirs
    });
    for (rank, got) in results.iter().enumerate() {
        let prev = (rank + world - 1) % world;
        assert!(got.iter().enumerate().all(|(i, &v)| v == exact_value(prev, i)));
    }
}

#[test]
fn mismatched_lengths_are_protocol_errors_on_every_rank() {
    let results = on_threads(InProcessGroup::new(2), |rank, mut comm| {
        let mut data = vec![1.0f32; 10 + rank];
        comm.all_reduce_sum(&mut data)
    });
    assert!(results.iter().all(|r| matches!(r, Err(CollectiveError::Protocol(_)))), "{results:?}");

    let results = on_threads(
        InProcessGroup::new(2),
        |rank, mut comm| {
            if rank == 0 {
                comm.send(1, &[1.0, 2.0])
            } else {
                comm.recv(0, &mut [0.0; 3])
            }
        },
    );
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(CollectiveError::Protocol(_))), "{:?}", results[1]);
}

#[test]
fn a_dropped_peer_gives_peer_lost() {
    let results = on_threads(InProcessGroup::new(3), |rank, mut comm| {
        if rank == 2 {
            drop(comm);
            return Vec::new();
        }
        let mut data = vec![1.0f32; 4];
        let reduce = comm.all_reduce_sum(&mut data);
        let recv = comm.recv(2, &mut [0.0; 1]);
        let send = comm.send(2, &[1.0]);
        vec![reduce, recv, send]
    });
    for rank_results in &results[..2] {
        assert!(rank_results.iter().all(|r| matches!(r, Err(CollectiveError::PeerLost))), "{rank_results:?}");
    }
}

#[test]
fn a_panicking_peer_gives_peer_lost() {
    let mut groups = InProcessGroup::new(2);
    let doomed = groups.pop().expect("rank 1");
    let crashed = std::thread::spawn(move || {
        let _comm = doomed;
        panic!("rank 1 fails on purpose");
    });
    let result = on_threads(groups, |_, mut survivor| survivor.all_reduce_sum(&mut [1.0, 2.0]));
    assert!(matches!(result[0], Err(CollectiveError::PeerLost)), "{:?}", result[0]);
    assert!(crashed.join().is_err());
}

#[test]
fn messages_sent_before_leaving_are_delivered() {
    let mut groups = InProcessGroup::new(2);
    let mut receiver = groups.remove(0);
    let mut sender = groups.remove(0);
    sender.send(0, &[4.0, 5.0]).expect("send");
    drop(sender);
    let mut out = [0f32; 2];
    receiver.recv(1, &mut out).expect("recv");
    assert_eq!(out, [4.0, 5.0]);
    assert!(matches!(receiver.recv(1, &mut out), Err(CollectiveError::PeerLost)));
}

#[test]
fn bad_arguments_are_rejected() {
    let mut groups = InProcessGroup::new(2);
    assert!(matches!(groups[0].send(0, &[1.0]), Err(CollectiveError::InvalidArgument(_))));
    assert!(matches!(groups[0].recv(5, &mut [0.0]), Err(CollectiveError::InvalidArgument(_))));
    assert_eq!((groups[1].rank(), groups[1].world_size()), (1, 2));
    assert!(InProcessGroup::new(0).is_empty());
}
