#![allow(clippy::unwrap_used)]
//! The fast encoder against `tokenizers` 0.22 (the reference), id for id:
//! on every document of the sample corpus (as read and as dataprep
//! normalizes it), on adversarial text, and on seeded random strings built
//! from the pieces that trip tokenizers up; for every kind of tokenizer
//! dataprep builds or loads (the OLMo file as given, the Ettin layout built
//! from it, a byte-level BPE trained here).

mod common;

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use twinhead_dataprep::DatasetConfig;
use twinhead_dataprep::encode::{EncoderChoice, FastEncoder};
use twinhead_dataprep::read::{ReadOutput, read_input};
use twinhead_dataprep::rng::Rng;
use twinhead_dataprep::tokenizer::{Tok, ettin_layout, train_bpe};
use twinhead_dataprep::{filters, inputs};
use twinhead_proto::dataset::OnError;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `dataprep/fetch-sample.sh` (a no-op when the corpora are there) and
/// returns the OLMo tokenizer's bytes.
fn olmo() -> Vec<u8> {
    let fetch = std::process::Command::new("bash")
        .arg(root().join("dataprep/fetch-sample.sh"))
        .output()
        .expect("run dataprep/fetch-sample.sh");
    assert!(
        fetch.status.success(),
        "dataprep/fetch-sample.sh failed:\n{}",
        String::from_utf8_lossy(&fetch.stderr)
    );
    std::fs::read(root().join(".cache/corpora/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"))
        .unwrap()
}

/// Every document of the sample config's sources, as read, plus its
/// normalized text where that differs (what dataprep encodes).
fn sample_docs() -> Vec<String> {
    let cfg = DatasetConfig::load(&root().join("configs/data/sample.toml")).unwrap();
    let mut texts = Vec::new();
    for src in &cfg.sources {
        let (loc, files) = inputs::list_input(&src.input).unwrap();
        assert!(!files.is_empty(), "source {} has no input", src.name);
        for f in files {
            let mut out = ReadOutput::default();
            read_input(&loc, &f.rel, src, OnError::Fail, &mut out).unwrap();
            for d in out.docs {
                let n = filters::normalize(&d.text);
                if n != d.text {
                    texts.push(n);
                }
                texts.push(d.text);
            }
        }
    }
    assert!(texts.len() > 10_000, "{} sample documents", texts.len());
    texts
}

