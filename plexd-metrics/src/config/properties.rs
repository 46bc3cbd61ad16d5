//! Properties of loading and validation over hostile input: whatever a file or the
//! environment holds, the agent ends with a config or with problems, one line each, and
//! never panics.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::{Config, ConfigError};

/// Every key path of the schema, as the environment names them.
fn key_paths() -> Vec<Vec<String>> {
    Config::env_keys().into_iter().map(|k| k.path).collect()
}

/// Values a user might write, right or wrong, for any key.
fn scalar() -> impl Strategy<Value = serde_yaml_ng::Value> {
    use serde_yaml_ng::Value;
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_map(|n| Value::Number(n.into())),
        "[a-z0-9:/._ -]{0,24}".prop_map(Value::String),
        "[0-9]{1,4}(ns|us|ms|s|m|h|d|x|)".prop_map(Value::String),
        "(https?|ftp)://[a-z0-9.:\\[\\]]{0,20}/?[a-z]{0,5}".prop_map(Value::String),
        Just(Value::Null),
        proptest::collection::vec("[a-z0-9.]{0,8}", 0..3)
            .prop_map(|v| { Value::Sequence(v.into_iter().map(Value::String).collect()) }),
    ]
}

/// A YAML document setting some schema keys (and now and then an unknown one) to
/// arbitrary values.
fn document() -> impl Strategy<Value = String> {
    let paths = key_paths();
    proptest::collection::vec(
        (
            prop_oneof![
                9 => proptest::sample::select(paths),
                1 => "[a-z_]{1,10}".prop_map(|k| vec!["metrics".to_owned(), k]),
            ],
            scalar(),
        ),
        0..12,
    )
    .prop_map(|settings| {
        let mut root = serde_yaml_ng::Mapping::new();
        for (path, value) in settings {
            insert(&mut root, &path, value);
        }
        serde_yaml_ng::to_string(&root).expect("a mapping serialises")
    })
}

fn insert(map: &mut serde_yaml_ng::Mapping, path: &[String], value: serde_yaml_ng::Value) {
    use serde_yaml_ng::Value;
    let key = Value::String(path[0].clone());
    if path.len() == 1 {
        map.insert(key, value);
        return;
    }
    let child = map
        .entry(key)
        .or_insert_with(|| Value::Mapping(Default::default()));
    if !child.is_mapping() {
        *child = Value::Mapping(Default::default());
    }
    if let Value::Mapping(child) = child {
        insert(child, &path[1..], value);
    }
}

/// Loads `text` and the variables as the binary does: parse, overrides, validation.
fn load(text: &str, vars: &BTreeMap<String, String>) -> Result<(), Vec<String>> {
    let dir = std::env::temp_dir().join(format!("plexd-config-prop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.yaml", fastrand::u64(..)));
    std::fs::write(&path, text).unwrap();
    let loaded = Config::load_with_env(Some(&path), vars.clone());
    let _ = std::fs::remove_file(&path);
    let config = loaded.map_err(|e| e.lines())?;
    config
        .validate()
        .map(drop)
        .map_err(|e: ConfigError| e.lines())
}

fn one_line_each(problems: &[String]) -> Result<(), TestCaseError> {
    prop_assert!(!problems.is_empty());
    for p in problems {
        prop_assert!(!p.trim().is_empty(), "an empty problem in {:?}", problems);
        prop_assert!(!p.contains('\n'), "a problem of several lines: {:?}", p);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn any_text_is_a_config_or_an_error(text in "(?s).{0,400}") {
        if let Ok(config) = Config::parse(&text) {
            let _ = config.validate();
        }
    }

    #[test]
    fn any_value_for_any_key_gives_a_config_or_problems_one_line_each(doc in document()) {
        if let Err(problems) = load(&doc, &BTreeMap::new()) {
            one_line_each(&problems)?;
        }
    }

    #[test]
    fn any_environment_gives_a_config_or_problems_one_line_each(
        vars in proptest::collection::btree_map(
            prop_oneof![
                9 => proptest::sample::select(
                    Config::env_keys().into_iter().map(|k| k.variable).collect::<Vec<_>>()
                ),
                1 => "PLEXD_METRICS_[A-Z_]{1,20}",
            ],
            "(?s).{0,40}",
            0..6,
        ),
    ) {
        if let Err(problems) = load("", &vars) {
            one_line_each(&problems)?;
        }
    }
}
