//! Checkpoint tests on a temporary folder through object_store's local
//! file system.

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn snapshot(step: u64, phase_end: bool) -> CheckpointSnapshot {
    // Values whose bits a lossy round trip would change.
    let special = [
        f32::NAN,
        -0.0,
        f32::MIN_POSITIVE / 3.0,
        f32::INFINITY,
        1.0e-45,
        -3.5,
    ];
    let model: NamedTensors = vec![
        ("embeddings.tok.weight".into(), vec![3, 2], special.to_vec()),
        (
            "layers.0.norm.weight".into(),
            vec![4],
            vec![1.0, 2.0, 3.0, step as f32],
        ),
        (
            "a_first_alphabetically".into(),
            vec![1, 1, 2],
            vec![0.25, -0.5],
        ),
    ];
    let optimizer = OptimizerState {
        step: step * 3,
        tensors: vec![
            TensorState {
                decay: true,
                exp_avg: special.iter().map(|v| v * 0.5).collect(),
                exp_avg_sq: vec![1e-30; 6],
            },
            TensorState {
                decay: false,
                exp_avg: vec![0.1, 0.2, 0.3, 0.4],
                exp_avg_sq: vec![0.0; 4],
            },
            TensorState {
                decay: true,
                exp_avg: vec![7.0, 8.0],
                exp_avg_sq: vec![9.0, 10.0],
            },
        ],
    };
    CheckpointSnapshot {
        info: CheckpointInfo {
            run_id: "run-1".into(),
            phase_index: 0,
            phase_name: "pretrain".into(),
            step,
            tokens: step * 4096,
            rng: vec![42, 0xdead_beef_0000_0001],
            data_cursor: step * 8,
            world_size: 2,
            spec_name: "tiny".into(),
            attempt: "world-a".into(),
            phase_end,
        },
        model,
        optimizer,
    }
}

fn bits(t: &NamedTensors) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    t.iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect()
}

/// Step, then per tensor: decay and the bits of both moments.
type OptBits = (u64, Vec<(bool, Vec<u32>, Vec<u32>)>);

fn opt_bits(o: &OptimizerState) -> OptBits {
    (
        o.step,
        o.tensors
            .iter()
            .map(|t| {
                (
                    t.decay,
                    t.exp_avg.iter().map(|x| x.to_bits()).collect(),
                    t.exp_avg_sq.iter().map(|x| x.to_bits()).collect(),
                )
            })
            .collect(),
    )
}

fn root_url(dir: &tempfile::TempDir) -> String {
    format!("file://{}", dir.path().display())
}

#[test]
fn round_trip_is_bit_identical() -> TestResult {
    let dir = tempfile::tempdir()?;
    let writer = CheckpointWriter::spawn(&root_url(&dir), 0)?;
    let snap = snapshot(10, false);
    let handle = writer.write_async(snap.clone())?;
    let committed = handle.wait()?;
    writer.wait()?;
    assert!(
        committed.url.ends_with("run-1/0-pretrain/step-0000010"),
        "{}",
        committed.url
    );
    let loaded = load(&committed.url)?;
    assert_eq!(bits(&loaded.model), bits(&snap.model));
    assert_eq!(opt_bits(&loaded.optimizer), opt_bits(&snap.optimizer));
    assert_eq!(loaded.state.info, snap.info);
    assert_eq!(loaded.state, committed.state);

    // The model file is a plain safetensors file with format = "pt".
    let bytes = std::fs::read(
        dir.path()
            .join("run-1/0-pretrain/step-0000010/model.safetensors"),
    )?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)?;
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    // state.json names the files' hashes.
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(
        dir.path().join("run-1/0-pretrain/step-0000010/state.json"),
    )?)?;
    assert_eq!(
        state["model_sha256"].as_str(),
        Some(sha256_hex(&bytes).as_str())
    );
    assert_eq!(state["data_cursor"].as_u64(), Some(80));
    Ok(())
}

#[test]
fn a_folder_without_committed_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let root = Location::open(&root_url(&dir), true)?;
    let committed = write(&root, &snapshot(5, false))?;
    std::fs::remove_file(dir.path().join("run-1/0-pretrain/step-0000005/COMMITTED"))?;
    let err = load(&committed.url).err();
    assert!(
        matches!(err, Some(CheckpointError::NotCommitted { .. })),
        "{err:?}"
    );
    let msg = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("step-0000005") && msg.contains("not committed"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn a_corrupted_file_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let root = Location::open(&root_url(&dir), true)?;
    let committed = write(&root, &snapshot(5, false))?;
    for file in [MODEL_FILE, OPTIMIZER_FILE] {
        let path = dir.path().join("run-1/0-pretrain/step-0000005").join(file);
        let good = std::fs::read(&path)?;
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        std::fs::write(&path, &bad)?;
        let err = load(&committed.url).err();
        let msg = err.as_ref().map(|e| e.to_string()).unwrap_or_default();
        assert!(matches!(err, Some(CheckpointError::Hash { .. })), "{msg}");
        assert!(msg.contains(file), "{msg}");
        std::fs::write(&path, &good)?;
    }
    assert!(load(&committed.url).is_ok());
    Ok(())
}

