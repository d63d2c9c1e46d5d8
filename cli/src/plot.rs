//! `twinhead plot`: a run's loss curve as a PNG. x is tokens since the
//! start of the run (each phase starts where the one before ended), y is
//! the loss, one colour per phase, with tick labels and a legend. Held-out
//! evaluations are squares of their phase's colour on the same axes.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;
use twinhead_proto::v1::{
    CheckpointEvalState, EvalPoint, GetProgressRequest, GetRunRequest, ProgressPoint, Run,
};

use crate::Connection;
use crate::client::run_client;
use crate::raster::{Canvas, Rgb};

/// One colour per phase; the dashboard uses the same palette.
pub const PHASE_COLOURS: [Rgb; 10] = [
    [0x1f, 0x77, 0xb4],
    [0xff, 0x7f, 0x0e],
    [0x2c, 0xa0, 0x2c],
    [0xd6, 0x27, 0x28],
    [0x94, 0x67, 0xbd],
    [0x8c, 0x56, 0x4b],
    [0xe3, 0x77, 0xc2],
    [0x7f, 0x7f, 0x7f],
    [0xbc, 0xbd, 0x22],
    [0x17, 0xbe, 0xcf],
];

const BACKGROUND: Rgb = [255, 255, 255];
const INK: Rgb = [40, 40, 40];
const AXIS: Rgb = [120, 120, 120];
const GRID: Rgb = [232, 232, 232];

/// The smallest and largest image sides accepted.
const MIN_SIDE: u32 = 200;
const MAX_SIDE: u32 = 8000;

/// One phase's curve: (run tokens, loss) in report order, and its
/// held-out losses as markers.
pub struct Series {
    pub name: String,
    pub colour: Rgb,
    pub points: Vec<(f64, f64)>,
    pub markers: Vec<(f64, f64)>,
}

fn check_size(width: u32, height: u32) -> anyhow::Result<()> {
    for (flag, value) in [("--width", width), ("--height", height)] {
        if !(MIN_SIDE..=MAX_SIDE).contains(&value) {
            anyhow::bail!("{flag}: must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {value}");
        }
    }
    Ok(())
}

fn write_png(canvas: &Canvas, out: &Path) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    canvas
        .write_png(&mut writer)
        .with_context(|| format!("cannot write {}", out.display()))?;
    std::io::Write::flush(&mut writer).with_context(|| format!("cannot write {}", out.display()))
}

