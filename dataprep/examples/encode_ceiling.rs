//! Raw encoder ceilings for bench/dataprep: every document of `jsonl.gz`
//! shards (field `text`), normalized as dataprep normalizes (NFC), encoded
//! with no filtering and no output, by `tokenizers` 0.22 (the reference) and
//! by the fast path, on a rayon pool of THREADS threads. Reading and
//! normalizing are timed apart and not counted. Prints one JSON line per
//! encoder; the two must give the same number of tokens.
//!
//!     cargo run --release -p twinhead-dataprep --example encode_ceiling -- \
//!         TOKENIZER.json THREADS [reference|fast|both] SHARD.jsonl.gz...

use std::io::BufRead;
use std::time::Instant;

use rayon::prelude::*;
use twinhead_dataprep::encode::EncoderChoice;
use twinhead_dataprep::filters;
use twinhead_dataprep::tokenizer::Tok;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "encode_ceiling TOKENIZER.json THREADS [reference|fast|both] SHARD.jsonl.gz...";
    let (tok_path, threads, which) = match &args[..] {
        [_, t, n, w, ..] => (t, n.parse::<usize>()?, w.as_str()),
        _ => return Err(usage.into()),
    };
    let t0 = Instant::now();
    let mut texts = Vec::new();
    for f in &args[4..] {
        let gz = flate2::read::GzDecoder::new(std::fs::File::open(f)?);
        for line in std::io::BufReader::new(gz).lines() {
            let v: serde_json::Value = serde_json::from_str(&line?)?;
            texts.push(v["text"].as_str().ok_or("no text field")?.to_string());
        }
    }
    let pool = twinhead_dataprep::thread_pool(threads)?;
    let texts: Vec<String> =
        pool.install(|| texts.par_iter().map(|t| filters::normalize(t)).collect());
    let seconds_read = t0.elapsed().as_secs_f64();
    let bytes: usize = texts.iter().map(String::len).sum();
    let json = std::fs::read(tok_path)?;
    let choices: &[EncoderChoice] = match which {
        "reference" => &[EncoderChoice::Reference],
        "fast" => &[EncoderChoice::Fast],
        "both" => &[EncoderChoice::Reference, EncoderChoice::Fast],
        _ => return Err(usage.into()),
    };
    for &choice in choices {
        // Framing tokens are not counted: `<|endoftext|>` exists in the OLMo file.
        let tok = Tok::with_encoder(&json, "<|endoftext|>", "<|endoftext|>", choice)?;
        let t1 = Instant::now();
        let tokens: usize = pool.install(|| {
            texts
                .par_iter()
                .map(|t| tok.encode_doc(t).map(|ids| ids.len() - 2))
                .sum::<Result<usize, _>>()
        })?;
        let seconds = t1.elapsed().as_secs_f64();
        let (fast, reference) = tok.counts();
        println!(
            "{}",
            serde_json::json!({
                "tool": match choice {
                    EncoderChoice::Reference => "raw ceiling: tokenizers 0.22 (reference)",
                    EncoderChoice::Fast => "raw ceiling: fast encoder",
                },
                "threads": threads,
                "seconds": (seconds * 100.0).round() / 100.0,
                "seconds_read": (seconds_read * 100.0).round() / 100.0,
                "docs_read": texts.len(),
                "docs_kept": texts.len(),
                "mb": bytes as f64 / 1e6,
                "tokens": tokens,
                "tokens_per_second": (tokens as f64 / seconds).round(),
                "docs_fast": fast,
                "docs_reference": reference,
            })
        );
    }
    Ok(())
}