/// Text that has broken tokenizers: combining marks, whitespace runs, the
/// OLMo file's added tokens (space runs, `|||…|||` markers, specials) in
/// and around words, U+FFFD from invalid UTF-8, emoji, CJK, code.
fn adversarial(added: &[String]) -> Vec<String> {
    let mut t: Vec<String> = [
        "",
        " ",
        "e\u{301}",
        "\u{301}start with a mark",
        "a\u{301}\u{302}\u{303}\u{304}\u{305}\u{306}\u{307}\u{308}\u{309}\u{30a} zalgo\u{337}\u{338}",
        "n\u{303}o decomposed n\u{303}",
        "\u{212b}ngstr\u{f6}m and A\u{30a} and \u{c5}",
        "\u{1100}\u{1161}\u{11a8} jamo, \u{ac01} syllable",
        "q\u{323}\u{307} and q\u{307}\u{323} (mark order)",
        "x\u{1df9}\u{1dfa}\u{1ac1} marks newer than Unicode 9",
        "<\u{338} >\u{338} =\u{338} compose to relations",
        "<|endoftext|>\u{338} after a special",
        "ﬁ ligature, \u{2126} ohm, \u{1e9b}\u{323}",
        "a\tb\t\tc\n\nd\r\ne\rf",
        "trailing spaces   ",
        "   leading spaces",
        "\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n",
        " \n \n  \n   \n\t\n \t \n",
        "word                                                          word",
        "\u{a0}nbsp\u{a0}\u{a0}x \u{2003}em\u{3000}ideographic\u{85}nel\u{2028}ls\u{b}\u{c}",
        "zero\u{200b}width\u{200d}joiner\u{feff}bom",
        "\u{fffd}\u{fffd} replacement \u{fffd}x",
        "\u{1f44d}\u{1f3fd} \u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}\u{200d}\u{1f466} \u{1f1fa}\u{1f1f8} \u{2764}\u{fe0f}\u{1f600}\u{1f600}\u{1f600}",
        "日本語のテキスト。中文文本，한국어 텍스트　全角１２３ＡＢＣ",
        "שלום עולם مرحبا بالعالم नमस्ते दुनिया สวัสดีชาวโลก",
        "fn main() {\n    let x = vec![1, 2, 3];\n\tprintln!(\"{:?}\", x);\n}\n",
        "if (a==b && c!=d || e<=f) { return x->y; } // done\n#include <stdio.h>",
        "'s 't 're 've 'm 'll 'd 'S 'T 'RE don't I'M we'll y'all ''s",
        "1234567890 3.14159 -42 1e-9 \u{663}\u{664}\u{665} \u{216b} \u{bd} \u{b2}",
        "http://example.com/a?b=c&d=e#f user@example.com 192.168.0.1",
        "$$\\frac{a}{b} = \\sum_{i=0}^{n} x_i^2$$",
        "|||IP_ADDRESS|||x|||EMAIL_ADDRESS||||||PHONE_NUMBER|||",
        "|||IP_ADDR |||EMAIL |||| ||||| <|endoftext <|padding|>",
        "[CLS] a [MASK] b  [MASK][SEP] [unused0][unused82] [UNK] [PAD]x[MASK]",
        "x <|endoftext|> y<|endoftext|><|endoftext|>z",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    t.push(String::from_utf8_lossy(b"bad \xff\xfe utf8 \xc3 end \xe2\x82").into_owned());
    for n in 1..=40 {
        t.push(" ".repeat(n));
        t.push(format!("a{}b", " ".repeat(n)));
        t.push(format!("a{}\nb", " ".repeat(n)));
        t.push(format!("{}x", "\n".repeat(n)));
        t.push(format!("x{}", "\t ".repeat(n)));
    }
    for a in added {
        t.push(a.clone());
        t.push(format!("x{a}y"));
        t.push(format!(" {a} "));
        t.push(format!("{a}{a}{a}"));
        t.push(format!("word{a}\u{301}"));
    }
    for f in ["code/fnv_lib.rs", "code/hex_lib.rs", "code/itoa_lib.rs"] {
        t.push(std::fs::read_to_string(common::fixtures().join(f)).unwrap());
    }
    t
}

/// Seeded random strings over the pieces above.
fn random(added: &[String], n: usize) -> Vec<String> {
    let mut pieces: Vec<String> = [
        "a",
        "Z",
        "é",
        "e\u{301}",
        "\u{301}",
        "\u{338}",
        "<",
        "ß",
        "ı",
        "1",
        "٣",
        " ",
        "  ",
        "\n",
        "\t",
        "\r",
        "\u{a0}",
        "\u{3000}",
        "'",
        "'s",
        "'ll",
        "\"",
        ".",
        ",",
        "!",
        "_",
        "-",
        "$",
        "日",
        "本",
        "한",
        "👍",
        "\u{1f3fd}",
        "\u{200d}",
        "\u{fffd}",
        "\u{fe0f}",
        "the",
        " the",
        "ing",
        "tion",
        "|||",
        "<|",
        "|>",
        "[",
        "]",
        "[MASK",
        "MASK]",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    pieces.extend(added.iter().cloned());
    let mut rng = Rng::new(16, &[b"encoder parity"]);
    (0..n)
        .map(|_| {
            let len = rng.below(64) as usize;
            (0..len)
                .map(|_| pieces[rng.below(pieces.len() as u64) as usize].as_str())
                .collect()
        })
        .collect()
}

fn added_tokens(json: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(json).unwrap();
    v["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["content"].as_str().unwrap().to_string())
        .collect()
}

/// Both encoders on every text; the first few differences are shown.
fn assert_parity(name: &str, json: &[u8], cls: &str, sep: &str, texts: &[String]) {
    let tok = Tok::from_bytes(json, cls, sep).unwrap();
    assert!(
        tok.is_fast(),
        "{name}: the fast path refused it: {:?}",
        tok.fallback()
    );
    let bad: Vec<String> = texts
        .par_iter()
        .filter_map(|t| {
            let fast = tok.encode_doc(t).unwrap();
            let reference = tok.encode_doc_reference(t).unwrap();
            (fast != reference).then(|| {
                let at = fast
                    .iter()
                    .zip(&reference)
                    .position(|(a, b)| a != b)
                    .unwrap_or(fast.len().min(reference.len()));
                format!(
                    "{:?}: first difference at {at}: fast {:?} reference {:?}",
                    t.chars().take(80).collect::<String>(),
                    &fast[at.saturating_sub(2)..(at + 4).min(fast.len())],
                    &reference[at.saturating_sub(2)..(at + 4).min(reference.len())]
                )
            })
        })
        .collect();
    let (fast, reference) = tok.counts();
    assert!(
        bad.is_empty(),
        "{name}: {} of {} texts differ:\n{}",
        bad.len(),
        texts.len(),
        bad[..bad.len().min(8)].join("\n")
    );
    // Most of the text takes the fast path; 0.22 only gets what its NFC changes.
    assert!(
        fast > reference,
        "{name}: {fast} fast, {reference} reference"
    );
}

#[test]
fn olmo_and_ettin_match_the_reference_on_the_sample_and_adversarial_text() {
    let olmo = olmo();
    let ettin = ettin_layout(&olmo).unwrap();
    let sample = sample_docs();
    let added: Vec<String> = added_tokens(&ettin);
    let mut hard = adversarial(&added);
    hard.extend(random(&added, 5_000));
    let olmo_texts: Vec<String> = sample.iter().chain(&hard).cloned().collect();
    assert_parity("olmo", &olmo, "<|endoftext|>", "<|endoftext|>", &olmo_texts);
    // The Ettin layout is the OLMo file plus specials (`[MASK]` strips the
    // space before it): every special case, and every 8th sample document
    // (the full sample ran above through the same merges).
    let ettin_texts: Vec<String> = sample.iter().step_by(8).chain(&hard).cloned().collect();
    assert_parity("ettin", &ettin, "[CLS]", "[SEP]", &ettin_texts);
}

#[test]
fn a_trained_bpe_matches_the_reference() {
    // Trained as dataprep trains (the fixture texts), encoded on the
    // fixtures, adversarial and random text.
    let mut texts: Vec<String> = Vec::new();
    for dir in ["books", "web", "code"] {
        let mut files: Vec<_> = std::fs::read_dir(common::fixtures().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            texts.push(filters::normalize(&std::fs::read_to_string(f).unwrap()));
        }
    }
    let trained = train_bpe(texts.iter().map(String::as_str), 2048, 2).unwrap();
    let added = added_tokens(&trained);
    texts.extend(adversarial(&added));
    texts.extend(random(&added, 5_000));
    assert_parity("trained", &trained, "[CLS]", "[SEP]", &texts);
}

#[test]
fn unsupported_tokenizers_fall_back_and_say_why() {
    let corpus: Vec<String> = (0..100).map(|i| format!("ship {i} sails west")).collect();
    let trained = train_bpe(corpus.iter().map(String::as_str), 300, 2).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&trained).unwrap();
    v["normalizer"] = serde_json::json!({ "type": "Lowercase" });
    let lower = serde_json::to_vec(&v).unwrap();
    let e = FastEncoder::new(&lower).err().unwrap();
    assert!(e.to_string().contains("Lowercase"), "{e}");
    let tok = Tok::from_bytes(&lower, "[CLS]", "[SEP]").unwrap();
    assert!(!tok.is_fast());
    assert!(tok.fallback().unwrap().contains("Lowercase"));
    assert_eq!(
        tok.encode_doc("Ship West").unwrap(),
        tok.encode_doc_reference("Ship West").unwrap()
    );
    assert_eq!(tok.counts(), (0, 1));

    let mut v: serde_json::Value = serde_json::from_slice(&trained).unwrap();
    v["truncation"] = serde_json::json!({ "max_length": 4, "stride": 0, "strategy": "LongestFirst", "direction": "Right" });
    let truncating = Tok::from_bytes(&serde_json::to_vec(&v).unwrap(), "[CLS]", "[SEP]").unwrap();
    assert!(truncating.fallback().unwrap().contains("truncation"));

    // Ids far past the number of tokens would make the fast reader allocate
    // for every id up to the largest: left to 0.22.
    let mut v: serde_json::Value = serde_json::from_slice(&trained).unwrap();
    v["model"]["vocab"]["a"] = u32::MAX.into();
    let sparse = Tok::from_bytes(&serde_json::to_vec(&v).unwrap(), "[CLS]", "[SEP]").unwrap();
    assert!(sparse.fallback().unwrap().contains("token id"));

    let forced = Tok::with_encoder(&trained, "[CLS]", "[SEP]", EncoderChoice::Reference).unwrap();
    assert!(!forced.is_fast());
    assert!(forced.fallback().unwrap().contains("reference"));
    let fast = Tok::from_bytes(&trained, "[CLS]", "[SEP]").unwrap();
    assert!(fast.is_fast() && fast.fallback().is_none());
}

/// The fixture dataset built on the fast path and with the reference forced,
/// byte for byte: with the trained tokenizer, and with the OLMo file as a
/// given `tokenizer.json` (the bench's setup) and as the Ettin layout's base.
#[test]
fn fast_and_reference_builds_are_byte_identical() {
    use twinhead_dataprep::{NoProgress, build_config_with};
    let olmo = olmo();
    let dir = tempfile::tempdir().unwrap();
    let olmo_path = dir.path().join("olmo.json");
    std::fs::write(&olmo_path, &olmo).unwrap();
    let trained = common::fixture_config(dir.path(), "");
    let text = std::fs::read_to_string(&trained).unwrap();
    let train_line = text
        .lines()
        .find(|l| l.starts_with("train = "))
        .unwrap()
        .to_string();
    let given = dir.path().join("given.toml");
    std::fs::write(
        &given,
        text.replace(
            &train_line,
            &format!(
                "path = {:?}\ncls_token = \"<|endoftext|>\"\nsep_token = \"<|endoftext|>\"",
                olmo_path.display().to_string()
            ),
        ),
    )
    .unwrap();
    let ettin = dir.path().join("ettin.toml");
    std::fs::write(
        &ettin,
        text.replace(
            &train_line,
            &format!("ettin_from = {:?}", olmo_path.display().to_string()),
        ),
    )
    .unwrap();
    for (name, cfg) in [("trained", trained), ("given", given), ("ettin", ettin)] {
        let cfg = DatasetConfig::load(&cfg).unwrap();
        let fast_out = dir.path().join(format!("{name}-fast"));
        let ref_out = dir.path().join(format!("{name}-reference"));
        let fast = build_config_with(
            &cfg,
            fast_out.to_str().unwrap(),
            2,
            EncoderChoice::Fast,
            &NoProgress,
        )
        .unwrap();
        let reference = build_config_with(
            &cfg,
            ref_out.to_str().unwrap(),
            2,
            EncoderChoice::Reference,
            &NoProgress,
        )
        .unwrap();
        let f = fast.encoder.unwrap();
        assert_eq!(f.path, EncoderChoice::Fast, "{name}: {f:?}");
        assert!(f.docs_fast > 0 && f.fallback.is_none(), "{name}: {f:?}");
        let r = reference.encoder.unwrap();
        assert_eq!(
            (r.path, r.docs_fast),
            (EncoderChoice::Reference, 0),
            "{name}"
        );
        assert!(
            reference
                .notes
                .iter()
                .any(|n| n.contains("tokenizers 0.22")),
            "{name}: {:?}",
            reference.notes
        );
        assert_eq!(fast.manifest, reference.manifest, "{name}");
        assert!(
            common::tree(&fast_out) == common::tree(&ref_out),
            "{name}: the two builds differ"
        );
    }
}
