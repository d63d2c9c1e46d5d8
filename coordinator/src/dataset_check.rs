//! A submitted run against its dataset's manifest: refused at submit when
//! the dataset is missing, lacks a phase the run reads, or was built at
//! another `seq_len` or for a vocabulary or special tokens the model does
//! not have, instead of failing inside every world it forms.

use std::time::Duration;

use tonic::Status;
use twinhead_data::manifest::{MANIFEST, Manifest};
use twinhead_data::store::{Location, StoreError};
use twinhead_proto::v1::RunSpec;

/// How long a submit waits for the manifest before giving up.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the manifest of `spec.dataset` and checks the run against it.
/// The coordinator therefore needs read access to datasets (the storage
/// variables in its environment, as workers have).
pub async fn check_run_dataset(spec: &RunSpec) -> Result<(), Status> {
    let url = spec.dataset.clone();
    let read = tokio::task::spawn_blocking(move || read_manifest(&url));
    let manifest = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(result)) => result?,
        Ok(Err(e)) => return Err(Status::internal(format!("dataset check: {e}"))),
        Err(_) => {
            return Err(Status::unavailable(format!(
                "dataset: reading {}/{MANIFEST} took more than {} s; try again",
                spec.dataset.trim_end_matches('/'),
                READ_TIMEOUT.as_secs()
            )));
        }
    };
    check_against_manifest(spec, &manifest)
}

fn read_manifest(url: &str) -> Result<Manifest, Status> {
    let store_status = |e: StoreError| {
        let message = format!("dataset: cannot read {url} from the coordinator: {e}");
        if e.is_transient() {
            Status::unavailable(message)
        } else {
            Status::failed_precondition(message)
        }
    };
    let root = Location::open(url, false).map_err(|e| match e {
        StoreError::Url { .. } => Status::invalid_argument(format!("spec.dataset: {e}")),
        other => store_status(other),
    })?;
    let name = root.name(MANIFEST);
    let bytes = root
        .get_opt(MANIFEST)
        .map_err(store_status)?
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "spec.dataset: no dataset at {url} ({name} does not exist; build one with \
             `twinhead dataset build`)"
            ))
        })?;
    Manifest::parse(&name, &bytes)
        .map_err(|e| Status::invalid_argument(format!("spec.dataset: {e}")))
}

