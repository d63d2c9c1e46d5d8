//! The blocked attention of [`super`] as a host kernel for the CPU backend.
//!
//! The tensor version materialises each group's scores several times
//! (scores, probabilities, their transposes for the backward products,
//! `dP`, `dS`), each a fresh allocation. Here every block is computed in
//! buffers reused from block to block: one product for the scores, the
//! softmax in place, one product for the output; the backward likewise,
//! with transposed operands passed as strided views instead of copies.
//! Heads are independent, so they run in parallel, each with its own
//! accumulators for the key and value gradients (no locks, and the result
//! does not depend on the number of threads).
//!
//! Same arithmetic as the tensor version (the tests hold both to the same
//! f64 reference): scores scaled by `head_dim^-1/2`, softmax from the row
//! maximum, output divided by the row sum, log-sum-exp kept per query.

use crate::product_cpu::{Threads, product};
use crate::rowwise;
use ndarray::{Array2, ArrayView2, ArrayView3, ArrayViewMut2, Axis};
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

/// Copies rows `index` of a `[tokens, hd]` buffer into `dst` (`[len, hd]`),
/// zeros where `keep` says no.
fn gather_rows(
    src: &[f32],
    hd: usize,
    index: &[i64],
    keep: impl Fn(usize) -> bool,
    dst: &mut Array2<f32>,
) {
    for (r, (&t, mut row)) in index.iter().zip(dst.rows_mut()).enumerate() {
        if keep(r) {
            let t = t as usize;
            row.iter_mut()
                .zip(&src[t * hd..(t + 1) * hd])
                .for_each(|(d, s)| *d = *s);
        } else {
            row.fill(0.0);
        }
    }
}

/// Scratch buffers of one block shape, reused from block to block.
struct Scratch {
    q: Array2<f32>,
    k: Array2<f32>,
    v: Array2<f32>,
    /// Output rows (forward) or the output gradient rows (backward).
    o: Array2<f32>,
    s: Array2<f32>,
}

impl Scratch {
    fn new(g: &Group, hd: usize) -> Self {
        Self {
            q: Array2::zeros((g.q_len, hd)),
            k: Array2::zeros((g.k_len, hd)),
            v: Array2::zeros((g.k_len, hd)),
            o: Array2::zeros((g.q_len, hd)),
            s: Array2::zeros((g.q_len, g.k_len)),
        }
    }
}

