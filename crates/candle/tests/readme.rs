//! The README's candle snippet is the example's marked region, verbatim: it cannot drift
//! from a program that CI builds and runs.

#[test]
fn the_readme_snippet_is_the_examples_region() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join("examples/candle_zero2.rs")).unwrap();
    let readme = std::fs::read_to_string(root.join("../../README.md")).unwrap();
    let region = example
        .split("// --8<-- [start:readme]\n")
        .nth(1)
        .and_then(|rest| rest.split("    // --8<-- [end:readme]").next())
        .expect("the example marks its README region");
    let dedented: String = region.lines().map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l))).collect();
    assert!(dedented.lines().count() > 20, "region too short: {dedented}");
    assert!(
        readme.contains(&format!("```rust\n{dedented}```")),
        "README.md's candle snippet differs from the example's region:\n{dedented}"
    );
}
