//! Placement as tables: a snapshot of groups, a request, the decision.

use super::*;

/// A serving, idle group of model 0.
fn group(id: u64, kv_capacity: u64) -> GroupView {
    GroupView { id, model: 0, kv_capacity, serving: true, held: false, draining: false, active: 0, last_placed: 0, cached_prefix: 0 }
}

/// Rings for prompts of at least `tokens` tokens; no prefix affinity.
fn ring(tokens: usize) -> Policy {
    Policy { ring_prefill_tokens: tokens, ..Policy::default() }
}

fn request(kv_tokens: u64, prompt_len: usize) -> PlacementRequest {
    PlacementRequest { model: 0, kv_tokens, prompt_len, may_ring: true }
}

#[test]
fn a_request_that_fits_goes_to_the_least_busy_group_then_the_least_recently_chosen() {
    let busy = GroupView { active: 3, ..group(1, 1024) };
    let idle_recent = GroupView { last_placed: 9, ..group(2, 1024) };
    let idle_old = GroupView { last_placed: 4, ..group(3, 1024) };
    let table = [
        (vec![busy.clone(), idle_recent.clone()], Decision::Group(2)),
        (vec![busy.clone(), idle_recent.clone(), idle_old.clone()], Decision::Group(3)),
        (vec![busy.clone()], Decision::Group(1)),
    ];
    for (groups, expected) in table {
        assert_eq!(place(&groups, &request(500, 400), Policy::default()), Ok(expected), "{groups:?}");
    }
}

#[test]
fn groups_that_are_draining_held_forming_too_small_or_of_another_model_are_skipped() {
    let skipped = [
        GroupView { draining: true, ..group(1, 1024) },
        GroupView { held: true, ..group(2, 1024) },
        GroupView { serving: false, ..group(3, 1024) },
        GroupView { model: 1, ..group(4, 1024) },
        group(5, 256),
    ];
    let mut groups = skipped.to_vec();
    groups.push(GroupView { active: 10, ..group(6, 1024) });
    assert_eq!(place(&groups, &request(500, 400), Policy::default()), Ok(Decision::Group(6)));
}

#[test]
fn a_request_no_group_holds_goes_to_the_smallest_ring_whose_members_hold_their_share() {
    let table: [(Vec<u64>, u64, usize); 3] = [
        // 1500 tokens over 2 groups: 752 each.
        (vec![1024, 1024, 1024], 1500, 2),
        // 2500 over 3: 836 each (the 2-ring would need 1252).
        (vec![1024, 1024, 1024], 2500, 3),
        // The larger groups are used first: 2 of 2048 hold 1802 each.
        (vec![512, 2048, 2048], 3600, 2),
    ];
    for (capacities, tokens, size) in table {
        let groups: Vec<GroupView> = capacities.iter().enumerate().map(|(i, &c)| group(i as u64 + 1, c)).collect();
        let expected = RingPlan { model: 0, size, share: ring_share(tokens, size), tokens };
        assert_eq!(place(&groups, &request(tokens, 100), Policy::default()), Ok(Decision::Ring(expected)), "{capacities:?} {tokens}");
    }
}

#[test]
fn a_request_no_ring_holds_is_refused_with_the_true_maximum() {
    let groups = [group(1, 1024), group(2, 1024), group(3, 512)];
    // One group holds 1024; two hold 2 × 1022; three hold 3 × 510.
    let refusal = place(&groups, &request(5000, 100), Policy::default());
    assert_eq!(refusal, Err(Refusal::TooLarge { tokens: 5000, most: 2044, groups: 3, largest: 1024 }));
    let message = refusal.err().map(|r| r.into_error("m", 1, 3).to_string()).unwrap_or_default();
    assert!(message.contains("the most this cluster can hold for one request now is 2044"), "{message}");
}

#[test]
fn a_lone_group_too_small_refuses_with_its_own_capacity() {
    assert_eq!(
        place(&[group(1, 1024)], &request(3016, 3000), Policy::default()),
        Err(Refusal::TooLarge { tokens: 3016, most: 1024, groups: 1, largest: 1024 })
    );
}

#[test]
fn a_beam_search_larger_than_any_group_is_refused_not_ringed() {
    let beams = PlacementRequest::new(0, 600, 100, 4);
    assert!(!beams.may_ring);
    assert_eq!(beams.kv_tokens, 4 * 704, "each beam holds the prompt and its tokens in whole blocks");
    let groups = [group(1, 1024), group(2, 1024), group(3, 1024)];
    assert_eq!(place(&groups, &beams, Policy::default()), Err(Refusal::BeamTooLarge { tokens: 2816, largest: 1024 }));
}

#[test]
fn a_beam_search_is_not_spread_for_prefill_speed() {
    let mut beams = PlacementRequest::new(0, 600, 10, 2);
    beams.prompt_len = 600;
    let groups = [group(1, 4096), group(2, 4096)];
    assert_eq!(place(&groups, &beams, ring(256)), Ok(Decision::Group(1)));
}

#[test]
fn a_sampled_request_reserves_prompt_plus_max_new_tokens() {
    let one = PlacementRequest::new(2, 600, 100, 1);
    assert_eq!(one, PlacementRequest { model: 2, kv_tokens: 700, prompt_len: 600, may_ring: true });
}

