//! The quality filters alone, on one thread: every document of `jsonl.gz`
//! shards (field `text`), normalized as dataprep normalizes (not timed),
//! judged by the filters of CONFIG's first source, ROUNDS times. Prints one
//! JSON line per round with its seconds and the outcome counts, which every
//! version of the filters must give alike.
//!
//!     cargo run --release -p twinhead-dataprep --example filter_time -- \
//!         bench/dataprep/bench.toml 5 .cache/bench-dataprep/corpus/shard-*.jsonl.gz

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

use twinhead_dataprep::filters;
use twinhead_proto::dataset::DatasetConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "filter_time CONFIG.toml ROUNDS SHARD.jsonl.gz...";
    let (config, rounds) = match &args[..] {
        [_, c, r, _, ..] => (c, r.parse::<usize>()?),
        _ => return Err(usage.into()),
    };
    let cfg = DatasetConfig::load(Path::new(config))?;
    let source = cfg.sources.first().ok_or("the config has no source")?;
    let mut texts = Vec::new();
    for f in &args[3..] {
        let gz = flate2::read::GzDecoder::new(std::fs::File::open(f)?);
        for line in std::io::BufReader::new(gz).lines() {
            let v: serde_json::Value = serde_json::from_str(&line?)?;
            let text = v["text"].as_str().ok_or("no text field")?;
            texts.push(filters::normalize(text));
        }
    }
    for round in 0..rounds {
        let started = Instant::now();
        let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
        for text in &texts {
            let outcome = match filters::check(&source.filters, text) {
                Ok(()) => "kept",
                Err(drop) => drop.name(),
            };
            *outcomes.entry(outcome).or_insert(0) += 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"round": round, "docs": texts.len(), "seconds": seconds, "outcomes": outcomes})
        );
    }
    Ok(())
}
