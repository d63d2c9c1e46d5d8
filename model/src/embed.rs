//! Embedding tasks, for both flavours: a text becomes the mean of the
//! model's last hidden states (after the final norm, before the head) over
//! its tokens, and two tasks judge the vectors.
//!
//! - [`frame`] and [`embed`]: token ids to vectors, texts packed as
//!   documents into rows (no padding), longest first.
//! - [`Retrieval`]: each SQuAD question of OLMo's `squad` request folder
//!   against every distinct paragraph of the questions kept; nDCG@10 and
//!   MRR@10 by cosine similarity ([`Retrieval::score`], [`ndcg_at`],
//!   [`mrr_at`], [`gold_rank`]).
//! - [`ProbeTask`] (`sst2`, `rte`, `mrpc`, `boolq`: the Hugging Face
//!   validation splits OLMo ships) and [`cross_validate`]: a logistic
//!   regression probe with stratified k-fold cross-validation; accuracy.
//! - [`ArrowTable`]: a Hugging Face `save_to_disk` file (an Arrow IPC
//!   stream), its string and label columns checked (file and column in
//!   each error).
//!
//! Token ids in, vectors out: tokenizing is the caller's business
//! (`twinhead eval`).
//!
//! # Decisions
//! - **Framing.** One text is `[CLS] text [SEP]`; a pair (RTE's
//!   `sentence1`/`sentence2`, MRPC's, BoolQ's `question`/`passage`) is
//!   `[CLS] first [SEP] second [SEP]`, the BERT/ModernBERT pair template
//!   that GLUE fine-tuning reads. The decoder reads the same tokens, so the
//!   two flavours see identical inputs. A text longer than the model's
//!   `max_position_embeddings` is truncated from its end, a pair longest
//!   segment first (Hugging Face's `longest_first`).
//! - **Mean over real tokens.** `[CLS]` and `[SEP]` count, as they do under
//!   an attention mask; nothing is padded: texts are packed as documents
//!   into rows of at most `row_tokens` tokens, and a packed row computes
//!   exactly what each text alone computes (see [`crate::packing`]).
//! - **The probe** is deterministic: folds are stratified by label from a
//!   seeded ChaCha8 shuffle of each class; features are standardised with
//!   the training folds' mean and deviation; a multinomial logistic
//!   regression with L2 penalty `1 / n_train` on the weights (scikit-learn's
//!   `LogisticRegression(C=1)`), fitted by L-BFGS in f64 from zero.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::eval::EvalError;
use crate::{ModelBackend, ModelConfig, ModelError, ModernBert, TokenBatch};

/// Retrieval metrics, primary first.
pub const RETRIEVAL_METRICS: [&str; 2] = ["ndcg@10", "mrr@10"];
/// The probe's metric.
pub const PROBE_METRIC: &str = "accuracy";

// ---------------------------------------------------------------------------
// Embedding

/// `[CLS] first [SEP]`, or `[CLS] first [SEP] second [SEP]` for a pair,
/// truncated to the model's `max_position_embeddings` (a pair's longer
/// segment loses its last token first; ties cut the second).
pub fn frame(config: &ModelConfig, first: &[u32], second: Option<&[u32]>) -> Vec<u32> {
    let max = config.max_position_embeddings;
    let special = if second.is_some() { 3 } else { 2 };
    let budget = max.saturating_sub(special);
    let (mut a, mut b) = (first.len(), second.map_or(0, <[u32]>::len));
    while a + b > budget {
        if a > b {
            a -= 1;
        } else {
            b -= 1;
        }
    }
    let mut ids = Vec::with_capacity(a + b + special);
    ids.push(config.cls_token_id);
    ids.extend(&first[..a]);
    ids.push(config.sep_token_id);
    if let Some(second) = second {
        ids.extend(&second[..b]);
        ids.push(config.sep_token_id);
    }
    ids
}

