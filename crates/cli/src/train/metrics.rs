//! The run's metrics: one row per step, written as CSV (for spreadsheets and the resume
//! of a later run) and JSON, and drawn as the SVG plot.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::plot::{self, Panel, Series};

#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Steps completed (1 after the first step).
    pub step: u64,
    pub epoch: u64,
    /// Mean cross-entropy of the global batch, before the step.
    pub loss: f64,
    pub train_accuracy: f64,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    /// Filled on evaluation steps.
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
}

const HEADER: &str = "step,epoch,loss,train_accuracy,lr,grad_norm,test_loss,test_accuracy";

fn opt(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

pub fn to_csv(rows: &[Row]) -> String {
    let mut out = format!("{HEADER}\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{}\n",
            r.step,
            r.epoch,
            r.loss,
            r.train_accuracy,
            r.lr,
            opt(r.grad_norm),
            opt(r.test_loss),
            opt(r.test_accuracy)
        ));
    }
    out
}

/// Parses what [`to_csv`] wrote.
pub fn from_csv(text: &str) -> Result<Vec<Row>> {
    let mut lines = text.lines();
    anyhow::ensure!(lines.next() == Some(HEADER), "not a distoptim metrics file (header differs)");
    lines
        .enumerate()
        .map(|(i, line)| {
            let f: Vec<&str> = line.split(',').collect();
            anyhow::ensure!(f.len() == 8, "line {}: {} fields, expected 8", i + 2, f.len());
            let num = |s: &str| s.parse::<f64>().with_context(|| format!("line {}: {s:?} is not a number", i + 2));
            let maybe = |s: &str| if s.is_empty() { Ok(None) } else { num(s).map(Some) };
            Ok(Row {
                step: f[0].parse().with_context(|| format!("line {}: step {:?}", i + 2, f[0]))?,
                epoch: f[1].parse().with_context(|| format!("line {}: epoch {:?}", i + 2, f[1]))?,
                loss: num(f[2])?,
                train_accuracy: num(f[3])?,
                lr: num(f[4])?,
                grad_norm: maybe(f[5])?,
                test_loss: maybe(f[6])?,
                test_accuracy: maybe(f[7])?,
            })
        })
        .collect()
}

/// The rows of an earlier run in `dir` up to `step` (for a resumed run's curve), or none.
pub fn earlier(dir: &Path, step: u64) -> Vec<Row> {
    fs::read_to_string(dir.join("metrics.csv"))
        .ok()
        .and_then(|t| from_csv(&t).ok())
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.step <= step)
        .collect()
}

/// The journal of rows an elastic run keeps next to its snapshots.
const JOURNAL: &str = "train-metrics.csv";

/// Appends `rows` to the journal in `dir` (created with the header on first use): one
/// small append per snapshot instead of rewriting the metrics.
pub fn journal(dir: &Path, rows: &[Row]) -> Result<()> {
    use std::io::Write;
    let path = dir.join(JOURNAL);
    let fresh = !path.exists();
    let mut f = fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
    let text = to_csv(rows);
    let body = if fresh { text.as_str() } else { text.split_once('\n').map_or("", |(_, rest)| rest) };
    f.write_all(body.as_bytes()).with_context(|| format!("appending to {}", path.display()))
}

/// The journal's rows up to `step` (a step journaled twice, before and after a restart,
/// keeps its last row).
pub fn journaled(dir: &Path, step: u64) -> Vec<Row> {
    let rows = fs::read_to_string(dir.join(JOURNAL)).ok().and_then(|t| from_csv(&t).ok()).unwrap_or_default();
    merge(Vec::new(), rows.into_iter().filter(|r| r.step <= step).collect())
}

/// `base` with `newer` laid over it, one row per step, in step order.
pub fn merge(base: Vec<Row>, newer: Vec<Row>) -> Vec<Row> {
    let mut by_step: std::collections::BTreeMap<u64, Row> = base.into_iter().map(|r| (r.step, r)).collect();
    by_step.extend(newer.into_iter().map(|r| (r.step, r)));
    by_step.into_values().collect()
}

fn json(rows: &[Row]) -> String {
    let num = |v: Option<f64>| v.filter(|v| v.is_finite()).map_or(serde_json::Value::Null, serde_json::Value::from);
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "step": r.step, "epoch": r.epoch, "loss": num(Some(r.loss)), "train_accuracy": num(Some(r.train_accuracy)),
                "lr": num(Some(r.lr)), "grad_norm": num(r.grad_norm), "test_loss": num(r.test_loss), "test_accuracy": num(r.test_accuracy),
            })
        })
        .collect();
    serde_json::Value::from(rows).to_string()
}

/// Writes `metrics.csv`, `metrics.json` and `plot.svg` into `dir`, each through a
/// temporary name so a crash never leaves half a file.
pub fn write(dir: &Path, title: &str, rows: &[Row]) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let evals = || rows.iter().filter(|r| r.test_accuracy.is_some());
    let loss = Panel {
        title: "loss",
        y_label: "cross-entropy",
        y_range: None,
        legend_bottom: false,
        series: vec![
            Series { label: "train (batch)", colour: "#1f77b4", points: rows.iter().map(|r| (r.step as f64, r.loss)).collect() },
            Series { label: "test", colour: "#d62728", points: evals().filter_map(|r| Some((r.step as f64, r.test_loss?))).collect() },
        ],
    };
    let accuracy = Panel {
        title: "accuracy",
        y_label: "accuracy (%)",
        y_range: Some((0.0, 100.0)),
        legend_bottom: true,
        series: vec![
            Series {
                label: "train (batch)",
                colour: "#1f77b4",
                points: rows.iter().map(|r| (r.step as f64, 100.0 * r.train_accuracy)).collect(),
            },
            Series {
                label: "test",
                colour: "#d62728",
                points: evals().filter_map(|r| Some((r.step as f64, 100.0 * r.test_accuracy?))).collect(),
            },
        ],
    };
    for (name, text) in [("metrics.csv", to_csv(rows)), ("metrics.json", json(rows)), ("plot.svg", plot::svg(title, &[loss, accuracy]))] {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).and_then(|_| fs::rename(&tmp, &path)).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trips_with_and_without_optional_fields() {
        let rows = vec![
            Row {
                step: 1,
                epoch: 0,
                loss: 2.302,
                train_accuracy: 0.1,
                lr: 1e-4,
                grad_norm: Some(0.5),
                test_loss: None,
                test_accuracy: None,
            },
            Row {
                step: 2,
                epoch: 1,
                loss: 0.25,
                train_accuracy: 0.9375,
                lr: 3e-3,
                grad_norm: None,
                test_loss: Some(0.3),
                test_accuracy: Some(0.95),
            },
        ];
        assert_eq!(from_csv(&to_csv(&rows)).unwrap(), rows);
        assert!(from_csv("a,b\n").is_err());
        let dir = std::env::temp_dir().join(format!("distoptim-metrics-{}", std::process::id()));
        write(&dir, "t", &rows).unwrap();
        assert_eq!(earlier(&dir, 1), rows[..1]);
        let parsed: serde_json::Value = serde_json::from_str(&fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
        assert_eq!(parsed[1]["test_accuracy"], 0.95);
        let _ = fs::remove_dir_all(&dir);
    }
}
