//! Object storage: local paths, `file://` URLs and (with the `cloud`
//! feature) `s3://`, `gs://`, `az://`, behind one small synchronous API.
//!
//! Every call blocks on a private tokio runtime, so the CPU-bound pipeline
//! (rayon threads) never runs on an async executor. Callers inside an async
//! context should call the crate's entry points from `spawn_blocking`.
//! `put` is atomic on every backend (local files are written under a
//! temporary name and renamed), so a reader never sees a half-written file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};

/// A folder-like location in some object store.
#[derive(Clone)]
pub struct Location {
    rt: Arc<tokio::runtime::Runtime>,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    /// How the user wrote it, for messages.
    pub display: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    /// Path relative to the location.
    pub rel: String,
    /// Size in bytes.
    pub size: u64,
}

fn runtime() -> Result<Arc<tokio::runtime::Runtime>> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("dataprep-io")
        .enable_all()
        .build()
        .map(Arc::new)
        .map_err(|e| Error::ThreadPool(format!("cannot start io runtime: {e}")))
}

fn local_dir(path: &str) -> Option<PathBuf> {
    if let Some(rest) = path.strip_prefix("file://") {
        return Some(PathBuf::from(rest));
    }
    if path.contains("://") {
        return None;
    }
    Some(PathBuf::from(path))
}

impl Location {
    /// Open `url` (a local path, `file://` URL or cloud URL) as a folder.
    /// With `create`, a missing local folder is created.
    pub fn open(url: &str, create: bool) -> Result<Self> {
        let rt = runtime()?;
        Self::open_with(rt, url, create)
    }

    fn open_with(rt: Arc<tokio::runtime::Runtime>, url: &str, create: bool) -> Result<Self> {
        let url_err = |message: String| Error::Url {
            url: url.to_string(),
            message,
        };
        if let Some(dir) = local_dir(url) {
            let dir = if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir()
                    .map_err(|e| url_err(e.to_string()))?
                    .join(dir)
            };
            if create {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| url_err(format!("cannot create folder: {e}")))?;
            } else if !dir.is_dir() {
                return Err(url_err("no such folder".into()));
            }
            // Cleanup: deleting a folder's last file removes the folder.
            let store = LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| url_err(e.to_string()))?
                .with_automatic_cleanup(true);
            return Ok(Location {
                rt,
                store: Arc::new(store),
                prefix: ObjPath::default(),
                display: url.to_string(),
            });
        }
        let parsed = url::Url::parse(url).map_err(|e| url_err(e.to_string()))?;
        let (store, prefix) = object_store::parse_url(&parsed).map_err(|e| {
            url_err(format!(
                "{e} (cloud stores need twinhead-dataprep's `cloud` feature)"
            ))
        })?;
        Ok(Location {
            rt,
            store: Arc::from(store),
            prefix,
            display: url.to_string(),
        })
    }

    /// A location for a sub-folder, sharing this one's store and runtime.
    pub fn child(&self, rel: &str) -> Location {
        Location {
            rt: self.rt.clone(),
            store: self.store.clone(),
            prefix: self.full(rel),
            display: format!("{}/{}", self.display.trim_end_matches('/'), rel),
        }
    }

    fn full(&self, rel: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    /// Human name of `rel` inside this location.
    pub fn name(&self, rel: &str) -> String {
        format!("{}/{}", self.display.trim_end_matches('/'), rel)
    }

    fn store_err(&self, rel: &str, source: object_store::Error) -> Error {
        Error::Store {
            location: self.name(rel),
            source,
        }
    }

    /// Read a whole object; `None` when it does not exist.
    pub fn get_opt(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let path = self.full(rel);
        let store = self.store.clone();
        let res = self.rt.block_on(async move {
            match store.get(&path).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        res.map(|b| b.map(|b| b.to_vec()))
            .map_err(|e| self.store_err(rel, e))
    }

    /// Read a whole object; a missing object is an error.
    pub fn get(&self, rel: &str) -> Result<Vec<u8>> {
        self.get_opt(rel)?.ok_or_else(|| Error::Corrupt {
            location: self.name(rel),
            message: "missing".into(),
        })
    }

    /// Write a whole object atomically.
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.full(rel);
        let store = self.store.clone();
        self.rt
            .block_on(async move { store.put(&path, PutPayload::from(bytes)).await })
            .map(|_| ())
            .map_err(|e| self.store_err(rel, e))
    }

    /// Deletes every object under `rel`.
    pub fn remove_all(&self, rel: &str) -> Result<()> {
        let dir = self.child(rel);
        for listed in dir.list()? {
            let path = dir.full(&listed.rel);
            let store = self.store.clone();
            self.rt
                .block_on(async move { store.delete(&path).await })
                .or_else(|e| match e {
                    object_store::Error::NotFound { .. } => Ok(()),
                    e => Err(e),
                })
                .map_err(|e| dir.store_err(&listed.rel, e))?;
        }
        Ok(())
    }

    /// Every object under this location, sorted by relative path.
    pub fn list(&self) -> Result<Vec<Listed>> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        let metas = self
            .rt
            .block_on(async move {
                let p = if prefix.as_ref().is_empty() {
                    None
                } else {
                    Some(&prefix)
                };
                store.list(p).try_collect::<Vec<_>>().await
            })
            .map_err(|e| self.store_err("", e))?;
        let base: Vec<_> = self.prefix.parts().collect();
        let mut out: Vec<Listed> = metas
            .into_iter()
            .filter_map(|m| {
                let parts: Vec<_> = m.location.parts().collect();
                if parts.len() <= base.len() || parts[..base.len()] != base[..] {
                    return None;
                }
                let rel = parts[base.len()..]
                    .iter()
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/");
                Some(Listed { rel, size: m.size })
            })
            .collect();
        out.sort();
        Ok(out)
    }
}

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
            if let Some(dir) = local_dir(input)
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
/// are relative to it), sharing `io`'s runtime so that opening it per task
/// starts no thread.
pub fn input_location(input: &str, io: &Location) -> Result<Location> {
    Location::open_with(io.rt.clone(), &split_input(input).base, false)
}

/// List the objects an input names: `(location, relative paths)` sorted.
pub fn list_input(input: &str) -> Result<(Location, Vec<Listed>)> {
    let spec = split_input(input);
    let loc = Location::open(&spec.base, false)?;
    let all = loc.list()?;
    let files = match &spec.pattern {
        None => all,
        Some(p) => {
            let pat = glob::Pattern::new(p).map_err(|e| Error::Url {
                url: input.to_string(),
                message: format!("bad glob pattern: {e}"),
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
    fn put_get_list_local() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::ThreadPool(e.to_string()))?;
        let root = dir.path().to_string_lossy().into_owned();
        let loc = Location::open(&format!("file://{root}/out"), true)?;
        loc.put("a/b.txt", b"hello".to_vec())?;
        loc.put("a/c.txt", b"hi".to_vec())?;
        assert_eq!(loc.get("a/b.txt")?, b"hello");
        assert!(loc.get_opt("missing")?.is_none());
        let sub = loc.child("a");
        let names: Vec<String> = sub.list()?.into_iter().map(|l| l.rel).collect();
        assert_eq!(names, ["b.txt", "c.txt"]);
        let (_, files) = list_input(&format!("{root}/out/a/*.txt"))?;
        assert_eq!(files.len(), 2);
        assert!(Location::open(&format!("{root}/nope"), false).is_err());
        Ok(())
    }
}
