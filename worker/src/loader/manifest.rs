//! The parts of dataprep's `manifest.json` the loader needs, read
//! tolerantly: unknown keys are ignored, keys the loader does not need
//! default, and a missing needed key is reported by its path
//! (`phases[1].shards[0].rows`).

use serde::Deserialize;

use super::LoaderError;

/// Name of the manifest at the dataset root.
pub const MANIFEST: &str = "manifest.json";

/// The dataset manifest as written by dataprep (only the fields read here).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Manifest {
    /// Layout version; 0 when absent.
    #[serde(default)]
    pub format_version: u32,
    /// Dataset name; empty when absent.
    #[serde(default)]
    pub name: String,
    /// Phases in config order.
    pub phases: Vec<ManifestPhase>,
}

/// One phase's shards.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ManifestPhase {
    /// Phase name (a run spec's `dataset_phase`).
    pub name: String,
    /// Tokens per row.
    pub seq_len: u32,
    /// Rows in the phase.
    pub sequences: u64,
    /// Tokens in the phase (sequences × seq_len); 0 when absent.
    #[serde(default)]
    pub tokens: u64,
    /// Shards in order.
    pub shards: Vec<ManifestShard>,
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ManifestShard {
    /// Path relative to the dataset root.
    pub path: String,
    /// Rows in the shard.
    pub rows: u64,
    /// sha256 of the file's bytes, lowercase hex.
    pub sha256: String,
}

impl Manifest {
    /// Parses `bytes` read from `location` (named in errors).
    pub fn parse(location: &str, bytes: &[u8]) -> Result<Self, LoaderError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(de).map_err(|e| LoaderError::Manifest {
            location: location.to_string(),
            message: format!("at `{}`: {}", e.path(), e.inner()),
        })
    }

    /// The phase called `name`.
    pub fn phase(&self, location: &str, name: &str) -> Result<&ManifestPhase, LoaderError> {
        self.phases
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| LoaderError::MissingPhase {
                location: location.to_string(),
                phase: name.to_string(),
                available: self.phases.iter().map(|p| p.name.clone()).collect(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_keys_are_ignored_and_optional_ones_default() -> Result<(), LoaderError> {
        let json = br#"{"format_version":1,"program":"twinhead-dataprep","sources":[],
            "phases":[{"name":"pretrain","seq_len":8,"sequences":3,"seed":7,
            "shards":[{"path":"phases/pretrain/shard-00000.parquet","rows":3,"sha256":"ab"}]}]}"#;
        let m = Manifest::parse("m.json", json)?;
        assert_eq!(m.phases[0].tokens, 0);
        assert_eq!(m.phases[0].shards[0].rows, 3);
        assert!(m.phase("m.json", "pretrain").is_ok());
        let err = m.phase("m.json", "decay").err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("m.json has no phase `decay` (phases: [\"pretrain\"])")
        );
        Ok(())
    }

    #[test]
    fn a_missing_key_is_named_by_its_path() {
        let json = br#"{"phases":[{"name":"p","seq_len":8,"sequences":3,
            "shards":[{"path":"a","sha256":"ab"}]}]}"#;
        let err = Manifest::parse("gs://b/d/manifest.json", json)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("gs://b/d/manifest.json"), "{err}");
        assert!(err.contains("phases[0].shards[0]"), "{err}");
        assert!(err.contains("missing field `rows`"), "{err}");
    }
}