#[test]
fn a_long_prompt_is_spread_over_a_ring_for_prefill_speed_when_the_rule_is_on() {
    let groups = [group(1, 4096), group(2, 4096), group(3, 4096)];
    let table = [
        // Rule off: one group.
        (0, 1000, Decision::Group(1)),
        // 1000 / 400 → 3 members.
        (400, 1000, Decision::Ring(RingPlan { model: 0, size: 3, share: ring_share(1100, 3), tokens: 1100 })),
        // Below the threshold: one group.
        (2000, 1000, Decision::Group(1)),
        // 1000 / 100 → 10, clamped to the 3 that serve.
        (100, 1000, Decision::Ring(RingPlan { model: 0, size: 3, share: ring_share(1100, 3), tokens: 1100 })),
    ];
    for (threshold, prompt, expected) in table {
        assert_eq!(place(&groups, &request(1100, prompt), ring(threshold)), Ok(expected), "threshold {threshold}");
    }
}

#[test]
fn with_every_fitting_group_held_by_rings_the_request_is_told_to_retry() {
    let groups = [GroupView { held: true, ..group(1, 1024) }, GroupView { held: true, ..group(2, 1024) }];
    let refusal = place(&groups, &request(500, 400), Policy::default());
    assert_eq!(refusal, Err(Refusal::AllHeld { held: 2 }));
    let error = refusal.err().map(|r| r.into_error("m", 1, 2));
    assert!(matches!(error, Some(CoordinatorError::Unavailable(_))));
}

#[test]
fn with_no_serving_group_the_refusal_counts_the_ones_loading() {
    let groups = [GroupView { serving: false, ..group(1, 1024) }, GroupView { serving: false, model: 1, ..group(2, 1024) }];
    assert_eq!(place(&groups, &request(500, 400), Policy::default()), Err(Refusal::NotServing { forming: 1 }));
    assert_eq!(place(&[], &request(500, 400), Policy::default()), Err(Refusal::NotServing { forming: 0 }));
    let message = Refusal::NotServing { forming: 1 }.into_error("tiny", 3, 2).to_string();
    assert!(message.contains("(1 loading; 2 workers registered, 3 needed per group)"), "{message}");
}

// --- Rings ---

#[test]
fn a_ring_takes_the_least_busy_free_groups_that_hold_its_share() {
    let plan = RingPlan { model: 0, size: 2, share: 700, tokens: 1396 };
    let groups = [
        GroupView { active: 2, ..group(1, 1024) },
        group(2, 512),
        GroupView { active: 1, ..group(3, 1024) },
        GroupView { active: 1, ..group(4, 1024) },
        GroupView { draining: true, ..group(5, 1024) },
    ];
    assert_eq!(choose_ring(&groups, &plan), Ok(Some(vec![3, 4])));
}

#[test]
fn a_ring_waits_while_other_rings_hold_the_groups_it_needs() {
    let plan = RingPlan { model: 0, size: 2, share: 700, tokens: 1396 };
    let groups = [GroupView { held: true, ..group(1, 1024) }, group(2, 1024)];
    assert_eq!(choose_ring(&groups, &plan), Ok(None));
    // Released: the ring forms.
    let groups = [group(1, 1024), group(2, 1024)];
    assert_eq!(choose_ring(&groups, &plan), Ok(Some(vec![1, 2])));
}

#[test]
fn a_ring_is_refused_when_too_few_groups_could_ever_hold_it_now() {
    let plan = RingPlan { model: 0, size: 3, share: 700, tokens: 2000 };
    let groups = [group(1, 1024), group(2, 1024), GroupView { draining: true, ..group(3, 1024) }];
    assert_eq!(choose_ring(&groups, &plan), Err(Refusal::RingUnavailable { size: 3, share: 700 }));
}

#[test]
fn embed_goes_to_the_least_busy_usable_group() {
    let groups =
        [GroupView { active: 1, ..group(1, 0) }, GroupView { last_placed: 5, ..group(2, 0) }, GroupView { last_placed: 2, ..group(3, 0) }];
    assert_eq!(least_busy(&groups, 0, |_| true), Some(3));
    assert_eq!(least_busy(&groups, 0, |g| g.id != 3), Some(2));
    assert_eq!(least_busy(&groups, 1, |_| true), None);
}

#[test]
fn a_group_holding_the_prompt_prefix_wins_unless_it_is_busier_than_the_margin() {
    let least = GroupView { active: 1, ..group(1, 1024) };
    let cached = |active, cached_prefix| GroupView { active, cached_prefix, ..group(2, 1024) };
    let longer = GroupView { active: 2, cached_prefix: 320, ..group(3, 1024) };
    let affinity = Policy { prefix_affinity_margin: Some(2), ..Policy::default() };
    let table = [
        // Within the margin: the group with the prefix, and of two the longer prefix.
        (vec![least.clone(), cached(3, 160)], affinity, Decision::Group(2)),
        (vec![least.clone(), cached(3, 160), longer.clone()], affinity, Decision::Group(3)),
        // Busier than the least busy by more than the margin: the least busy.
        (vec![least.clone(), cached(4, 160)], affinity, Decision::Group(1)),
        // No prefix anywhere, or affinity off: the least busy.
        (vec![least.clone(), cached(1, 0)], affinity, Decision::Group(1)),
        (vec![least.clone(), cached(1, 160)], Policy::default(), Decision::Group(1)),
    ];
    for (groups, policy, expected) in table {
        assert_eq!(place(&groups, &request(500, 400), policy), Ok(expected), "{groups:?} {policy:?}");
    }
    // A group that cannot hold the request is not preferred for its prefix.
    let small = GroupView { cached_prefix: 400, ..group(4, 256) };
    assert_eq!(place(&[least, small], &request(500, 400), affinity), Ok(Decision::Group(1)));
}
