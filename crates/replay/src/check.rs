//! The checker's rules (`check.py`), so cases can be compared in-process by `cargo test`.
//!
//! A value passes if `|actual - expected| <= atol + rtol·|expected|`; for `lr` atol is
//! 1e-12. ZeRO strategies must also report where optimizer state lives.

use serde_json::Value;

/// Reasons `got` (the replay's JSON output) fails `case` (the case's JSON); empty if it
/// passes. `got` is `Err(class)` when the replay failed.
pub fn judge(case: &Value, got: Result<&Value, &str>) -> Vec<String> {
    let expected = &case["expected"];
    if let Some(class) = expected.get("error").and_then(Value::as_str) {
        return match got {
            Err(msg) if msg.to_lowercase().contains(&class.to_lowercase()) => vec![],
            Err(msg) => vec![format!("error does not name the class {class}: {msg}")],
            Ok(_) => vec![format!("succeeded, expected the error {class}")],
        };
    }
    let got = match got {
        Ok(v) => v,
        Err(msg) => return vec![format!("failed: {msg}")],
    };
    let tol = &case["tolerance"];
    let (rtol, atol) = (tol["rtol"].as_f64().unwrap_or(0.0), tol["atol"].as_f64().unwrap_or(0.0));
    let mut errors = Vec::new();
    if let Some(exp) = expected.get("params") {
        compare_named("params", &got["params"], exp, rtol, atol, &mut errors);
    }
    if let Some(exp) = expected.get("model_params") {
        check_model_params(case, got, exp, rtol, atol, &mut errors);
    }
    if let Some(exp) = expected.get("params_per_rank").and_then(Value::as_array) {
        match got.get("params_per_rank").and_then(Value::as_array) {
            Some(ranks) if ranks.len() == exp.len() => {
                for (r, (g, e)) in ranks.iter().zip(exp).enumerate() {
                    compare_named(&format!("params_per_rank[{r}]"), g, e, rtol, atol, &mut errors);
                }
            }
            _ => errors.push(format!("params_per_rank: want {} ranks", exp.len())),
        }
    }
    let exp_steps = expected["per_step"].as_array().cloned().unwrap_or_default();
    match got.get("per_step").and_then(Value::as_array) {
        Some(steps) if steps.len() == exp_steps.len() => {
            for (t, (g, e)) in steps.iter().zip(&exp_steps).enumerate() {
                for (key, ev) in e.as_object().into_iter().flatten() {
                    let what = format!("per_step[{t}].{key}");
                    let a = if key == "lr" { 1e-12 } else { atol };
                    match ev {
                        Value::Array(_) => compare_values(&what, &g[key], ev, rtol, a, &mut errors),
                        _ => {
                            if !close(&g[key], ev, rtol, a) {
                                errors.push(format!("{what} = {}, expected {ev}", g[key]));
                            }
                        }
                    }
                }
            }
        }
        _ => errors.push(format!("per_step: want a list of {} entries", exp_steps.len())),
    }
    if matches!(case["strategy"].as_str(), Some("zero1" | "zero2" | "zero3")) {
        check_state_bound(case, got, &mut errors);
    }
    errors
}

