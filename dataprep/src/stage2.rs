//! Stage 2, per phase: split documents longer than `seq_len` into pieces,
//! draw each source's share of the budget (whole epochs, then a seeded
//! subsample), mix, pack into rows of exactly `seq_len` keeping document
//! boundaries, shuffle rows, and write fixed-size shards.
//!
//! A phase is one independent task: it reads only the stage-1 parts and
//! writes only `phases/<phase>/`.
//!
//! With a held-out split (`eval` in the config), each source's held-out
//! documents ([`held_out`]) are left out of every phase's draw and packed,
//! all of them, into the phase's eval shards (`eval-NNNNN.parquet`).

use std::collections::BTreeMap;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::ProgressSink;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::stage1::{Written, put_with_marker, read_marker};
use twinhead_data::formats::{self, Row};
use twinhead_data::manifest::{Draw, EvalStats, FileEntry, PhaseStats, SourceStats};
use twinhead_data::store::Location;
use twinhead_proto::dataset::{DatasetConfig, EvalSplit, PhaseConfig};

/// A slice of one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Source index.
    pub source: u16,
    /// Document index within the source.
    pub doc: u32,
    /// First token.
    pub start: u32,
    /// Tokens.
    pub len: u32,
}

/// Split the documents `take` accepts (by index) into pieces of at most
/// `seq_len`; non-first pieces shorter than `min_piece` are dropped.
/// Returns pieces and dropped tokens.
pub fn split(
    source: u16,
    docs: &[Vec<u32>],
    seq_len: u32,
    min_piece: u32,
    take: impl Fn(usize) -> bool,
) -> (Vec<Piece>, u64) {
    let mut pieces = Vec::new();
    let mut dropped = 0u64;
    for (d, doc) in docs.iter().enumerate().filter(|(d, _)| take(*d)) {
        let n = doc.len() as u32;
        let mut start = 0u32;
        while start < n {
            let len = (n - start).min(seq_len);
            if start == 0 || len >= min_piece {
                pieces.push(Piece {
                    source,
                    doc: d as u32,
                    start,
                    len,
                });
            } else {
                dropped += u64::from(len);
            }
            start += len;
        }
    }
    (pieces, dropped)
}

/// Draw pieces worth exactly `target` tokens: whole epochs while they fit,
/// then a seeded subsample of the rest (pieces in a random order until the
/// target is reached; the last one is cut to fit).
pub fn draw(pieces: &[Piece], target: u64, rng: &mut Rng) -> (Vec<Piece>, u64, bool) {
    let avail: u64 = pieces.iter().map(|p| u64::from(p.len)).sum();
    if avail == 0 || target == 0 {
        return (Vec::new(), 0, false);
    }
    let epochs = target / avail;
    let rest = target - epochs * avail;
    let mut out = Vec::with_capacity(pieces.len() * (epochs as usize + 1));
    for _ in 0..epochs {
        out.extend_from_slice(pieces);
    }
    let mut subsampled = false;
    if rest > 0 {
        subsampled = true;
        let mut order: Vec<u32> = (0..pieces.len() as u32).collect();
        rng.shuffle(&mut order);
        let mut got = 0u64;
        for i in order {
            if got >= rest {
                break;
            }
            let mut p = pieces[i as usize];
            // The last piece is cut so the draw is exactly `target` tokens.
            p.len = p.len.min(u32::try_from(rest - got).unwrap_or(u32::MAX));
            got += u64::from(p.len);
            out.push(p);
        }
    }
    (out, epochs, subsampled)
}

/// Pack pieces, in order, into rows of exactly `seq_len`: a piece that does
/// not fit the row's remaining space continues at the start of the next row
/// (each part counts as its own document). The last partial row is left out
/// and its token count returned.
pub fn pack(pieces: &[Piece], docs: &[SourceDocs], seq_len: u32) -> (Vec<Row>, u64) {
    let cap = seq_len as usize;
    let mut rows = Vec::new();
    let mut row = Row {
        input_ids: Vec::with_capacity(cap),
        ..Row::default()
    };
    for p in pieces {
        let source = &docs[p.source as usize];
        let toks = &source.tokens[p.doc as usize][p.start as usize..(p.start + p.len) as usize];
        let key = source.keys[p.doc as usize];
        let mut off = 0usize;
        while off < toks.len() {
            let take = (toks.len() - off).min(cap - row.input_ids.len());
            row.input_ids.extend_from_slice(&toks[off..off + take]);
            row.doc_lens.push(take as u32);
            row.source.push(p.source);
            row.doc_keys.push(key);
            off += take;
            if row.input_ids.len() == cap {
                rows.push(std::mem::replace(
                    &mut row,
                    Row {
                        input_ids: Vec::with_capacity(cap),
                        ..Row::default()
                    },
                ));
            }
        }
    }
    (rows, row.input_ids.len() as u64)
}

