//! Durable state behind a trait, with SQLite as the default store.
//!
//! The coordinator keeps its state in memory and writes every change
//! through to the store before it answers the call that made it. Writes are
//! queued in the order the state changed and committed by one writer thread
//! in batches (group commit): many concurrent calls share one transaction,
//! and the database never sees an older version of a row after a newer one.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use twinhead_proto::v1::{Dataset, Run};

/// A failure of the durable store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {path}: stored run {id} cannot be decoded: {source}")]
    Decode {
        path: PathBuf,
        id: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("database {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("the store's writer has stopped")]
    Closed,
}

/// Whether a worker may still be given work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStatus {
    Alive,
    Dead,
}

impl WorkerStatus {
    fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Alive => "alive",
            WorkerStatus::Dead => "dead",
        }
    }
}

/// A registered worker, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub id: String,
    pub seq: u64,
    pub hostname: String,
    pub device: String,
    pub pid: u32,
    pub registered_ms: i64,
    pub status: WorkerStatus,
    pub dead_reason: String,
}

/// One progress report of a world's rank 0: a point of the loss curve.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressRow {
    pub run_id: String,
    pub world_id: String,
    pub phase_index: u32,
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub tokens_per_sec: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub mfu: f64,
    pub time_ms: i64,
}

/// A change to persist.
#[derive(Debug, Clone)]
pub enum Write {
    /// The run's whole record (spec, state, progress, attempts, checkpoints).
    Run {
        seq: u64,
        run: Box<Run>,
    },
    Worker(WorkerRow),
    Progress(ProgressRow),
    /// A dataset build's whole record.
    Dataset {
        seq: u64,
        record: Box<Dataset>,
    },
    /// A counter (next run, worker, world number).
    Counter {
        name: &'static str,
        value: u64,
    },
}

/// Everything the store holds, as loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Runs with their submission sequence numbers, in submission order.
    pub runs: Vec<(u64, Run)>,
    pub workers: Vec<WorkerRow>,
    pub counters: Vec<(String, u64)>,
    /// Dataset builds with their sequence numbers, oldest first.
    pub datasets: Vec<(u64, Dataset)>,
}

/// Where coordinator state is persisted.
pub trait Store: Send + Sync + 'static {
    /// Reads everything back, as at the last committed write.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Queues writes behind all earlier ones; the receiver resolves when
    /// they are committed.
    fn submit(&self, writes: Vec<Write>) -> oneshot::Receiver<Result<(), String>>;
    /// The loss curve of a run: rank 0's progress reports in order.
    fn progress(&self, run_id: &str) -> Result<Vec<ProgressRow>, StoreError>;
}

type Job = (Vec<Write>, oneshot::Sender<Result<(), String>>);

/// SQLite in WAL mode: one file, one writer thread, readers beside it.
pub struct SqliteStore {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
  id TEXT PRIMARY KEY, seq INTEGER NOT NULL, hostname TEXT NOT NULL, device TEXT NOT NULL,
  pid INTEGER NOT NULL, registered_ms INTEGER NOT NULL, status TEXT NOT NULL, dead_reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS progress (
  run_id TEXT NOT NULL, world_id TEXT NOT NULL, phase_index INTEGER NOT NULL, step INTEGER NOT NULL,
  tokens INTEGER NOT NULL, loss REAL NOT NULL, tokens_per_sec REAL NOT NULL, lr REAL NOT NULL,
  grad_norm REAL NOT NULL, mfu REAL NOT NULL, time_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, record BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS progress_by_run ON progress (run_id, phase_index, step);
";

/// The schema this build writes; a newer database is refused.
const SCHEMA_VERSION: u64 = 1;

/// Writes per transaction at most; more wait for the next one.
const MAX_BATCH: usize = 4096;

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Self::connect(path)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        let version: Option<u64> = conn
            .query_row(
                "SELECT value FROM meta WHERE name = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
        match version {
            None => {
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('schema_version', ?1)",
                    params![SCHEMA_VERSION],
                )
                .map_err(sql)?;
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "schema version {v} is newer than this coordinator's {SCHEMA_VERSION}; upgrade twinhead"
                    ),
                });
            }
            Some(_) => {}
        }
        let (jobs, queue) = mpsc::channel::<Job>();
        let writer_path = path.to_path_buf();
        thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(conn, writer_path, queue))
            .map_err(|e| StoreError::Invalid {
                path: path.to_path_buf(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            jobs,
        })
    }

    fn connect(path: &Path) -> Result<Connection, StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(sql)?;
        // WAL lets readers run beside the writer; NORMAL syncs at checkpoints,
        // which survives a killed process (the log is in the OS's hands).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        Ok(conn)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = Self::connect(&self.path)?;
        f(&conn).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }
}