#[test]
fn latest_committed_skips_an_uncommitted_newer_folder() -> TestResult {
    let dir = tempfile::tempdir()?;
    let url = root_url(&dir);
    let root = Location::open(&url, true)?;
    assert_eq!(latest_committed(&url, "run-1")?, None);
    write(&root, &snapshot(10, false))?;
    write(&root, &snapshot(20, false))?;
    // An interrupted write: files present, no marker (the process died
    // before COMMITTED).
    write(&root, &snapshot(30, false))?;
    std::fs::remove_file(dir.path().join("run-1/0-pretrain/step-0000030/COMMITTED"))?;
    // A partially written folder with only the weights.
    let partial = root.child(&checkpoint_dir("run-1", 0, "pretrain", 40));
    partial.put(MODEL_FILE, b"half".to_vec())?;
    // Other folders of the run (the data-order logs) are not checkpoints.
    root.put(
        "run-1/data-order/0-pretrain/w/rank-00000.attempt.json",
        b"{}".to_vec(),
    )?;
    // A later phase wins over a higher step of an earlier one.
    let mut next = snapshot(2, false);
    next.info.phase_index = 1;
    next.info.phase_name = "ext".into();
    let latest = latest_committed(&url, "run-1")?;
    assert_eq!(latest.as_ref().map(|c| c.step), Some(20));
    write(&root, &next)?;
    let latest = latest_committed(&url, "run-1")?;
    assert_eq!(
        latest.as_ref().map(|c| (c.phase_index, c.step)),
        Some((1, 2))
    );
    let steps: Vec<_> = committed(&url, "run-1")?
        .iter()
        .map(|c| (c.phase_index, c.step))
        .collect();
    assert_eq!(steps, vec![(0, 10), (0, 20), (1, 2)]);
    Ok(())
}

#[test]
fn load_latest_valid_falls_back_past_a_corrupt_checkpoint() -> TestResult {
    let dir = tempfile::tempdir()?;
    let url = root_url(&dir);
    let root = Location::open(&url, true)?;
    write(&root, &snapshot(10, false))?;
    write(&root, &snapshot(20, false))?;
    std::fs::write(
        dir.path()
            .join("run-1/0-pretrain/step-0000020/optimizer.safetensors"),
        b"garbage",
    )?;
    let (loaded, skipped) = load_latest_valid(&url, "run-1")?;
    assert_eq!(loaded.map(|l| l.state.info.step), Some(10));
    assert_eq!(skipped.len(), 1);
    Ok(())
}

#[test]
fn keep_last_prunes_older_checkpoints_but_not_phase_ends() -> TestResult {
    let dir = tempfile::tempdir()?;
    let url = root_url(&dir);
    // A phase end of another phase and an earlier one of this phase that
    // must survive.
    let root = Location::open(&url, true)?;
    let mut end = snapshot(3, true);
    end.info.phase_index = 1;
    end.info.phase_name = "ext".into();
    write(&root, &end)?;
    let writer = CheckpointWriter::spawn(&url, 2)?;
    let mut handles = Vec::new();
    for step in [10, 20, 30, 40] {
        handles.push(writer.write_async(snapshot(step, false))?);
    }
    handles.push(writer.write_async(snapshot(50, true))?);
    for h in handles {
        h.wait()?;
    }
    writer.wait()?;
    let steps: Vec<_> = committed(&url, "run-1")?
        .iter()
        .map(|c| (c.phase_index, c.step))
        .collect();
    assert_eq!(steps, vec![(0, 30), (0, 40), (0, 50), (1, 3)]);
    assert!(
        !dir.path()
            .join("run-1/0-pretrain/step-0000010/model.safetensors")
            .exists()
    );
    Ok(())
}

#[test]
fn a_bad_snapshot_is_reported_through_the_handle() -> TestResult {
    let dir = tempfile::tempdir()?;
    let writer = CheckpointWriter::spawn(&root_url(&dir), 0)?;
    let mut bad = snapshot(1, false);
    bad.model[0].1 = vec![7];
    let err = writer
        .write_async(bad)?
        .wait()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("embeddings.tok.weight"), "{err}");
    // The writer keeps going after a failed write.
    assert!(writer.write_async(snapshot(2, false))?.wait().is_ok());
    assert_eq!(
        latest_committed(&root_url(&dir), "run-1")?.map(|c| c.step),
        Some(2)
    );
    Ok(())
}