/// `twinhead plot RUN --eval`: each task's primary metric on the run's
/// scored checkpoints, against tokens since the run began.
pub async fn plot_task_scores(
    connection: &Connection,
    run_id: &str,
    out: &Path,
    (width, height): (u32, u32),
    json: bool,
) -> anyhow::Result<ExitCode> {
    check_size(width, height)?;
    let run = run_client(connection)
        .await?
        .get_run(GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await?
        .into_inner();
    let series = task_series(&run);
    let points: usize = series.iter().map(|s| s.points.len()).sum();
    if points == 0 {
        anyhow::bail!(
            "run {run_id} has no scored checkpoint yet (its [eval] tasks are scored as checkpoints commit; `twinhead status {run_id}` shows them)"
        );
    }
    let canvas = draw(&format!("{run_id} task scores"), &series, width, height);
    write_png(&canvas, out)?;
    if json {
        println!(
            "{}",
            json!({ "out": out.display().to_string(), "points": points, "tasks": series.len() })
        );
    } else {
        println!(
            "wrote {} ({points} scores of {} task{})",
            out.display(),
            series.len(),
            if series.len() == 1 { "" } else { "s" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One series per task of the run's `[eval]`: (tokens since the run began,
/// primary metric) of each scored checkpoint, in commit order.
pub fn task_series(run: &Run) -> Vec<Series> {
    let tasks = run
        .spec
        .as_ref()
        .and_then(|s| s.eval.as_ref())
        .map(|e| e.tasks.clone())
        .unwrap_or_default();
    tasks
        .iter()
        .enumerate()
        .map(|(i, task)| Series {
            name: task.clone(),
            colour: PHASE_COLOURS[i % PHASE_COLOURS.len()],
            points: run
                .checkpoint_evals
                .iter()
                .filter(|e| e.state == CheckpointEvalState::Done as i32)
                .filter_map(|e| {
                    let c = e.checkpoint.as_ref()?;
                    let score = e.scores.iter().find(|s| &s.task == task)?;
                    let value = *score.metrics.get(&score.primary_metric)?;
                    let earlier: u64 = run
                        .phases
                        .iter()
                        .take(c.phase_index as usize)
                        .map(|p| p.tokens_done)
                        .sum();
                    Some(((earlier + c.tokens) as f64, value))
                })
                .filter(|(_, v)| v.is_finite())
                .collect(),
            markers: Vec::new(),
        })
        .collect()
}

pub async fn plot(
    connection: &Connection,
    run_id: &str,
    out: &Path,
    (width, height): (u32, u32),
    json: bool,
) -> anyhow::Result<ExitCode> {
    check_size(width, height)?;
    let mut client = run_client(connection).await?;
    let run = client
        .get_run(GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await?
        .into_inner();
    let progress = client
        .get_progress(GetProgressRequest {
            run_id: run_id.to_string(),
            // A few points per pixel column is all a line can show.
            max_points: width.saturating_mul(4),
        })
        .await?
        .into_inner();
    let points = progress.points;
    if points.is_empty() {
        anyhow::bail!(
            "run {run_id} has no progress reports yet; plot it once its workers have trained a step"
        );
    }
    let names: Vec<String> = run.phases.iter().map(|p| p.name.clone()).collect();
    let series = series_by_phase(&names, &points, &progress.evals);
    let canvas = draw(&format!("{run_id} loss"), &series, width, height);
    write_png(&canvas, out)?;
    let phases = series.iter().filter(|s| !s.points.is_empty()).count();
    let evals: usize = series.iter().map(|s| s.markers.len()).sum();
    if json {
        println!(
            "{}",
            json!({
                "out": out.display().to_string(),
                "points": points.len(),
                "phases": phases,
                "evals": evals,
            })
        );
    } else {
        println!(
            "wrote {} ({} points, {phases} phase{}, {evals} held-out evaluation{})",
            out.display(),
            points.len(),
            if phases == 1 { "" } else { "s" },
            if evals == 1 { "" } else { "s" },
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Groups points and successful held-out evaluations by phase on a
/// run-wide token axis: a phase starts after the most tokens reported in
/// each earlier phase.
pub fn series_by_phase(
    names: &[String],
    points: &[ProgressPoint],
    evals: &[EvalPoint],
) -> Vec<Series> {
    let phases = points
        .iter()
        .map(|p| p.phase_index)
        .chain(evals.iter().map(|e| e.phase_index))
        .map(|i| i as usize + 1)
        .max()
        .unwrap_or(0)
        .max(names.len());
    let mut most = vec![0u64; phases];
    for p in points {
        let i = p.phase_index as usize;
        most[i] = most[i].max(p.tokens);
    }
    (0..phases)
        .map(|i| {
            let offset: u64 = most[..i].iter().sum();
            Series {
                name: names
                    .get(i)
                    .filter(|n| !n.is_empty())
                    .cloned()
                    .unwrap_or_else(|| format!("phase {i}")),
                colour: PHASE_COLOURS[i % PHASE_COLOURS.len()],
                points: points
                    .iter()
                    .filter(|p| p.phase_index as usize == i)
                    .map(|p| ((offset + p.tokens) as f64, p.loss))
                    .filter(|(_, loss)| loss.is_finite())
                    .collect(),
                markers: evals
                    .iter()
                    .filter(|e| e.phase_index as usize == i && e.error.is_empty())
                    .map(|e| ((offset + e.tokens) as f64, e.loss))
                    .filter(|(_, loss)| loss.is_finite())
                    .collect(),
            }
        })
        .collect()
}

/// Tick values at 1, 2 or 5 × 10^k covering [lo, hi] in about `count` steps.
fn ticks(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let rough = span / count.max(1) as f64;
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * power);
    let mut values = Vec::new();
    let mut v = (lo / step).ceil() * step;
    while v <= hi + step * 1e-9 && values.len() < 100 {
        values.push(v);
        v += step;
    }
    values
}

/// A tick label with just the decimals that tell ticks `step` apart, and
/// k/M/B/T suffixes from a thousand on: 50k, 1.5M, 2.25.
fn tick_label(v: f64, step: f64) -> String {
    if v.abs() < step * 1e-9 {
        return "0".into();
    }
    let (scale, suffix) = match v.abs().max(step) {
        x if x >= 1e12 => (1e12, "T"),
        x if x >= 1e9 => (1e9, "B"),
        x if x >= 1e6 => (1e6, "M"),
        x if x >= 1e3 => (1e3, "k"),
        _ => (1.0, ""),
    };
    let digits = (-(step / scale).log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{:.digits$}{suffix}", v / scale)
}

/// The distance between consecutive ticks (1 for a single tick).
fn tick_step(ticks: &[f64]) -> f64 {
    match ticks {
        [a, b, ..] => b - a,
        _ => 1.0,
    }
}

/// Lays out axes, grid, ticks, legend and curves on a new canvas.
pub fn draw(title: &str, series: &[Series], width: u32, height: u32) -> Canvas {
    let mut canvas = Canvas::new(width, height, BACKGROUND);
    let scale: i64 = if width >= 600 && height >= 400 { 2 } else { 1 };
    let text_h = Canvas::text_height(scale);
    let thickness = (i64::from(width.min(height)) / 250).clamp(2, 6);

    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().chain(&s.markers).copied())
        .collect();
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.0), hi.max(p.0))
        });
    let (mut y0, mut y1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    if !x0.is_finite() || !y0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let pad = (y1 - y0) * 0.05;
    y0 -= pad;
    y1 += pad;
    let y_ticks = ticks(y0, y1, 5);
    let y_step = tick_step(&y_ticks);
    let y_labels: Vec<String> = y_ticks.iter().map(|v| tick_label(*v, y_step)).collect();
    let label_w = y_labels
        .iter()
        .map(|l| Canvas::text_width(l, scale))
        .max()
        .unwrap_or(0);

    let left = label_w + 12 * scale;
    let right = i64::from(width) - 12 * scale;
    let top = text_h * 2 + 14 * scale;
    let bottom = i64::from(height) - text_h * 2 - 14 * scale;
    let sx = |x: f64| left as f64 + (x - x0) / (x1 - x0) * (right - left) as f64;
    let sy = |y: f64| top as f64 + (1.0 - (y - y0) / (y1 - y0)) * (bottom - top) as f64;

    // Grid and y ticks.
    for (v, label) in y_ticks.iter().zip(&y_labels) {
        let y = sy(*v).round() as i64;
        canvas.fill_rect(left, y, right - left, 1, GRID);
        canvas.fill_rect(left - 4 * scale, y, 4 * scale, 1, AXIS);
        let w = Canvas::text_width(label, scale);
        canvas.text(left - 6 * scale - w, y - text_h / 2, label, scale, INK);
    }
    // x ticks.
    let x_ticks = ticks(x0, x1, 6);
    let x_step = tick_step(&x_ticks);
    for v in x_ticks {
        let x = sx(v).round() as i64;
        canvas.fill_rect(x, bottom, 1, 4 * scale, AXIS);
        let label = tick_label(v, x_step);
        let w = Canvas::text_width(&label, scale);
        canvas.text(x - w / 2, bottom + 6 * scale, &label, scale, INK);
    }
    // Axes and their names.
    canvas.fill_rect(left, top, 1, bottom - top + 1, AXIS);
    canvas.fill_rect(left, bottom, right - left + 1, 1, AXIS);
    let x_name = "tokens";
    canvas.text(
        right - Canvas::text_width(x_name, scale),
        i64::from(height) - text_h - 4 * scale,
        x_name,
        scale,
        INK,
    );
    canvas.text(4 * scale, 4 * scale, title, scale, INK);

    // Legend, right-aligned on the line under the title.
    let swatch = 14 * scale;
    let marker = thickness * 2 + 2;
    let with_markers = series.iter().any(|s| !s.markers.is_empty());
    let entries: Vec<&Series> = series
        .iter()
        .filter(|s| !s.points.is_empty() || !s.markers.is_empty())
        .collect();
    let mut legend_w: i64 = entries
        .iter()
        .map(|s| swatch + 4 * scale + Canvas::text_width(&s.name, scale) + 12 * scale)
        .sum();
    if with_markers {
        legend_w += marker + 4 * scale + Canvas::text_width(HELD_OUT_LABEL, scale);
    }
    let mut lx = (right - legend_w).max(left);
    let ly = 4 * scale + text_h + 6 * scale;
    for s in &entries {
        canvas.fill_rect(lx, ly + text_h / 2 - scale, swatch, 2 * scale, s.colour);
        lx += swatch + 4 * scale;
        canvas.text(lx, ly, &s.name, scale, INK);
        lx += Canvas::text_width(&s.name, scale) + 12 * scale;
    }
    if with_markers {
        canvas.fill_rect(lx, ly + (text_h - marker) / 2, marker, marker, INK);
        lx += marker + 4 * scale;
        canvas.text(lx, ly, HELD_OUT_LABEL, scale, INK);
    }

    // Curves last, over the grid.
    for s in series {
        let mapped: Vec<(f64, f64)> = s.points.iter().map(|(x, y)| (sx(*x), sy(*y))).collect();
        if let [only] = mapped.as_slice() {
            canvas.line(*only, *only, thickness + 2, s.colour);
        }
        for pair in mapped.windows(2) {
            canvas.line(pair[0], pair[1], thickness, s.colour);
        }
    }
    // Held-out markers on top, outlined so they stand out on their curve.
    for s in series {
        for (x, y) in &s.markers {
            let (cx, cy) = (sx(*x).round() as i64, sy(*y).round() as i64);
            let half = marker / 2;
            canvas.fill_rect(cx - half - 1, cy - half - 1, marker + 2, marker + 2, INK);
            canvas.fill_rect(cx - half, cy - half, marker, marker, s.colour);
        }
    }
    canvas
}

/// The legend's name for the markers.
const HELD_OUT_LABEL: &str = "held-out";

#[cfg(test)]
mod tests {
    use super::*;

    fn point(phase_index: u32, tokens: u64, loss: f64) -> ProgressPoint {
        ProgressPoint {
            phase_index,
            tokens,
            loss,
            ..Default::default()
        }
    }

    #[test]
    fn phases_follow_each_other_on_the_token_axis() {
        let names = vec!["pretrain".to_string(), "decay".to_string()];
        let points = [point(0, 100, 5.0), point(0, 200, 4.0), point(1, 50, 3.0)];
        let evals = [
            EvalPoint {
                phase_index: 0,
                tokens: 200,
                loss: 4.5,
                ..Default::default()
            },
            EvalPoint {
                phase_index: 1,
                tokens: 50,
                error: "unreadable shard".into(),
                ..Default::default()
            },
            EvalPoint {
                phase_index: 1,
                tokens: 60,
                loss: 3.5,
                ..Default::default()
            },
        ];
        let series = series_by_phase(&names, &points, &evals);
        assert_eq!(series[0].points, vec![(100.0, 5.0), (200.0, 4.0)]);
        assert_eq!(series[1].points, vec![(250.0, 3.0)]);
        // Failed evaluations are not drawn.
        assert_eq!(series[0].markers, vec![(200.0, 4.5)]);
        assert_eq!(series[1].markers, vec![(260.0, 3.5)]);
        assert_eq!(series[1].name, "decay");
        assert_eq!(series[1].colour, PHASE_COLOURS[1]);
    }

    #[test]
    fn task_scores_follow_the_run_axis_one_series_per_task() {
        use twinhead_proto::v1::{
            Checkpoint, CheckpointEval, EvalPolicy, PhaseProgress, RunSpec, TaskScore,
        };
        let scored = |phase_index, tokens, state: CheckpointEvalState, acc: f64| CheckpointEval {
            checkpoint: Some(Checkpoint {
                phase_index,
                tokens,
                ..Default::default()
            }),
            state: state as i32,
            scores: vec![TaskScore {
                task: "arc_easy".into(),
                primary_metric: "acc_raw".into(),
                metrics: [("acc_raw".to_string(), acc)].into_iter().collect(),
                docs: 10,
            }],
            ..Default::default()
        };
        let run = Run {
            spec: Some(RunSpec {
                eval: Some(EvalPolicy {
                    tasks: vec!["arc_easy".into(), "piqa".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            phases: vec![
                PhaseProgress {
                    tokens_done: 1000,
                    ..Default::default()
                },
                PhaseProgress::default(),
            ],
            checkpoint_evals: vec![
                scored(0, 1000, CheckpointEvalState::Done, 0.3),
                scored(1, 500, CheckpointEvalState::Failed, 0.9),
                scored(1, 800, CheckpointEvalState::Done, 0.5),
            ],
            ..Default::default()
        };
        let series = task_series(&run);
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].name, "arc_easy");
        assert_eq!(series[0].points, vec![(1000.0, 0.3), (1800.0, 0.5)]);
        assert!(series[1].points.is_empty(), "no piqa scores");
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(2.31, 2.77, 5);
        assert!(t.iter().all(|v| (2.31..=2.77).contains(v)), "{t:?}");
        assert_eq!(tick_label(2.5, 0.5), "2.5");
        assert_eq!(tick_label(9.0, 1.0), "9");
        assert_eq!(tick_label(0.012, 0.002), "0.012");
        assert_eq!(tick_label(50_000.0, 50_000.0), "50k");
        assert_eq!(tick_label(1_500_000.0, 500_000.0), "1.5M");
        assert_eq!(tick_label(0.0, 50_000.0), "0");
    }
}
