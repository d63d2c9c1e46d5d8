//! The blocked attention of [`super`] as a host kernel for the CPU backend.
//!
//! The tensor version gathers each group's queries, keys and values and
//! materialises its scores several times (scores, probabilities, their
//! transposes for the backward products, `dP`, `dS`), each a fresh
//! allocation. Here a block's queries and keys are consecutive tokens, so
//! they are read in place as views of one buffer per head; the scores live
//! in one buffer reused from block to block: one product for the scores,
//! the softmax in place over each query's span of visible keys, one product
//! straight into the output rows; the backward likewise, accumulating the
//! key and value gradients in place, with transposed operands passed as
//! strided views instead of copies. Heads are independent, so they run in
//! parallel, each with its own accumulators (no locks, and the result does
//! not depend on the number of threads).
//!
//! Same arithmetic as the tensor version (the tests hold both to the same
//! f64 reference): scores scaled by `head_dim^-1/2`, softmax from the row
//! maximum, output divided by the row sum, log-sum-exp kept per query.

use std::ops::Range;

use crate::product_cpu::{Threads, product};
use crate::rowwise;
use ndarray::{Array2, ArrayView2, ArrayView3, ArrayViewMut2, Axis, s};
use rayon::prelude::*;

use super::{AttentionPlan, Group};

/// `[tokens, heads, width]` (any strides) to one `[tokens, width]` buffer
/// per head: rows are copied whole where they are contiguous, so a strided
/// view of the fused projection costs no more than a contiguous one.
fn split_heads(x: ArrayView3<'_, f32>) -> Vec<Vec<f32>> {
    let (tokens, heads, width) = x.dim();
    (0..heads)
        .map(|h| {
            let mut out = Vec::with_capacity(tokens * width);
            for row in x.index_axis(Axis(1), h).rows() {
                match row.as_slice() {
                    Some(values) => out.extend_from_slice(values),
                    None => out.extend(row.iter()),
                }
            }
            out
        })
        .collect()
}

/// One `[tokens, width]` buffer per head back to `[tokens, heads, width]`.
fn join_heads(parts: &[Vec<f32>], width: usize) -> Vec<f32> {
    let heads = parts.len();
    let tokens = parts.first().map_or(0, |p| p.len() / width.max(1));
    let mut out = vec![0f32; tokens * heads * width];
    for (h, part) in parts.iter().enumerate() {
        for t in 0..tokens {
            let at = (t * heads + h) * width;
            out[at..at + width].copy_from_slice(&part[t * width..(t + 1) * width]);
        }
    }
    out
}

/// Rows `r` of a `[tokens, hd]` buffer.
fn rows<'a>(buf: &'a [f32], r: &Range<usize>, hd: usize) -> ArrayView2<'a, f32> {
    ArrayView2::from_shape((r.len(), hd), &buf[r.start * hd..r.end * hd])
        .expect("a range of rows of hd values")
}

/// Rows `r` of a `[tokens, hd]` buffer, to write.
fn rows_mut<'a>(buf: &'a mut [f32], r: &Range<usize>, hd: usize) -> ArrayViewMut2<'a, f32> {
    ArrayViewMut2::from_shape((r.len(), hd), &mut buf[r.start * hd..r.end * hd])
        .expect("a range of rows of hd values")
}

/// Block `b`'s real queries and keys as token ranges.
fn tokens(g: &Group, b: usize) -> (Range<usize>, Range<usize>) {
    let (nq, nk) = g.real[b];
    let q0 = g.q_index[b * g.q_len] as usize;
    let k0 = g.k_index[b * g.k_len] as usize;
    (q0..q0 + nq as usize, k0..k0 + nk as usize)
}

/// The key slots query `i` of block `block` sees (empty for padding).
fn span(g: &Group, block: usize, i: usize) -> std::ops::Range<usize> {
    let (from, to) = g.q_span[block * g.q_len + i];
    from as usize..to as usize
}

/// Output `[queries, heads, hd]` and log-sum-exp `[queries, heads]` of
/// `q`, `k`, `v` (`[tokens, heads, hd]` each).
pub(crate) fn forward(
    plan: &AttentionPlan,
    q: ArrayView3<'_, f32>,
    k: ArrayView3<'_, f32>,
    v: ArrayView3<'_, f32>,
) -> (Vec<f32>, Vec<f32>) {
    let (_, heads, hd) = q.dim();
    let (qs, ks, vs) = (split_heads(q), split_heads(k), split_heads(v));
    let scale = (hd as f32).powf(-0.5);
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let mut out = vec![0f32; plan.queries * hd];
            let mut lse = vec![0f32; plan.queries];
            for g in &plan.groups {
                let mut scores = Array2::<f32>::zeros((g.q_len, g.k_len));
                let mut row_sum = vec![0f32; g.q_len];
                for b in 0..g.count {
                    let (qt, kt) = tokens(g, b);
                    let mut s = scores.slice_mut(s![..qt.len(), ..kt.len()]);
                    let keys = rows(&ks[h], &kt, hd);
                    product(
                        scale,
                        rows(&qs[h], &qt, hd),
                        keys.t(),
                        0.0,
                        s.view_mut(),
                        Threads::Serial,
                    );
                    // Softmax over each query's span, from the span's
                    // maximum; keys outside it get probability 0.
                    for (i, mut row) in s.rows_mut().into_iter().enumerate() {
                        let seen = span(g, b, i);
                        let Some(row) = row.as_slice_mut() else {
                            continue;
                        };
                        let m = rowwise::max(&row[seen.clone()]);
                        row_sum[i] = rowwise::exp_shifted_sum(&mut row[seen.clone()], m);
                        row[..seen.start].fill(0.0);
                        row[seen.end..].fill(0.0);
                        lse[qt.start + i] = m + row_sum[i].ln();
                    }
                    let mut o = rows_mut(&mut out, &qt, hd);
                    product(
                        1.0,
                        s.view(),
                        rows(&vs[h], &kt, hd),
                        0.0,
                        o.view_mut(),
                        Threads::Serial,
                    );
                    for (mut row, sum) in o.rows_mut().into_iter().zip(&row_sum) {
                        row.iter_mut().for_each(|x| *x /= sum);
                    }
                }
            }
            (out, lse)
        })
        .collect();
    let (outs, lses): (Vec<Vec<f32>>, Vec<Vec<f32>>) = per_head.into_iter().unzip();
    (join_heads(&outs, hd), join_heads(&lses, 1))
}

