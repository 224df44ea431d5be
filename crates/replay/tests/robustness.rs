//! Bad input never panics: every public case, mutated at random many times, is either
//! replayed or refused with an error class.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use distoptim_replay::replay_json;
use serde_json::{json, Value};

/// xorshift: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Replaces one node of the tree (chosen by walking down at random) with a hostile value.
fn mutate(v: &mut Value, rng: &mut Rng, depth: usize) {
    let descend = depth < 8 && rng.below(4) != 0;
    match v {
        Value::Object(m) if descend && !m.is_empty() => {
            let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
            if rng.below(6) == 0 {
                m.remove(&k);
            } else {
                mutate(m.get_mut(&k).unwrap(), rng, depth + 1);
            }
        }
        Value::Array(a) if descend && !a.is_empty() => {
            let i = rng.below(a.len());
            match rng.below(6) {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let dup = a[i].clone();
                    a.push(dup);
                }
                _ => mutate(&mut a[i], rng, depth + 1),
            }
        }
        _ => {
            let hostile = [
                json!(null),
                json!(-1),
                json!(0),
                json!(1e300),
                json!(-0.0),
                json!(1.5),
                json!(u64::MAX),
                json!("NaN"),
                json!("Infinity"),
                json!("x"),
                json!(true),
                json!([]),
                json!({}),
                json!([1, 2]),
                json!({"params": ["nope"]}),
            ];
            *v = hostile[rng.below(hostile.len())].clone();
        }
    }
}

#[test]
fn mutated_cases_never_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance/cases");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut runs = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let original: Value = serde_json::from_str(&text).unwrap();
        for _ in 0..40 {
            let mut v = original.clone();
            for _ in 0..1 + rng.below(3) {
                mutate(&mut v, &mut rng, 0);
            }
            let mutated = v.to_string();
            let result = catch_unwind(AssertUnwindSafe(|| replay_json(&mutated)));
            assert!(result.is_ok(), "replay panicked on:\n{mutated}");
            runs += 1;
        }
        // Truncated files are malformed JSON, never a panic.
        let cut = &text[..text.len() / 2];
        assert!(replay_json(cut).unwrap_err().to_string().starts_with("invalid_config"));
    }
    assert!(runs >= 46 * 40);
}

#[test]
fn hostile_sizes_are_refused_or_bounded() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance/cases");
    let text = std::fs::read_to_string(dir.join("lbfgs_rosenbrock_fixed_step.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    // A huge step count must not pre-allocate (it would abort); a zero step count is fine.
    v["num_steps"] = json!(0);
    assert!(replay_json(&v.to_string()).unwrap().per_step.is_empty());
    // A billion LBFGS steps would grow the output for ever: over the documented limit.
    v["num_steps"] = json!(1_000_000_000u64);
    let err = replay_json(&v.to_string()).unwrap_err().to_string();
    assert!(err.starts_with("unsupported") && err.contains("limit of 100000"), "{err}");
    v["num_steps"] = json!(3);
    // A shape whose element count overflows is a shape mismatch, not an overflow.
    v["params"][0]["shape"] = json!([u64::MAX, 4]);
    assert!(replay_json(&v.to_string()).unwrap_err().to_string().starts_with("shape_mismatch"));

    let text = std::fs::read_to_string(dir.join("reduce_batch_weighted_ws4.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    // More ranks than one process may run as threads: the documented limit, named.
    for w in [513u64, 4096, 1 << 40] {
        let mut big = v.clone();
        big["world_size"] = json!(w);
        let err = replay_json(&big.to_string()).unwrap_err().to_string();
        assert!(err.starts_with("unsupported") && err.contains("limit of 512 ranks"), "{err}");
    }
    v["strategy"] = json!("single");
    v["world_size"] = json!(1);
    let steps = v["steps"].as_array_mut().unwrap();
    for s in steps.iter_mut() {
        let g = s["grads"][0].clone();
        s["grads"] = json!([g]);
        s["batch_sizes"] = json!([3]);
    }
    assert!(replay_json(&v.to_string()).is_ok());
    // A rank may bring no samples, but some rank must: a zero total has no average.
    v["steps"][0]["batch_sizes"] = json!([0]);
    assert!(replay_json(&v.to_string()).unwrap_err().to_string().starts_with("invalid_config"));
}