/// The mean of the last hidden states over each sequence's tokens, in
/// input order, with the model's own attention (bidirectional for an
/// encoder, causal for a decoder).
///
/// Sequences are sorted longest first and packed as documents into rows of
/// at most `row_tokens` tokens (a longer sequence gets a row of its own);
/// `done` hears how many sequences each forward pass finished.
///
/// # Shapes
/// - returns `[sequences][hidden]`
pub fn embed<B: ModelBackend>(
    model: &ModernBert<B>,
    sequences: &[Vec<u32>],
    row_tokens: usize,
    mut done: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>, EvalError> {
    if let Some(empty) = sequences.iter().position(Vec::is_empty) {
        return Err(ModelError::Batch(format!("sequence {empty} has no tokens")).into());
    }
    let hidden = model.config().hidden_size;
    let kind = model.flavour().attention();
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].len()));
    let mut out = vec![Vec::new(); sequences.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start;
        let mut len = 0;
        while end < order.len() && (end == start || len + sequences[order[end]].len() <= row_tokens)
        {
            len += sequences[order[end]].len();
            end += 1;
        }
        let members = &order[start..end];
        let mut ids = Vec::with_capacity(len);
        let mut lens = Vec::with_capacity(members.len());
        for &i in members {
            ids.extend(&sequences[i]);
            lens.push(sequences[i].len());
        }
        let batch = TokenBatch::new(&[ids], Some(vec![lens]))?;
        let states = model.hidden_states(&batch, kind)?;
        let values: Vec<f32> = states
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| ModelError::Batch(format!("hidden states: {e:?}")))?;
        let mut offset = 0;
        for &i in members {
            let n = sequences[i].len();
            let mut sum = vec![0f64; hidden];
            for row in values[offset * hidden..(offset + n) * hidden].chunks_exact(hidden) {
                for (s, &v) in sum.iter_mut().zip(row) {
                    *s += f64::from(v);
                }
            }
            out[i] = sum.into_iter().map(|s| (s / n as f64) as f32).collect();
            offset += n;
        }
        done(members.len());
        start = end;
    }
    Ok(out)
}

/// Cosine similarity in f64 (0 when either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        dot / (aa.sqrt() * bb.sqrt())
    }
}

// ---------------------------------------------------------------------------
// Retrieval

/// One query of a retrieval task.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// The document's id in the request file.
    pub doc_id: u64,
    /// The question's text.
    pub text: String,
    /// Index of its paragraph in [`Retrieval::paragraphs`].
    pub gold: usize,
}

/// Questions and the distinct paragraphs they were asked about.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieval {
    /// The request file the questions came from.
    pub path: PathBuf,
    /// In file order, one per document.
    pub questions: Vec<Question>,
    /// Distinct paragraphs in order of first appearance (a paragraph's id
    /// is its index here).
    pub paragraphs: Vec<String>,
}

#[derive(Deserialize)]
struct RawSquadLine {
    doc_id: u64,
    doc: RawSquadDoc,
}

#[derive(Deserialize)]
struct RawSquadDoc {
    query: String,
}

/// What [`Retrieval::score`] found for one question.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// The top-ranked paragraph.
    pub top: usize,
    /// Its cosine similarity to the question.
    pub top_score: f64,
    /// The gold paragraph's rank, 1 = first.
    pub gold_rank: usize,
    /// The gold paragraph's cosine similarity.
    pub gold_score: f64,
}

/// What [`Retrieval::score`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalScore {
    /// `ndcg@10` and `mrr@10`, means over questions.
    pub metrics: BTreeMap<String, f64>,
    /// Per question, in order.
    pub ranked: Vec<Ranked>,
}

impl Retrieval {
    /// Reads `dir/requests.jsonl.gz` (or a plain `requests.jsonl`) of
    /// OLMo's `squad` task: each document's `doc.query` is
    /// `Title: …\nBackground: PARAGRAPH\nQuestion: QUESTION\nAnswer:`. Keeps
    /// the first `limit` documents (by `doc_id`, first line of each) and the
    /// distinct paragraphs they ask about.
    pub fn read(dir: &Path, limit: Option<usize>) -> Result<Retrieval, EvalError> {
        let (path, reader) = crate::eval::open_requests(dir)?;
        Self::parse(&path, reader, limit)
    }