/// Gradients of q, k, v, each `[tokens, heads, hd]`, from the forward's
/// inputs, output and log-sum-exp (`[queries, heads]`) and the output's
/// gradient.
pub(crate) fn backward(
    plan: &AttentionPlan,
    [q, k, v, out, grad]: [ArrayView3<'_, f32>; 5],
    lse: ArrayView2<'_, f32>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (_, heads, hd) = q.dim();
    let (qs, ks, vs) = (split_heads(q), split_heads(k), split_heads(v));
    let (outs, grads) = (split_heads(out), split_heads(grad));
    let lses = split_heads(lse.insert_axis(Axis(2)));
    let scale = (hd as f32).powf(-0.5);
    let per_head: Vec<[Vec<f32>; 3]> = (0..heads)
        .into_par_iter()
        .map(|h| {
            // D_i = dO_i · O_i.
            let delta: Vec<f32> = grads[h]
                .chunks(hd)
                .zip(outs[h].chunks(hd))
                .map(|(g, o)| g.iter().zip(o).map(|(a, b)| a * b).sum())
                .collect();
            let mut dq = vec![0f32; plan.queries * hd];
            let mut dk = vec![0f32; plan.keys * hd];
            let mut dv = vec![0f32; plan.keys * hd];
            for g in &plan.groups {
                let mut scores = Array2::<f32>::zeros((g.q_len, g.k_len));
                let mut dscores = Array2::<f32>::zeros((g.q_len, g.k_len));
                for b in 0..g.count {
                    let (qt, kt) = tokens(g, b);
                    let (queries, keys) = (rows(&qs[h], &qt, hd), rows(&ks[h], &kt, hd));
                    let d_out = rows(&grads[h], &qt, hd);
                    let mut p = scores.slice_mut(s![..qt.len(), ..kt.len()]);
                    product(scale, queries, keys.t(), 0.0, p.view_mut(), Threads::Serial);
                    // P = exp(S − lse) over each query's span, 0 elsewhere.
                    for (i, mut row) in p.rows_mut().into_iter().enumerate() {
                        let seen = span(g, b, i);
                        let Some(row) = row.as_slice_mut() else {
                            continue;
                        };
                        rowwise::exp_shifted_sum(&mut row[seen.clone()], lses[h][qt.start + i]);
                        row[..seen.start].fill(0.0);
                        row[seen.end..].fill(0.0);
                    }
                    let p = p.view();
                    product(
                        1.0,
                        p.t(),
                        d_out,
                        1.0,
                        rows_mut(&mut dv, &kt, hd),
                        Threads::Serial,
                    );
                    let mut ds = dscores.slice_mut(s![..qt.len(), ..kt.len()]);
                    product(
                        1.0,
                        d_out,
                        rows(&vs[h], &kt, hd).t(),
                        0.0,
                        ds.view_mut(),
                        Threads::Serial,
                    );
                    // dS = P ∘ (dP − D), in place in dP.
                    for ((mut ds_row, p_row), d) in ds
                        .rows_mut()
                        .into_iter()
                        .zip(p.rows())
                        .zip(&delta[qt.clone()])
                    {
                        ds_row
                            .iter_mut()
                            .zip(p_row)
                            .for_each(|(x, p)| *x = p * (*x - d));
                    }
                    let ds = ds.view();
                    product(
                        scale,
                        ds,
                        keys,
                        0.0,
                        rows_mut(&mut dq, &qt, hd),
                        Threads::Serial,
                    );
                    product(
                        scale,
                        ds.t(),
                        queries,
                        1.0,
                        rows_mut(&mut dk, &kt, hd),
                        Threads::Serial,
                    );
                }
            }
            [dq, dk, dv]
        })
        .collect();
    let mut parts: [Vec<Vec<f32>>; 3] = Default::default();
    for grads in per_head {
        for (part, grad) in parts.iter_mut().zip(grads) {
            part.push(grad);
        }
    }
    (
        join_heads(&parts[0], hd),
        join_heads(&parts[1], hd),
        join_heads(&parts[2], hd),
    )
}
