//! Downstream evaluation on OLMo's in-loop request files: each task variant
//! is a folder with `config.json` and `requests.jsonl.gz`, one
//! `loglikelihood` request per line (`request.context`,
//! `request.continuation`, `doc_id`, `idx`, `label`). A document's requests
//! are its answer choices; the model's choice is the one its metric scores
//! highest.
//!
//! - [`Task::read`]: a task folder (`requests.jsonl.gz`, or a plain
//!   `requests.jsonl`), every line checked (file and line in each error).
//! - [`loglikelihoods`]: `log p(continuation | context)` per request, for a
//!   decoder (`[CLS]` first, as Ettin's evaluation did) or an encoder
//!   (masked pseudo-log-likelihood: each continuation token masked in turn,
//!   Salazar et al. 2020), requests packed as documents into shared rows.
//! - [`Task::score`]: OLMo's accuracies (`acc_raw`, `acc_per_token`,
//!   `acc_per_char`, and `acc_uncond` where the config gives
//!   `uncond_docid_offset`) and each document's choice.
//!
//! Token ids in, token ids out: tokenizing is the caller's business
//! (`twinhead eval`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;

use crate::objectives::{ObjectiveError, PredictionBatch, prediction_logits};
use crate::packing::AttentionKind;
use crate::{Flavour, ModelBackend, ModernBert, TokenBatch};

/// The metrics [`Task::score`] computes.
pub const METRICS: [&str; 4] = ["acc_raw", "acc_per_token", "acc_per_char", "acc_uncond"];

/// A task (log-likelihood or embedding) that cannot be read or scored;
/// names the file (and line or column).
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A request line is not a valid request.
    #[error("{path}:{line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// The task's config is not usable.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A file is not an Arrow IPC stream (the embedding tasks' splits).
    #[error("{path}: not a readable Arrow IPC stream: {message}")]
    Arrow { path: PathBuf, message: String },
    /// A column is missing or holds the wrong values.
    #[error("{path}: column {column:?}: {message}")]
    Column {
        path: PathBuf,
        column: String,
        message: String,
    },
    /// The data cannot support the task (too few items, one class, …).
    #[error("{what}: {message}")]
    Data { what: String, message: String },
    /// The model refused a batch.
    #[error(transparent)]
    Model(#[from] ObjectiveError),
}

impl From<crate::ModelError> for EvalError {
    fn from(e: crate::ModelError) -> Self {
        EvalError::Model(ObjectiveError::from(e))
    }
}

/// The request file of task folder `dir` and a reader of its lines: OLMo
/// ships `requests.jsonl.gz`; a hand-made task may be a plain
/// `requests.jsonl`.
pub(crate) fn open_requests(dir: &Path) -> Result<(PathBuf, Box<dyn BufRead>), EvalError> {
    let plain = dir.join("requests.jsonl");
    let gz = dir.join("requests.jsonl.gz");
    let path = if !gz.exists() && plain.exists() {
        plain
    } else {
        gz
    };
    let file = std::fs::File::open(&path).map_err(|source| EvalError::Io {
        path: path.clone(),
        source,
    })?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    Ok((path, reader))
}

/// One `loglikelihood` request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The request's own index within its document (its answer choice).
    pub idx: u32,
    /// The document it belongs to (unconditional requests: offset + doc).
    pub doc_id: u64,
    /// The index of the gold choice.
    pub label: u32,
    /// Text before the continuation.
    pub context: String,
    /// The scored text.
    pub continuation: String,
}

#[derive(Deserialize)]
struct RawLine {
    request_type: Option<String>,
    request: RawRequest,
    doc_id: u64,
    idx: u32,
    label: serde_json::Value,
}

#[derive(Deserialize)]
struct RawRequest {
    context: String,
    continuation: String,
}

#[derive(Deserialize)]
struct RawConfig {
    task_name: String,
    task_config: RawTaskConfig,
}

#[derive(Deserialize)]
struct RawTaskConfig {
    primary_metric: String,
    #[serde(default)]
    metric_kwargs: RawMetricArgs,
}

#[derive(Deserialize, Default)]
struct RawMetricArgs {
    uncond_docid_offset: Option<u64>,
}

