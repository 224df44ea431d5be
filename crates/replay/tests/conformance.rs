//! Replays every case of `tests/conformance/cases` in-process with the checker's rules.

use std::path::PathBuf;

use distoptim_replay::case::Case;
use distoptim_replay::check::judge;
use distoptim_replay::{replay_json, run, ErrorClass};
use serde_json::Value;

fn cases() -> Vec<(String, String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance/cases");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            (p.file_stem().unwrap().to_string_lossy().into_owned(), text, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 46, "expected the 46 public cases, found {}", out.len());
    out
}

fn is_error_case(v: &Value) -> bool {
    v["expected"].get("error").is_some()
}

/// Every single-process and error case passes; the others say they are unsupported.
#[test]
fn replay_passes_single_and_error_cases() {
    let mut failures = Vec::new();
    let mut passed = 0;
    for (name, text, v) in cases() {
        let result = replay_json(&text);
        if !is_error_case(&v) && v["strategy"] != "single" {
            match result {
                Err(e) if e.class == ErrorClass::Unsupported => continue,
                other => panic!("{name}: expected 'unsupported' until the distributed optimizer exists, got {other:?}"),
            }
        }
        let json = result.as_ref().map(|o| serde_json::to_value(o).unwrap()).map_err(|e| e.to_string());
        let errors = judge(&v, json.as_ref().map_err(String::as_str));
        if errors.is_empty() {
            passed += 1;
        } else {
            failures.push(format!("{name}: {}", errors.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{} failing:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(passed, 13, "6 single cases and 7 error cases");
}

/// All reducing strategies must equal the one-process reference, so the reference must
/// reproduce PyTorch's numbers for every ddp/zero case (state placement aside).
#[test]
fn reference_matches_every_reducing_case() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for (name, text, mut v) in cases() {
        if is_error_case(&v) || !matches!(v["strategy"].as_str(), Some("single" | "ddp" | "zero1" | "zero2" | "zero3")) {
            continue;
        }
        let case = Case::from_json(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        if case.objective.is_some() {
            continue;
        }
        let out = run::run_reference(&case).unwrap_or_else(|e| panic!("{name}: {e}"));
        v["strategy"] = "single".into(); // where the state lives is not the reference's business
        let errors = judge(&v, Ok(&serde_json::to_value(out).unwrap()));
        if !errors.is_empty() {
            failures.push(format!("{name}: {}", errors.join("; ")));
        }
        checked += 1;
    }
    assert!(failures.is_empty(), "{} failing:\n{}", failures.len(), failures.join("\n"));
    assert!(checked >= 30, "only {checked} reducing cases checked");
}
