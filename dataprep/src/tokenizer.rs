//! The dataset's tokenizer: a `tokenizer.json` given by path, the Ettin
//! layout built from a base tokenizer (the OLMo BPE), or a byte-level BPE
//! trained (deterministically) on the kept documents. Either way its bytes
//! are stored with the dataset as `tokenizer.json`.
//!
//! `tokenizers` 0.22 trains, builds the Ettin layout and is the reference
//! encoder; documents are encoded by the fast path ([`crate::encode`]) where
//! the tokenizer allows it, with exactly the same ids.

use std::collections::HashSet;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder,
};

use crate::encode::{EncodeCounts, EncoderChoice, FastEncoder};
use crate::error::{Error, Result};

/// Special tokens of a trained tokenizer, in id order: [UNK]=0, [CLS]=1,
/// [SEP]=2, [PAD]=3, [MASK]=4 (the `tiny` model config relies on these).
pub const SPECIALS: [&str; 5] = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"];

/// A loaded tokenizer with the ids that frame every document.
pub struct Tok {
    inner: Tokenizer,
    /// The fast path, when asked for and the tokenizer allows it.
    fast: Option<FastEncoder>,
    /// Why the fast path is not used (forced, or what it cannot express).
    fallback: Option<String>,
    /// Documents encoded each way.
    counts: EncodeCounts,
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

/// `Tokenizer::from_bytes`, with a panic turned into an error: `tokenizers`
/// 0.22 panics on some malformed tables instead of failing (a `decoder` it
/// cannot read: `.expect("Helper")`; a `normalizer`'s: `.expect("Parsed
/// values")`), which would take a dataprep process down with no word of
/// which file was bad.
pub fn parse_tokenizer(bytes: &[u8]) -> std::result::Result<Tokenizer, String> {
    check_added_tokens(bytes)?;
    parse_checked(bytes)
}

fn parse_checked(bytes: &[u8]) -> std::result::Result<Tokenizer, String> {
    match twinhead_data::caught::catch_panic(|| Tokenizer::from_bytes(bytes)) {
        Ok(parsed) => parsed.map_err(|e| e.to_string()),
        Err(_) => Err("a table of it (decoder, normalizer, ...) is malformed: \
                       the tokenizers library could not read it"
            .into()),
    }
}

/// The longest added token (in characters) a tokenizer may have. Both
/// tokenizers libraries build their added-token matcher (an Aho-Corasick
/// DFA) in time quadratic in a token's length: one token of 5,000
/// characters took over a second per load, five seconds for the Ettin
/// layout. Real files stay far below this (the OLMo file's longest: 24).
pub const MAX_ADDED_TOKEN_CHARS: usize = 512;

/// Refuses an added token longer than [`MAX_ADDED_TOKEN_CHARS`], naming it;
/// anything else wrong with the file is left to the tokenizers library,
/// which says what.
fn check_added_tokens(bytes: &[u8]) -> std::result::Result<(), String> {
    #[derive(serde::Deserialize)]
    struct AddedTokens {
        #[serde(default)]
        added_tokens: Option<Vec<serde_json::Value>>,
    }
    let Ok(file) = serde_json::from_slice::<AddedTokens>(bytes) else {
        return Ok(());
    };
    for (i, token) in file.added_tokens.unwrap_or_default().iter().enumerate() {
        let chars = token
            .get("content")
            .and_then(serde_json::Value::as_str)
            .map_or(0, |c| c.chars().count());
        if chars > MAX_ADDED_TOKEN_CHARS {
            return Err(format!(
                "added_tokens[{i}].content has {chars} characters; added tokens of up to \
                 {MAX_ADDED_TOKEN_CHARS} are read (the tokenizers library's matcher takes \
                 time quadratic in a token's length to build)"
            ));
        }
    }
    Ok(())
}

impl Tok {
    /// Load `tokenizer.json` bytes; `cls` and `sep` name the framing tokens.
    /// Encodes on the fast path where the tokenizer allows it.
    pub fn from_bytes(bytes: &[u8], cls: &str, sep: &str) -> Result<Self> {
        Self::with_encoder(bytes, cls, sep, EncoderChoice::Fast)
    }

