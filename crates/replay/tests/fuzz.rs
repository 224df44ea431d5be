//! Property-based fuzzing of the case parser: arbitrary text and arbitrary JSON trees
//! built from the format's own keys are replayed or refused with an error class, never a
//! panic. Bounded: a few hundred cases (PROPTEST_CASES overrides); generated cases are
//! small, so any that is valid replays in microseconds.

use distoptim_replay::replay_json;
use proptest::prelude::*;
use serde_json::{Map, Value};

const KEYS: &[&str] = &[
    "name",
    "world_size",
    "strategy",
    "optimizer",
    "optimizers",
    "param_groups",
    "params",
    "steps",
    "grads",
    "batch_sizes",
    "scheduler",
    "clip_grad_norm",
    "max_norm",
    "norm_type",
    "reshard",
    "after_step",
    "lr",
    "num_steps",
    "objective",
    "precision",
    "error",
];
const WORDS: &[&str] = &["ddp", "zero1", "zero2", "zero3", "single", "adamw", "sgd", "lbfgs", "linear", "w", "b", "NaN", "Infinity"];

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::from(n % 5000)),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        prop::sample::select(WORDS).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Map<_, _>>())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_is_refused_with_a_class(text in "\\PC{0,64}") {
        let _ = replay_json(&text);
    }

    #[test]
    fn arbitrary_trees_of_case_keys_replay_or_are_refused(v in json()) {
        let _ = replay_json(&v.to_string());
    }
}
