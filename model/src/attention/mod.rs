//! Attention that costs what the recipe needs: blocked, per document, and
//! with memory that does not grow with the square of the context.
//!
//! A query only ever sees a contiguous range of keys: its document, cut to
//! the sliding window in local layers and to the past in decoders. So the
//! queries of a row are cut into blocks, and each block is scored against
//! the key range its queries can see, nothing else:
//!
//! ```text
//! local layer, window ±w, block = w       global layer, packed row
//! keys  ·····[==|==|==]·············      keys  [doc a ][doc b   ][c]
//! block       └─ q ─┘ (3w keys)           block    └─ q ─┘ → keys of a and b
//! ```
//!
//! Time and memory then grow with seq × window in local layers and with
//! Σ doc² (not seq²) in global layers. Blocks of equal shape are batched into
//! groups, and groups are sized so that one group's scores stay under
//! [`SCORE_BUDGET`] values: that bounds the memory of any document length.
//!
//! The forward keeps only the output and the log-sum-exp of each query's
//! scores; the backward recomputes each group's scores from them (the
//! FlashAttention recipe), so training stores O(seq) per layer instead of
//! the probabilities. Inside a group, visibility (same document, causal,
//! window, padding) is an additive bias computed on the device from each
//! slot's document id and time; groups whose keys are all visible to all
//! their queries (a long document in a bidirectional global layer) skip it.
//!
//! [`ModelBackend::block_attention`] is the entry point: plain backends run
//! [`forward`]; `Autodiff` records one node whose backward is [`backward`];
//! the CPU backend runs the same blocks as a host kernel ([`cpu`]).
//!
//! [`ModelBackend::block_attention`]: super::backend::ModelBackend::block_attention
//!
//! # Layout
//! Queries, keys and values are token-major, `[tokens, heads, head_dim]`,
//! as the fused `Wqkv` projection produces them, so no transpose is needed
//! before or after.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

use super::packing::{AttentionKind, MASKED, PackedLayout};

pub(super) mod cpu;

/// The most score values (`blocks × heads × block × keys`) one group
/// materialises at a time: 16M f32 values, 64 MB per tensor of the group.
pub const SCORE_BUDGET: usize = 1 << 24;

/// Queries per block in global layers (local layers use the half window).
pub const GLOBAL_BLOCK: usize = 256;

/// Key ranges of masked blocks are rounded up to a multiple of this, so
/// that blocks of similar reach share a group.
const KEY_ALIGN: usize = 32;

/// Document id of padding query slots and padding key slots: different
/// from each other and from every real document, so nothing sees them.
const PAD_QUERY_DOC: f32 = -2.0;
const PAD_KEY_DOC: f32 = -1.0;

/// Which keys a query sees, besides its own document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visibility {
    /// Only keys at or before the query.
    pub causal: bool,
    /// Only keys within this many tokens (`|i − j| ≤ w`, causally
    /// `i − w ≤ j ≤ i`).
    pub half_window: Option<usize>,
}

impl Visibility {
    /// The visibility of an attention kind, optionally windowed.
    pub fn new(kind: AttentionKind, half_window: Option<usize>) -> Self {
        Self {
            causal: kind == AttentionKind::Causal,
            half_window,
        }
    }
}

/// Blocks of one shape: `count` blocks of `q_len` query slots, each scored
/// against `k_len` key slots. Slots index the query and key tensors; padding
/// slots point at index 0 and carry a padding document id.
#[derive(Debug, Clone, PartialEq)]
struct Group {
    count: usize,
    q_len: usize,
    k_len: usize,
    q_index: Vec<i64>,
    k_index: Vec<i64>,
    q_doc: Vec<f32>,
    q_time: Vec<f32>,
    k_doc: Vec<f32>,
    k_time: Vec<f32>,
    /// Some key of some block is hidden from some query of it.
    masked: bool,
    /// For each query slot, the key slots it sees, `start..end`: always one
    /// range, because a block's keys are consecutive tokens of one sequence
    /// and a query sees a contiguous part of them (its document, cut to the
    /// window and the past). Empty for padding query slots.
    q_span: Vec<(u32, u32)>,
    /// Per block, its real (not padding) query and key slots: the first
    /// ones, consecutive tokens from the block's first `q_index` and
    /// `k_index`.
    real: Vec<(u32, u32)>,
}