    /// [`Tok::from_bytes`] with the encoder chosen: [`EncoderChoice::Reference`]
    /// encodes every document with `tokenizers` 0.22.
    pub fn with_encoder(bytes: &[u8], cls: &str, sep: &str, choice: EncoderChoice) -> Result<Self> {
        check_added_tokens(bytes).map_err(|e| terr(format!("not a tokenizer.json: {e}")))?;
        // The two libraries read the file side by side.
        let (inner, fast) = rayon::join(
            || parse_checked(bytes),
            || match choice {
                EncoderChoice::Reference => {
                    Err(format!("forced ({}=reference)", crate::encode::ENCODER_ENV))
                }
                EncoderChoice::Fast => FastEncoder::new(bytes).map_err(|why| why.to_string()),
            },
        );
        let inner = inner.map_err(|e| terr(format!("not a tokenizer.json: {e}")))?;
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| {
                terr(format!(
                    "the tokenizer has no {t:?} token; set tokenizer.cls_token / sep_token"
                ))
            })
        };
        let (cls, sep) = (id(cls)?, id(sep)?);
        let vocab_size = u32::try_from(inner.get_vocab_size(true)).map_err(terr)?;
        let (fast, fallback) = match fast {
            Ok(f) => (Some(f), None),
            Err(why) => (None, Some(why)),
        };
        Ok(Tok {
            inner,
            fast,
            fallback,
            counts: EncodeCounts::default(),
            cls,
            sep,
            vocab_size,
        })
    }

    /// `[CLS] ids… [SEP]` of a document: the fast path where it applies,
    /// else `tokenizers` 0.22 (the same ids either way).
    pub fn encode_doc(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(fast) = self.fast.as_ref().filter(|f| f.accepts(text)) {
            let mut out = Vec::with_capacity(text.len() / 3 + 2);
            out.push(self.cls);
            fast.encode_into(text, &mut out).map_err(terr)?;
            out.push(self.sep);
            self.counts
                .fast
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(out);
        }
        self.counts
            .reference
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.encode_doc_reference(text)
    }

    /// `[CLS] ids… [SEP]` of a document by `tokenizers` 0.22.
    pub fn encode_doc_reference(&self, text: &str) -> Result<Vec<u32>> {
        // 0.22 panics on some tables it reads without complaint (a
        // `Prepend` normalizer of an empty string indexes past its end).
        let enc = twinhead_data::caught::catch_panic(|| self.inner.encode(text, false))
            .map_err(|why| {
                terr(format!(
                    "the tokenizers library failed on a document ({why})"
                ))
            })?
            .map_err(terr)?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 2);
        out.push(self.cls);
        out.extend_from_slice(ids);
        out.push(self.sep);
        Ok(out)
    }

    /// Whether documents go the fast way (some may still need 0.22).
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// Why every document goes to 0.22, when it does.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// `(fast, reference)` documents encoded so far by this tokenizer.
    pub fn counts(&self) -> (u64, u64) {
        self.counts.get()
    }
}

/// Specials the Ettin layout appends to its base vocabulary, in id order,
/// followed by `[unused0]` … `[unused82]`: on the OLMo BPE (50,280 ids)
/// that is `[UNK]` 50280, `[CLS]` 50281, `[SEP]` 50282, `[PAD]` 50283,
/// `[MASK]` 50284 and a vocabulary of 50,368.
pub const ETTIN_SPECIALS: [&str; 5] = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"];

/// `[unused0]` … `[unused82]` after the specials.
pub const ETTIN_UNUSED: usize = 83;