/// Scaled scores of the block into `s`, every pair: what a query does not
/// see lies outside its span and is never read.
fn scores(scale: f32, w: &mut Scratch) {
    product(
        scale,
        w.q.view(),
        w.k.t(),
        0.0,
        w.s.view_mut(),
        Threads::Serial,
    );
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
                let mut w = Scratch::new(g, hd);
                let mut row_sum = vec![0f32; g.q_len];
                for b in 0..g.count {
                    let qi = &g.q_index[b * g.q_len..(b + 1) * g.q_len];
                    let ki = &g.k_index[b * g.k_len..(b + 1) * g.k_len];
                    let query = |i: usize| !span(g, b, i).is_empty();
                    gather_rows(&qs[h], hd, qi, query, &mut w.q);
                    gather_rows(&ks[h], hd, ki, |_| true, &mut w.k);
                    gather_rows(&vs[h], hd, ki, |_| true, &mut w.v);
                    scores(scale, &mut w);
                    // Softmax over each query's span, from the span's
                    // maximum; keys outside it get probability 0.
                    for (i, mut row) in w.s.rows_mut().into_iter().enumerate() {
                        let seen = span(g, b, i);
                        let Some(row) = row.as_slice_mut() else {
                            continue;
                        };
                        let m = rowwise::max(&row[seen.clone()]);
                        let sum = rowwise::exp_shifted_sum(&mut row[seen.clone()], m);
                        row[..seen.start].fill(0.0);
                        row[seen.end..].fill(0.0);
                        row_sum[i] = sum;
                        if !seen.is_empty() {
                            lse[qi[i] as usize] = m + sum.ln();
                        }
                    }
                    product(
                        1.0,
                        w.s.view(),
                        w.v.view(),
                        0.0,
                        w.o.view_mut(),
                        Threads::Serial,
                    );
                    for (i, row) in w.o.rows().into_iter().enumerate() {
                        if !query(i) {
                            continue;
                        }
                        let t = qi[i] as usize;
                        out[t * hd..(t + 1) * hd]
                            .iter_mut()
                            .zip(row)
                            .for_each(|(d, x)| *d = x / row_sum[i]);
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
                let mut w = Scratch::new(g, hd);
                let mut dp = Array2::<f32>::zeros((g.q_len, g.k_len));
                let mut dq_b = Array2::<f32>::zeros((g.q_len, hd));
                let mut dk_b = Array2::<f32>::zeros((g.k_len, hd));
                let mut dv_b = Array2::<f32>::zeros((g.k_len, hd));
                for b in 0..g.count {
                    let qi = &g.q_index[b * g.q_len..(b + 1) * g.q_len];
                    let ki = &g.k_index[b * g.k_len..(b + 1) * g.k_len];
                    let query = |i: usize| !span(g, b, i).is_empty();
                    gather_rows(&qs[h], hd, qi, query, &mut w.q);
                    gather_rows(&ks[h], hd, ki, |_| true, &mut w.k);
                    gather_rows(&vs[h], hd, ki, |_| true, &mut w.v);
                    gather_rows(&grads[h], hd, qi, query, &mut w.o);
                    scores(scale, &mut w);
                    // P = exp(S − lse) over each query's span, 0 elsewhere
                    // (and on rows of padding queries).
                    for (i, mut row) in w.s.rows_mut().into_iter().enumerate() {
                        let seen = span(g, b, i);
                        let Some(row) = row.as_slice_mut() else {
                            continue;
                        };
                        if !seen.is_empty() {
                            let l = lses[h][qi[i] as usize];
                            rowwise::exp_shifted_sum(&mut row[seen.clone()], l);
                        }
                        row[..seen.start].fill(0.0);
                        row[seen.end..].fill(0.0);
                    }
                    let p: ArrayView2<'_, f32> = w.s.view();
                    product(
                        1.0,
                        p.t(),
                        w.o.view(),
                        0.0,
                        dv_b.view_mut(),
                        Threads::Serial,
                    );
                    product(
                        1.0,
                        w.o.view(),
                        w.v.t(),
                        0.0,
                        dp.view_mut(),
                        Threads::Serial,
                    );
                    // dS = P ∘ (dP − D), in place in dP.
                    for (i, (mut ds_row, p_row)) in
                        dp.rows_mut().into_iter().zip(p.rows()).enumerate()
                    {
                        let d = if query(i) { delta[qi[i] as usize] } else { 0.0 };
                        ds_row
                            .iter_mut()
                            .zip(p_row)
                            .for_each(|(x, p)| *x = p * (*x - d));
                    }
                    let ds: ArrayView2<'_, f32> = dp.view();
                    product(scale, ds, w.k.view(), 0.0, dq_b.view_mut(), Threads::Serial);
                    product(
                        scale,
                        ds.t(),
                        w.q.view(),
                        0.0,
                        dk_b.view_mut(),
                        Threads::Serial,
                    );
                    for (i, row) in dq_b.rows().into_iter().enumerate() {
                        if query(i) {
                            let t = qi[i] as usize;
                            dq[t * hd..(t + 1) * hd]
                                .iter_mut()
                                .zip(row)
                                .for_each(|(d, x)| *d += x);
                        }
                    }
                    add_rows(&mut dk, hd, ki, dk_b.view_mut());
                    add_rows(&mut dv, hd, ki, dv_b.view_mut());
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

/// `dst[index[r]] += rows[r]` (padding keys contribute zero rows).
fn add_rows(dst: &mut [f32], hd: usize, index: &[i64], rows: ArrayViewMut2<'_, f32>) {
    for (&t, row) in index.iter().zip(rows.rows()) {
        let t = t as usize;
        dst[t * hd..(t + 1) * hd]
            .iter_mut()
            .zip(row)
            .for_each(|(d, x)| *d += x);
    }
}
