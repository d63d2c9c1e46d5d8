//! Matrix products of the CPU kernels (head, attention) on strided ndarray
//! views, through `gemm`: at the model's shapes 1.1–2× the speed of
//! ndarray's matrixmultiply on the same threads, with AVX-512 kernels where
//! the processor has them (chosen at run time).
//!
//! Each output element's sum over `k` is accumulated in an order that
//! depends on the block sizes `gemm` derives from the processor's caches,
//! never on the thread count, so a step stays bit-identical at any thread
//! count on one machine.
#![allow(unsafe_code)] // one call into gemm with pointers and strides taken from live views

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

/// Whether a product may spread over the rayon pool: `Serial` inside work
/// that is already parallel (attention's per-head tasks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    Pool,
    Serial,
}

/// `c = beta·c + alpha·(a · b)`, as BLAS names them; `beta = 0` ignores
/// what `c` held (even NaN).
///
/// # Panics
/// When the shapes do not chain (`a` is m×k, `b` k×n, `c` m×n): callers
/// pass shapes they built, never user input.
pub fn product(
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    mut c: ArrayViewMut2<'_, f32>,
    threads: Threads,
) {
    let ((m, k), (k_b, n)) = (a.dim(), b.dim());
    assert!(
        k == k_b && c.dim() == (m, n),
        "matrix product of {m}×{k} and {k_b}×{n} into {:?}",
        c.dim()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if beta == 0.0 {
            c.fill(0.0);
        } else {
            c.mapv_inplace(|x| beta * x);
        }
        return;
    }
    let parallelism = match threads {
        Threads::Pool if rayon::current_num_threads() > 1 => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => gemm::Parallelism::None,
    };
    let ([a_rs, a_cs], [b_rs, b_cs], [c_rs, c_cs]) = (
        strides(a.strides()),
        strides(b.strides()),
        strides(c.strides()),
    );
    // SAFETY: the pointers and strides come from live views whose every
    // (row, column) within the stated shapes is in bounds; `c` is a mutable
    // view, so its elements are distinct and none of them is an element of
    // `a` or `b` (those are shared borrows held for the whole call).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs,
            c_rs,
            beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            // gemm computes dst = alpha·dst + beta·(lhs·rhs): the names are
            // the other way round from BLAS.
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `alpha·(a · b)` in a new row-major array, written once: no zero-fill
/// first (for a 50,368 × 256 gradient that fill is a pass over 52 MB).
pub fn product_new(
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    threads: Threads,
) -> Array2<f32> {
    let (m, n) = (a.nrows(), b.ncols());
    if a.ncols() == 0 {
        // gemm writes nothing for an empty sum: the product is all zeros.
        return Array2::zeros((m, n));
    }
    let mut out = Array2::<f32>::uninit((m, n));
    {
        let mut view = out.view_mut();
        // SAFETY: an `ArrayViewMut2` over `MaybeUninit<f32>` has the layout
        // of one over `f32`, and `product` with beta = 0 never reads the
        // output: gemm is told not to (`read_dst = false`).
        let view: ArrayViewMut2<'_, f32> = unsafe {
            ArrayViewMut2::from_shape_ptr(view.raw_dim(), view.as_mut_ptr().cast::<f32>())
        };
        product(alpha, a, b, 0.0, view, threads);
    }
    // SAFETY: with k > 0, gemm wrote every one of the m × n elements.
    unsafe { out.assume_init() }
}

fn strides(s: &[isize]) -> [isize; 2] {
    [s[0], s[1]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, s};

    fn reference(a: &ArrayView2<'_, f32>, b: &ArrayView2<'_, f32>) -> Array2<f64> {
        let (m, k) = a.dim();
        let n = b.ncols();
        Array2::from_shape_fn((m, n), |(i, j)| {
            (0..k)
                .map(|p| f64::from(a[[i, p]]) * f64::from(b[[p, j]]))
                .sum()
        })
    }

    fn filled(rows: usize, cols: usize, seed: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            ((i * 31 + j * 17 + seed * 7) % 23) as f32 / 23.0 - 0.5
        })
    }

    #[test]
    fn strided_transposed_and_accumulating_products_match_a_reference() {
        for (m, k, n) in [(1, 1, 1), (5, 3, 7), (37, 64, 129), (300, 17, 40)] {
            for threads in [Threads::Pool, Threads::Serial] {
                let a = filled(m, k, 1);
                let bt = filled(n, k, 2); // b as the transpose of a row-major matrix
                let b = bt.t();
                let mut c = filled(2 * m, n, 3);
                let before = c.clone();
                let every_other_row = c.slice_mut(s![..;2, ..]);
                product(0.5, a.view(), b, 2.0, every_other_row, threads);
                let expected = reference(&a.view(), &b);
                for i in 0..2 * m {
                    for j in 0..n {
                        let want = if i % 2 == 0 {
                            0.5 * expected[[i / 2, j]] + 2.0 * f64::from(before[[i, j]])
                        } else {
                            f64::from(before[[i, j]])
                        };
                        let got = f64::from(c[[i, j]]);
                        assert!(
                            (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "{m}×{k}×{n} {threads:?} at ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_new_product_equals_the_reference_and_an_empty_sum_is_zero() {
        let a = filled(37, 19, 1);
        let bt = filled(23, 19, 2);
        let got = product_new(2.0, a.view(), bt.t(), Threads::Pool);
        let expected = reference(&a.view(), &bt.t());
        assert_eq!(got.dim(), (37, 23));
        assert!(
            got.iter()
                .zip(&expected)
                .all(|(x, y)| (f64::from(*x) - 2.0 * y).abs() < 1e-5)
        );
        let empty = Array2::<f32>::zeros((3, 0));
        let none = Array2::<f32>::zeros((0, 4));
        let zeros = product_new(1.0, empty.view(), none.view(), Threads::Serial);
        assert_eq!(zeros, Array2::<f32>::zeros((3, 4)));
    }

    #[test]
    fn beta_zero_ignores_what_the_output_held() {
        let a = filled(4, 3, 1);
        let b = filled(3, 5, 2);
        let mut c = Array2::from_elem((4, 5), f32::NAN);
        product(1.0, a.view(), b.view(), 0.0, c.view_mut(), Threads::Pool);
        let expected = reference(&a.view(), &b.view());
        assert!(
            c.iter()
                .zip(&expected)
                .all(|(x, y)| (f64::from(*x) - y).abs() < 1e-6)
        );
        let empty = Array2::<f32>::zeros((4, 0));
        let none = Array2::<f32>::zeros((0, 5));
        product(
            1.0,
            empty.view(),
            none.view(),
            0.0,
            c.view_mut(),
            Threads::Pool,
        );
        assert!(c.iter().all(|x| *x == 0.0), "k = 0 gives zeros");
    }
}