    /// [`Retrieval::read`] on a stream; `path` names it in errors.
    pub fn parse(
        path: &Path,
        reader: impl BufRead,
        limit: Option<usize>,
    ) -> Result<Retrieval, EvalError> {
        let mut questions: Vec<Question> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut paragraphs: Vec<String> = Vec::new();
        let mut paragraph_ids: BTreeMap<String, usize> = BTreeMap::new();
        for (i, line) in reader.lines().enumerate() {
            if limit.is_some_and(|n| questions.len() >= n) {
                break;
            }
            let bad = |message: String| EvalError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let line = line.map_err(|e| bad(e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let raw: RawSquadLine = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
            if !seen.insert(raw.doc_id) {
                continue;
            }
            let (paragraph, question) = split_squad_query(&raw.doc.query).ok_or_else(|| {
                bad("doc.query is not `Title: …\\nBackground: …\\nQuestion: …\\nAnswer:`".into())
            })?;
            let gold = match paragraph_ids.get(paragraph) {
                Some(&id) => id,
                None => {
                    paragraphs.push(paragraph.to_string());
                    paragraph_ids.insert(paragraph.to_string(), paragraphs.len() - 1);
                    paragraphs.len() - 1
                }
            };
            questions.push(Question {
                doc_id: raw.doc_id,
                text: question.to_string(),
                gold,
            });
        }
        if questions.is_empty() {
            return Err(EvalError::Data {
                what: path.display().to_string(),
                message: "no questions".into(),
            });
        }
        Ok(Retrieval {
            path: path.to_path_buf(),
            questions,
            paragraphs,
        })
    }

    /// Ranks every paragraph for every question by cosine similarity (ties
    /// to the lower paragraph id) and averages nDCG@10 and MRR@10 (one
    /// relevant paragraph per question).
    ///
    /// # Shapes
    /// - `questions`: `[questions][hidden]`, `paragraphs`: `[paragraphs][hidden]`
    pub fn score(&self, questions: &[Vec<f32>], paragraphs: &[Vec<f32>]) -> RetrievalScore {
        let ranked: Vec<Ranked> = self
            .questions
            .iter()
            .zip(questions)
            .map(|(q, e)| {
                let scores: Vec<f64> = paragraphs.iter().map(|p| cosine(e, p)).collect();
                let (mut top, mut top_score) = (0, f64::NEG_INFINITY);
                for (p, &s) in scores.iter().enumerate() {
                    if s > top_score {
                        (top, top_score) = (p, s);
                    }
                }
                Ranked {
                    top,
                    top_score,
                    gold_rank: gold_rank(&scores, q.gold),
                    gold_score: scores.get(q.gold).copied().unwrap_or(f64::NAN),
                }
            })
            .collect();
        let ranks: Vec<usize> = ranked.iter().map(|r| r.gold_rank).collect();
        let metrics = BTreeMap::from([
            ("ndcg@10".to_string(), ndcg_at(&ranks, 10)),
            ("mrr@10".to_string(), mrr_at(&ranks, 10)),
        ]);
        RetrievalScore { metrics, ranked }
    }
}

/// The paragraph and the question of a SQuAD `doc.query`.
fn split_squad_query(query: &str) -> Option<(&str, &str)> {
    let (_, rest) = query.split_once("\nBackground: ")?;
    let (paragraph, question) = rest.rsplit_once("\nQuestion: ")?;
    let question = question.strip_suffix("\nAnswer:").unwrap_or(question);
    Some((paragraph, question.trim_end()))
}

/// The 1-based rank of `gold` when `scores` are sorted high to low, ties
/// going to the lower index.
pub fn gold_rank(scores: &[f64], gold: usize) -> usize {
    let g = scores.get(gold).copied().unwrap_or(f64::NEG_INFINITY);
    1 + scores
        .iter()
        .enumerate()
        .filter(|&(p, &s)| s > g || (s == g && p < gold))
        .count()
}

/// Mean nDCG@k with one relevant item per query at these 1-based ranks:
/// `1 / log2(rank + 1)` within the top `k`, else 0.
pub fn ndcg_at(ranks: &[usize], k: usize) -> f64 {
    mean(ranks.iter().map(|&r| {
        if (1..=k).contains(&r) {
            1.0 / ((r + 1) as f64).log2()
        } else {
            0.0
        }
    }))
}

/// Mean reciprocal rank cut at `k`: `1 / rank` within the top `k`, else 0.
pub fn mrr_at(ranks: &[usize], k: usize) -> f64 {
    mean(ranks.iter().map(|&r| {
        if (1..=k).contains(&r) {
            1.0 / r as f64
        } else {
            0.0
        }
    }))
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values {
        sum += v;
        n += 1;
    }
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

// ---------------------------------------------------------------------------
// Arrow files

/// A Hugging Face `save_to_disk` file (`data-00000-of-00001.arrow`, an
/// Arrow IPC stream) in memory.
#[derive(Debug, Clone)]
pub struct ArrowTable {
    path: PathBuf,
    batches: Vec<RecordBatch>,
    columns: Vec<String>,
}

impl ArrowTable {
    /// Reads every record batch of the stream at `path`.
    pub fn read(path: &Path) -> Result<ArrowTable, EvalError> {
        let file = std::fs::File::open(path).map_err(|source| EvalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_reader(path, BufReader::new(file))
    }

    /// [`ArrowTable::read`] on a stream; `path` names it in errors.
    pub fn from_reader(path: &Path, reader: impl Read) -> Result<ArrowTable, EvalError> {
        let bad = |e: arrow_schema::ArrowError| EvalError::Arrow {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let stream = arrow_ipc::reader::StreamReader::try_new(reader, None).map_err(bad)?;
        let columns = stream
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let batches = stream.collect::<Result<Vec<_>, _>>().map_err(bad)?;
        Ok(ArrowTable {
            path: path.to_path_buf(),
            batches,
            columns,
        })
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows over all batches.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// The column names, in schema order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    fn column_error(&self, column: &str, message: String) -> EvalError {
        EvalError::Column {
            path: self.path.clone(),
            column: column.to_string(),
            message,
        }
    }

    /// The column's array in each batch; an error names the columns there are.
    fn arrays(&self, column: &str) -> Result<Vec<ArrayRef>, EvalError> {
        if !self.columns.iter().any(|c| c == column) {
            return Err(self.column_error(
                column,
                format!("no such column (the file has {})", self.columns.join(", ")),
            ));
        }
        self.batches
            .iter()
            .map(|b| {
                b.column_by_name(column)
                    .cloned()
                    .ok_or_else(|| self.column_error(column, "missing from a record batch".into()))
            })
            .collect()
    }

    /// A string column (`Utf8`, `LargeUtf8` or `Utf8View`), no nulls.
    pub fn strings(&self, column: &str) -> Result<Vec<String>, EvalError> {
        let mut out = Vec::with_capacity(self.num_rows());
        for array in self.arrays(column)? {
            let row0 = out.len();
            let null = |i: usize| self.column_error(column, format!("row {} is null", row0 + i));
            match array.data_type() {
                DataType::Utf8 => {
                    let a = array.as_string::<i32>();
                    for i in 0..a.len() {
                        if a.is_null(i) {
                            return Err(null(i));
                        }
                        out.push(a.value(i).to_string());
                    }
                }
                DataType::LargeUtf8 => {
                    let a = array.as_string::<i64>();
                    for i in 0..a.len() {
                        if a.is_null(i) {
                            return Err(null(i));
                        }
                        out.push(a.value(i).to_string());
                    }
                }
                DataType::Utf8View => {
                    let a = array.as_string_view();
                    for i in 0..a.len() {
                        if a.is_null(i) {
                            return Err(null(i));
                        }
                        out.push(a.value(i).to_string());
                    }
                }
                other => {
                    return Err(
                        self.column_error(column, format!("expected strings, found {other}"))
                    );
                }
            }
        }
        Ok(out)
    }

    /// A column of non-negative integers or booleans (`false` 0, `true` 1),
    /// no nulls: class labels, ids.
    pub fn integers(&self, column: &str) -> Result<Vec<u64>, EvalError> {
        let mut out = Vec::with_capacity(self.num_rows());
        for array in self.arrays(column)? {
            let row0 = out.len();
            let values: Vec<Option<i128>> = match array.data_type() {
                DataType::Boolean => array
                    .as_boolean()
                    .iter()
                    .map(|v| v.map(i128::from))
                    .collect(),
                DataType::Int8 => ints::<Int8Type>(&array),
                DataType::Int16 => ints::<Int16Type>(&array),
                DataType::Int32 => ints::<Int32Type>(&array),
                DataType::Int64 => ints::<Int64Type>(&array),
                DataType::UInt8 => ints::<UInt8Type>(&array),
                DataType::UInt16 => ints::<UInt16Type>(&array),
                DataType::UInt32 => ints::<UInt32Type>(&array),
                DataType::UInt64 => ints::<UInt64Type>(&array),
                other => {
                    return Err(self.column_error(
                        column,
                        format!("expected integers or booleans, found {other}"),
                    ));
                }
            };
            for (i, v) in values.into_iter().enumerate() {
                let v = v.ok_or_else(|| {
                    self.column_error(column, format!("row {} is null", row0 + i))
                })?;
                let v = u64::try_from(v).map_err(|_| {
                    self.column_error(
                        column,
                        format!("row {}: {v} is negative (an unlabelled split?)", row0 + i),
                    )
                })?;
                out.push(v);
            }
        }
        Ok(out)
    }
}

fn ints<T: arrow_array::ArrowPrimitiveType>(array: &ArrayRef) -> Vec<Option<i128>>
where
    T::Native: Into<i128>,
{
    array
        .as_primitive::<T>()
        .iter()
        .map(|v| v.map(Into::into))
        .collect()
}

// ---------------------------------------------------------------------------
// Probe tasks

/// A classification task read from a Hugging Face validation split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Task name on the command line (`sst2_probe`).
    pub name: &'static str,
    /// The Arrow file, relative to the `hf_datasets` folder.
    pub file: &'static str,
    /// One text column, or a pair's two.
    pub text: &'static [&'static str],
    /// Label column (integers or booleans).
    pub label: &'static str,
    /// A column of item ids, where the split has one (else the row number).
    pub id: Option<&'static str>,
}

/// The probe tasks `twinhead eval` knows.
pub const PROBE_TASKS: [ProbeSpec; 4] = [
    ProbeSpec {
        name: "sst2_probe",
        file: "glue/sst2/validation/data-00000-of-00001.arrow",
        text: &["sentence"],
        label: "label",
        id: Some("idx"),
    },
    ProbeSpec {
        name: "rte_probe",
        file: "glue/rte/validation/data-00000-of-00001.arrow",
        text: &["sentence1", "sentence2"],
        label: "label",
        id: Some("idx"),
    },
    ProbeSpec {
        name: "mrpc_probe",
        file: "glue/mrpc/validation/data-00000-of-00001.arrow",
        text: &["sentence1", "sentence2"],
        label: "label",
        id: Some("idx"),
    },
    ProbeSpec {
        name: "boolq_probe",
        file: "boolq/none/validation/data-00000-of-00001.arrow",
        text: &["question", "passage"],
        label: "answer",
        id: None,
    },
];

/// The probe task of this name.
pub fn probe_spec(name: &str) -> Option<&'static ProbeSpec> {
    PROBE_TASKS.iter().find(|s| s.name == name)
}

/// A probe task's items.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeTask {
    /// The Arrow file read.
    pub path: PathBuf,
    /// Per item, its text or its pair's two texts.
    pub texts: Vec<Vec<String>>,
    /// Per item, its class.
    pub labels: Vec<u32>,
    /// Per item, its id in the split.
    pub ids: Vec<u64>,
}

impl ProbeTask {
    /// Reads `spec`'s columns from the Arrow file at `path`, the first
    /// `limit` rows (all without a limit).
    pub fn read(spec: &ProbeSpec, path: &Path, limit: Option<usize>) -> Result<Self, EvalError> {
        let table = ArrowTable::read(path)?;
        let n = limit.map_or(table.num_rows(), |l| l.min(table.num_rows()));
        let columns = spec
            .text
            .iter()
            .map(|c| table.strings(c))
            .collect::<Result<Vec<_>, _>>()?;
        let labels = table
            .integers(spec.label)?
            .into_iter()
            .take(n)
            .map(|l| {
                u32::try_from(l).map_err(|_| {
                    table.column_error(spec.label, format!("label {l} is not a class index"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ids = match spec.id {
            Some(c) => table.integers(c)?.into_iter().take(n).collect(),
            None => (0..n as u64).collect(),
        };
        let texts = (0..n)
            .map(|i| columns.iter().map(|c| c[i].clone()).collect())
            .collect();
        Ok(ProbeTask {
            path: path.to_path_buf(),
            texts,
            labels,
            ids,
        })
    }
}

/// How [`cross_validate`] fits and splits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeConfig {
    /// Folds (k).
    pub folds: usize,
    /// Seed of the fold assignment.
    pub seed: u64,
    /// L-BFGS iterations at most.
    pub max_iter: usize,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            folds: 5,
            seed: 0,
            max_iter: 200,
        }
    }
}

/// What [`cross_validate`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    /// Mean of the folds' held-out accuracies.
    pub accuracy: f64,
    /// Each fold's held-out accuracy.
    pub fold_accuracy: Vec<f64>,
    /// Per item: its fold.
    pub fold: Vec<usize>,
    /// Per item: the class predicted by the probe fitted without its fold.
    pub predicted: Vec<u32>,
    /// Per item: that probe's probability of the predicted class.
    pub probability: Vec<f64>,
}

/// Each item's fold: the items of every class, shuffled by a ChaCha8
/// stream seeded with `seed`, are dealt round-robin to `k` folds, the deal
/// continuing from class to class, so every fold has `n / k` items (±1)
/// and each class spread evenly.
pub fn fold_assignment(labels: &[u32], k: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    let mut fold = vec![0; labels.len()];
    let mut next = 0;
    for items in by_class.values_mut() {
        // Fisher-Yates with our own index draw, so the folds do not change
        // with the `rand` crate's shuffle.
        for i in (1..items.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
        for &i in items.iter() {
            fold[i] = next % k.max(1);
            next += 1;
        }
    }
    fold
}

/// k-fold cross-validation of a logistic-regression probe on `features`
/// (one row per item) with `labels` (classes `0..=max`).
///
/// # Shapes
/// - `features`: `[items][dims]`
pub fn cross_validate(
    features: &[Vec<f32>],
    labels: &[u32],
    config: &ProbeConfig,
) -> Result<ProbeResult, EvalError> {
    let n = labels.len();
    let k = config.folds;
    let data_error = |message: String| EvalError::Data {
        what: "linear probe".into(),
        message,
    };
    if features.len() != n {
        return Err(data_error(format!(
            "{} feature rows for {n} labels",
            features.len()
        )));
    }
    if k < 2 || n < k {
        return Err(data_error(format!(
            "{k}-fold cross-validation needs k >= 2 and at least k items, got {n} items"
        )));
    }
    let dims = features.first().map_or(0, Vec::len);
    if let Some(bad) = features.iter().position(|f| f.len() != dims) {
        return Err(data_error(format!(
            "item {bad} has {} features, item 0 has {dims}",
            features[bad].len()
        )));
    }
    let classes = labels
        .iter()
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1)
        .max(2);
    let fold = fold_assignment(labels, k, config.seed);
    let mut predicted = vec![0u32; n];
    let mut probability = vec![0f64; n];
    let mut fold_accuracy = Vec::with_capacity(k);
    for f in 0..k {
        let train: Vec<usize> = (0..n).filter(|&i| fold[i] != f).collect();
        let test: Vec<usize> = (0..n).filter(|&i| fold[i] == f).collect();
        let scaler = Scaler::fit(features, &train, dims);
        let x_train: Vec<f64> = train
            .iter()
            .flat_map(|&i| scaler.apply(&features[i]))
            .collect();
        let y_train: Vec<u32> = train.iter().map(|&i| labels[i]).collect();
        let probe = LogisticRegression::fit(
            &x_train,
            &y_train,
            dims,
            classes,
            1.0 / train.len() as f64,
            config.max_iter,
        );
        let mut hits = 0;
        for &i in &test {
            let p = probe.probabilities(&scaler.apply(&features[i]));
            let mut best = 0;
            for c in 1..classes {
                if p[c] > p[best] {
                    best = c;
                }
            }
            predicted[i] = best as u32;
            probability[i] = p[best];
            hits += usize::from(best as u32 == labels[i]);
        }
        fold_accuracy.push(hits as f64 / test.len().max(1) as f64);
    }
    Ok(ProbeResult {
        accuracy: fold_accuracy.iter().sum::<f64>() / k as f64,
        fold_accuracy,
        fold,
        predicted,
        probability,
    })
}

/// Per-feature mean and deviation of the training rows.
struct Scaler {
    mean: Vec<f64>,
    scale: Vec<f64>,
}

impl Scaler {
    fn fit(features: &[Vec<f32>], rows: &[usize], dims: usize) -> Scaler {
        let n = rows.len().max(1) as f64;
        let mut mean = vec![0f64; dims];
        for &i in rows {
            for (m, &v) in mean.iter_mut().zip(&features[i]) {
                *m += f64::from(v);
            }
        }
        mean.iter_mut().for_each(|m| *m /= n);
        let mut var = vec![0f64; dims];
        for &i in rows {
            for ((s, &v), m) in var.iter_mut().zip(&features[i]).zip(&mean) {
                *s += (f64::from(v) - m).powi(2);
            }
        }
        // A constant feature stays centred at 0 rather than dividing by 0.
        let scale = var
            .into_iter()
            .map(|v| {
                let sd = (v / n).sqrt();
                if sd > 1e-12 { sd } else { 1.0 }
            })
            .collect();
        Scaler { mean, scale }
    }

    fn apply(&self, x: &[f32]) -> Vec<f64> {
        x.iter()
            .zip(&self.mean)
            .zip(&self.scale)
            .map(|((&v, m), s)| (f64::from(v) - m) / s)
            .collect()
    }
}

/// Multinomial logistic regression: `p = softmax(W x + b)`, `W` of
/// `[classes, dims]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogisticRegression {
    classes: usize,
    dims: usize,
    /// `[classes * dims]` weights, then `[classes]` biases.
    params: Vec<f64>,
}

impl LogisticRegression {
    /// Minimises the mean cross-entropy plus `l2 / 2 · ‖W‖²` (the biases
    /// unpenalised) by L-BFGS from zero, at most `max_iter` iterations.
    ///
    /// # Shapes
    /// - `x`: `[rows * dims]` row-major, `y`: `[rows]`
    pub fn fit(
        x: &[f64],
        y: &[u32],
        dims: usize,
        classes: usize,
        l2: f64,
        max_iter: usize,
    ) -> LogisticRegression {
        let mut model = LogisticRegression {
            classes,
            dims,
            params: vec![0.0; classes * dims + classes],
        };
        let objective = |params: &[f64], grad: &mut [f64]| {
            let probe = LogisticRegression {
                classes,
                dims,
                params: params.to_vec(),
            };
            probe.loss_and_gradient(x, y, l2, grad)
        };
        model.params = lbfgs(model.params.clone(), objective, max_iter);
        model
    }

