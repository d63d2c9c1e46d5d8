//! The fast encoding path: the ids `tokenizers` 0.22 gives, from the
//! read-only pipeline of `tokenizers` 1.0 (`tk-encode`'s `PipelineTokenizer`,
//! a SIMD pre-tokenizer and a faster BPE), about 25× the reference's speed
//! per core on the bench corpus (BENCHMARKS.md, "dataprep").
//!
//! Exactness is kept by construction where the two libraries could differ,
//! and by tests everywhere else (`tests/encoder_parity.rs`):
//!
//! * Only the shape every tokenizer dataprep builds or loads has (a BPE
//!   model, byte-level with the GPT-2 split and no prefix space, no dropout,
//!   no unknown token, no byte fallback; normalizer none or NFC; added tokens
//!   neither single-word nor right-stripping; no truncation or padding) goes
//!   the fast way. Anything
//!   else is encoded by 0.22 for the whole build, and the build says why
//!   ([`Unsupported`], the report's `encoder` and notes).
//! * NFC is never run by 1.0 (whose tables are Unicode 16, 0.22's are
//!   Unicode 9). The fast pipeline is loaded without a normalizer and only
//!   gets documents on which 0.22's NFC is the identity: ASCII, or a Unicode 9
//!   quick check of "yes" (then every piece between added tokens is NFC too).
//!   Any other document is encoded by 0.22 and counted
//!   ([`EncodeCounts::reference`]); dataprep normalizes documents to NFC
//!   before this, so on real text that is a handful of documents with marks
//!   newer than Unicode 9.
//!
//! The 1.0 reader wants its own canonical `tokenizer.json` ("2.0"); the
//! conversion below is the part of `tk-convert` our shape needs, done on a
//! copy: the stored `tokenizer.json`, and so the manifest, do not change.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde_json::Value;
use tk_encode::pipeline::{EncodeOptions, PipelineToken, PipelineTokenizer};
use unicode_normalization_alignments::{IsNormalized, is_nfc_quick};

/// The GPT-2 split that a byte-level pre-tokenizer with `use_regex` runs
/// (0.22's `ByteLevel`), which the 1.0 pipeline recognises and runs as a
/// SIMD state machine.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Environment variable choosing the encoder: `reference` forces
/// `tokenizers` 0.22 for every document; unset or `fast` takes the fast
/// path where the tokenizer allows it.
pub const ENCODER_ENV: &str = "TWINHEAD_DATAPREP_ENCODER";

/// Which encoder a build asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderChoice {
    /// The fast path where the tokenizer allows it, else 0.22.
    #[default]
    Fast,
    /// `tokenizers` 0.22 for everything (the reference).
    Reference,
}

impl EncoderChoice {
    /// From [`ENCODER_ENV`]: `reference` (any case) forces the reference;
    /// anything else, or unset, is [`EncoderChoice::Fast`].
    pub fn from_env() -> EncoderChoice {
        match std::env::var(ENCODER_ENV) {
            Ok(v) if v.eq_ignore_ascii_case("reference") => EncoderChoice::Reference,
            _ => EncoderChoice::Fast,
        }
    }
}

/// Why a tokenizer cannot take the fast path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn unsupported(what: impl Into<String>) -> Unsupported {
    Unsupported(what.into())
}

/// The fast encoder of one tokenizer.
pub struct FastEncoder {
    pipeline: PipelineTokenizer,
    /// The tokenizer normalizes to NFC (done by the caller's reference).
    nfc: bool,
}

/// Documents encoded each way (this process).
#[derive(Debug, Default)]
pub struct EncodeCounts {
    /// By the fast pipeline.
    pub fast: AtomicU64,
    /// By 0.22: a forced reference, an unsupported tokenizer, or a
    /// document on which 0.22's NFC is not the identity.
    pub reference: AtomicU64,
}

impl EncodeCounts {
    /// `(fast, reference)` so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.fast.load(Ordering::Relaxed),
            self.reference.load(Ordering::Relaxed),
        )
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// `true` when `key` is absent, null or `false`.
fn off(v: &Value, key: &str) -> bool {
    matches!(
        v.get(key),
        None | Some(Value::Null) | Some(Value::Bool(false))
    )
}

/// `true` when `key` is absent or null.
fn none(v: &Value, key: &str) -> bool {
    matches!(v.get(key), None | Some(Value::Null))
}