/// The Ettin tokenizer from its base (`tokenizer.json` bytes of the OLMo
/// BPE): the specials and unused tokens appended after the base vocabulary,
/// `[MASK]` stripping the space before it as ModernBERT's does, and a
/// `[CLS] $A [SEP]` post-processor. Deterministic for the same base.
pub fn ettin_layout(base: &[u8]) -> Result<Vec<u8>> {
    let mut tok = parse_tokenizer(base).map_err(|e| terr(format!("base tokenizer: {e}")))?;
    let first = u32::try_from(tok.get_vocab_size(true)).map_err(terr)?;
    // The layout's ids follow the base's: they must run 0..n without
    // holes. (Writing a vocabulary with holes also makes the tokenizers
    // library print every missing id: gigabytes for an id of 4294967295.)
    if let Some((token, id)) = tok
        .get_vocab(true)
        .into_iter()
        .filter(|(_, id)| *id >= first)
        .max_by_key(|(_, id)| *id)
    {
        return Err(terr(format!(
            "base tokenizer: token {token:?} has id {id}, but there are only {first} tokens; \
             the Ettin layout needs ids 0..{first} without holes"
        )));
    }
    let mut added: Vec<AddedToken> = ETTIN_SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true).lstrip(*s == "[MASK]"))
        .collect();
    added.extend((0..ETTIN_UNUSED).map(|i| AddedToken::from(format!("[unused{i}]"), true)));
    tok.add_special_tokens(&added);
    let (cls, sep) = (first + 1, first + 2);
    let post = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .map_err(terr)?
        .try_pair("[CLS] $A [SEP] $B [SEP]")
        .map_err(terr)?
        .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
        .build()
        .map_err(terr)?;
    tok.with_post_processor(Some(post));
    let json = tok.to_string(false).map_err(terr)?;
    // The layout is promised by id: check it before anyone relies on it.
    let check = Tokenizer::from_bytes(json.as_bytes()).map_err(terr)?;
    for (i, s) in ETTIN_SPECIALS.iter().enumerate() {
        if check.token_to_id(s) != Some(first + i as u32) {
            return Err(terr(format!(
                "the base tokenizer already has {s} (at {:?}); the Ettin layout needs a base without it",
                check.token_to_id(s)
            )));
        }
    }
    Ok(json.into_bytes())
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

    #[test]
    fn ettin_layout_appends_specials_and_unused_after_the_base() -> Result<()> {
        // A base without [CLS] and friends, as the OLMo BPE is.
        let corpus: Vec<String> = (0..100).map(|i| format!("ship {i} sails west")).collect();
        let trained = train_bpe(corpus.iter().map(String::as_str), 320, 2)?;
        let mut json: serde_json::Value = serde_json::from_slice(&trained).map_err(terr)?;
        json["added_tokens"] = serde_json::json!([]);
        json["post_processor"] = serde_json::Value::Null;
        if let Some(vocab) = json["model"]["vocab"].as_object_mut() {
            for s in SPECIALS {
                vocab.remove(s);
            }
            // Ids 0..n again, without the specials' (merges name tokens,
            // not ids).
            let mut tokens: Vec<(String, u64)> = vocab
                .iter()
                .map(|(t, id)| (t.clone(), id.as_u64().unwrap_or(u64::MAX)))
                .collect();
            tokens.sort_by_key(|(_, id)| *id);
            for (new_id, (token, _)) in tokens.into_iter().enumerate() {
                vocab.insert(token, new_id.into());
            }
        }
        let base = serde_json::to_vec(&json).map_err(terr)?;
        let base_size = Tokenizer::from_bytes(&base)
            .map_err(terr)?
            .get_vocab_size(true) as u32;

        let a = ettin_layout(&base)?;
        assert_eq!(a, ettin_layout(&base)?, "deterministic");
        let tok = Tok::from_bytes(&a, "[CLS]", "[SEP]")?;
        assert_eq!((tok.cls, tok.sep), (base_size + 1, base_size + 2));
        assert_eq!(tok.vocab_size, base_size + 5 + ETTIN_UNUSED as u32);
        let t = Tokenizer::from_bytes(&a).map_err(terr)?;
        assert_eq!(t.token_to_id("[MASK]"), Some(base_size + 4));
        assert_eq!(t.token_to_id("[unused82]"), Some(base_size + 87));
        let framed = t.encode("ship west", true).map_err(terr)?;
        assert_eq!(framed.get_ids().first(), Some(&(base_size + 1)));
        assert_eq!(framed.get_ids().last(), Some(&(base_size + 2)));
        // A base that already has the specials is refused by name.
        let e = ettin_layout(&trained)
            .expect_err("a base with the specials")
            .to_string();
        assert!(e.contains("[UNK]"), "{e}");
        Ok(())
    }
}