#[test]
fn optimizer_state_restores_into_stable_adamw() -> TestResult {
    use crate::optim::{StableAdamW, StableAdamWConfig, TensorSpec};
    use burn::tensor::{Tensor, TensorData};
    type B = twinhead_model::CpuBackend;
    let device = Default::default();
    let flat =
        |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
    let specs = [
        TensorSpec::for_shape("w", &[2, 2]),
        TensorSpec::for_shape("b", &[2]),
    ];
    let mut opt = StableAdamW::<B>::new(StableAdamWConfig::new(1e-3, 0.01), &specs, &device)?;
    let mut params = vec![flat(&[0.5, -0.25, 1.0, 2.0]), flat(&[0.1, 0.2])];
    for _ in 0..3 {
        params = opt
            .step(1e-3, params, flat(&[0.1, 0.2, -0.3, 0.4, 0.5, -0.6]))?
            .0;
    }
    let mut snap = snapshot(3, false);
    snap.optimizer = OptimizerState {
        step: opt.steps(),
        tensors: opt.state(),
    };
    let dir = tempfile::tempdir()?;
    let committed = write(&Location::open(&root_url(&dir), true)?, &snap)?;
    let loaded = load(&committed.url)?;
    let mut restored = StableAdamW::<B>::new(StableAdamWConfig::new(1e-3, 0.01), &specs, &device)?;
    restored.restore(loaded.optimizer.step, loaded.optimizer.tensors)?;
    assert_eq!(restored.steps(), 3);
    assert_eq!(restored.state(), opt.state());
    Ok(())
}

#[test]
fn an_interrupted_write_is_never_returned() -> TestResult {
    let dir = tempfile::tempdir()?;
    let url = root_url(&dir);
    let writer = CheckpointWriter::spawn(&url, 0)?;
    writer.write_async(snapshot(10, false))?.wait()?;
    // Make the write of step 20 fail after the weights: a folder sits where
    // state.json goes.
    let step20 = dir.path().join("run-1/0-pretrain/step-0000020");
    std::fs::create_dir_all(step20.join("state.json/blocker"))?;
    let handle = writer.write_async(snapshot(20, false))?;
    let err = handle
        .wait()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("state.json"), "{err}");
    assert!(step20.join("model.safetensors").exists());
    assert!(!step20.join("COMMITTED").exists());
    assert_eq!(latest_committed(&url, "run-1")?.map(|c| c.step), Some(10));
    let (loaded, skipped) = load_latest_valid(&url, "run-1")?;
    assert_eq!(loaded.map(|l| l.state.info.step), Some(10));
    assert!(skipped.is_empty());
    assert!(matches!(
        load(&format!("{url}/run-1/0-pretrain/step-0000020")),
        Err(CheckpointError::NotCommitted { .. })
    ));
    writer.wait()?;
    Ok(())
}

#[test]
fn a_rewritten_folder_loses_what_a_killed_writer_left() -> TestResult {
    let dir = tempfile::tempdir()?;
    let root = Location::open(&root_url(&dir), true)?;
    // An earlier attempt at step 5 was killed while writing the weights.
    let folder = dir.path().join("run-1/0-pretrain/step-0000005");
    std::fs::create_dir_all(&folder)?;
    std::fs::write(folder.join("model.safetensors#2"), b"half")?;
    let committed = write(&root, &snapshot(5, false))?;
    let mut files: Vec<String> = std::fs::read_dir(&folder)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    files.sort();
    assert_eq!(
        files,
        [COMMITTED_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE],
        "{}",
        committed.url
    );
    Ok(())
}

#[test]
fn a_fenced_write_leaves_its_folder_uncommitted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let fence: Fence = std::sync::Arc::new(|| Err("the lease lapsed".to_string()));
    let writer = CheckpointWriter::spawn_fenced(&root_url(&dir), 0, fence)?;
    let handle = writer.write_async(snapshot(4, false))?;
    let url = handle.url().to_string();
    let err = handle.wait().expect_err("fenced");
    writer.wait()?;
    assert!(
        matches!(&err, CheckpointError::Fenced { reason, .. } if reason == "the lease lapsed"),
        "{err}"
    );
    assert!(err.to_string().contains("step-0000004"), "{err}");
    // Every file but the marker is there; the folder does not load.
    let folder = dir.path().join("run-1/0-pretrain/step-0000004");
    assert!(folder.join(STATE_FILE).is_file());
    assert!(!folder.join(COMMITTED_FILE).exists());
    assert!(matches!(
        load(&url),
        Err(CheckpointError::NotCommitted { .. })
    ));
    Ok(())
}