fn write_loop(mut conn: Connection, path: PathBuf, queue: mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        let mut count = batch[0].0.len();
        while count < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => {
                    count += job.0.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let result = commit(&mut conn, batch.iter().flat_map(|(writes, _)| writes))
            .map_err(|e| format!("database {}: {e}", path.display()));
        if let Err(e) = &result {
            tracing::error!(error = %e, "commit failed");
        }
        for (_, done) in batch {
            let _ = done.send(result.clone());
        }
    }
}

fn commit<'a>(
    conn: &mut Connection,
    writes: impl Iterator<Item = &'a Write>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut run = tx.prepare_cached(
            "INSERT INTO runs (id, seq, record) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET record = excluded.record",
        )?;
        let mut worker = tx.prepare_cached(
            "INSERT INTO workers (id, seq, hostname, device, pid, registered_ms, status, dead_reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(id) DO UPDATE SET status = excluded.status, dead_reason = excluded.dead_reason",
        )?;
        let mut progress = tx.prepare_cached(
            "INSERT INTO progress (run_id, world_id, phase_index, step, tokens, loss, tokens_per_sec,
             lr, grad_norm, mfu, time_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        let mut dataset = tx.prepare_cached(
            "INSERT INTO datasets (id, seq, record) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET record = excluded.record",
        )?;
        let mut counter = tx.prepare_cached(
            "INSERT INTO meta (name, value) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        )?;
        for write in writes {
            match write {
                Write::Run { seq, run: r } => {
                    run.execute(params![r.id, seq, r.encode_to_vec()])?;
                }
                Write::Worker(w) => {
                    worker.execute(params![
                        w.id,
                        w.seq,
                        w.hostname,
                        w.device,
                        w.pid,
                        w.registered_ms,
                        w.status.as_str(),
                        w.dead_reason
                    ])?;
                }
                Write::Progress(p) => {
                    progress.execute(params![
                        p.run_id,
                        p.world_id,
                        p.phase_index,
                        p.step,
                        p.tokens,
                        p.loss,
                        p.tokens_per_sec,
                        p.lr,
                        p.grad_norm,
                        p.mfu,
                        p.time_ms
                    ])?;
                }
                Write::Dataset { seq, record } => {
                    dataset.execute(params![record.id, seq, record.encode_to_vec()])?;
                }
                Write::Counter { name, value } => {
                    counter.execute(params![name, value])?;
                }
            }
        }
    }
    tx.commit()
}

