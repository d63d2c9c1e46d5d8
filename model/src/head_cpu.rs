//! The tied head's cross-entropy on the CPU, in chunks of rows, so that a
//! long sequence's `[positions, vocab]` logits never exist at once (a
//! decoder at 8,192 tokens would hold 1.6 GB per copy of them).

use crate::product_cpu::{Threads, product, product_new};
use crate::rowwise;
use ndarray::{Array1, Array2, ArrayView2, Axis, s};
use rayon::prelude::*;

/// Rows per chunk: 256 rows of a 50,368 vocabulary are 52 MB of logits.
const CHUNK_ROWS: usize = 256;

/// Summed cross-entropy of `hidden · Eᵀ + bias` against `targets`, and the
/// gradients of that sum with respect to `hidden`, `E` and `bias`.
pub fn cross_entropy(
    hidden: ArrayView2<'_, f32>,
    embedding: ArrayView2<'_, f32>,
    bias: &[f32],
    targets: &[u32],
) -> (f32, Array2<f32>, Array2<f32>, Array1<f32>) {
    let (rows, width) = hidden.dim();
    let vocab = embedding.nrows();
    let mut d_hidden = Array2::<f32>::zeros((rows, width));
    // Written by the first chunk's product, accumulated into by the rest.
    let mut d_embedding: Option<Array2<f32>> = None;
    let mut d_bias = Array1::<f32>::zeros(vocab);
    let mut loss = 0f64;
    let mut logits = Array2::<f32>::zeros((CHUNK_ROWS.min(rows).max(1), vocab));
    for start in (0..rows).step_by(CHUNK_ROWS) {
        let end = (start + CHUNK_ROWS).min(rows);
        let h = hidden.slice(s![start..end, ..]);
        let mut g = logits.slice_mut(s![..end - start, ..]);
        g.rows_mut().into_iter().for_each(|mut row| {
            row.iter_mut().zip(bias).for_each(|(x, b)| *x = *b);
        });
        product(1.0, h, embedding.t(), 1.0, g.view_mut(), Threads::Pool);
        // Each row becomes softmax − one-hot; its loss is lse − logit[target].
        let losses: Vec<f64> = g
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(&targets[start..end])
            .map(|(mut row, &target)| {
                let t = target as usize;
                let picked = row.get(t).copied().unwrap_or(f32::NAN);
                let Some(row) = row.as_slice_mut() else {
                    return f64::NAN;
                };
                let max = rowwise::max(row);
                let sum = rowwise::exp_shifted_sum(row, max);
                row.iter_mut().for_each(|x| *x /= sum);
                if let Some(x) = row.get_mut(t) {
                    *x -= 1.0;
                }
                f64::from(max) + f64::from(sum.ln()) - f64::from(picked)
            })
            .collect();
        loss += losses.iter().sum::<f64>();
        let g = g.view();
        product(
            1.0,
            g,
            embedding,
            0.0,
            d_hidden.slice_mut(s![start..end, ..]),
            Threads::Pool,
        );
        match d_embedding.as_mut() {
            None => d_embedding = Some(product_new(1.0, g.t(), h, Threads::Pool)),
            Some(d) => product(1.0, g.t(), h, 1.0, d.view_mut(), Threads::Pool),
        }
        d_bias += &g.sum_axis(Axis(0));
    }
    let d_embedding = d_embedding.unwrap_or_else(|| Array2::zeros((vocab, width)));
    (loss as f32, d_hidden, d_embedding, d_bias)
}
