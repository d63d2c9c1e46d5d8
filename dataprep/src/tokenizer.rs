//! The dataset's tokenizer: a `tokenizer.json` given by path, or a byte-level
//! BPE trained (deterministically) on the kept documents. Either way its
//! bytes are stored with the dataset as `tokenizer.json`.

use std::collections::HashSet;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder,
};

use crate::error::{Error, Result};

/// Special tokens of a trained tokenizer, in id order: [UNK]=0, [CLS]=1,
/// [SEP]=2, [PAD]=3, [MASK]=4 (the `tiny` model config relies on these).
pub const SPECIALS: [&str; 5] = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"];

/// A loaded tokenizer with the ids that frame every document.
pub struct Tok {
    inner: Tokenizer,
    /// Id of the token that opens a document.
    pub cls: u32,
    /// Id of the token that closes a document.
    pub sep: u32,
    /// Vocabulary size including added tokens.
    pub vocab_size: u32,
}

fn terr(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tok {
    /// Load `tokenizer.json` bytes; `cls` and `sep` name the framing tokens.
    pub fn from_bytes(bytes: &[u8], cls: &str, sep: &str) -> Result<Self> {
        let inner =
            Tokenizer::from_bytes(bytes).map_err(|e| terr(format!("not a tokenizer.json: {e}")))?;
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| {
                terr(format!(
                    "the tokenizer has no {t:?} token; set tokenizer.cls_token / sep_token"
                ))
            })
        };
        let (cls, sep) = (id(cls)?, id(sep)?);
        let vocab_size = u32::try_from(inner.get_vocab_size(true)).map_err(terr)?;
        Ok(Tok {
            inner,
            cls,
            sep,
            vocab_size,
        })
    }

    /// `[CLS] ids… [SEP]` of a document.
    pub fn encode_doc(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(terr)?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 2);
        out.push(self.cls);
        out.extend_from_slice(ids);
        out.push(self.sep);
        Ok(out)
    }
}

/// Train a byte-level BPE of `vocab_size` on `texts` (in the given order) and
/// return its `tokenizer.json` bytes. Deterministic for the same inputs.
pub fn train_bpe<'a, I>(texts: I, vocab_size: u32, min_frequency: u64) -> Result<Vec<u8>>
where
    I: Iterator<Item = &'a str> + Send,
{
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size as usize)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build();
    let post = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .map_err(terr)?
        .try_pair("[CLS] $A [SEP] $B [SEP]")
        .map_err(terr)?
        .special_tokens(vec![("[CLS]", 1), ("[SEP]", 2)])
        .build()
        .map_err(terr)?;
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
    .with_post_processor(Some(post.into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(terr)?;
    tok.train(&mut trainer, texts).map_err(terr)?;
    let json = tok.to_string(false).map_err(terr)?;
    // Check the promised special ids before anyone relies on them.
    let check = Tok::from_bytes(json.as_bytes(), "[CLS]", "[SEP]")?;
    for (i, s) in SPECIALS.iter().enumerate() {
        if check.inner.token_to_id(s) != Some(i as u32) {
            return Err(terr(format!(
                "trained tokenizer put {s} at {:?}, expected {i}",
                check.inner.token_to_id(s)
            )));
        }
    }
    Ok(json.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_is_deterministic_and_frames_docs() -> Result<()> {
        let corpus: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "the whale number {i} swam past the ship, and the sailors sang {} songs",
                    i % 7
                )
            })
            .collect();
        let a = train_bpe(corpus.iter().map(String::as_str), 400, 2)?;
        let b = train_bpe(corpus.iter().map(String::as_str), 400, 2)?;
        assert_eq!(a, b);
        let tok = Tok::from_bytes(&a, "[CLS]", "[SEP]")?;
        assert_eq!((tok.cls, tok.sep), (1, 2));
        assert!(tok.vocab_size <= 400 && tok.vocab_size > 261);
        let ids = tok.encode_doc("the whale")?;
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        assert!(ids.len() >= 3);
        Ok(())
    }
}
