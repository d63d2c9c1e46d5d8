//! Host-side tables for packed rows: which document each token belongs to,
//! its position inside that document and the rotary tables. (The dense
//! `[seq, seq]` mask survives only as the tests' reference for the blocked
//! attention of [`super::attention`].)
//!
//! # Positions restart at every document
//!
//! A row of the phase shards holds several documents back to back
//! (`doc_lens`). ModernBERT and Ettin trained unpadded: FlashAttention's
//! varlen kernels take `cu_seqlens`, and the rotary embedding is applied
//! per sequence, so every sequence starts at position 0. We do the same:
//! a packed row then computes exactly what running each document on its
//! own computes (no token attends across a boundary, and every document
//! sees the same positions as when alone). The HF fixtures check this: the
//! reference for a packed row is each document run separately.

use crate::ModelError;

/// Which tokens a query may see, before the sliding window is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// Every token of the same document (encoders, MNTP).
    Bidirectional,
    /// Only itself and earlier tokens of the same document (decoders).
    Causal,
}

/// Additive mask value for a hidden key. Large and finite, so a fully
/// masked row (which cannot occur: a token always sees itself) would give
/// a uniform softmax rather than NaN.
pub const MASKED: f32 = -1.0e9;

/// Per-token document index and in-document position for a batch of rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedLayout {
    /// Rows in the batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// `[batch * seq_len]`: index of the document within its row.
    pub doc_index: Vec<u32>,
    /// `[batch * seq_len]`: position of the token within its document.
    pub positions: Vec<u32>,
}

impl PackedLayout {
    /// Builds the layout; each row's `doc_lens` must be positive and sum to
    /// `seq_len`. `None` means one document per row.
    pub fn new(
        batch: usize,
        seq_len: usize,
        doc_lens: Option<&[Vec<usize>]>,
    ) -> Result<Self, ModelError> {
        let mut doc_index = Vec::with_capacity(batch * seq_len);
        let mut positions = Vec::with_capacity(batch * seq_len);
        match doc_lens {
            None => {
                for _ in 0..batch {
                    doc_index.extend(std::iter::repeat_n(0, seq_len));
                    positions.extend(0..seq_len as u32);
                }
            }
            Some(rows) => {
                if rows.len() != batch {
                    return Err(ModelError::DocLens(format!(
                        "{} rows of doc_lens for a batch of {batch}",
                        rows.len()
                    )));
                }
                for (r, lens) in rows.iter().enumerate() {
                    let total: usize = lens.iter().sum();
                    if total != seq_len || lens.contains(&0) {
                        return Err(ModelError::DocLens(format!(
                            "row {r}: doc_lens {lens:?} must be positive and sum to seq_len {seq_len}"
                        )));
                    }
                    for (d, &len) in lens.iter().enumerate() {
                        doc_index.extend(std::iter::repeat_n(d as u32, len));
                        positions.extend(0..len as u32);
                    }
                }
            }
        }
        Ok(Self {
            batch,
            seq_len,
            doc_index,
            positions,
        })
    }

    /// The masked path's test reference: additive attention bias
    /// `[batch, seq_len, seq_len]` (row = query,
    /// column = key): 0 where visible, [`MASKED`] elsewhere. A key is
    /// visible when it is in the query's document, allowed by `kind`, and
    /// (when `half_window` is `Some(w)`) within `w` tokens: `|i - j| <= w`
    /// bidirectionally, `i - w <= j <= i` causally.
    #[cfg(test)]
    pub fn mask(&self, kind: AttentionKind, half_window: Option<usize>) -> Vec<f32> {
        let s = self.seq_len;
        let mut out = vec![MASKED; self.batch * s * s];
        for b in 0..self.batch {
            let docs = &self.doc_index[b * s..(b + 1) * s];
            for i in 0..s {
                let (lo, hi) = match (kind, half_window) {
                    (AttentionKind::Bidirectional, None) => (0, s - 1),
                    (AttentionKind::Bidirectional, Some(w)) => {
                        (i.saturating_sub(w), (i + w).min(s - 1))
                    }
                    (AttentionKind::Causal, None) => (0, i),
                    (AttentionKind::Causal, Some(w)) => (i.saturating_sub(w), i),
                };
                let row = &mut out[(b * s + i) * s..(b * s + i + 1) * s];
                for j in lo..=hi {
                    if docs[j] == docs[i] {
                        row[j] = 0.0;
                    }
                }
            }
        }
        out
    }