/// The rules, on a manifest already read: every phase's `dataset_phase`
/// exists with the phase's `seq_len`; the model's vocabulary holds every
/// token id of the dataset, and its `[CLS]` and `[SEP]` are the ids the
/// rows were packed with.
pub fn check_against_manifest(spec: &RunSpec, manifest: &Manifest) -> Result<(), Status> {
    let url = spec.dataset.trim_end_matches('/');
    let refuse = |key: String, message: String| {
        Err(Status::invalid_argument(format!("spec.{key}: {message}")))
    };
    let available = || {
        manifest
            .phases
            .iter()
            .map(|p| format!("{} (seq_len {})", p.name, p.seq_len))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, phase) in spec.phases.iter().enumerate() {
        let Some(built) = manifest
            .phases
            .iter()
            .find(|p| p.name == phase.dataset_phase)
        else {
            return refuse(
                format!("phases[{i}].dataset_phase"),
                format!(
                    "the dataset at {url} has no phase {:?}; it has {}",
                    phase.dataset_phase,
                    available()
                ),
            );
        };
        if built.seq_len != phase.seq_len {
            return refuse(
                format!("phases[{i}].seq_len"),
                format!(
                    "{} in the run, but phase {:?} of the dataset at {url} was built at seq_len {}",
                    phase.seq_len, built.name, built.seq_len
                ),
            );
        }
    }
    let Some(model) = &spec.model else {
        return Ok(());
    };
    let tokenizer = &manifest.tokenizer;
    // A manifest without tokenizer details (vocab_size 0) has nothing to
    // compare.
    if tokenizer.vocab_size == 0 {
        return Ok(());
    }
    if model.vocab_size < tokenizer.vocab_size {
        return refuse(
            "model.vocab_size".into(),
            format!(
                "{} in the model, but the dataset at {url} was tokenized with a vocabulary of {} \
                 (ids up to {} would not fit)",
                model.vocab_size,
                tokenizer.vocab_size,
                tokenizer.vocab_size - 1
            ),
        );
    }
    for (key, in_model, in_data, token) in [
        (
            "model.cls_token_id",
            model.cls_token_id,
            tokenizer.cls_id,
            "[CLS]",
        ),
        (
            "model.sep_token_id",
            model.sep_token_id,
            tokenizer.sep_id,
            "[SEP]",
        ),
    ] {
        if in_model != in_data {
            return refuse(
                key.into(),
                format!(
                    "{in_model} in the model, but the dataset at {url} packs rows with {token} = {in_data}"
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinhead_data::manifest::{PhaseStats, TokenizerInfo};
    use twinhead_proto::v1::{ModelSpec, PhaseSpec};

    fn phase(name: &str, seq_len: u32) -> PhaseStats {
        PhaseStats {
            name: name.into(),
            seq_len,
            seed: 0,
            min_piece_tokens: 0,
            budget_tokens: 0,
            sequences: 0,
            tokens: 0,
            tokens_per_source: Default::default(),
            tail_tokens_dropped: 0,
            draws: vec![],
            shards: vec![],
            eval: None,
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            format_version: 1,
            program: String::new(),
            program_version: String::new(),
            name: "d".into(),
            config: String::new(),
            config_sha256: String::new(),
            tokenizer: TokenizerInfo {
                vocab_size: 512,
                cls_id: 1,
                sep_id: 2,
                ..Default::default()
            },
            sources: vec![],
            phases: vec![phase("short", 64), phase("long", 256)],
            decontamination: None,
        }
    }

    fn spec() -> RunSpec {
        let phase = |name: &str, seq_len| PhaseSpec {
            name: name.into(),
            dataset_phase: name.into(),
            seq_len,
            ..Default::default()
        };
        RunSpec {
            dataset: "s3://b/d/".into(),
            model: Some(ModelSpec {
                vocab_size: 4096,
                cls_token_id: 1,
                sep_token_id: 2,
                ..Default::default()
            }),
            phases: vec![phase("short", 64), phase("long", 256)],
            ..Default::default()
        }
    }

    fn refused(spec: &RunSpec, manifest: &Manifest) -> String {
        let status = check_against_manifest(spec, manifest).expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        status.message().to_string()
    }

    #[test]
    fn a_matching_run_passes_and_each_mismatch_names_its_key_and_both_values() {
        let m = manifest();
        check_against_manifest(&spec(), &m).expect("matches");

        let mut s = spec();
        s.phases[1].dataset_phase = "decay".into();
        let msg = refused(&s, &m);
        assert!(msg.starts_with("spec.phases[1].dataset_phase:"), "{msg}");
        assert!(
            msg.contains("\"decay\"") && msg.contains("s3://b/d has no phase"),
            "{msg}"
        );
        assert!(
            msg.contains("short (seq_len 64), long (seq_len 256)"),
            "{msg}"
        );

        let mut s = spec();
        s.phases[1].seq_len = 512;
        let msg = refused(&s, &m);
        assert!(
            msg.starts_with("spec.phases[1].seq_len: 512 in the run"),
            "{msg}"
        );
        assert!(msg.contains("built at seq_len 256"), "{msg}");

        let mut s = spec();
        if let Some(model) = s.model.as_mut() {
            model.vocab_size = 256;
        }
        let msg = refused(&s, &m);
        assert!(
            msg.starts_with("spec.model.vocab_size: 256 in the model"),
            "{msg}"
        );
        assert!(msg.contains("vocabulary of 512"), "{msg}");

        let mut s = spec();
        if let Some(model) = s.model.as_mut() {
            model.sep_token_id = 50282;
        }
        let msg = refused(&s, &m);
        assert!(
            msg.starts_with("spec.model.sep_token_id: 50282 in the model"),
            "{msg}"
        );
        assert!(msg.contains("[SEP] = 2"), "{msg}");

        // A larger model vocabulary (Ettin pads 50,280 to 50,368) is fine.
        let mut s = spec();
        if let Some(model) = s.model.as_mut() {
            model.vocab_size = 50_368;
        }
        check_against_manifest(&s, &m).expect("a padded vocabulary fits");
    }

    #[test]
    fn a_missing_dataset_is_refused_naming_the_url() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let url = format!("file://{}", dir.path().join("nothing-here").display());
        let status = read_manifest(&url).expect_err("missing");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("no dataset at"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("nothing-here"),
            "{}",
            status.message()
        );

        let broken = dir.path().join("broken");
        std::fs::create_dir_all(&broken)?;
        std::fs::write(broken.join(MANIFEST), b"{\"phases\": 3}")?;
        let status = read_manifest(&broken.display().to_string()).expect_err("broken");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("manifest.json"),
            "{}",
            status.message()
        );
        Ok(())
    }
}
