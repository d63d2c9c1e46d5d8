//! Pure decisions over coordinator state: which free workers form which
//! world. No I/O, no clocks: the state layer feeds it plain values.
//!
//! ```text
//!   waiting runs (submission order)      free workers (registration order)
//!   run-1 needs 4, fresh        ─┐       w-1 w-2 w-3 w-4 w-5 w-6
//!   run-2 needs 2..4, restarted ─┼──►    run-1 ← w-1 w-2 w-3 w-4 (ranks 0..3)
//!                                └──►    run-2 ← w-5 w-6          (ranks 0..1)
//! ```
//!
//! A run's first world has exactly `world_size` ranks. A run that already
//! trained and lost its world is re-formed with the largest size between
//! `min_world_size` and `world_size` that divides the global batch, so
//! recovery does not wait for a replacement when fewer ranks can carry the
//! batch. Runs are served in submission order; a run that cannot be served
//! yet does not hold back later runs that can (backfill).

/// A run without a world, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingRun {
    pub run_id: String,
    pub world_size: u32,
    /// 0 means `world_size`.
    pub min_world_size: u32,
    pub global_batch: u32,
    /// Whether the run has had a world before (elastic sizes allowed).
    pub started: bool,
}

/// The world size to form for `run` out of `free` workers, if any.
pub fn world_size_for(run: &WaitingRun, free: usize) -> Option<u32> {
    let wanted = run.world_size;
    if !run.started {
        return (wanted as usize <= free).then_some(wanted);
    }
    let min = if run.min_world_size == 0 {
        wanted
    } else {
        run.min_world_size.min(wanted)
    };
    (min..=wanted)
        .rev()
        .find(|&n| n as usize <= free && n > 0 && run.global_batch.is_multiple_of(n))
}

/// Assigns free workers to waiting runs: `(run_id, workers by rank)`.
pub fn plan_worlds(waiting: &[WaitingRun], free: &[String]) -> Vec<(String, Vec<String>)> {
    let mut next = 0;
    let mut plan = Vec::new();
    for run in waiting {
        if let Some(n) = world_size_for(run, free.len() - next) {
            let members = free[next..next + n as usize].to_vec();
            next += n as usize;
            plan.push((run.run_id.clone(), members));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, size: u32, min: u32, batch: u32, started: bool) -> WaitingRun {
        WaitingRun {
            run_id: id.into(),
            world_size: size,
            min_world_size: min,
            global_batch: batch,
            started,
        }
    }

    fn workers(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("w-{i}")).collect()
    }

    #[test]
    fn a_fresh_run_waits_for_its_full_world() {
        assert_eq!(world_size_for(&run("r", 4, 2, 8, false), 3), None);
        assert_eq!(world_size_for(&run("r", 4, 2, 8, false), 5), Some(4));
    }

    #[test]
    fn a_restarted_run_takes_the_largest_size_that_divides_the_batch() {
        // 3 does not divide 8, so with 3 free workers the world has 2 ranks.
        assert_eq!(world_size_for(&run("r", 4, 2, 8, true), 3), Some(2));
        assert_eq!(world_size_for(&run("r", 4, 2, 8, true), 1), None);
        // min 0 means the full size.
        assert_eq!(world_size_for(&run("r", 4, 0, 8, true), 3), None);
    }

    #[test]
    fn ranks_follow_registration_order_and_no_worker_serves_twice() {
        let waiting = [
            run("a", 2, 0, 4, false),
            run("b", 8, 0, 8, false),
            run("c", 3, 0, 3, false),
        ];
        let plan = plan_worlds(&waiting, &workers(6));
        assert_eq!(
            plan,
            vec![
                ("a".to_string(), vec!["w-1".to_string(), "w-2".to_string()]),
                // b needs 8 and cannot start; c backfills.
                (
                    "c".to_string(),
                    vec!["w-3".to_string(), "w-4".to_string(), "w-5".to_string()]
                ),
            ]
        );
    }

    #[test]
    fn every_plan_is_consistent() {
        // Exhaustive over small shapes: members are distinct, sizes are
        // within bounds and divide the batch.
        for free in 0..7 {
            for size in 1..5 {
                for min in 0..=size {
                    // Only valid specs: world_size divides the batch.
                    for batch in [size, size * 2, 6, 12]
                        .into_iter()
                        .filter(|b| b % size == 0)
                    {
                        for started in [false, true] {
                            let waiting =
                                [run("x", size, min, batch, started), run("y", 2, 1, 4, true)];
                            let plan = plan_worlds(&waiting, &workers(free));
                            let mut seen: Vec<&String> = plan.iter().flat_map(|(_, m)| m).collect();
                            let total = seen.len();
                            seen.sort();
                            seen.dedup();
                            assert_eq!(seen.len(), total);
                            assert!(total <= free);
                            for (id, members) in &plan {
                                let r = waiting.iter().find(|r| &r.run_id == id).expect("run");
                                let n = members.len() as u32;
                                assert!(n <= r.world_size && r.global_batch % n == 0);
                                if !r.started {
                                    assert_eq!(n, r.world_size);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