/// Which queries are scored against which keys, in groups of equal-shape
/// blocks; built on the host once per forward and shared by every layer of
/// one kind (global or local).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionPlan {
    queries: usize,
    keys: usize,
    visibility: Visibility,
    groups: Vec<Group>,
    /// For each query, its slot in the groups' query slots laid end to end.
    query_slot: Vec<i64>,
}

/// Block and group sizes (tests shrink them to exercise many blocks).
#[derive(Debug, Clone, Copy)]
struct Blocking {
    global_block: usize,
    score_budget: usize,
}

impl Default for Blocking {
    fn default() -> Self {
        Self {
            global_block: GLOBAL_BLOCK,
            score_budget: SCORE_BUDGET,
        }
    }
}

/// One contiguous run of tokens whose documents are known: a packed row,
/// or a sequence being decoded.
struct Sequence<'a> {
    /// Index of the sequence's first key in the key tensor.
    key_offset: usize,
    /// Index of the first query in the query tensor.
    query_offset: usize,
    /// Time (position in the sequence) of the first query; keys have times
    /// `0..doc_index.len()`.
    first_query_time: usize,
    /// Document index of every key time (documents are contiguous).
    doc_index: &'a [u32],
    /// Added to `doc_index` so that ids are unique across sequences.
    doc_base: u32,
}

/// A block before grouping: its query slots and the key slots they see.
struct Block {
    q_index: Vec<i64>,
    q_doc: Vec<f32>,
    q_time: Vec<f32>,
    k_index: Vec<i64>,
    k_doc: Vec<f32>,
    k_time: Vec<f32>,
    q_span: Vec<(u32, u32)>,
}

impl AttentionPlan {
    /// The plan for the rows of a packed batch: every token is a query and
    /// a key; documents come from `layout`.
    pub fn packed(layout: &PackedLayout, visibility: Visibility, heads: usize) -> Self {
        Self::packed_in(layout, visibility, heads, Blocking::default())
    }

    fn packed_in(
        layout: &PackedLayout,
        visibility: Visibility,
        heads: usize,
        blocking: Blocking,
    ) -> Self {
        let s = layout.seq_len;
        let mut doc_base = 0u32;
        let sequences: Vec<Sequence<'_>> = (0..layout.batch)
            .map(|r| {
                let doc_index = &layout.doc_index[r * s..(r + 1) * s];
                let sequence = Sequence {
                    key_offset: r * s,
                    query_offset: r * s,
                    first_query_time: 0,
                    doc_index,
                    doc_base,
                };
                doc_base += doc_index.last().map_or(0, |d| d + 1);
                sequence
            })
            .collect();
        Self::build(
            &sequences,
            layout.batch * s,
            layout.batch * s,
            visibility,
            heads,
            blocking,
        )
    }

    /// The plan for decoding: queries are the `new_tokens` tokens after
    /// `cached` ones of one document; keys are all `cached + new_tokens`.
    pub fn decode(
        cached: usize,
        new_tokens: usize,
        half_window: Option<usize>,
        heads: usize,
    ) -> Self {
        Self::decode_in(cached, new_tokens, half_window, heads, Blocking::default())
    }

    fn decode_in(
        cached: usize,
        new_tokens: usize,
        half_window: Option<usize>,
        heads: usize,
        blocking: Blocking,
    ) -> Self {
        let doc_index = vec![0u32; cached + new_tokens];
        let sequence = Sequence {
            key_offset: 0,
            query_offset: 0,
            first_query_time: cached,
            doc_index: &doc_index,
            doc_base: 0,
        };
        let visibility = Visibility {
            causal: true,
            half_window,
        };
        Self::build(
            &[sequence],
            new_tokens,
            cached + new_tokens,
            visibility,
            heads,
            blocking,
        )
    }