/// A task variant's requests and how it is scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// `task_name` from the config.
    pub name: String,
    /// The metric the task reports first.
    pub primary_metric: String,
    /// Requests with `doc_id` at or above this are the unconditional ones
    /// (the continuation after an empty context) behind `acc_uncond`.
    pub uncond_docid_offset: Option<u64>,
    /// Every request, in file order.
    pub requests: Vec<Request>,
}

/// What [`Task::score`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskScore {
    /// Metric name to value (fraction of documents), primary metric among them.
    pub metrics: BTreeMap<String, f64>,
    /// Documents scored.
    pub docs: usize,
    /// Per scored document: its id and the choice (`idx`) the primary
    /// metric picked.
    pub predicted: BTreeMap<u64, u32>,
}

impl Task {
    /// Reads `dir/config.json` and `dir/requests.jsonl.gz`, keeping the
    /// requests of the first `limit` documents (all without a limit) and
    /// their unconditional counterparts.
    pub fn read(dir: &Path, limit: Option<usize>) -> Result<Task, EvalError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| EvalError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: RawConfig = serde_json::from_str(&text).map_err(|e| EvalError::Config {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        let primary = config.task_config.primary_metric;
        if !METRICS.contains(&primary.as_str()) {
            return Err(EvalError::Config {
                path: config_path,
                message: format!(
                    "primary_metric {primary:?} is not one twinhead computes ({})",
                    METRICS.join(", ")
                ),
            });
        }
        let offset = config.task_config.metric_kwargs.uncond_docid_offset;
        let (path, reader) = open_requests(dir)?;
        let requests = parse_requests(&path, reader)?;
        let requests = match limit {
            None => requests,
            Some(n) => {
                let conditional = |r: &Request| offset.is_none_or(|o| r.doc_id < o);
                // The first `n` documents in file order, however their
                // requests are interleaved.
                let mut seen = std::collections::BTreeSet::new();
                for r in requests.iter().filter(|r| conditional(r)) {
                    if seen.len() == n {
                        break;
                    }
                    seen.insert(r.doc_id);
                }
                let kept: Vec<u64> = seen.into_iter().collect();
                requests
                    .into_iter()
                    .filter(|r| {
                        let doc = if conditional(r) {
                            r.doc_id
                        } else {
                            r.doc_id - offset.unwrap_or(0)
                        };
                        kept.binary_search(&doc).is_ok()
                    })
                    .collect()
            }
        };
        Ok(Task {
            name: config.task_name,
            primary_metric: primary,
            uncond_docid_offset: offset,
            requests,
        })
    }

    /// OLMo's accuracies from each request's log-likelihood (in request
    /// order) and its continuation's token count. Ties go to the lowest
    /// `idx`.
    pub fn score(&self, loglikelihoods: &[f64], tokens: &[usize]) -> TaskScore {
        let offset = self.uncond_docid_offset;
        let mut docs: BTreeMap<u64, Vec<Choice>> = BTreeMap::new();
        let mut uncond: BTreeMap<(u64, u32), f64> = BTreeMap::new();
        for ((r, &ll), &n) in self.requests.iter().zip(loglikelihoods).zip(tokens) {
            match offset {
                Some(o) if r.doc_id >= o => {
                    uncond.insert((r.doc_id - o, r.idx), ll);
                }
                _ => docs.entry(r.doc_id).or_default().push(Choice {
                    idx: r.idx,
                    label: r.label,
                    raw: ll,
                    per_token: ll / n.max(1) as f64,
                    per_char: ll / r.continuation.chars().count().max(1) as f64,
                }),
            }
        }
        let mut hits: BTreeMap<String, usize> = BTreeMap::new();
        let mut predicted = BTreeMap::new();
        for (doc, mut choices) in docs {
            choices.sort_by_key(|c| c.idx);
            let label = choices.first().map_or(0, |c| c.label);
            let pick = |value: &dyn Fn(&Choice) -> Option<f64>| {
                let mut best: Option<(u32, f64)> = None;
                for c in &choices {
                    let v = value(c)?;
                    if best.is_none_or(|(_, b)| v > b) {
                        best = Some((c.idx, v));
                    }
                }
                best.map(|(idx, _)| idx)
            };
            let picks = [
                ("acc_raw", pick(&|c| Some(c.raw))),
                ("acc_per_token", pick(&|c| Some(c.per_token))),
                ("acc_per_char", pick(&|c| Some(c.per_char))),
                (
                    "acc_uncond",
                    offset.and_then(|_| pick(&|c| uncond.get(&(doc, c.idx)).map(|u| c.raw - u))),
                ),
            ];
            for (metric, choice) in picks {
                let Some(choice) = choice else { continue };
                *hits.entry(metric.to_string()).or_insert(0) += usize::from(choice == label);
                if metric == self.primary_metric {
                    predicted.insert(doc, choice);
                }
            }
        }
        let n = predicted.len().max(1) as f64;
        TaskScore {
            metrics: hits
                .into_iter()
                .map(|(metric, hit)| (metric, hit as f64 / n))
                .collect(),
            docs: predicted.len(),
            predicted,
        }
    }
}

/// One answer choice of a document, with its scores under each metric.
struct Choice {
    idx: u32,
    label: u32,
    raw: f64,
    per_token: f64,
    per_char: f64,
}

/// Requests from a `requests.jsonl` stream; `path` names it in errors.
pub fn parse_requests(path: &Path, reader: impl BufRead) -> Result<Vec<Request>, EvalError> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let bad = |message: String| EvalError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let line = line.map_err(|e| bad(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let raw: RawLine = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        if let Some(kind) = raw.request_type.as_deref()
            && kind != "loglikelihood"
        {
            return Err(bad(format!(
                "request_type {kind:?}: only loglikelihood requests are scored"
            )));
        }
        let label = match &raw.label {
            serde_json::Value::Number(n) => n.as_u64().and_then(|l| u32::try_from(l).ok()),
            _ => None,
        }
        .ok_or_else(|| {
            bad(format!(
                "label {}: expected the gold choice's index",
                raw.label
            ))
        })?;
        out.push(Request {
            idx: raw.idx,
            doc_id: raw.doc_id,
            label,
            context: raw.request.context,
            continuation: raw.request.continuation,
        });
    }
    Ok(out)
}

/// A request as token ids: the context's, then the continuation's (the
/// scored tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedRequest {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// `log p(continuation | context)` of every request, in order.
///
/// A decoder reads `[CLS] context continuation` and sums the log-
/// probabilities of the continuation's tokens. An encoder reads
/// `[CLS] context continuation [SEP]` once per continuation token with that
/// token replaced by `[MASK]`, and sums the masked tokens'
/// log-probabilities (pseudo-log-likelihood). Sequences are packed as
/// documents into rows of at most `row_tokens` tokens (a longer sequence
/// gets a row of its own), so attention never crosses requests and each
/// forward pass serves many.
pub fn loglikelihoods<B: ModelBackend>(
    model: &ModernBert<B>,
    requests: &[TokenizedRequest],
    row_tokens: usize,
) -> Result<Vec<f64>, EvalError> {
    let config = model.config();
    let encoder = model.flavour() == Flavour::Encoder;
    let mut sequences: Vec<Sequence> = Vec::new();
    for (r, req) in requests.iter().enumerate() {
        let mut ids = Vec::with_capacity(req.context.len() + req.continuation.len() + 2);
        ids.push(config.cls_token_id);
        ids.extend(&req.context);
        let start = ids.len();
        ids.extend(&req.continuation);
        if encoder {
            ids.push(config.sep_token_id);
            for j in 0..req.continuation.len() {
                let mut masked = ids.clone();
                masked[start + j] = config.mask_token_id;
                sequences.push(Sequence {
                    tokens: masked,
                    positions: vec![start + j],
                    targets: vec![req.continuation[j]],
                    request: r,
                });
            }
        } else {
            let positions: Vec<usize> = (start - 1..ids.len() - 1).collect();
            sequences.push(Sequence {
                tokens: ids,
                positions,
                targets: req.continuation.clone(),
                request: r,
            });
        }
    }
    let mut scores = vec![0f64; requests.len()];
    let mut row: Vec<&Sequence> = Vec::new();
    let mut row_len = 0;
    for seq in &sequences {
        if !row.is_empty() && row_len + seq.tokens.len() > row_tokens {
            score_row(model, &row, encoder, &mut scores)?;
            row.clear();
            row_len = 0;
        }
        row_len += seq.tokens.len();
        row.push(seq);
    }
    if !row.is_empty() {
        score_row(model, &row, encoder, &mut scores)?;
    }
    Ok(scores)
}

/// One sequence to run: its tokens, the offsets in it that predict, the
/// tokens they predict, and the request it scores.
struct Sequence {
    tokens: Vec<u32>,
    positions: Vec<usize>,
    targets: Vec<u32>,
    request: usize,
}

/// Runs one row of packed sequences and adds each target's log-probability
/// to its request's score.
fn score_row<B: ModelBackend>(
    model: &ModernBert<B>,
    row: &[&Sequence],
    encoder: bool,
    scores: &mut [f64],
) -> Result<(), EvalError> {
    let mut ids = Vec::new();
    let mut lens = Vec::new();
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    let mut owners = Vec::new();
    for seq in row {
        let base = ids.len();
        ids.extend(&seq.tokens);
        lens.push(seq.tokens.len());
        positions.extend(seq.positions.iter().map(|p| base + p));
        targets.extend(&seq.targets);
        owners.extend(std::iter::repeat_n(seq.request, seq.targets.len()));
    }
    if targets.is_empty() {
        return Ok(());
    }
    let input = TokenBatch::new(&[ids], Some(vec![lens])).map_err(ObjectiveError::from)?;
    let batch = PredictionBatch {
        input,
        attention: if encoder {
            AttentionKind::Bidirectional
        } else {
            AttentionKind::Causal
        },
        positions,
        targets,
    };
    let logits = prediction_logits(model, &batch)?;
    let n = batch.targets.len();
    let device = logits.device();
    let index: Vec<i64> = batch.targets.iter().map(|&t| i64::from(t)).collect();
    let index = Tensor::<B, 2, Int>::from_data(TensorData::new(index, [n, 1]), &device);
    let picked = log_softmax(logits, 1).gather(1, index);
    let values = picked
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .unwrap_or_default();
    for (value, owner) in values.into_iter().zip(owners) {
        scores[owner] += value;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request(doc_id: u64, idx: u32, label: u32, continuation: &str) -> Request {
        Request {
            idx,
            doc_id,
            label,
            context: "Q:".into(),
            continuation: continuation.into(),
        }
    }

    #[test]
    fn every_metric_on_a_hand_made_task() {
        // Doc 0 (gold 1): raw picks 0, per token picks 1, per char picks 1,
        // unconditional-normalised picks 1. Doc 1 (gold 0): every metric
        // picks 0 except per char, which picks the long answer (1).
        let task = Task {
            name: "hand".into(),
            primary_metric: "acc_per_token".into(),
            uncond_docid_offset: Some(100),
            requests: vec![
                request(0, 0, 1, " a"),
                request(0, 1, 1, " bbbbbbbbbb"),
                request(1, 0, 0, " cccc"),
                request(1, 1, 0, " ddddddddddddddddddd"),
                request(100, 0, 1, " a"),
                request(100, 1, 1, " bbbbbbbbbb"),
                request(101, 0, 0, " cccc"),
                request(101, 1, 0, " ddddddddddddddddddd"),
            ],
        };
        let ll = [-2.0, -3.0, -4.0, -4.5, -1.0, -2.5, -5.0, -3.0];
        let tokens = [1, 3, 2, 1, 1, 3, 2, 1];
        let s = task.score(&ll, &tokens);
        assert_eq!(s.docs, 2);
        let m = |k: &str| s.metrics.get(k).copied().expect(k);
        assert_eq!(m("acc_raw"), 0.5); // doc 0 wrong (0), doc 1 right (0)
        assert_eq!(m("acc_per_token"), 1.0); // -2 vs -1: 1; -2 vs -4.5: 0
        assert_eq!(m("acc_per_char"), 0.5); // -1 vs -0.27: 1; -0.8 vs -0.24: 1
        assert_eq!(m("acc_uncond"), 1.0); // -1 vs -0.5: 1; 1 vs -1.5: 0
        assert_eq!(s.predicted, BTreeMap::from([(0, 1), (1, 0)]));
    }

    #[test]
    fn ties_go_to_the_first_choice_and_no_offset_means_no_uncond() {
        let task = Task {
            name: "t".into(),
            primary_metric: "acc_raw".into(),
            uncond_docid_offset: None,
            requests: vec![request(7, 1, 0, "x"), request(7, 0, 0, "y")],
        };
        let s = task.score(&[-1.0, -1.0], &[1, 1]);
        assert_eq!(s.predicted[&7], 0);
        assert!(!s.metrics.contains_key("acc_uncond"));
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let good = r#"{"request_type": "loglikelihood", "request": {"context": "a", "continuation": " b"}, "doc_id": 0, "idx": 0, "label": 0}"#;
        let path = Path::new("arc/requests.jsonl");
        let cases = [
            (format!("{good}\n{{not json\n"), "arc/requests.jsonl:2"),
            (
                format!(
                    "{good}\n\n{}\n",
                    good.replace("loglikelihood", "generate_until")
                ),
                "arc/requests.jsonl:3: request_type",
            ),
            (
                good.replace("\"label\": 0", "\"label\": \"B\""),
                "arc/requests.jsonl:1: label",
            ),
            (good.replace("\"doc_id\": 0, ", ""), "doc_id"),
        ];
        for (text, want) in cases {
            let e = parse_requests(path, text.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want} not in {e}");
        }
        assert_eq!(
            parse_requests(path, good.as_bytes()).map(|r| r.len()).ok(),
            Some(1)
        );
    }

    fn task_dir(primary: &str, lines: &[String]) -> tempfile::TempDir {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = format!(
            r#"{{"task_name": "hand", "task_config": {{"primary_metric": "{primary}", "metric_kwargs": {{"uncond_docid_offset": 1000}}}}}}"#
        );
        std::fs::write(dir.path().join("config.json"), config).expect("config");
        let file = std::fs::File::create(dir.path().join("requests.jsonl.gz")).expect("create");
        let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        for l in lines {
            writeln!(gz, "{l}").expect("write");
        }
        gz.finish().expect("finish");
        dir
    }

    fn line(doc_id: u64, idx: u32) -> String {
        format!(
            r#"{{"request_type": "loglikelihood", "request": {{"context": "c{doc_id}", "continuation": " {idx}"}}, "doc_id": {doc_id}, "idx": {idx}, "label": 0}}"#
        )
    }

    #[test]
    fn read_limits_whole_documents_with_their_unconditional_requests() {
        let mut lines = Vec::new();
        for doc in [0, 1, 2] {
            for idx in [0, 1] {
                lines.push(line(doc, idx));
            }
        }
        for doc in [1000, 1001, 1002] {
            for idx in [0, 1] {
                lines.push(line(doc, idx));
            }
        }
        let dir = task_dir("acc_raw", &lines);
        let task = Task::read(dir.path(), Some(2)).expect("read");
        let docs: Vec<u64> = task.requests.iter().map(|r| r.doc_id).collect();
        assert_eq!(docs, [0, 0, 1, 1, 1000, 1000, 1001, 1001]);
        assert_eq!(task.uncond_docid_offset, Some(1000));
        assert_eq!(
            Task::read(dir.path(), None).expect("read").requests.len(),
            12
        );
    }

    #[test]
    fn an_unknown_metric_or_a_missing_file_is_named() {
        let dir = task_dir("f1", &[line(0, 0)]);
        let e = Task::read(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("\"f1\""), "{e}");
        let empty = tempfile::tempdir().expect("tempdir");
        let e = Task::read(empty.path(), None).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        let dir = task_dir("acc_raw", &[]);
        std::fs::remove_file(dir.path().join("requests.jsonl.gz")).expect("rm");
        let e = Task::read(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("requests.jsonl.gz"), "{e}");
    }
}
