//! Build a dataset without the CLI and print the report as JSON:
//!     cargo run -p twinhead-dataprep --example build_dataset -- configs/data/sample.toml file://./twinhead-data 2
//! Then `verify` and `stats` run on the result.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use twinhead_dataprep::ProgressSink;

/// Prints each stage's duration to stderr.
struct Stages(Mutex<Option<(String, Instant)>>);

impl ProgressSink for Stages {
    fn start(&self, stage: &str, total: u64) {
        if let Ok(mut s) = self.0.lock() {
            *s = Some((format!("{stage} ({total})"), Instant::now()));
        }
    }
    fn finish(&self, _stage: &str) {
        if let Ok(mut s) = self.0.lock()
            && let Some((name, t)) = s.take()
        {
            eprintln!("{:>8.2}s  {name}", t.elapsed().as_secs_f64());
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let config = args
        .get(1)
        .map_or("configs/data/sample.toml", String::as_str);
    let out = args.get(2).map_or("file://./twinhead-data", String::as_str);
    let threads: usize = args.get(3).map_or(Ok(2), |t| t.parse())?;
    let report =
        twinhead_dataprep::build(Path::new(config), out, threads, &Stages(Mutex::new(None)))?;
    let mut summary = serde_json::to_value(&report)?;
    if let Some(m) = summary.get_mut("manifest").and_then(|m| m.as_object_mut()) {
        m.remove("config");
        for p in m
            .get_mut("phases")
            .and_then(|p| p.as_array_mut())
            .into_iter()
            .flatten()
        {
            if let Some(p) = p.as_object_mut() {
                let n = p
                    .get("shards")
                    .and_then(|s| s.as_array())
                    .map_or(0, Vec::len);
                p.insert("shards".into(), n.into());
            }
        }
        for s in m
            .get_mut("sources")
            .and_then(|p| p.as_array_mut())
            .into_iter()
            .flatten()
        {
            if let Some(s) = s.as_object_mut() {
                let n = s
                    .get("parts")
                    .and_then(|s| s.as_array())
                    .map_or(0, Vec::len);
                s.insert("parts".into(), n.into());
            }
        }
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    let v = twinhead_dataprep::verify(&report.url)?;
    eprintln!(
        "verify: ok={} files={} problems={:?}",
        v.ok, v.files_checked, v.problems
    );
    let s = twinhead_dataprep::stats(&report.url)?;
    eprintln!("{}", serde_json::to_string(&s.phases)?);
    Ok(())
}