/// `model_params[i]` must be q(`params[i]`) exactly, and q of some value within
/// tolerance of the expected master (q is monotonic, so: between q(e - tol) and
/// q(e + tol)).
fn check_model_params(case: &Value, got: &Value, exp: &Value, rtol: f64, atol: f64, errors: &mut Vec<String>) {
    let dtype = case["precision"]["param_dtype"].as_str().unwrap_or("f32").parse::<distoptim::FloatDtype>().unwrap_or_default();
    let (Some(model), Some(params), Some(exp)) = (got["model_params"].as_object(), got["params"].as_object(), exp.as_object()) else {
        errors.push("model_params: missing".into());
        return;
    };
    let exp_params = &case["expected"]["params"];
    for name in exp.keys() {
        let f = |v: &Value| -> Vec<f32> { v.as_array().into_iter().flatten().map(|x| x.as_f64().unwrap_or(f64::NAN) as f32).collect() };
        let (m, p, e) =
            (f(&model.get(name).cloned().unwrap_or_default()), f(&params.get(name).cloned().unwrap_or_default()), f(&exp_params[name]));
        if m.len() != e.len() || p.len() != e.len() {
            errors.push(format!("model_params.{name}: expected {} values", e.len()));
            continue;
        }
        for i in 0..e.len() {
            let tol = (atol + rtol * f64::from(e[i]).abs()) as f32;
            let (lo, hi) = (dtype.round(e[i] - tol), dtype.round(e[i] + tol));
            if m[i].to_bits() != dtype.round(p[i]).to_bits() || !(lo <= m[i] && m[i] <= hi) {
                errors.push(format!(
                    "model_params.{name}[{i}] = {}, params {} rounds to {}, expected within [{lo}, {hi}]",
                    m[i],
                    p[i],
                    dtype.round(p[i])
                ));
                break;
            }
        }
    }
}

fn close(a: &Value, e: &Value, rtol: f64, atol: f64) -> bool {
    match (a.as_f64(), e.as_f64()) {
        (Some(a), Some(e)) => (a - e).abs() <= atol + rtol * e.abs(),
        _ => false,
    }
}

fn compare_values(what: &str, got: &Value, exp: &Value, rtol: f64, atol: f64, errors: &mut Vec<String>) {
    let exp = exp.as_array().cloned().unwrap_or_default();
    match got.as_array() {
        Some(g) if g.len() == exp.len() => {
            if let Some(i) = g.iter().zip(&exp).position(|(a, e)| !close(a, e, rtol, atol)) {
                errors.push(format!("{what}[{i}] = {}, expected {} (rtol {rtol}, atol {atol})", g[i], exp[i]));
            }
        }
        _ => errors.push(format!("{what}: expected {} values, got {got}", exp.len())),
    }
}

fn compare_named(what: &str, got: &Value, exp: &Value, rtol: f64, atol: f64, errors: &mut Vec<String>) {
    let (Some(g), Some(e)) = (got.as_object(), exp.as_object()) else {
        errors.push(format!("{what}: missing"));
        return;
    };
    let mut gk: Vec<_> = g.keys().collect();
    let mut ek: Vec<_> = e.keys().collect();
    gk.sort();
    ek.sort();
    if gk != ek {
        errors.push(format!("{what}: names {gk:?}, expected {ek:?}"));
        return;
    }
    for (name, ev) in e {
        compare_values(&format!("{what}.{name}"), &g[name], ev, rtol, atol, errors);
    }
}

fn check_state_bound(case: &Value, got: &Value, errors: &mut Vec<String>) {
    let ws = case["reshard"]["world_size"].as_u64().or(case["world_size"].as_u64()).unwrap_or(1) as usize;
    let sizes: Vec<u64> = case["params"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["shape"].as_array().into_iter().flatten().map(|d| d.as_u64().unwrap_or(0)).product())
        .collect();
    let total: u64 = sizes.iter().sum();
    let bound = total.div_ceil(ws as u64) + sizes.iter().copied().max().unwrap_or(0);
    let elems: Option<Vec<u64>> = got["optimizer_state_elems_per_rank"].as_array().and_then(|a| a.iter().map(Value::as_u64).collect());
    match elems {
        Some(e) if e.len() == ws => {
            if e.iter().sum::<u64>() != total {
                errors.push(format!("optimizer_state_elems_per_rank {e:?} does not sum to {total}"));
            } else if e.iter().any(|&n| n > bound) {
                errors.push(format!("optimizer_state_elems_per_rank {e:?}: a rank holds more than {bound}"));
            }
        }
        _ => errors.push(format!("optimizer_state_elems_per_rank: want {ws} non-negative integers")),
    }
}