/// Split `budget` by weight: floors, then the leftover tokens one each to the
/// largest fractional parts (ties: lower index), so the shares sum to `budget`.
pub fn shares(budget: u64, weights: &[f64]) -> Vec<u64> {
    let total: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| budget as f64 * w / total).collect();
    let mut out: Vec<u64> = exact.iter().map(|x| x.floor() as u64).collect();
    let mut left = budget.saturating_sub(out.iter().sum());
    let mut order: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0.0).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    for i in order.into_iter().cycle() {
        if left == 0 {
            break;
        }
        out[i] += 1;
        left -= 1;
    }
    out
}

/// What a phase's shard holds: training rows or held-out rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardKind {
    Training,
    Eval,
}

impl ShardKind {
    /// `phases/<phase>/shard-NNNNN.parquet` or `phases/<phase>/eval-NNNNN.parquet`.
    pub fn path(self, phase: &str, i: usize) -> String {
        let prefix = match self {
            ShardKind::Training => "shard",
            ShardKind::Eval => "eval",
        };
        format!("phases/{phase}/{prefix}-{i:05}.parquet")
    }

    /// The progress stage writing them.
    fn stage(self, phase: &str) -> String {
        match self {
            ShardKind::Training => format!("phase {phase}"),
            ShardKind::Eval => format!("phase {phase} eval"),
        }
    }
}

/// A source's stage-1 documents in part order: tokens, and each
/// document's key ([`doc_key`]).
#[derive(Debug, Clone, Default)]
pub struct SourceDocs {
    pub tokens: Vec<Vec<u32>>,
    pub keys: Vec<u64>,
}