impl Store for SqliteStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let rows = self.read(|conn| {
            let mut runs = Vec::new();
            let mut stmt = conn.prepare("SELECT id, seq, record FROM runs ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                runs.push((
                    row.get::<_, String>(0)?,
                    row.get::<_, u64>(1)?,
                    row.get::<_, Vec<u8>>(2)?,
                ));
            }
            let mut workers = Vec::new();
            let mut stmt = conn.prepare(
                "SELECT id, seq, hostname, device, pid, registered_ms, status, dead_reason
                 FROM workers ORDER BY seq",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let status: String = row.get(6)?;
                workers.push(WorkerRow {
                    id: row.get(0)?,
                    seq: row.get(1)?,
                    hostname: row.get(2)?,
                    device: row.get(3)?,
                    pid: row.get(4)?,
                    registered_ms: row.get(5)?,
                    status: if status == "alive" {
                        WorkerStatus::Alive
                    } else {
                        WorkerStatus::Dead
                    },
                    dead_reason: row.get(7)?,
                });
            }
            let mut counters = Vec::new();
            let mut stmt = conn.prepare("SELECT name, value FROM meta")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                counters.push((row.get(0)?, row.get(1)?));
            }
            let mut datasets = Vec::new();
            let mut stmt = conn.prepare("SELECT id, seq, record FROM datasets ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                datasets.push((
                    row.get::<_, String>(0)?,
                    row.get::<_, u64>(1)?,
                    row.get::<_, Vec<u8>>(2)?,
                ));
            }
            Ok((runs, workers, counters, datasets))
        })?;
        let (encoded, workers, counters, encoded_datasets) = rows;
        let mut datasets = Vec::with_capacity(encoded_datasets.len());
        for (id, seq, bytes) in encoded_datasets {
            let record =
                Dataset::decode(bytes.as_slice()).map_err(|source| StoreError::Decode {
                    path: self.path.clone(),
                    id,
                    source,
                })?;
            datasets.push((seq, record));
        }
        let mut runs = Vec::with_capacity(encoded.len());
        for (id, seq, bytes) in encoded {
            let run = Run::decode(bytes.as_slice()).map_err(|source| StoreError::Decode {
                path: self.path.clone(),
                id,
                source,
            })?;
            runs.push((seq, run));
        }
        Ok(Snapshot {
            runs,
            workers,
            counters,
            datasets,
        })
    }

    fn submit(&self, writes: Vec<Write>) -> oneshot::Receiver<Result<(), String>> {
        let (done, receiver) = oneshot::channel();
        if let Err(mpsc::SendError((_, done))) = self.jobs.send((writes, done)) {
            let _ = done.send(Err(StoreError::Closed.to_string()));
        }
        receiver
    }

    fn progress(&self, run_id: &str) -> Result<Vec<ProgressRow>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT run_id, world_id, phase_index, step, tokens, loss, tokens_per_sec, lr,
                 grad_norm, mfu, time_ms FROM progress WHERE run_id = ?1 ORDER BY rowid",
            )?;
            let rows = stmt.query_map(params![run_id], |row| {
                Ok(ProgressRow {
                    run_id: row.get(0)?,
                    world_id: row.get(1)?,
                    phase_index: row.get(2)?,
                    step: row.get(3)?,
                    tokens: row.get(4)?,
                    loss: row.get(5)?,
                    tokens_per_sec: row.get(6)?,
                    lr: row.get(7)?,
                    grad_norm: row.get(8)?,
                    mfu: row.get(9)?,
                    time_ms: row.get(10)?,
                })
            })?;
            rows.collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, seq: u64) -> WorkerRow {
        WorkerRow {
            id: id.into(),
            seq,
            hostname: "h".into(),
            device: "cpu".into(),
            pid: 7,
            registered_ms: 1,
            status: WorkerStatus::Alive,
            dead_reason: String::new(),
        }
    }

    #[tokio::test]
    async fn later_writes_of_a_row_win_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        {
            let store = SqliteStore::open(&path).expect("open");
            let mut first = Run {
                id: "run-1".into(),
                message: "old".into(),
                ..Default::default()
            };
            let a = store.submit(vec![
                Write::Run {
                    seq: 1,
                    run: Box::new(first.clone()),
                },
                Write::Worker(worker("w-1", 1)),
            ]);
            first.message = "new".into();
            let mut dead = worker("w-1", 1);
            dead.status = WorkerStatus::Dead;
            dead.dead_reason = "gone".into();
            let b = store.submit(vec![
                Write::Run {
                    seq: 1,
                    run: Box::new(first),
                },
                Write::Worker(dead),
                Write::Counter {
                    name: "next_run",
                    value: 2,
                },
            ]);
            a.await.expect("ack").expect("commit");
            b.await.expect("ack").expect("commit");
        }
        let store = SqliteStore::open(&path).expect("reopen");
        let snapshot = store.load().expect("load");
        assert_eq!(snapshot.runs.len(), 1);
        assert_eq!(snapshot.runs[0].1.message, "new");
        assert_eq!(snapshot.workers[0].status, WorkerStatus::Dead);
        assert_eq!(snapshot.workers[0].dead_reason, "gone");
        assert!(snapshot.counters.contains(&("next_run".to_string(), 2)));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        drop(SqliteStore::open(&path).expect("open"));
        let conn = Connection::open(&path).expect("conn");
        conn.execute(
            "UPDATE meta SET value = 99 WHERE name = 'schema_version'",
            [],
        )
        .expect("update");
        let err = SqliteStore::open(&path).err().expect("refused").to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }
}