    /// Class probabilities of one (standardised) row.
    pub fn probabilities(&self, x: &[f64]) -> Vec<f64> {
        let (c, d) = (self.classes, self.dims);
        let mut z: Vec<f64> = (0..c)
            .map(|k| {
                let w = &self.params[k * d..(k + 1) * d];
                self.params[c * d + k] + w.iter().zip(x).map(|(a, b)| a * b).sum::<f64>()
            })
            .collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut total = 0.0;
        for v in z.iter_mut() {
            *v = (*v - max).exp();
            total += *v;
        }
        z.iter_mut().for_each(|v| *v /= total);
        z
    }

    fn loss_and_gradient(&self, x: &[f64], y: &[u32], l2: f64, grad: &mut [f64]) -> f64 {
        let (c, d) = (self.classes, self.dims);
        let n = y.len().max(1) as f64;
        grad.iter_mut().for_each(|g| *g = 0.0);
        let mut loss = 0.0;
        for (row, &label) in x.chunks_exact(d).zip(y) {
            let p = self.probabilities(row);
            loss -= p[label as usize].max(1e-300).ln();
            for (k, &pk) in p.iter().enumerate() {
                let err = (pk - f64::from(u8::from(k == label as usize))) / n;
                for (g, &v) in grad[k * d..(k + 1) * d].iter_mut().zip(row) {
                    *g += err * v;
                }
                grad[c * d + k] += err;
            }
        }
        loss /= n;
        let weights = &self.params[..c * d];
        loss += 0.5 * l2 * weights.iter().map(|w| w * w).sum::<f64>();
        for (g, w) in grad[..c * d].iter_mut().zip(weights) {
            *g += l2 * w;
        }
        loss
    }
}

/// Limited-memory BFGS (ten pairs) with a backtracking Armijo line search;
/// stops when the largest gradient entry is below 1e-6, the loss stops
/// moving (relative 1e-12), or after `max_iter` iterations.
fn lbfgs(
    mut x: Vec<f64>,
    mut f: impl FnMut(&[f64], &mut [f64]) -> f64,
    max_iter: usize,
) -> Vec<f64> {
    const MEMORY: usize = 10;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
    let n = x.len();
    let mut g = vec![0.0; n];
    let mut fx = f(&x, &mut g);
    let mut history: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
    let mut trial_g = vec![0.0; n];
    for _ in 0..max_iter {
        if g.iter().fold(0f64, |m, v| m.max(v.abs())) < 1e-6 {
            break;
        }
        // Two-loop recursion: d = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(history.len());
        for (s, y, rho) in history.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        if let Some((s, y, _)) = history.back() {
            let gamma = dot(s, y) / dot(y, y);
            q.iter_mut().for_each(|v| *v *= gamma);
        }
        for ((s, y, rho), a) in history.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
        }
        let mut direction: Vec<f64> = q.into_iter().map(|v| -v).collect();
        let mut slope = dot(&g, &direction);
        if slope >= 0.0 {
            // Not a descent direction: restart from steepest descent.
            history.clear();
            direction = g.iter().map(|v| -v).collect();
            slope = dot(&g, &direction);
        }
        let mut step = if history.is_empty() {
            1.0 / g.iter().map(|v| v * v).sum::<f64>().sqrt().max(1.0)
        } else {
            1.0
        };
        let mut accepted = None;
        for _ in 0..40 {
            let trial: Vec<f64> = x
                .iter()
                .zip(&direction)
                .map(|(xi, di)| xi + step * di)
                .collect();
            let ft = f(&trial, &mut trial_g);
            if ft <= fx + 1e-4 * step * slope {
                accepted = Some((trial, ft));
                break;
            }
            step *= 0.5;
        }
        let Some((trial, ft)) = accepted else { break };
        let s: Vec<f64> = trial.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = trial_g.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        let moved = (fx - ft).abs() <= 1e-12 * fx.abs().max(1.0);
        x = trial;
        fx = ft;
        g.copy_from_slice(&trial_g);
        if sy > 1e-12 {
            if history.len() == MEMORY {
                history.pop_front();
            }
            history.push_back((s, y, 1.0 / sy));
        }
        if moved {
            break;
        }
    }
    x
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn squad_queries_split_into_paragraph_and_question() {
        let q = "Title: T\nBackground: First line.\nSecond line.\nQuestion: Why?\nAnswer:";
        assert_eq!(
            split_squad_query(q),
            Some(("First line.\nSecond line.", "Why?"))
        );
        assert_eq!(split_squad_query("Title: T\nQuestion: Why?"), None);
    }

