//! Fuzzing of the config parser (issue 11): whatever is in jfs.toml, every
//! daemon either starts with a checked config or says what is wrong, and
//! never panics. Inputs: the seed corpus in `common/fuzz/config/` (kept in
//! the repository), byte-level mutations of it, every known key with
//! values of every type, and arbitrary text. `JFS_FUZZ_CASES` bounds the
//! cases per property.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use jfs_common::config::{known_keys, Config, ConfigError};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("JFS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn corpus() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/config");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("common/fuzz/config is in the repository")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        files.iter().map(|p| std::fs::read(p).expect("read a seed")).collect()
    })
}

fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
    let text = String::from_utf8_lossy(bytes);
    let r = Config::from_toml_str(&text, Path::new("fuzz.toml"));
    if let Err(e) = &r {
        // Every refusal explains itself.
        assert!(!e.to_string().trim().is_empty(), "an empty error for {text:?}");
    }
    r
}

#[test]
fn every_seed_parses() {
    assert!(corpus().len() >= 4);
    for (i, s) in corpus().iter().enumerate() {
        if let Err(e) = parse(s) {
            panic!("seed {i} does not parse: {e}");
        }
    }
}

#[test]
fn the_secret_is_never_in_debug_output() {
    let cfg = parse(&corpus()[1]).expect("seed 2 parses");
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("not-a-real-secret-0042"), "the secret in {shown}");
}

fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        ".{0,40}".prop_map(|s| toml::Value::String(s).to_string()),
        "[0-9.:,]{0,40}".prop_map(|s| format!("\"{s}\"")),
        Just("[]".to_string()),
        Just("[1, \"a\"]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,300}") {
        let _ = parse(text.as_bytes());
    }

    #[test]
    fn known_keys_with_any_value_never_panic(
        entries in prop::collection::vec((prop::sample::select(known_keys().collect::<Vec<_>>()), toml_value()), 1..6)
    ) {
        let mut text = String::new();
        let mut seen = std::collections::HashSet::new();
        for (k, v) in entries {
            if seen.insert(k) {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        let _ = parse(text.as_bytes());
    }

    #[test]
    fn mutated_seeds_never_panic(
        seed in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut b = corpus()[seed.index(corpus().len())].clone();
        for (at, byte, kind) in edits {
            if b.is_empty() {
                break;
            }
            let i = at.index(b.len());
            match kind {
                0 => b[i] = byte,
                1 => b.insert(i, byte),
                _ => {
                    b.remove(i);
                }
            }
        }
        let _ = parse(&b);
    }
}