    /// Rotary tables `(cos, signed sin)` (see [`rope_tables`]), each
    /// `[batch * seq_len * head_dim]`, in
    /// the rotate-half layout: frequency `k` fills columns `k` and
    /// `k + head_dim / 2`.
    pub fn rope(&self, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
        rope_tables(&self.positions, head_dim, theta)
    }
}

/// Rotary tables for arbitrary positions: `(cos, signed sin)`, each
/// `[positions.len() * head_dim]`, rotate-half layout. Frequencies are
/// `theta^(-2k/head_dim)`, computed in f32 as transformers does. The sin
/// table is sign-folded for rotate-half (`−sin` in the first half of each
/// head, `+sin` in the second), so that `rotate_half(x) · sin` becomes
/// `[x2, x1] · signed_sin` without a negation pass.
pub fn rope_tables(positions: &[u32], head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|k| 1.0 / (theta as f32).powf((2 * k) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(positions.len() * head_dim);
    let mut sin = Vec::with_capacity(positions.len() * head_dim);
    for &p in positions {
        for sign in [-1.0f32, 1.0] {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(sign * angle.sin());
            }
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(mask: &[f32], s: usize, b: usize, i: usize) -> Vec<usize> {
        (0..s)
            .filter(|&j| mask[(b * s + i) * s + j] == 0.0)
            .collect()
    }

    #[test]
    fn positions_restart_per_document() {
        let l = PackedLayout::new(1, 6, Some(&[vec![2, 4]])).expect("layout");
        assert_eq!(l.positions, vec![0, 1, 0, 1, 2, 3]);
        assert_eq!(l.doc_index, vec![0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn bad_doc_lens_are_rejected() {
        assert!(PackedLayout::new(1, 6, Some(&[vec![2, 3]])).is_err());
        assert!(PackedLayout::new(1, 6, Some(&[vec![6, 0]])).is_err());
        assert!(PackedLayout::new(2, 6, Some(&[vec![6]])).is_err());
    }

    #[test]
    fn no_token_sees_another_document() {
        let l = PackedLayout::new(1, 6, Some(&[vec![2, 4]])).expect("layout");
        let m = l.mask(AttentionKind::Bidirectional, None);
        assert_eq!(visible(&m, 6, 0, 1), vec![0, 1]);
        assert_eq!(visible(&m, 6, 0, 2), vec![2, 3, 4, 5]);
        let c = l.mask(AttentionKind::Causal, None);
        assert_eq!(visible(&c, 6, 0, 2), vec![2]);
        assert_eq!(visible(&c, 6, 0, 4), vec![2, 3, 4]);
    }

    #[test]
    fn sliding_window_is_half_window_each_side() {
        let l = PackedLayout::new(1, 10, None).expect("layout");
        let m = l.mask(AttentionKind::Bidirectional, Some(2));
        assert_eq!(visible(&m, 10, 0, 5), vec![3, 4, 5, 6, 7]);
        assert_eq!(visible(&m, 10, 0, 0), vec![0, 1, 2]);
        let c = l.mask(AttentionKind::Causal, Some(2));
        assert_eq!(visible(&c, 10, 0, 5), vec![3, 4, 5]);
    }

    #[test]
    fn rope_is_rotate_half_layout() {
        let (cos, sin) = rope_tables(&[0, 3], 4, 10_000.0);
        assert_eq!(&cos[0..4], &[1.0, 1.0, 1.0, 1.0]);
        // position 3: frequencies 1 and 1/100, each repeated in both halves.
        let expect = [3.0f32.cos(), 0.03f32.cos(), 3.0f32.cos(), 0.03f32.cos()];
        for (a, b) in cos[4..8].iter().zip(expect) {
            assert!((a - b).abs() < 1e-6);
        }
        // sin is sign-folded: −sin in the first half, +sin in the second.
        assert!((sin[5] + 0.03f32.sin()).abs() < 1e-6);
        assert!((sin[7] - 0.03f32.sin()).abs() < 1e-6);
    }
}