    fn build(
        sequences: &[Sequence<'_>],
        queries: usize,
        keys: usize,
        visibility: Visibility,
        heads: usize,
        blocking: Blocking,
    ) -> Self {
        let block = visibility
            .half_window
            .map_or(blocking.global_block, |w| w.clamp(8, blocking.global_block));
        // Blocks bucketed by their padded key length (BTreeMap: a fixed
        // order, so the plan is the same on every run).
        let mut buckets: BTreeMap<(usize, bool), Vec<Block>> = BTreeMap::new();
        let doc_id = |seq: &Sequence<'_>, t: usize| (seq.doc_base + seq.doc_index[t]) as f32;
        for seq in sequences {
            let len = seq.doc_index.len();
            // First and one-past-last time of each time's document.
            let mut doc_start = vec![0usize; len];
            let mut doc_end = vec![len; len];
            for t in 1..len {
                doc_start[t] = if seq.doc_index[t] == seq.doc_index[t - 1] {
                    doc_start[t - 1]
                } else {
                    t
                };
            }
            for t in (0..len.saturating_sub(1)).rev() {
                doc_end[t] = if seq.doc_index[t] == seq.doc_index[t + 1] {
                    doc_end[t + 1]
                } else {
                    t + 1
                };
            }
            let mut q0 = seq.first_query_time;
            while q0 < len {
                let q1 = (q0 + block).min(len);
                let mut lo = doc_start[q0];
                let mut hi = if visibility.causal {
                    q1
                } else {
                    doc_end[q1 - 1]
                };
                if let Some(w) = visibility.half_window {
                    lo = lo.max(q0.saturating_sub(w));
                    if !visibility.causal {
                        hi = hi.min(q1 + w);
                    }
                }
                let one_doc = seq.doc_index[lo] == seq.doc_index[hi - 1];
                let window_cuts = visibility
                    .half_window
                    .is_some_and(|w| q1 - 1 - lo > w || hi - 1 - q0 > w);
                let masked = visibility.causal || window_cuts || !one_doc || q1 - q0 < block;
                let k_len = if masked {
                    (hi - lo).div_ceil(KEY_ALIGN) * KEY_ALIGN
                } else {
                    hi - lo
                };
                buckets.entry((k_len, masked)).or_default().push(Block {
                    q_index: (q0..q1)
                        .map(|t| (seq.query_offset + t - seq.first_query_time) as i64)
                        .collect(),
                    q_doc: (q0..q1).map(|t| doc_id(seq, t)).collect(),
                    q_time: (q0..q1).map(|t| t as f32).collect(),
                    k_index: (lo..hi).map(|t| (seq.key_offset + t) as i64).collect(),
                    k_doc: (lo..hi).map(|t| doc_id(seq, t)).collect(),
                    k_time: (lo..hi).map(|t| t as f32).collect(),
                    q_span: (q0..q1)
                        .map(|t| {
                            let (mut from, mut to) = (doc_start[t].max(lo), doc_end[t].min(hi));
                            if visibility.causal {
                                to = to.min(t + 1);
                            }
                            if let Some(w) = visibility.half_window {
                                from = from.max(t.saturating_sub(w));
                                if !visibility.causal {
                                    to = to.min(t + w + 1);
                                }
                            }
                            ((from - lo) as u32, (to - lo) as u32)
                        })
                        .collect(),
                });
                q0 = q1;
            }
        }
        let mut groups = Vec::new();
        let mut query_slot = vec![0i64; queries];
        let mut next_slot = 0usize;
        for ((k_len, masked), blocks) in buckets {
            let per_block = heads.max(1) * block * k_len;
            let per_group = (blocking.score_budget / per_block.max(1)).max(1);
            for chunk in blocks.chunks(per_group) {
                let mut g = Group {
                    count: chunk.len(),
                    q_len: block,
                    k_len,
                    q_index: Vec::with_capacity(chunk.len() * block),
                    k_index: Vec::with_capacity(chunk.len() * k_len),
                    q_doc: Vec::with_capacity(chunk.len() * block),
                    q_time: Vec::with_capacity(chunk.len() * block),
                    k_doc: Vec::with_capacity(chunk.len() * k_len),
                    k_time: Vec::with_capacity(chunk.len() * k_len),
                    masked,
                    q_span: Vec::with_capacity(chunk.len() * block),
                    real: Vec::with_capacity(chunk.len()),
                };
                for b in chunk {
                    g.real
                        .push((b.q_index.len() as u32, b.k_index.len() as u32));
                    for (i, &q) in b.q_index.iter().enumerate() {
                        query_slot[q as usize] = (next_slot + i) as i64;
                    }
                    next_slot += block;
                    let pad = block - b.q_index.len();
                    g.q_index.extend(&b.q_index);
                    g.q_index.extend(std::iter::repeat_n(0, pad));
                    g.q_doc.extend(&b.q_doc);
                    g.q_doc.extend(std::iter::repeat_n(PAD_QUERY_DOC, pad));
                    g.q_time.extend(&b.q_time);
                    g.q_time.extend(std::iter::repeat_n(0.0, pad));
                    g.q_span.extend(&b.q_span);
                    g.q_span.extend(std::iter::repeat_n((0, 0), pad));
                    let pad = k_len - b.k_index.len();
                    g.k_index.extend(&b.k_index);
                    g.k_doc.extend(&b.k_doc);
                    g.k_time.extend(&b.k_time);
                    g.k_index.extend(std::iter::repeat_n(0, pad));
                    g.k_doc.extend(std::iter::repeat_n(PAD_KEY_DOC, pad));
                    g.k_time.extend(std::iter::repeat_n(0.0, pad));
                }
                groups.push(g);
            }
        }
        Self {
            queries,
            keys,
            visibility,
            groups,
            query_slot,
        }
    }

    /// Score values computed per head, all groups together (the work of a
    /// forward, in multiply-adds per head dimension).
    pub fn scored_pairs(&self) -> usize {
        self.groups
            .iter()
            .map(|g| g.count * g.q_len * g.k_len)
            .sum()
    }

    /// The largest number of score values of one group per head.
    pub fn largest_group(&self) -> usize {
        self.groups
            .iter()
            .map(|g| g.count * g.q_len * g.k_len)
            .max()
            .unwrap_or(0)
    }
}

// ------------------------------------------------------------ the kernels

/// A group's indices and visibility bias on the device.
struct DeviceGroup<B: Backend> {
    count: usize,
    q_len: usize,
    k_len: usize,
    q_index: Tensor<B, 1, Int>,
    k_index: Tensor<B, 1, Int>,
    /// `[count, 1, q_len, k_len]`: 0 where visible, [`MASKED`] elsewhere.
    bias: Option<Tensor<B, 4>>,
}

fn ints<B: Backend>(values: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

fn floats<B: Backend, const D: usize>(
    values: &[f32],
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

impl<B: Backend> DeviceGroup<B> {
    fn new(g: &Group, visibility: Visibility, device: &B::Device) -> Self {
        let (n, ql, kl) = (g.count, g.q_len, g.k_len);
        let bias = g.masked.then(|| {
            let q_doc = floats::<B, 4>(&g.q_doc, [n, 1, ql, 1], device);
            let k_doc = floats::<B, 4>(&g.k_doc, [n, 1, 1, kl], device);
            let q_time = floats::<B, 4>(&g.q_time, [n, 1, ql, 1], device);
            let k_time = floats::<B, 4>(&g.k_time, [n, 1, 1, kl], device);
            // Every term is a whole number, zero exactly when its rule lets
            // the key through; any positive sum hides the key.
            let mut hidden = (q_doc - k_doc).abs();
            let ahead = q_time - k_time; // query time minus key time
            if visibility.causal {
                hidden = hidden + ahead.clone().neg().clamp_min(0.0);
            }
            if let Some(w) = visibility.half_window {
                let reach = if visibility.causal {
                    ahead
                } else {
                    ahead.abs()
                };
                hidden = hidden + reach.sub_scalar(w as f64).clamp_min(0.0);
            }
            hidden.clamp_max(1.0).mul_scalar(f64::from(MASKED))
        });
        Self {
            count: n,
            q_len: ql,
            k_len: kl,
            q_index: ints(&g.q_index, device),
            k_index: ints(&g.k_index, device),
            bias,
        }
    }

    /// Rows of `x` (`[tokens, heads, head_dim]`) at `index`, as
    /// `[count, heads, len, head_dim]`.
    fn gather(&self, x: &Tensor<B, 3>, index: &Tensor<B, 1, Int>, len: usize) -> Tensor<B, 4> {
        let [_, h, hd] = x.dims();
        x.clone()
            .select(0, index.clone())
            .reshape([self.count, len, h, hd])
            .swap_dims(1, 2)
    }

    /// `[count, heads, q_len, 1]` per-query values of `x` (`[tokens, heads]`).
    fn gather_rows(&self, x: &Tensor<B, 2>) -> Tensor<B, 4> {
        let [_, h] = x.dims();
        x.clone()
            .select(0, self.q_index.clone())
            .reshape([self.count, self.q_len, h])
            .swap_dims(1, 2)
            .reshape([self.count, h, self.q_len, 1])
    }

    /// Scaled scores plus the visibility bias, `[count, heads, q_len, k_len]`.
    fn scores(&self, q_scaled: Tensor<B, 4>, k: Tensor<B, 4>) -> Tensor<B, 4> {
        let s = q_scaled.matmul(k.swap_dims(2, 3));
        match &self.bias {
            Some(bias) => s + bias.clone(),
            None => s,
        }
    }
}

/// `[count, heads, len, head_dim]` back to slot-major `[count·len, heads, head_dim]`.
fn slots<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [n, h, len, hd] = x.dims();
    x.swap_dims(1, 2).reshape([n * len, h, hd])
}

/// Attention output `[queries, heads, head_dim]` and the log-sum-exp of
/// every query's visible scores `[queries, heads]`.
pub fn forward<B: Backend>(
    plan: &AttentionPlan,
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
) -> (Tensor<B, 3>, Tensor<B, 2>) {
    let device = q.device();
    let [_, h, hd] = q.dims();
    let scale = (hd as f64).powf(-0.5);
    let mut outs = Vec::with_capacity(plan.groups.len());
    let mut lses = Vec::with_capacity(plan.groups.len());
    for group in &plan.groups {
        let g = DeviceGroup::<B>::new(group, plan.visibility, &device);
        let qg = g.gather(&q, &g.q_index, g.q_len).mul_scalar(scale);
        let kg = g.gather(&k, &g.k_index, g.k_len);
        let vg = g.gather(&v, &g.k_index, g.k_len);
        let s = g.scores(qg, kg);
        let max = s.clone().max_dim(3);
        let p = (s - max.clone()).exp();
        let sum = p.clone().sum_dim(3);
        outs.push(slots(p.matmul(vg).div(sum.clone())));
        let lse = max + sum.log();
        lses.push(
            lse.reshape([g.count, h, g.q_len])
                .swap_dims(1, 2)
                .reshape([g.count * g.q_len, h]),
        );
    }
    let order = ints::<B>(&plan.query_slot, &device);
    (
        Tensor::cat(outs, 0).select(0, order.clone()),
        Tensor::cat(lses, 0).select(0, order),
    )
}

/// Gradients of the queries, keys and values from the gradient of the
/// output, recomputing each group's scores (nothing of size scores was
/// kept by [`forward`]).
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    plan: &AttentionPlan,
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    out: Tensor<B, 3>,
    lse: Tensor<B, 2>,
    grad: Tensor<B, 3>,
) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
    let device = q.device();
    let [_, h, hd] = q.dims();
    let scale = (hd as f64).powf(-0.5);
    // D_i = Σ_j P_ij dP_ij = dO_i · O_i.
    let [nq, _, _] = out.dims();
    let delta = (grad.clone() * out).sum_dim(2).reshape([nq, h]);
    let mut dk = Tensor::<B, 3>::zeros(k.dims(), &device);
    let mut dv = Tensor::<B, 3>::zeros(v.dims(), &device);
    let mut dqs = Vec::with_capacity(plan.groups.len());
    for group in &plan.groups {
        let g = DeviceGroup::<B>::new(group, plan.visibility, &device);
        let qg = g.gather(&q, &g.q_index, g.q_len).mul_scalar(scale);
        let kg = g.gather(&k, &g.k_index, g.k_len);
        let vg = g.gather(&v, &g.k_index, g.k_len);
        let dog = g.gather(&grad, &g.q_index, g.q_len);
        let p = (g.scores(qg.clone(), kg.clone()) - g.gather_rows(&lse)).exp();
        let dvg = p.clone().swap_dims(2, 3).matmul(dog.clone());
        let dp = dog.matmul(vg.swap_dims(2, 3));
        let ds = p * (dp - g.gather_rows(&delta));
        dqs.push(slots(ds.clone().matmul(kg).mul_scalar(scale)));
        let dkg = ds.swap_dims(2, 3).matmul(qg);
        dk = dk.select_assign(0, g.k_index.clone(), slots(dkg), IndexingUpdateOp::Add);
        dv = dv.select_assign(0, g.k_index.clone(), slots(dvg), IndexingUpdateOp::Add);
    }
    let order = ints::<B>(&plan.query_slot, &device);
    (Tensor::cat(dqs, 0).select(0, order), dk, dv)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::ModelBackend;
    use crate::packing::PackedLayout;
    use crate::{CpuAutodiff, CpuBackend};
    use burn::tensor::activation::softmax;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    type B = CpuBackend;
    type A = CpuAutodiff;

