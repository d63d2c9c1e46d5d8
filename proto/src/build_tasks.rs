//! A dataset build as tasks: what the coordinator hands out to dataprep
//! processes (`DataprepService`) and what `twinhead-dataprep` runs. The keys
//! are part of the protocol; the work behind each task is dataprep's.

/// One unit of work of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// List inputs and group them into parts.
    Plan,
    /// Filter one part of one source.
    Scan { source: usize, part: usize },
    /// Dedup and caps across each source; tokenizer stored (or trained).
    Prepare,
    /// Tokenize one part of one source.
    Tokenize { source: usize, part: usize },
    /// Build one phase's shards.
    Phase { index: usize },
    /// Write the manifest.
    Finalize,
}

impl Task {
    /// A stable name: `plan`, `scan/0/3`, `prepare`, `tokenize/0/3`,
    /// `phase/1`, `finalize`.
    pub fn key(&self) -> String {
        match self {
            Task::Plan => "plan".into(),
            Task::Scan { source, part } => format!("scan/{source}/{part}"),
            Task::Prepare => "prepare".into(),
            Task::Tokenize { source, part } => format!("tokenize/{source}/{part}"),
            Task::Phase { index } => format!("phase/{index}"),
            Task::Finalize => "finalize".into(),
        }
    }

    /// The task named by [`Task::key`].
    pub fn from_key(key: &str) -> Option<Task> {
        let mut it = key.split('/');
        let kind = it.next()?;
        let mut num = || it.next().and_then(|n| n.parse::<usize>().ok());
        let task = match kind {
            "plan" => Task::Plan,
            "scan" => Task::Scan {
                source: num()?,
                part: num()?,
            },
            "prepare" => Task::Prepare,
            "tokenize" => Task::Tokenize {
                source: num()?,
                part: num()?,
            },
            "phase" => Task::Phase { index: num()? },
            "finalize" => Task::Finalize,
            _ => return None,
        };
        (task.key() == key).then_some(task)
    }
}

/// The most parts (input files, or groups of text files) a build may have,
/// over all its sources: every part is a scan and a tokenize task, and a
/// plan's counts come from a dataprep process over the network.
pub const MAX_PARTS: u64 = 1_000_000;

/// Refuses a plan of more than [`MAX_PARTS`] parts, naming the count.
pub fn check_parts(parts_per_source: impl IntoIterator<Item = u64>) -> Result<(), String> {
    let total = parts_per_source
        .into_iter()
        .fold(0u64, |total, n| total.saturating_add(n));
    if total > MAX_PARTS {
        return Err(format!(
            "parts_per_source: {total} parts in all; a build has at most {MAX_PARTS} \
             (one per input file)"
        ));
    }
    Ok(())
}

/// The steps of a build in order, each with its tasks, given the parts per
/// source from [`Task::Plan`] and the number of phases.
pub fn steps(parts_per_source: &[usize], phases: usize) -> Vec<Vec<Task>> {
    let per_part = |make: fn(usize, usize) -> Task| -> Vec<Task> {
        parts_per_source
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| (0..n).map(move |p| make(s, p)))
            .collect()
    };
    vec![
        vec![Task::Plan],
        per_part(|source, part| Task::Scan { source, part }),
        vec![Task::Prepare],
        per_part(|source, part| Task::Tokenize { source, part }),
        (0..phases).map(|index| Task::Phase { index }).collect(),
        vec![Task::Finalize],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_keys_round_trip_and_reject_garbage() {
        for t in [
            Task::Plan,
            Task::Scan {
                source: 2,
                part: 13,
            },
            Task::Prepare,
            Task::Tokenize { source: 0, part: 0 },
            Task::Phase { index: 4 },
            Task::Finalize,
        ] {
            assert_eq!(Task::from_key(&t.key()), Some(t));
        }
        for bad in [
            "",
            "scan",
            "scan/1",
            "scan/1/x",
            "phase/1/2",
            "plan/0",
            "scan/01/2",
        ] {
            assert_eq!(Task::from_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn steps_cover_every_part_and_phase_in_order() {
        let s = steps(&[2, 0, 1], 2);
        assert_eq!(s.len(), 6);
        assert_eq!(
            s[1],
            [
                Task::Scan { source: 0, part: 0 },
                Task::Scan { source: 0, part: 1 },
                Task::Scan { source: 2, part: 0 },
            ]
        );
        assert_eq!(s[3].len(), 3);
        assert_eq!(s[4], [Task::Phase { index: 0 }, Task::Phase { index: 1 }]);
    }
}
