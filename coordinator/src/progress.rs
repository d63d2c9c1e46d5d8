//! Loss curves as the monitoring surfaces serve them: a run's progress
//! reports, thinned so a long run's curve stays a few thousand points.

use crate::store::ProgressRow;

/// Keeps about `max_points` of `rows` (0: all; at most two more per phase
/// from rounding), spread evenly over each phase so every phase keeps its
/// shape, and always each phase's first and last point. Order is kept.
pub fn thin(rows: Vec<ProgressRow>, max_points: usize) -> Vec<ProgressRow> {
    if max_points == 0 || rows.len() <= max_points {
        return rows;
    }
    let stride = rows.len().div_ceil(max_points);
    let mut kept = Vec::with_capacity(max_points + 8);
    let mut index_in_phase = 0usize;
    for (i, row) in rows.iter().enumerate() {
        let phase_starts = i == 0 || rows[i - 1].phase_index != row.phase_index;
        if phase_starts {
            index_in_phase = 0;
        }
        let phase_ends = rows
            .get(i + 1)
            .is_none_or(|next| next.phase_index != row.phase_index);
        if index_in_phase.is_multiple_of(stride) || phase_ends {
            kept.push(row.clone());
        }
        index_in_phase += 1;
    }
    kept
}

/// Where each phase starts on the run-wide token axis: the most tokens
/// reported in each earlier phase, summed. Entry `i` is phase `i`'s start;
/// one entry past the last phase reported.
pub fn phase_starts(rows: &[ProgressRow]) -> Vec<u64> {
    let mut most_per_phase: Vec<u64> = Vec::new();
    for row in rows {
        let phase = row.phase_index as usize;
        if most_per_phase.len() <= phase {
            most_per_phase.resize(phase + 1, 0);
        }
        most_per_phase[phase] = most_per_phase[phase].max(row.tokens);
    }
    let mut starts = Vec::with_capacity(most_per_phase.len() + 1);
    let mut at = 0u64;
    starts.push(at);
    for most in most_per_phase {
        at += most;
        starts.push(at);
    }
    starts
}

/// Tokens since the start of the run of a point `tokens` into phase
/// `phase_index`, given [`phase_starts`] (a phase past the reported ones
/// starts where they end).
pub fn on_run_axis(starts: &[u64], phase_index: u32, tokens: u64) -> u64 {
    let start = starts
        .get(phase_index as usize)
        .or(starts.last())
        .copied()
        .unwrap_or(0);
    start + tokens
}

/// Tokens since the start of the run for each row: a phase's tokens plus
/// the most tokens reported in each earlier phase, so the phases of one
/// run lie side by side on one axis.
pub fn run_tokens(rows: &[ProgressRow]) -> Vec<u64> {
    let starts = phase_starts(rows);
    rows.iter()
        .map(|row| on_run_axis(&starts, row.phase_index, row.tokens))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(phase_index: u32, step: u64) -> ProgressRow {
        ProgressRow {
            run_id: "run-1".into(),
            world_id: "world-1".into(),
            phase_index,
            step,
            tokens: step * 10,
            loss: 1.0,
            tokens_per_sec: 1.0,
            lr: 0.0,
            grad_norm: 0.0,
            mfu: 0.0,
            time_ms: 0,
        }
    }

    #[test]
    fn thinning_keeps_each_phase_ends_and_stays_near_the_limit() {
        let rows: Vec<ProgressRow> = (1..=1000)
            .map(|s| row(0, s))
            .chain((1..=500).map(|s| row(1, s)))
            .collect();
        let kept = thin(rows, 100);
        assert!(kept.len() <= 100 + 2 * 2, "{} points", kept.len());
        assert!(kept.len() >= 90, "{} points", kept.len());
        let ends = |phase: u32| {
            let steps: Vec<u64> = kept
                .iter()
                .filter(|r| r.phase_index == phase)
                .map(|r| r.step)
                .collect();
            (steps[0], steps[steps.len() - 1])
        };
        assert_eq!(ends(0), (1, 1000));
        assert_eq!(ends(1), (1, 500));
        assert!(
            kept.windows(2)
                .all(|w| (w[0].phase_index, w[0].step) < (w[1].phase_index, w[1].step))
        );
    }

    #[test]
    fn few_rows_or_no_limit_are_kept_whole() {
        let rows: Vec<ProgressRow> = (1..=10).map(|s| row(0, s)).collect();
        assert_eq!(thin(rows.clone(), 0).len(), 10);
        assert_eq!(thin(rows, 10).len(), 10);
    }

    #[test]
    fn later_phases_start_where_earlier_ones_ended() {
        let rows = vec![row(0, 1), row(0, 3), row(1, 1), row(1, 2), row(2, 1)];
        assert_eq!(run_tokens(&rows), vec![10, 30, 40, 50, 60]);
    }
}
