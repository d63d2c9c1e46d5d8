#![allow(dead_code, clippy::unwrap_used)]
//! Shared helpers of the integration tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A config over the committed fixtures: four sources of different kinds and
/// two phases; written into `dir` (input paths are absolute).
pub fn fixture_config(dir: &Path, extra_phase: &str) -> PathBuf {
    let f = fixtures();
    let f = f.display();
    let text = format!(
        r#"
name = "fixture"
on_error = "skip"

[tokenizer]
train = {{ vocab_size = 512, min_frequency = 2 }}

[output]
rows_per_shard = 64
rows_per_row_group = 16

[[sources]]
name = "books"
input = "{f}/books/*.txt"
format = "text"
files_per_part = 3
[sources.filters]
min_chars = 500

[[sources]]
name = "web"
input = "{f}/web"
format = "text"
files_per_part = 2
[sources.filters]
mean_word_length = [3.0, 10.0]
max_repeated_lines = 0.3

[[sources]]
name = "code"
input = "{f}/code"
format = "text"
extensions = ["rs"]
files_per_part = 1

[[sources]]
name = "math"
input = "{f}/math.jsonl.gz"
format = "jsonl.gz"
text_fields = ["doc.problem", "doc.solution"]
id_field = "id"

[[phases]]
name = "short"
seq_len = 64
tokens = 40000
seed = 21
[phases.weights]
web = 5.0
code = 2.0
math = 2.0
books = 1.0

[[phases]]
name = "long"
seq_len = 256
tokens = 60000
seed = 22
[phases.weights]
books = 3.0
code = 1.0
math = 1.0
{extra_phase}
"#
    );
    let p = dir.join("fixture.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Every file under `root` with its bytes, keyed by relative path.
pub fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}