/// A document's key: the first 8 bytes of sha256(source name, 0, document
/// id), big-endian. It depends on nothing but the two names, so the
/// held-out split is the same whatever reads the documents, in whatever
/// order or number of threads.
pub fn doc_key(source: &str, id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(source.as_bytes())
        .chain_update([0u8])
        .chain_update(id.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Which of a source's documents (by key) are held out: those whose key
/// falls below `fraction` of the key range, at most `max_docs` distinct
/// keys of them (the smallest). All `false` without a split.
pub fn held_out(keys: &[u64], split: Option<&EvalSplit>) -> Vec<bool> {
    let Some(split) = split else {
        return vec![false; keys.len()];
    };
    // fraction ≤ 0.5, so the product is below 2⁶⁴ and converts exactly.
    let below = (split.fraction * 18_446_744_073_709_551_616.0) as u64;
    let mut chosen: Vec<u64> = keys.iter().copied().filter(|k| *k < below).collect();
    chosen.sort_unstable();
    chosen.dedup();
    if let Some(max) = split.max_docs {
        chosen.truncate(usize::try_from(max).unwrap_or(usize::MAX));
    }
    keys.iter()
        .map(|k| chosen.binary_search(k).is_ok())
        .collect()
}

/// Load a source's stage-1 documents.
pub fn load_source(out: &Location, stats: &SourceStats) -> Result<SourceDocs> {
    let parts: Vec<Result<Vec<formats::Doc>>> = stats
        .parts
        .par_iter()
        .map(|f| {
            let bytes = out.get(&f.path)?;
            Ok(formats::read_docs(&out.name(&f.path), bytes)?)
        })
        .collect();
    let mut docs = SourceDocs::default();
    for p in parts {
        for d in p? {
            docs.keys.push(doc_key(&stats.name, &d.id));
            docs.tokens.push(d.ids);
        }
    }
    Ok(docs)
}

/// Build one phase: its training shards and, with a held-out split, its
/// eval shards. `docs` holds every source's documents (empty for sources
/// the phase does not draw from). `key` is the build key recorded in shard
/// markers (config and tokenizer hashes): shards with another key are
/// rewritten.
#[allow(clippy::too_many_arguments)]
pub fn run_phase(
    out: &Location,
    cfg: &DatasetConfig,
    key: &str,
    phase: &PhaseConfig,
    sources: &[SourceStats],
    docs: &[SourceDocs],
    progress: &dyn ProgressSink,
    written: &mut Written,
) -> Result<PhaseStats> {
    let held: Vec<Vec<bool>> = docs
        .iter()
        .map(|d| held_out(&d.keys, cfg.eval.as_ref()))
        .collect();
    let targets = shares(phase.tokens, &phase.weights);
    let mut drawn = Vec::new();
    let mut draws = Vec::new();
    for (s, src) in cfg.sources.iter().enumerate() {
        let w = phase.weights[s];
        if w <= 0.0 {
            continue;
        }
        let target = targets[s];
        let (pieces, short) = split(
            s as u16,
            &docs[s].tokens,
            phase.seq_len,
            phase.min_piece_tokens,
            |d| !held[s][d],
        );
        let avail: u64 = pieces.iter().map(|p| u64::from(p.len)).sum();
        if avail == 0 && target > 0 {
            return Err(Error::Phase {
                phase: phase.name.clone(),
                message: format!(
                    "source {:?} has weight {w} but no tokens: {}",
                    src.name,
                    why_empty(&src.input, &sources[s])
                ),
            });
        }
        let mut rng = Rng::new(
            phase.seed,
            &[b"draw", phase.name.as_bytes(), src.name.as_bytes()],
        );
        let (got, full_epochs, subsampled) = draw(&pieces, target, &mut rng);
        let drawn_tokens: u64 = got.iter().map(|p| u64::from(p.len)).sum();
        if full_epochs > 0 {
            tracing::info!(phase = %phase.name, source = %src.name, full_epochs, "source repeated to meet its share");
        }
        draws.push(Draw {
            source: src.name.clone(),
            weight: w,
            target_tokens: target,
            available_tokens: avail,
            drawn_tokens,
            full_epochs,
            subsampled,
            short_piece_tokens_dropped: short,
        });
        drawn.extend(got);
    }
    Rng::new(phase.seed, &[b"mix", phase.name.as_bytes()]).shuffle(&mut drawn);
    let (mut rows, mut tail) = pack(&drawn, docs, phase.seq_len);
    drop(drawn);
    // Each source may overshoot its share by less than one piece: keep the
    // phase at exactly floor(budget / seq_len) rows, dropping the last rows
    // of the mixed stream (a random mix of sources) before the row shuffle.
    let max_rows = usize::try_from(phase.tokens / u64::from(phase.seq_len)).unwrap_or(usize::MAX);
    if rows.len() > max_rows {
        tail += (rows.len() - max_rows) as u64 * u64::from(phase.seq_len);
        rows.truncate(max_rows);
    }
    Rng::new(phase.seed, &[b"rows", phase.name.as_bytes()]).shuffle(&mut rows);
    let shards = write_shards(
        out,
        key,
        cfg,
        phase,
        &rows,
        ShardKind::Training,
        progress,
        written,
    )?;
    let eval = match cfg.eval {
        None => None,
        Some(_) => Some(eval_rows(
            out, cfg, key, phase, sources, docs, &held, progress, written,
        )?),
    };
    Ok(PhaseStats {
        name: phase.name.clone(),
        seq_len: phase.seq_len,
        seed: phase.seed,
        min_piece_tokens: phase.min_piece_tokens,
        budget_tokens: phase.tokens,
        sequences: rows.len() as u64,
        tokens: rows.len() as u64 * u64::from(phase.seq_len),
        tokens_per_source: tokens_per_source(&rows, sources),
        tail_tokens_dropped: tail,
        draws,
        shards,
        eval,
    })
}

/// Why a source has nothing to draw, from what stage 1 counted.
fn why_empty(input: &str, stats: &SourceStats) -> String {
    let reasons = |counts: &BTreeMap<String, u64>| {
        counts
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if stats.files == 0 && stats.read == 0 {
        match stats.issues.first().map(|i| i.message.as_str()) {
            Some(message) if !message.contains("matches no file") => {
                format!("its input {input:?} could not be listed: {message}")
            }
            _ => format!("its input {input:?} matches no file"),
        }
    } else if stats.kept == 0 {
        format!(
            "none of the {} records read from {input:?} was kept (rejected: {}; dropped: {})",
            stats.read,
            reasons(&stats.rejected),
            reasons(&stats.dropped)
        )
    } else {
        format!(
            "its {} kept documents from {input:?} are all held out for evaluation ([eval])",
            stats.kept
        )
    }
}

/// A phase's eval rows: every held-out document of its sources, split and
/// packed like the training rows, in a seeded order.
#[allow(clippy::too_many_arguments)]
fn eval_rows(
    out: &Location,
    cfg: &DatasetConfig,
    key: &str,
    phase: &PhaseConfig,
    sources: &[SourceStats],
    docs: &[SourceDocs],
    held: &[Vec<bool>],
    progress: &dyn ProgressSink,
    written: &mut Written,
) -> Result<EvalStats> {
    let mut pieces = Vec::new();
    let mut held_docs = 0u64;
    let mut short_tokens = 0u64;
    for (s, weight) in phase.weights.iter().enumerate() {
        if *weight <= 0.0 {
            continue;
        }
        held_docs += held[s].iter().filter(|h| **h).count() as u64;
        let (got, short) = split(
            s as u16,
            &docs[s].tokens,
            phase.seq_len,
            phase.min_piece_tokens,
            |d| held[s][d],
        );
        pieces.extend(got);
        short_tokens += short;
    }
    Rng::new(phase.seed, &[b"eval", phase.name.as_bytes()]).shuffle(&mut pieces);
    let (rows, tail) = pack(&pieces, docs, phase.seq_len);
    let shards = write_shards(
        out,
        key,
        cfg,
        phase,
        &rows,
        ShardKind::Eval,
        progress,
        written,
    )?;
    Ok(EvalStats {
        docs: held_docs,
        sequences: rows.len() as u64,
        tokens: rows.len() as u64 * u64::from(phase.seq_len),
        tokens_per_source: tokens_per_source(&rows, sources),
        tail_tokens_dropped: tail + short_tokens,
        shards,
    })
}

fn tokens_per_source(rows: &[Row], sources: &[SourceStats]) -> BTreeMap<String, u64> {
    let mut tokens: BTreeMap<String, u64> = BTreeMap::new();
    for r in rows {
        for (len, s) in r.doc_lens.iter().zip(&r.source) {
            let name = &sources[*s as usize].name;
            *tokens.entry(name.clone()).or_insert(0) += u64::from(*len);
        }
    }
    tokens
}

/// Writes `rows` as `kind` shards of `cfg.rows_per_shard` rows, each with
/// its marker; shards already stored for this build are kept.
#[allow(clippy::too_many_arguments)]
fn write_shards(
    out: &Location,
    key: &str,
    cfg: &DatasetConfig,
    phase: &PhaseConfig,
    rows: &[Row],
    kind: ShardKind,
    progress: &dyn ProgressSink,
    written: &mut Written,
) -> Result<Vec<FileEntry>> {
    let per = usize::try_from(cfg.rows_per_shard).unwrap_or(usize::MAX);
    let per_group = usize::try_from(cfg.rows_per_row_group).unwrap_or(usize::MAX);
    let chunks: Vec<&[Row]> = rows.chunks(per).collect();
    let stage = kind.stage(&phase.name);
    progress.start(&stage, chunks.len() as u64);
    let results: Vec<Result<(FileEntry, bool)>> = chunks
        .par_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let path = kind.path(&phase.name, i);
            if progress.cancelled() {
                return Err(Error::Cancelled);
            }
            if let Some(m) = read_marker(out, &path, key)? {
                progress.inc(1);
                return Ok((m.file, false));
            }
            let bytes = formats::write_rows(&out.name(&path), chunk, per_group)?;
            let tokens = chunk.len() as u64 * u64::from(phase.seq_len);
            let m = put_with_marker(out, &path, bytes, chunk.len() as u64, tokens, key)?;
            progress.inc(1);
            Ok((m.file, true))
        })
        .collect();
    progress.finish(&stage);
    let mut shards = Vec::with_capacity(results.len());
    for r in results {
        let (f, wrote) = r?;
        if wrote {
            written.written += 1;
        } else {
            written.skipped += 1;
        }
        shards.push(f);
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(n: u32, base: u32) -> Vec<u32> {
        (0..n).map(|i| base + i).collect()
    }

    #[test]
    fn split_drops_short_non_first_pieces() {
        let docs = vec![doc(10, 0), doc(25, 100), doc(3, 200)];
        let (pieces, dropped) = split(0, &docs, 8, 4, |_| true);
        let lens: Vec<u32> = pieces.iter().map(|p| p.len).collect();
        // 10 -> 8 + 2 (dropped); 25 -> 8 8 8 + 1 (dropped); 3 -> 3 (first piece kept).
        assert_eq!(lens, [8, 8, 8, 8, 3]);
        assert_eq!(dropped, 3);
    }

    #[test]
    fn pack_keeps_every_token_in_order() {
        let docs = vec![doc(5, 0), doc(9, 100), doc(2, 200), doc(7, 300)];
        let (pieces, _) = split(1, &docs, 8, 1, |_| true);
        let keys: Vec<u64> = (100..104).collect();
        let src = vec![
            SourceDocs::default(),
            SourceDocs {
                tokens: docs.clone(),
                keys: keys.clone(),
            },
        ];
        let (rows, tail) = pack(&pieces, &src, 8);
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.input_ids.clone()).collect();
        let all: Vec<u32> = docs.concat();
        assert_eq!(flat.len() as u64 + tail, all.len() as u64);
        assert_eq!(&all[..flat.len()], &flat[..]);
        for r in &rows {
            assert_eq!(r.input_ids.len(), 8);
            assert_eq!(r.doc_lens.iter().sum::<u32>(), 8);
            assert_eq!(r.doc_lens.len(), r.source.len());
            assert_eq!(r.doc_lens.len(), r.doc_keys.len());
            assert!(r.source.iter().all(|s| *s == 1));
            assert!(r.doc_keys.iter().all(|k| keys.contains(k)));
        }
    }

    #[test]
    fn draw_epochs_then_subsample() {
        let docs: Vec<Vec<u32>> = (0..10).map(|i| doc(10, i * 100)).collect();
        let (pieces, _) = split(0, &docs, 16, 1, |_| true);
        let mut rng = Rng::new(7, &[]);
        let (got, epochs, sub) = draw(&pieces, 250, &mut rng);
        let tokens: u64 = got.iter().map(|p| u64::from(p.len)).sum();
        assert_eq!(epochs, 2);
        assert!(sub);
        assert_eq!(tokens, 250);
        let (got, epochs, sub) = draw(&pieces, 35, &mut Rng::new(7, &[]));
        assert_eq!((epochs, sub), (0, true));
        let tokens: u64 = got.iter().map(|p| u64::from(p.len)).sum();
        assert_eq!(tokens, 35);
        assert_eq!(
            got.iter().map(|p| p.len).collect::<Vec<_>>(),
            [10, 10, 10, 5]
        );
    }

    #[test]
    fn held_out_documents_depend_on_their_keys_only() {
        let keys: Vec<u64> = (0..2000)
            .map(|i| doc_key("web", &format!("doc-{i}")))
            .collect();
        let split = EvalSplit {
            fraction: 0.1,
            max_docs: None,
        };
        let held = held_out(&keys, Some(&split));
        let n = held.iter().filter(|h| **h).count();
        assert!((150..=250).contains(&n), "{n} of 2000 held out at 10%");
        // Another order of the same documents holds out the same ones.
        let mut order: Vec<usize> = (0..keys.len()).collect();
        Rng::new(3, &[]).shuffle(&mut order);
        let shuffled: Vec<u64> = order.iter().map(|&i| keys[i]).collect();
        let again = held_out(&shuffled, Some(&split));
        for (j, &i) in order.iter().enumerate() {
            assert_eq!(again[j], held[i]);
        }
        // A cap keeps the smallest keys, a subset of the uncapped choice.
        let capped = held_out(
            &keys,
            Some(&EvalSplit {
                fraction: 0.1,
                max_docs: Some(20),
            }),
        );
        assert_eq!(capped.iter().filter(|h| **h).count(), 20);
        assert!(capped.iter().zip(&held).all(|(c, h)| !c || *h));
        assert!(held_out(&keys, None).iter().all(|h| !h));
        // The key is of the source and the id together.
        assert_ne!(doc_key("web", "a"), doc_key("code", "a"));
        assert_ne!(doc_key("we", "ba"), doc_key("web", "a"));
    }

    #[test]
    fn shares_sum_to_budget() {
        assert_eq!(shares(100, &[1.0, 1.0, 1.0]), [34, 33, 33]);
        assert_eq!(shares(10, &[0.0, 2.0, 1.0]), [0, 7, 3]);
        let s = shares(1_048_576, &[62.0, 16.0, 9.0, 8.0, 5.0]);
        assert_eq!(s.iter().sum::<u64>(), 1_048_576);
    }
}
