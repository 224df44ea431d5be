//! Property-based fuzzing of the checkpoint readers: the safetensors decoder and reader,
//! and the manifest reader, fed arbitrary bytes and mutations of valid files. They must
//! answer every input with a value or an error: no panic, no allocation beyond the
//! input's size, no hang. Bounded: a few hundred cases each (PROPTEST_CASES overrides).

use std::collections::BTreeMap;
use std::path::PathBuf;

use distoptim::checkpoint;
use distoptim::safetensors;
use proptest::prelude::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("distoptim-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn valid_file() -> Vec<u8> {
    let meta = BTreeMap::from([("steps".to_string(), "[1,2]".to_string()), ("range".to_string(), "0,6".to_string())]);
    safetensors::encode(&[("w".into(), &[1.0, 2.0, 3.0, 4.0][..]), ("exp_avg/w".into(), &[0.5, 0.25][..])], &meta)
}

/// A byte string and a list of edits (position, new byte) and a truncation point.
fn mutation() -> impl Strategy<Value = (Vec<(usize, u8)>, usize)> {
    (prop::collection::vec((any::<usize>(), any::<u8>()), 0..8), any::<usize>())
}

fn mutate(mut bytes: Vec<u8>, (edits, cut): (Vec<(usize, u8)>, usize)) -> Vec<u8> {
    for (at, b) in edits {
        let n = bytes.len();
        if n > 0 {
            bytes[at % n] = b;
        }
    }
    let keep = bytes.len() - cut % (bytes.len() / 4 + 1);
    bytes.truncate(keep);
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_decode_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = safetensors::decode(&bytes);
    }

    #[test]
    fn safetensors_decode_of_a_mutated_file_is_a_value_or_an_error(m in mutation()) {
        let bytes = mutate(valid_file(), m);
        if let Ok(d) = safetensors::decode(&bytes) {
            // Whatever decodes holds no more values than the file has bytes.
            prop_assert!(d.tensors.values().map(|v| v.len() * 4).sum::<usize>() <= bytes.len());
        }
    }

    #[test]
    fn the_streaming_reader_never_panics(m in mutation(), name in "[a-z/_]{0,12}") {
        let path = scratch("reader").join(format!("{}.safetensors", std::thread::current().name().unwrap_or("t").replace("::", "-")));
        std::fs::write(&path, mutate(valid_file(), m)).unwrap();
        if let Ok(mut r) = safetensors::Reader::open(&path) {
            let mut out = vec![0f32; 4];
            let _ = r.read(&name, &mut out);
            let _ = r.read("w", &mut out);
        }
    }

    #[test]
    fn the_manifest_reader_refuses_every_edit(m in mutation(), junk in prop::collection::vec(any::<u8>(), 0..256)) {
        let dir = scratch("manifest").join(std::thread::current().name().unwrap_or("t").replace("::", "-"));
        std::fs::create_dir_all(&dir).unwrap();
        let good = manifest_bytes();
        std::fs::write(dir.join("manifest.json"), &junk).unwrap();
        prop_assert!(checkpoint::read_manifest(&dir).is_err());
        let edited = mutate(good.clone(), m);
        std::fs::write(dir.join("manifest.json"), &edited).unwrap();
        let read = checkpoint::manifest::read(&dir);
        // Only the untouched manifest (or an edit to insignificant whitespace) passes.
        if edited != good {
            if let Ok(m) = read {
                prop_assert_eq!(m.to_bytes().unwrap(), good);
            }
        } else {
            prop_assert!(read.is_ok());
        }
    }
}

/// A valid manifest of a 2-rank checkpoint of 6 elements.
fn manifest_bytes() -> Vec<u8> {
    use distoptim::checkpoint::{FileEntry, Manifest, FORMAT_VERSION};
    let layout = distoptim_optim::Layout::new([("w", vec![2, 2]), ("b", vec![2])]).unwrap();
    let m = Manifest {
        format_version: FORMAT_VERSION,
        world_size: 2,
        strategy: "zero2".into(),
        layout,
        groups: vec![],
        step: 3,
        schedule_step: Some(3),
        counters: BTreeMap::new(),
        per_rank: false,
        precision: None,
        files: (0..2)
            .map(|r| FileEntry {
                name: format!("rank-{r:05}.safetensors"),
                rank: r,
                range: [3 * r, 3 * r + 3],
                bytes: 200,
                crc32: "00000000".into(),
            })
            .collect(),
        checksum: String::new(),
    };
    m.to_bytes().unwrap()
}
