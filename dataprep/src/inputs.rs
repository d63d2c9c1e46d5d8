//! Where a source's inputs are: an input pattern (a path, URL or glob) split
//! into the folder that holds the files and the pattern that selects them.

use std::path::Path;

use twinhead_data::store::{Listed, Location, local_path};

use crate::error::{Error, Result};

/// An input pattern split into the folder that holds the files and the
/// glob pattern (relative to it) that selects them.
#[derive(Debug, Clone)]
pub struct InputSpec {
    /// The folder (URL or path).
    pub base: String,
    /// Glob relative to `base`; `None` selects everything below it.
    pub pattern: Option<String>,
}

/// Split `input` at the last `/` before the first glob character; a path
/// to a single local file becomes its folder plus its name.
pub fn split_input(input: &str) -> InputSpec {
    let first_glob = input.find(['*', '?', '[', '{']);
    match first_glob {
        Some(g) => {
            let cut = input[..g].rfind('/').map_or(0, |i| i + 1);
            InputSpec {
                base: if cut == 0 {
                    ".".into()
                } else {
                    input[..cut - 1].to_string()
                },
                pattern: Some(input[cut..].to_string()),
            }
        }
        None => {
            if let Some(dir) = local_path(input)
                && Path::new(&dir).is_file()
            {
                let cut = input.rfind('/').map_or(0, |i| i + 1);
                return InputSpec {
                    base: if cut == 0 {
                        ".".into()
                    } else {
                        input[..cut - 1].to_string()
                    },
                    pattern: Some(glob::Pattern::escape(&input[cut..])),
                };
            }
            InputSpec {
                base: input.trim_end_matches('/').to_string(),
                pattern: None,
            }
        }
    }
}

/// The folder holding an input's objects (the names [`list_input`] gives
/// are relative to it).
pub fn input_location(input: &str) -> Result<Location> {
    Ok(Location::open_existing(&split_input(input).base)?)
}

/// List the objects an input names: `(location, relative paths)` sorted.
pub fn list_input(input: &str) -> Result<(Location, Vec<Listed>)> {
    let spec = split_input(input);
    let loc = Location::open_existing(&spec.base)?;
    let all = loc.list("")?;
    let files = match &spec.pattern {
        None => all,
        Some(p) => {
            let pat = glob::Pattern::new(p).map_err(|e| Error::Glob {
                input: input.to_string(),
                message: e.to_string(),
            })?;
            let opts = glob::MatchOptions {
                case_sensitive: true,
                require_literal_separator: true,
                require_literal_leading_dot: false,
            };
            all.into_iter()
                .filter(|l| pat.matches_with(&l.rel, opts))
                .collect()
        }
    };
    Ok((loc, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_glob() {
        let s = split_input("/data/x/*.jsonl.gz");
        assert_eq!(s.base, "/data/x");
        assert_eq!(s.pattern.as_deref(), Some("*.jsonl.gz"));
        let s = split_input("s3://b/p/**/part-*.parquet");
        assert_eq!(s.base, "s3://b/p");
        assert_eq!(s.pattern.as_deref(), Some("**/part-*.parquet"));
        let s = split_input("/no/such/dir");
        assert_eq!(s.base, "/no/such/dir");
        assert!(s.pattern.is_none());
    }

    #[test]
    fn list_input_selects_by_glob_and_refuses_missing_folders() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::ThreadPool(e.to_string()))?;
        let root = dir.path().to_string_lossy().into_owned();
        let loc = Location::open(&format!("file://{root}/out"), true)?;
        loc.put("a/b.txt", b"hello".to_vec())?;
        loc.put("a/c.txt", b"hi".to_vec())?;
        loc.put("a/d.json", b"{}".to_vec())?;
        let (_, files) = list_input(&format!("{root}/out/a/*.txt"))?;
        let names: Vec<&str> = files.iter().map(|l| l.rel.as_str()).collect();
        assert_eq!(names, ["b.txt", "c.txt"]);
        let missing = list_input(&format!("{root}/nope/*.txt"))
            .err()
            .map(|e| e.to_string());
        assert!(
            missing
                .as_deref()
                .is_some_and(|m| m.contains("nope") && m.contains("no such folder")),
            "{missing:?}"
        );
        Ok(())
    }
}
