//! Object storage for datasets and checkpoints: local paths, `file://` URLs
//! and (with the crate's `cloud` feature, which the `twinhead` binary turns
//! on by default) `s3://`, `gs://`, `az://`, behind
//! one small synchronous API.
//!
//! Every call blocks on one process-wide, never-dropped tokio runtime (one
//! I/O thread), so dataprep's rayon threads, the loader's prefetch thread
//! and the checkpoint writer need no async executor of their own, and a
//! [`Location`] can be created and dropped anywhere. Do not call its
//! methods from inside an async task (blocking there panics); use
//! `spawn_blocking` or a thread. `put` is atomic on every backend (local
//! files are written under a temporary name and renamed), so a reader never
//! sees a half-written file.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Errors of [`Location`], naming the object.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid storage url {url}: {message}")]
    Url { url: String, message: String },
    #[error("cannot start the storage runtime: {0}")]
    Runtime(String),
    #[error("{location} does not exist")]
    NotFound { location: String },
    #[error("storage error at {location}: {source}")]
    Store {
        location: String,
        #[source]
        source: object_store::Error,
    },
}

impl StoreError {
    /// Whether the same call may succeed later: the store or the runtime
    /// failed, rather than the URL or the object being wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Runtime(_) => true,
            // Refused credentials, a missing permission or an unsupported
            // call stay so on a retry; anything else (a timeout, a 5xx, a
            // closed connection) may not.
            StoreError::Store { source, .. } => !matches!(
                source,
                object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
            ),
            StoreError::Url { .. } | StoreError::NotFound { .. } => false,
        }
    }
}

/// The runtime every [`Location`] blocks on.
fn runtime() -> Result<&'static tokio::runtime::Runtime, StoreError> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("twinhead-store-io")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| StoreError::Runtime(e.clone()))
}

/// A read started on the storage runtime ([`Location::start_get_range`],
/// [`Location::start_get_tail`], [`Location::start_get`]): it goes on while
/// the caller does other work, [`Pending::wait`] blocks for its result, and
/// dropping it unwaited cancels it.
pub struct Pending<T> {
    rt: &'static tokio::runtime::Runtime,
    task: Option<tokio::task::JoinHandle<Result<T, StoreError>>>,
    /// The object, for messages.
    location: String,
}

impl<T> Pending<T> {
    /// Whether the read is over (waiting will not block).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// The read's result if it comes within `timeout` (the read goes on
    /// otherwise), so that a waiting thread can check whether it should
    /// stop. Like every blocking call here, not from inside an async task.
    pub fn wait_for(&mut self, timeout: std::time::Duration) -> Option<Result<T, StoreError>> {
        let Some(task) = self.task.as_mut() else {
            return Some(Err(StoreError::Runtime(format!(
                "the read of {} was already taken",
                self.location
            ))));
        };
        let joined = self
            .rt
            .block_on(async { tokio::time::timeout(timeout, task).await })
            .ok()?;
        self.task = None;
        Some(joined.unwrap_or_else(|e| {
            Err(StoreError::Runtime(format!(
                "the read of {} stopped: {e}",
                self.location
            )))
        }))
    }

    /// The read's result, blocking until it is there. Like every blocking
    /// call here, not from inside an async task.
    pub fn wait(mut self) -> Result<T, StoreError> {
        let Some(task) = self.task.take() else {
            return Err(StoreError::Runtime(format!(
                "the read of {} was already taken",
                self.location
            )));
        };
        match self.rt.block_on(task) {
            Ok(result) => result,
            Err(e) => Err(StoreError::Runtime(format!(
                "the read of {} stopped: {e}",
                self.location
            ))),
        }
    }
}

impl<T> Drop for Pending<T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("location", &self.location)
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// A folder-like location in some object store.
#[derive(Clone)]
pub struct Location {
    rt: &'static tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    display: String,
    /// The folder on this machine, for local stores.
    local: Option<PathBuf>,
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    /// Path relative to the listed location.
    pub rel: String,
    /// Size in bytes.
    pub size: u64,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// The path on this machine that `url` names, when it is a local path or a
/// `file://` URL (not resolved against the working directory).
pub fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Some(PathBuf::from(rest));
    }
    if url.contains("://") {
        return None;
    }
    Some(PathBuf::from(url))
}