    #[test]
    fn lbfgs_finds_a_quadratic_minimum() {
        // f = (a - 3)² + 10 (b + 1)²
        let x = lbfgs(
            vec![0.0, 0.0],
            |p, g| {
                g[0] = 2.0 * (p[0] - 3.0);
                g[1] = 20.0 * (p[1] + 1.0);
                (p[0] - 3.0).powi(2) + 10.0 * (p[1] + 1.0).powi(2)
            },
            100,
        );
        assert!(
            (x[0] - 3.0).abs() < 1e-6 && (x[1] + 1.0).abs() < 1e-6,
            "{x:?}"
        );
    }

    #[test]
    fn logistic_gradient_matches_finite_differences() {
        let x = [0.5, -1.0, 2.0, 0.1, -0.3, 0.7];
        let y = [0, 2, 1];
        let probe = LogisticRegression {
            classes: 3,
            dims: 2,
            params: vec![0.1, -0.2, 0.3, 0.05, -0.4, 0.2, 0.01, -0.02, 0.03],
        };
        let mut grad = vec![0.0; 9];
        probe.loss_and_gradient(&x, &y, 0.1, &mut grad);
        for (i, &analytic) in grad.iter().enumerate() {
            let mut plus = probe.clone();
            plus.params[i] += 1e-6;
            let mut minus = probe.clone();
            minus.params[i] -= 1e-6;
            let mut scratch = vec![0.0; 9];
            let numeric = (plus.loss_and_gradient(&x, &y, 0.1, &mut scratch)
                - minus.loss_and_gradient(&x, &y, 0.1, &mut scratch))
                / 2e-6;
            assert!(
                (numeric - analytic).abs() < 1e-6,
                "{i}: {numeric} vs {analytic}"
            );
        }
    }

    #[test]
    fn a_pair_is_cut_longest_first() {
        let mut c = ModelConfig::builtin("tiny").unwrap();
        c.max_position_embeddings = 9;
        let a: Vec<u32> = (10..20).collect();
        let b: Vec<u32> = (30..33).collect();
        let ids = frame(&c, &a, Some(&b));
        assert_eq!(ids.len(), 9);
        // 6 budget: a keeps 3, b keeps 3.
        let (cls, sep) = (c.cls_token_id, c.sep_token_id);
        assert_eq!(ids, [cls, 10, 11, 12, sep, 30, 31, 32, sep]);
        assert_eq!(frame(&c, &a, None), [cls, 10, 11, 12, 13, 14, 15, 16, sep]);
        assert_eq!(frame(&c, &[7], None), [cls, 7, sep]);
    }
}