/// The canonical ("2.0") `tokenizer.json` the 1.0 reader takes, without a
/// normalizer, post-processor or decoder (dataprep frames documents itself
/// and never decodes), and whether the original normalizes to NFC.
pub fn canonical(json: &[u8]) -> Result<(String, bool), Unsupported> {
    let mut v: Value = serde_json::from_slice(json)
        .map_err(|e| unsupported(format!("tokenizer.json does not parse: {e}")))?;
    let root = v
        .as_object_mut()
        .ok_or_else(|| unsupported("tokenizer.json is not an object"))?;
    let nfc = match root.get("normalizer") {
        None | Some(Value::Null) => false,
        Some(n) if str_of(n, "type") == Some("NFC") => true,
        Some(n) => {
            return Err(unsupported(format!(
                "normalizer {} (only none or NFC)",
                str_of(n, "type").unwrap_or("?")
            )));
        }
    };
    for key in ["truncation", "padding"] {
        if !matches!(root.get(key), None | Some(Value::Null)) {
            return Err(unsupported(format!("the tokenizer sets {key}")));
        }
    }
    let pre = root.get("pre_tokenizer").cloned().unwrap_or(Value::Null);
    if str_of(&pre, "type") != Some("ByteLevel")
        || !off(&pre, "add_prefix_space")
        || pre.get("use_regex").and_then(Value::as_bool) == Some(false)
    {
        return Err(unsupported(format!(
            "pre-tokenizer {} (only ByteLevel with use_regex and without add_prefix_space)",
            serde_json::to_string(&pre).unwrap_or_default()
        )));
    }
    if let Some(added) = root.get("added_tokens").and_then(Value::as_array) {
        for t in added {
            let content = str_of(t, "content").unwrap_or_default();
            if !off(t, "single_word") || !off(t, "rstrip") {
                return Err(unsupported(format!(
                    "added token {content:?} is single_word or rstrip"
                )));
            }
            // 0.22 normalizes a normalized token's own text before matching
            // it; the fast pipeline has no normalizer, so that must be a no-op.
            if nfc && !off(t, "normalized") && is_nfc_quick(content.chars()) != IsNormalized::Yes {
                return Err(unsupported(format!(
                    "added token {content:?} is not in NFC"
                )));
            }
        }
    }
    // The 1.0 reader allocates a table up to the largest id: ids far past
    // the number of tokens (a sparse or corrupt file) would take the
    // process down with it, so such a file is left to 0.22.
    let tokens = root
        .get("model")
        .and_then(|m| m.get("vocab"))
        .and_then(Value::as_object)
        .map_or(0, |v| v.len())
        + root
            .get("added_tokens")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
    let ids = root
        .get("model")
        .and_then(|m| m.get("vocab"))
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|v| v.values())
        .chain(
            root.get("added_tokens")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| t.get("id")),
        );
    for id in ids {
        match id.as_u64() {
            Some(id) if id < 2 * tokens as u64 + 1024 => {}
            _ => {
                return Err(unsupported(format!(
                    "token id {id} is far past the {tokens} tokens of the file"
                )));
            }
        }
    }
    let model = root
        .get_mut("model")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| unsupported("no model"))?;
    let model_v = Value::Object(model.clone());
    let is_bpe = match str_of(&model_v, "type") {
        Some(t) => t == "BPE",
        None => model.contains_key("merges"),
    };
    if !is_bpe {
        return Err(unsupported("model is not BPE"));
    }
    for key in [
        "dropout",
        "unk_token",
        "continuing_subword_prefix",
        "end_of_word_suffix",
    ] {
        if !none(&model_v, key) {
            return Err(unsupported(format!("BPE model sets {key}")));
        }
    }
    for key in ["fuse_unk", "byte_fallback", "ignore_merges"] {
        if !off(&model_v, key) {
            return Err(unsupported(format!("BPE model sets {key}")));
        }
    }
    model.insert("type".into(), "BPE".into());
    model.insert("byte_level".into(), true.into());
    if let Some(Value::Array(merges)) = model.get_mut("merges") {
        for m in merges.iter_mut() {
            if let Value::String(s) = m {
                let (a, b) = s
                    .split_once(' ')
                    .filter(|(_, b)| !b.contains(' '))
                    .ok_or_else(|| unsupported(format!("merge {s:?} is not two tokens")))?;
                *m = serde_json::json!([a, b]);
            }
        }
    }
    root.insert("version".into(), "2.0".into());
    root.insert("normalizer".into(), Value::Null);
    root.insert(
        "pre_tokenizer".into(),
        serde_json::json!({ "type": "Split", "pattern": { "Regex": GPT2_SPLIT } }),
    );
    root.insert("post_processor".into(), Value::Null);
    root.insert("decoder".into(), Value::Null);
    let text = serde_json::to_string(&v)
        .map_err(|e| unsupported(format!("tokenizer.json does not serialize: {e}")))?;
    Ok((text, nfc))
}

impl FastEncoder {
    /// The fast encoder of `tokenizer.json` bytes, or why there is none.
    pub fn new(json: &[u8]) -> Result<FastEncoder, Unsupported> {
        let (canonical, nfc) = canonical(json)?;
        // A reader that panics on a table it does not expect must not take
        // the build down: 0.22 encodes instead.
        let pipeline = twinhead_data::caught::catch_panic(|| tk_serialize::from_json(&canonical))
            .map_err(|_| unsupported("tokenizers 1.0 could not read it (its reader panicked)"))?
            .map_err(|e| unsupported(format!("tokenizers 1.0 does not read it: {e}")))?;
        Ok(FastEncoder { pipeline, nfc })
    }

    /// Whether `text` may take the fast path: 0.22's normalizer is the
    /// identity on it (and on every piece between added tokens).
    pub fn accepts(&self, text: &str) -> bool {
        !self.nfc || text.is_ascii() || is_nfc_quick(text.chars()) == IsNormalized::Yes
    }

    /// Appends the ids of `text` (no special tokens around it) to `out`;
    /// the caller checked [`FastEncoder::accepts`].
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        let opts = EncodeOptions {
            add_special_tokens: false,
            ..EncodeOptions::default()
        };
        let mut ids: Vec<PipelineToken> = Vec::with_capacity(text.len() / 3 + 1);
        self.pipeline
            .encode_into(text, &opts, &mut ids)
            .map_err(|e| e.to_string())?;
        out.extend_from_slice(PipelineToken::cast_slice(&ids));
        Ok(())
    }
}