/// Whether a local file name is one `LocalFileSystem::put` writes before
/// renaming it into place: `NAME#DIGITS`.
fn is_staged_write(file_name: &str) -> bool {
    file_name.rsplit_once('#').is_some_and(|(name, suffix)| {
        !name.is_empty() && !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit())
    })
}

/// `path` with `.` and `..` resolved by name (an object path has neither);
/// a `..` above the root stays at the root, as the kernel does.
fn without_dots(path: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The environment variables that configure cloud stores: `AWS_*`,
/// `GOOGLE_*` and `AZURE_*` (object_store's names, e.g. `AWS_ENDPOINT`,
/// `AWS_ALLOW_HTTP`). object_store also takes unprefixed keys (`REGION`,
/// `TOKEN`, `ENDPOINT`), which in a process environment mean something
/// else, so they are left out.
fn store_env(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    vars.filter(|(key, _)| {
        let key = key.to_ascii_uppercase();
        ["AWS_", "GOOGLE_", "AZURE_"]
            .iter()
            .any(|prefix| key.starts_with(prefix))
    })
    .collect()
}

impl Location {
    /// Opens `url` (a local path, `file://` URL or cloud URL) as a folder.
    /// With `create`, a missing local folder is created (cloud stores have
    /// no folders to create); without, a missing one reads as empty.
    pub fn open(url: &str, create: bool) -> Result<Self, StoreError> {
        let rt = runtime()?;
        let url_err = |message: String| StoreError::Url {
            url: url.to_string(),
            message,
        };
        let trimmed = url.trim_end_matches('/');
        if let Some(dir) = local_path(trimmed) {
            let scheme = if trimmed.starts_with("file://") {
                "file://"
            } else {
                ""
            };
            let dir = if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir()
                    .map_err(|e| url_err(e.to_string()))?
                    .join(dir)
            };
            let dir = without_dots(&dir);
            if create {
                std::fs::create_dir_all(&dir).map_err(|e| url_err(e.to_string()))?;
            }
            // Root the store at `/` so that a missing folder reads as "not
            // found" rather than failing here (the manifest's absence must
            // be reported as such).
            let store = LocalFileSystem::new();
            let prefix = ObjPath::from_absolute_path(&dir).map_err(|e| url_err(e.to_string()))?;
            return Ok(Self {
                rt,
                store: Arc::new(store),
                prefix,
                display: format!("{scheme}{}", dir.display()),
                local: Some(dir),
            });
        }
        let parsed = url::Url::parse(trimmed).map_err(|e| url_err(e.to_string()))?;
        let (store, prefix) = object_store::parse_url_opts(&parsed, store_env(std::env::vars()))
            .map_err(|e| url_err(format!("{e} (cloud stores need the `cloud` feature)")))?;
        Ok(Self {
            rt,
            store: Arc::from(store),
            prefix,
            display: trimmed.to_string(),
            local: None,
        })
    }

    /// Opens `url` like [`Location::open`] without `create`, but a local
    /// folder that does not exist is an error (inputs must be there; an
    /// object store has no folders to check).
    pub fn open_existing(url: &str) -> Result<Self, StoreError> {
        let location = Self::open(url, false)?;
        match &location.local {
            Some(dir) if !dir.is_dir() => Err(StoreError::Url {
                url: url.to_string(),
                message: "no such folder".into(),
            }),
            _ => Ok(location),
        }
    }

    /// The location `rel` below this one (a `/`-separated relative path).
    pub fn child(&self, rel: &str) -> Location {
        Location {
            rt: self.rt,
            store: self.store.clone(),
            prefix: self.full(rel),
            display: self.name(rel),
            local: self.local.as_ref().map(|dir| {
                rel.split('/')
                    .filter(|p| !p.is_empty())
                    .fold(dir.clone(), |d, p| d.join(p))
            }),
        }
    }

    /// How to name this location in messages and to pass it on as a URL
    /// (local stores: an absolute path, with `file://` if opened so).
    pub fn url(&self) -> &str {
        &self.display
    }

    fn full(&self, rel: &str) -> ObjPath {
        let mut parts: Vec<_> = self.prefix.parts().collect();
        parts.extend(
            rel.split('/')
                .filter(|p| !p.is_empty())
                .map(object_store::path::PathPart::from),
        );
        ObjPath::from_iter(parts)
    }

    /// `rel` joined to this location, for messages.
    pub fn name(&self, rel: &str) -> String {
        let rel = rel.trim_matches('/');
        if rel.is_empty() {
            self.display.clone()
        } else {
            format!("{}/{rel}", self.display)
        }
    }

    fn err(&self, rel: &str, source: object_store::Error) -> StoreError {
        match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound {
                location: self.name(rel),
            },
            source => StoreError::Store {
                location: self.name(rel),
                source,
            },
        }
    }

    /// The whole object `rel`.
    pub fn get(&self, rel: &str) -> Result<Bytes, StoreError> {
        let path = self.full(rel);
        self.rt
            .block_on(async {
                let got = self.store.get(&path).await?;
                got.bytes().await
            })
            .map_err(|e| self.err(rel, e))
    }

    /// The object `rel`, or `None` when it does not exist.
    pub fn get_opt(&self, rel: &str) -> Result<Option<Bytes>, StoreError> {
        match self.get(rel) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Bytes `range` of the object `rel`.
    pub fn get_range(&self, rel: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let path = self.full(rel);
        self.rt
            .block_on(self.store.get_range(&path, range))
            .map_err(|e| self.err(rel, e))
    }

    /// The last `max` bytes of object `rel` (all of it when shorter) and
    /// the object's size: a file's footer. Two requests (the size, then a
    /// bounded range) rather than a suffix range, which some S3-compatible
    /// servers refuse when it is longer than the object.
    pub fn get_tail(&self, rel: &str, max: u64) -> Result<(Bytes, u64), StoreError> {
        let size = self.size(rel)?;
        let bytes = self.get_range(rel, size.saturating_sub(max)..size)?;
        Ok((bytes, size))
    }

    /// Starts reading bytes `range` of the object `rel` on the storage
    /// runtime and returns at once: several reads can be in flight while
    /// the caller works (the loader's read-ahead).
    pub fn start_get_range(&self, rel: &str, range: Range<u64>) -> Pending<Bytes> {
        let (store, path) = (self.store.clone(), self.full(rel));
        self.start(rel, async move { store.get_range(&path, range).await })
    }

    /// [`Location::get_tail`], started like [`Location::start_get_range`].
    pub fn start_get_tail(&self, rel: &str, max: u64) -> Pending<(Bytes, u64)> {
        let (store, path) = (self.store.clone(), self.full(rel));
        self.start(rel, async move {
            let size = store.head(&path).await?.size;
            let bytes = store
                .get_range(&path, size.saturating_sub(max)..size)
                .await?;
            Ok((bytes, size))
        })
    }

    /// [`Location::get`], started like [`Location::start_get_range`].
    pub fn start_get(&self, rel: &str) -> Pending<Bytes> {
        let (store, path) = (self.store.clone(), self.full(rel));
        self.start(rel, async move { store.get(&path).await?.bytes().await })
    }

    /// Spawns `read` on the runtime, its errors naming `rel`.
    fn start<T: Send + 'static>(
        &self,
        rel: &str,
        read: impl Future<Output = Result<T, object_store::Error>> + Send + 'static,
    ) -> Pending<T> {
        let (me, rel) = (self.clone(), rel.to_string());
        let location = self.name(&rel);
        Pending {
            rt: self.rt,
            task: Some(
                self.rt
                    .spawn(async move { read.await.map_err(|e| me.err(&rel, e)) }),
            ),
            location,
        }
    }

    /// This location with its store replaced by `wrap(store)` (same prefix
    /// and name): a store that counts, delays or fails requests, for tests
    /// and measurements.
    pub fn map_store(
        &self,
        wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>,
    ) -> Location {
        Location {
            store: wrap(self.store.clone()),
            ..self.clone()
        }
    }

    /// The size in bytes of the object `rel`.
    pub fn size(&self, rel: &str) -> Result<u64, StoreError> {
        let path = self.full(rel);
        self.rt
            .block_on(self.store.head(&path))
            .map(|m| m.size)
            .map_err(|e| self.err(rel, e))
    }

    /// Whether the object `rel` exists.
    pub fn exists(&self, rel: &str) -> Result<bool, StoreError> {
        match self.size(rel) {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes the object `rel` atomically (creating local folders).
    pub fn put(&self, rel: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let path = self.full(rel);
        let payload = PutPayload::from_bytes(bytes.into());
        self.rt
            .block_on(self.store.put(&path, payload))
            .map(|_| ())
            .map_err(|e| self.err(rel, e))
    }

    /// Removes what interrupted writes left below this location: a local
    /// `put` writes `NAME#N` and renames it, so a process killed in
    /// between leaves the `#N` file behind (object stores' single-request
    /// puts leave nothing). Only call it when no writer is active, e.g.
    /// before a commit point. Returns how many files it removed.
    pub fn remove_interrupted_writes(&self) -> Result<usize, StoreError> {
        let Some(root) = &self.local else {
            return Ok(0);
        };
        let failed = |path: &std::path::Path, e: std::io::Error| StoreError::Url {
            url: path.display().to_string(),
            message: format!("cannot clean up an interrupted write: {e}"),
        };
        let mut removed = 0;
        let mut folders = vec![root.clone()];
        while let Some(folder) = folders.pop() {
            let entries = match std::fs::read_dir(&folder) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(failed(&folder, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| failed(&folder, e))?;
                let path = entry.path();
                let kind = entry.file_type().map_err(|e| failed(&path, e))?;
                if kind.is_dir() {
                    folders.push(path);
                } else if is_staged_write(&entry.file_name().to_string_lossy()) {
                    std::fs::remove_file(&path).map_err(|e| failed(&path, e))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Deletes the object `rel`; a missing one is not an error.
    pub fn delete(&self, rel: &str) -> Result<(), StoreError> {
        let path = self.full(rel);
        match self.rt.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Names of the immediate sub-folders of `rel`, sorted.
    pub fn list_dirs(&self, rel: &str) -> Result<Vec<String>, StoreError> {
        let path = self.full(rel);
        let listed = match self
            .rt
            .block_on(self.store.list_with_delimiter(Some(&path)))
        {
            Ok(listed) => listed,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(rel, e)),
        };
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every object below `rel`, with paths relative to `rel`, sorted.
    pub fn list(&self, rel: &str) -> Result<Vec<Listed>, StoreError> {
        let path = self.full(rel);
        let metas: Vec<_> = match self
            .rt
            .block_on(self.store.list(Some(&path)).try_collect::<Vec<_>>())
        {
            Ok(metas) => metas,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(rel, e)),
        };
        let mut listed: Vec<Listed> = metas
            .iter()
            .filter_map(|m| {
                let parts = m.location.prefix_match(&path)?;
                let rel = parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>();
                Some(Listed {
                    rel: rel.join("/"),
                    size: m.size,
                })
            })
            .collect();
        listed.sort();
        Ok(listed)
    }

    /// Deletes every object below `rel` (on a local store, the folder too).
    pub fn remove_all(&self, rel: &str) -> Result<(), StoreError> {
        if let Some(dir) = &self.child(rel).local {
            return match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Url {
                    url: self.name(rel),
                    message: format!("cannot remove: {e}"),
                }),
                _ => Ok(()),
            };
        }
        let below = self.child(rel);
        for listed in below.list("")? {
            below.delete(&listed.rel)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_local_writes_are_removed_and_nothing_else()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let root = Location::open(dir.path().to_str().ok_or("path")?, false)?;
        root.put("a/shard.parquet", b"whole".to_vec())?;
        std::fs::write(dir.path().join("a/shard.parquet#3"), b"who")?;
        std::fs::create_dir_all(dir.path().join("b/c"))?;
        std::fs::write(dir.path().join("b/c/part.parquet#12"), b"")?;
        // Names that only look alike are the user's files.
        for kept in ["a/notes#draft", "a/#7", "a/trailing#"] {
            std::fs::write(dir.path().join(kept), b"x")?;
        }
        assert_eq!(root.remove_interrupted_writes()?, 2);
        let mut left: Vec<String> = walk(dir.path());
        left.sort();
        assert_eq!(
            left,
            ["a/#7", "a/notes#draft", "a/shard.parquet", "a/trailing#"]
        );
        assert_eq!(root.get("a/shard.parquet")?, b"whole".as_slice());
        // A folder that does not exist has nothing to clean.
        assert_eq!(root.child("missing").remove_interrupted_writes()?, 0);
        Ok(())
    }

    fn walk(root: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else if let Ok(rel) = e.path().strip_prefix(root) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out
    }

    #[test]
    fn put_get_list_delete_on_local_paths() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let root = Location::open(&format!("file://{}", dir.path().display()), false)?;
        assert_eq!(
            root.child("x/y").url(),
            format!("file://{}/x/y", dir.path().display())
        );
        root.put("a/b/one.txt", b"one".to_vec())?;
        root.put("a/c/two.txt", b"two".to_vec())?;
        assert_eq!(&root.get("a/b/one.txt")?[..], b"one");
        assert_eq!(&root.child("a").get_range("c/two.txt", 1..3)?[..], b"wo");
        assert_eq!(root.list_dirs("a")?, vec!["b", "c"]);
        let files: Vec<(String, u64)> = root
            .list("a")?
            .into_iter()
            .map(|l| (l.rel, l.size))
            .collect();
        assert_eq!(files, [("b/one.txt".into(), 3), ("c/two.txt".into(), 3)]);
        assert!(Location::open_existing(root.child("nowhere").url()).is_err());
        assert!(Location::open_existing(root.child("a").url()).is_ok());
        let dotted = format!("{}/a/./b/../c", dir.path().display());
        assert_eq!(&Location::open(&dotted, false)?.get("two.txt")?[..], b"two");
        assert!(root.get_opt("missing")?.is_none());
        assert!(matches!(
            root.get("missing"),
            Err(StoreError::NotFound { .. })
        ));
        root.delete("a/b/one.txt")?;
        assert!(!root.exists("a/b/one.txt")?);
        assert!(root.list_dirs("nowhere")?.is_empty());
        root.remove_all("a")?;
        assert!(root.list("")?.is_empty());
        assert!(
            !dir.path().join("a").exists(),
            "the emptied folder is gone too"
        );
        Ok(())
    }

    #[test]
    fn a_tail_read_returns_the_last_bytes_and_the_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let loc = Location::open(dir.path().to_str().expect("utf-8"), true).expect("open");
        loc.put("f.bin", Bytes::from_static(b"0123456789"))
            .expect("put");
        let (tail, size) = loc.get_tail("f.bin", 4).expect("tail");
        assert_eq!((&tail[..], size), (&b"6789"[..], 10));
        let (all, size) = loc
            .get_tail("f.bin", 64)
            .expect("tail longer than the file");
        assert_eq!((&all[..], size), (&b"0123456789"[..], 10));
        assert!(matches!(
            loc.get_tail("missing.bin", 4),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn reads_started_ahead_return_what_blocking_reads_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let loc = Location::open(dir.path().to_str().expect("utf-8"), true).expect("open");
        loc.put("f.bin", Bytes::from_static(b"0123456789"))
            .expect("put");
        // Several in flight at once, waited for in another order.
        let range = loc.start_get_range("f.bin", 2..5);
        let tail = loc.start_get_tail("f.bin", 4);
        let whole = loc.start_get("f.bin");
        let missing = loc.start_get_range("missing.bin", 0..1);
        drop(loc.start_get("f.bin")); // dropped unwaited: cancelled
        assert_eq!(&whole.wait().expect("whole")[..], b"0123456789");
        let (bytes, size) = tail.wait().expect("tail");
        assert_eq!((&bytes[..], size), (&b"6789"[..], 10));
        assert_eq!(&range.wait().expect("range")[..], b"234");
        let err = missing
            .wait()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("missing.bin") && err.contains("does not exist"),
            "{err}"
        );
        let mut polled = loc.start_get_range("f.bin", 9..10);
        let got = loop {
            if let Some(got) = polled.wait_for(std::time::Duration::from_millis(1)) {
                break got;
            }
        };
        assert_eq!(&got.expect("polled")[..], b"9");
        assert!(polled.is_finished());
        assert!(polled.wait().is_err(), "a result is taken once");
    }

    #[test]
    fn only_the_cloud_variables_of_the_environment_configure_stores() {
        let vars = [
            ("AWS_ENDPOINT", "http://127.0.0.1:9000"),
            ("aws_allow_http", "true"),
            ("GOOGLE_SERVICE_ACCOUNT", "key.json"),
            ("AZURE_STORAGE_ACCOUNT_NAME", "acct"),
            ("TOKEN", "a user's own variable"),
            ("REGION", "eu"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let kept: Vec<String> = store_env(vars.into_iter())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            kept,
            [
                "AWS_ENDPOINT",
                "aws_allow_http",
                "GOOGLE_SERVICE_ACCOUNT",
                "AZURE_STORAGE_ACCOUNT_NAME"
            ]
        );
    }

    #[cfg(not(feature = "cloud"))]
    #[test]
    fn cloud_urls_name_the_missing_feature() {
        let err = Location::open("s3://bucket/data", false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("s3://bucket/data") && err.contains("`cloud` feature"),
            "{err}"
        );
    }
}
