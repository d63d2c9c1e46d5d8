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
use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

use super::{AttentionPlan, Group, PAD_QUERY_DOC, Visibility};

/// Whether query `i` of a block may see key `j` of it.
fn visible(g: &Group, visibility: Visibility, block: usize, i: usize, j: usize) -> bool {
    let (qi, kj) = (block * g.q_len + i, block * g.k_len + j);
    if g.q_doc[qi] != g.k_doc[kj] {
        return false;
    }
    let ahead = g.q_time[qi] - g.k_time[kj];
    if visibility.causal && ahead < 0.0 {
        return false;
    }
    match visibility.half_window {
        Some(w) if visibility.causal => ahead <= w as f32,
        Some(w) => ahead.abs() <= w as f32,
        None => true,
    }
}

/// `[tokens, heads, hd]` to one `[tokens, hd]` buffer per head.
fn split_heads(x: &[f32], heads: usize, hd: usize) -> Vec<Vec<f32>> {
    let tokens = x.len() / (heads * hd).max(1);
    (0..heads)
        .map(|h| {
            let mut out = Vec::with_capacity(tokens * hd);
            for t in 0..tokens {
                let at = (t * heads + h) * hd;
                out.extend_from_slice(&x[at..at + hd]);
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

/// Scaled scores of the block into `s`, hidden pairs at −∞.
fn scores(g: &Group, visibility: Visibility, block: usize, scale: f32, w: &mut Scratch) {
    product(
        scale,
        w.q.view(),
        w.k.t(),
        0.0,
        w.s.view_mut(),
        Threads::Serial,
    );
    if g.masked {
        for (i, mut row) in w.s.rows_mut().into_iter().enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                if !visible(g, visibility, block, i, j) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
}

fn is_query(g: &Group, block: usize, i: usize) -> bool {
    g.q_doc[block * g.q_len + i] != PAD_QUERY_DOC
}

/// Output `[queries, heads, hd]` and log-sum-exp `[queries, heads]`.
pub(crate) fn forward(
    plan: &AttentionPlan,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (qs, ks, vs) = (
        split_heads(q, heads, hd),
        split_heads(k, heads, hd),
        split_heads(v, heads, hd),
    );
    let scale = (hd as f32).powf(-0.5);
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let mut out = vec![0f32; plan.queries * hd];
            let mut lse = vec![0f32; plan.queries];
            for g in &plan.groups {
                let mut w = Scratch::new(g, hd);
                for b in 0..g.count {
                    let qi = &g.q_index[b * g.q_len..(b + 1) * g.q_len];
                    let ki = &g.k_index[b * g.k_len..(b + 1) * g.k_len];
                    gather_rows(&qs[h], hd, qi, |i| is_query(g, b, i), &mut w.q);
                    gather_rows(&ks[h], hd, ki, |_| true, &mut w.k);
                    gather_rows(&vs[h], hd, ki, |_| true, &mut w.v);
                    scores(g, plan.visibility, b, scale, &mut w);
                    let mut row_max = vec![0f32; g.q_len];
                    let mut row_sum = vec![0f32; g.q_len];
                    for (i, mut row) in w.s.rows_mut().into_iter().enumerate() {
                        if !is_query(g, b, i) {
                            row.fill(0.0);
                            continue;
                        }
                        let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                        let mut sum = 0f32;
                        for x in row.iter_mut() {
                            *x = (*x - m).exp();
                            sum += *x;
                        }
                        row_max[i] = m;
                        row_sum[i] = sum;
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
                        if !is_query(g, b, i) {
                            continue;
                        }
                        let t = qi[i] as usize;
                        out[t * hd..(t + 1) * hd]
                            .iter_mut()
                            .zip(row)
                            .for_each(|(d, x)| *d = x / row_sum[i]);
                        lse[t] = row_max[i] + row_sum[i].ln();
                    }
                }
            }
            (out, lse)
        })
        .collect();
    let outs: Vec<Vec<f32>> = per_head.iter().map(|p| p.0.clone()).collect();
    let lses: Vec<Vec<f32>> = per_head.into_iter().map(|p| p.1).collect();
    (join_heads(&outs, hd), join_heads(&lses, 1))
}

/// Gradients of q, k, v, each `[tokens, heads, hd]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    plan: &AttentionPlan,
    [q, k, v, out, lse, grad]: [&[f32]; 6],
    heads: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let split = |x: &[f32]| split_heads(x, heads, hd);
    let (qs, ks, vs, outs, grads) = (split(q), split(k), split(v), split(out), split(grad));
    let lses = split_heads(lse, heads, 1);
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
                    let query = |i: usize| is_query(g, b, i);
                    gather_rows(&qs[h], hd, qi, query, &mut w.q);
                    gather_rows(&ks[h], hd, ki, |_| true, &mut w.k);
                    gather_rows(&vs[h], hd, ki, |_| true, &mut w.v);
                    gather_rows(&grads[h], hd, qi, query, &mut w.o);
                    scores(g, plan.visibility, b, scale, &mut w);
                    // P = exp(S − lse); rows of padding queries are zero.
                    for (i, mut row) in w.s.rows_mut().into_iter().enumerate() {
                        if !query(i) {
                            row.fill(0.0);
                            continue;
                        }
                        let l = lses[h][qi[i] as usize];
                        row.iter_mut().for_each(|x| *x = (*x - l).exp());
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
    let part = |i: usize| per_head.iter().map(|p| p[i].clone()).collect::<Vec<_>>();
    (
        join_heads(&part(0), hd),
        join_heads(&part(1), hd),
        join_heads(&part(2), hd),
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