    /// The masked attention the model computed before blocks (one
    /// `[seq, seq]` mask per row): the reference the blocked path must equal.
    fn reference<Bk: Backend>(
        layout: &PackedLayout,
        kind: AttentionKind,
        half_window: Option<usize>,
        q: Tensor<Bk, 3>,
        k: Tensor<Bk, 3>,
        v: Tensor<Bk, 3>,
    ) -> Tensor<Bk, 3> {
        let (b, s) = (layout.batch, layout.seq_len);
        let [_, h, hd] = q.dims();
        let device = q.device();
        let mask = Tensor::<Bk, 4>::from_data(
            TensorData::new(layout.mask(kind, half_window), [b, 1, s, s]),
            &device,
        );
        let heads_first = |x: Tensor<Bk, 3>| x.reshape([b, s, h, hd]).swap_dims(1, 2);
        let scores = heads_first(q)
            .matmul(heads_first(k).swap_dims(2, 3))
            .mul_scalar((hd as f64).powf(-0.5))
            + mask;
        softmax(scores, 3)
            .matmul(heads_first(v))
            .swap_dims(1, 2)
            .reshape([b * s, h, hd])
    }

    fn random<Bk: Backend>(rng: &mut ChaCha8Rng, shape: [usize; 3]) -> Tensor<Bk, 3> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn host<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().expect("f32")
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
    }

    /// Rows of several documents, a row of one, lengths that are no
    /// multiple of any block.
    fn layout() -> PackedLayout {
        PackedLayout::new(3, 77, Some(&[vec![30, 5, 42], vec![77], vec![1, 60, 16]]))
            .expect("layout")
    }

    const SMALL: Blocking = Blocking {
        global_block: 16,
        score_budget: 2 * 16 * 48,
    };

    /// Output and gradients of q, k, v (for `dL/dout = r`) of masked
    /// attention, in f64 loops on the host: an independent reference for
    /// gradients (Burn's CPU softmax backward is itself only accurate to
    /// about 1e-4).
    #[allow(clippy::type_complexity)]
    fn host_reference(
        layout: &PackedLayout,
        kind: AttentionKind,
        half_window: Option<usize>,
        (h, hd): (usize, usize),
        [q, k, v, r]: [&[f32]; 4],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (b, s) = (layout.batch, layout.seq_len);
        let mask = layout.mask(kind, half_window);
        let scale = (hd as f64).powf(-0.5);
        let at = |x: &[f32], t: usize, head: usize, d: usize| f64::from(x[(t * h + head) * hd + d]);
        let n = b * s * h * hd;
        let (mut out, mut dq, mut dk, mut dv) =
            (vec![0f64; n], vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        for row in 0..b {
            for head in 0..h {
                for i in 0..s {
                    let ti = row * s + i;
                    let visible: Vec<usize> = (0..s)
                        .filter(|&j| mask[(row * s + i) * s + j] == 0.0)
                        .collect();
                    let scores: Vec<f64> = visible
                        .iter()
                        .map(|&j| {
                            (0..hd)
                                .map(|d| at(q, ti, head, d) * at(k, row * s + j, head, d))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let p: Vec<f64> = e.iter().map(|x| x / z).collect();
                    let dp: Vec<f64> = visible
                        .iter()
                        .map(|&j| {
                            (0..hd)
                                .map(|d| at(r, ti, head, d) * at(v, row * s + j, head, d))
                                .sum()
                        })
                        .collect();
                    let delta: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for (idx, &j) in visible.iter().enumerate() {
                        let tj = row * s + j;
                        let ds = p[idx] * (dp[idx] - delta);
                        for d in 0..hd {
                            out[(ti * h + head) * hd + d] += p[idx] * at(v, tj, head, d);
                            dv[(tj * h + head) * hd + d] += p[idx] * at(r, ti, head, d);
                            dq[(ti * h + head) * hd + d] += ds * at(k, tj, head, d) * scale;
                            dk[(tj * h + head) * hd + d] += ds * at(q, ti, head, d) * scale;
                        }
                    }
                }
            }
        }
        let f = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect();
        (f(out), f(dq), f(dk), f(dv))
    }

    /// Forward and the gradients of q, k, v (through a random linear
    /// read-out) of the blocked path equal masked attention's.
    fn check(kind: AttentionKind, half_window: Option<usize>, blocking: Blocking) {
        let layout = layout();
        let (n, h, hd) = (layout.batch * layout.seq_len, 2, 8);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (q, k, v, r) = (
            random::<B>(&mut rng, [n, h, hd]),
            random::<B>(&mut rng, [n, h, hd]),
            random::<B>(&mut rng, [n, h, hd]),
            random::<B>(&mut rng, [n, h, hd]),
        );
        let plan = Arc::new(AttentionPlan::packed_in(
            &layout,
            Visibility::new(kind, half_window),
            h,
            blocking,
        ));
        let leaf = |t: &Tensor<B, 3>| Tensor::<A, 3>::from_inner(t.clone()).require_grad();
        let (qa, ka, va) = (leaf(&q), leaf(&k), leaf(&v));
        let out = A::block_attention(&plan, qa.clone(), ka.clone(), va.clone());
        let grads = (out.clone() * Tensor::from_inner(r.clone()))
            .sum()
            .backward();
        let grad = |t: &Tensor<A, 3>| host(t.grad(&grads).expect("grad"));
        let (hq, hk, hv, hr) = (
            host(q.clone()),
            host(k.clone()),
            host(v.clone()),
            host(r.clone()),
        );
        let (out_ref, dq_ref, dk_ref, dv_ref) =
            host_reference(&layout, kind, half_window, (h, hd), [&hq, &hk, &hv, &hr]);
        let what = format!("{kind:?} window {half_window:?}");
        let out = host(out.inner());
        assert!(
            max_diff(&out, &out_ref) < 1e-5,
            "{what}: output {}",
            max_diff(&out, &out_ref)
        );
        for (name, a, b) in [
            ("q", grad(&qa), &dq_ref),
            ("k", grad(&ka), &dk_ref),
            ("v", grad(&va), &dv_ref),
        ] {
            let d = max_diff(&a, b);
            assert!(d < 1e-5, "{what}: grad {name} differs by {d}");
        }
        // The plain (inference) backend computes the same output, and so
        // did the model's masked path.
        let plain = host(B::block_attention(&plan, q.clone(), k.clone(), v.clone()));
        assert!(max_diff(&plain, &out_ref) < 1e-5, "{what}: plain backend");
        // The tensor version (other backends) agrees too.
        let (out_t, lse_t) = forward::<B>(&plan, q.clone(), k.clone(), v.clone());
        assert!(
            max_diff(&host(out_t.clone()), &out_ref) < 1e-5,
            "{what}: tensor forward"
        );
        let r = Tensor::<B, 3>::from_data(TensorData::new(hr, [n, h, hd]), &Default::default());
        let (tq, tk, tv) = backward::<B>(&plan, q.clone(), k.clone(), v.clone(), out_t, lse_t, r);
        for (name, a, b) in [("q", tq, &dq_ref), ("k", tk, &dk_ref), ("v", tv, &dv_ref)] {
            let d = max_diff(&host(a), b);
            assert!(d < 1e-5, "{what}: tensor grad {name} differs by {d}");
        }
        let masked = host(reference(&layout, kind, half_window, q, k, v));
        assert!(max_diff(&masked, &out_ref) < 1e-5, "{what}: masked path");
    }

    #[test]
    fn blocked_equals_masked_attention_for_every_mask() {
        for blocking in [Blocking::default(), SMALL] {
            for kind in [AttentionKind::Bidirectional, AttentionKind::Causal] {
                for window in [None, Some(4), Some(9), Some(64)] {
                    check(kind, window, blocking);
                }
            }
        }
    }

    #[test]
    fn small_blocks_split_into_many_groups_within_the_budget() {
        let plan = AttentionPlan::packed_in(
            &layout(),
            Visibility::new(AttentionKind::Bidirectional, None),
            2,
            SMALL,
        );
        assert!(plan.groups.len() > 5, "{} groups", plan.groups.len());
        for g in &plan.groups {
            assert!(
                g.count == 1 || 2 * g.count * g.q_len * g.k_len <= SMALL.score_budget,
                "group of {} blocks {}x{}",
                g.count,
                g.q_len,
                g.k_len
            );
        }
    }

    #[test]
    fn local_work_grows_with_seq_times_window() {
        let pairs = |s: usize| {
            let layout = PackedLayout::new(1, s, None).expect("layout");
            let vis = Visibility::new(AttentionKind::Bidirectional, Some(64));
            AttentionPlan::packed(&layout, vis, 4).scored_pairs()
        };
        // Each query sees up to 129 keys; each 64-query block scores at
        // most 64 + 2·64: linear in seq, never seq².
        for s in [1024, 4096, 8192] {
            let p = pairs(s);
            assert!(p >= s * 128 && p <= s * 192, "seq {s}: {p} pairs");
        }
    }

    #[test]
    fn global_work_is_per_document() {
        let docs = vec![vec![512; 16]];
        let layout = PackedLayout::new(1, 8192, Some(&docs)).expect("layout");
        let vis = Visibility::new(AttentionKind::Bidirectional, None);
        let plan = AttentionPlan::packed(&layout, vis, 4);
        // 16 documents of 512: 16 · 512², not 8192².
        assert_eq!(plan.scored_pairs(), 16 * 512 * 512);
        // One long document is scored in groups under the budget.
        let long = PackedLayout::new(1, 8192, None).expect("layout");
        let plan = AttentionPlan::packed(&long, vis, 4);
        assert_eq!(plan.scored_pairs(), 8192 * 8192);
        assert!(4 * plan.largest_group() <= SCORE_BUDGET);
    }

    #[test]
    fn decode_plan_equals_masked_attention_over_the_cache() {
        let (cached, new, h, hd) = (37, 11, 2, 8);
        let total = cached + new;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let q = random::<B>(&mut rng, [total, h, hd]);
        let k = random::<B>(&mut rng, [total, h, hd]);
        let v = random::<B>(&mut rng, [total, h, hd]);
        let layout = PackedLayout::new(1, total, None).expect("layout");
        for window in [None, Some(4)] {
            let full = host(reference(
                &layout,
                AttentionKind::Causal,
                window,
                q.clone(),
                k.clone(),
                v.clone(),
            ));
            let plan = Arc::new(AttentionPlan::decode_in(cached, new, window, h, SMALL));
            let out = host(B::block_attention(
                &plan,
                q.clone().narrow(0, cached, new),
                k.clone(),
                v.clone(),
            ));
            let tail = &full[cached * h * hd..];
            assert!(max_diff(&out, tail) < 1e-5, "window {window:?}");
        }
    }
}
