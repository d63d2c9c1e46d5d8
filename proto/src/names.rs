//! The names people and JSON see for the API's enums: one spelling for the
//! CLI, the dashboard, `/metrics` and the coordinator's messages.

use crate::v1::{CheckpointEvalState, DataprepStep, DatasetState, Objective, RunState};

/// A run state's name.
pub fn run_state(state: i32) -> &'static str {
    match RunState::try_from(state) {
        Ok(RunState::Pending) => "pending",
        Ok(RunState::Running) => "running",
        Ok(RunState::Completed) => "completed",
        Ok(RunState::Failed) => "failed",
        Ok(RunState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

/// A checkpoint evaluation's state name.
pub fn checkpoint_eval_state(state: i32) -> &'static str {
    match CheckpointEvalState::try_from(state) {
        Ok(CheckpointEvalState::Pending) => "pending",
        Ok(CheckpointEvalState::Running) => "running",
        Ok(CheckpointEvalState::Done) => "done",
        Ok(CheckpointEvalState::Failed) => "failed",
        _ => "unknown",
    }
}

/// An objective's name, as run configs spell it.
pub fn objective(objective: i32) -> &'static str {
    match Objective::try_from(objective) {
        Ok(Objective::Mlm) => "mlm",
        Ok(Objective::Clm) => "clm",
        Ok(Objective::Mntp) => "mntp",
        _ => "unknown",
    }
}

/// A dataset build's state name.
pub fn dataset_state(state: i32) -> &'static str {
    match DatasetState::try_from(state) {
        Ok(DatasetState::Building) => "building",
        Ok(DatasetState::Complete) => "complete",
        Ok(DatasetState::Failed) => "failed",
        _ => "unknown",
    }
}

/// A dataset build step's name.
pub fn dataprep_step(step: i32) -> &'static str {
    match DataprepStep::try_from(step) {
        Ok(DataprepStep::Plan) => "plan",
        Ok(DataprepStep::Scan) => "scan",
        Ok(DataprepStep::Prepare) => "dedup + tokenizer",
        Ok(DataprepStep::Tokenize) => "tokenize",
        Ok(DataprepStep::Phases) => "phases",
        Ok(DataprepStep::Finalize) => "manifest",
        _ => "-",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_values_have_a_name_too() {
        assert_eq!(run_state(RunState::Failed as i32), "failed");
        assert_eq!(run_state(99), "unknown");
        assert_eq!(objective(Objective::Clm as i32), "clm");
        assert_eq!(dataset_state(-1), "unknown");
        assert_eq!(
            dataprep_step(DataprepStep::Prepare as i32),
            "dedup + tokenizer"
        );
        assert_eq!(dataprep_step(42), "-");
    }
}
