//! Property-based fuzzing of the readers of untrusted files: config.json text, safetensors
//! bytes (random, truncated, bit-flipped) and whole model folders. None may panic; every
//! failure must be a classified error, and whatever opens must read back without panicking.

mod common;

use std::sync::OnceLock;

use lorap_gpu::cli::classify;
use lorap_gpu::error::ErrorClass;
use lorap_gpu::model::{config::ModelConfig, synthetic, Model, WeightStore};
use proptest::prelude::*;

/// A valid small model folder's files, made once.
fn valid() -> &'static (String, Vec<u8>) {
    static V: OnceLock<(String, Vec<u8>)> = OnceLock::new();
    V.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        synthetic::write_random_model(dir.path(), &synthetic::config_json(synthetic::Shape { model_type: "llama", layers: 1, hidden: 16, ffn: 32, heads: 2, kv_heads: 1, vocab: 20, tied: true }), 4).unwrap();
        (std::fs::read_to_string(dir.path().join("config.json")).unwrap(), std::fs::read(dir.path().join("model.safetensors")).unwrap())
    })
}

/// A JSON value of any shape, small.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        (0u64..5000).prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(serde_json::Value::from),
        "[a-z_0-9]{0,8}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| prop::collection::vec(inner, 0..4).prop_map(serde_json::Value::from))
}

const FIELDS: &[&str] = &[
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "rope_scaling", "hidden_act", "lorap",
    "attention_bias",
];

fn write_folder(dir: &std::path::Path, config: &str, weights: &[u8]) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
}

/// Opens the folder; on success reads every tensor.
fn open_and_read(dir: &std::path::Path) -> Result<(), ErrorClass> {
    let m = Model::open(dir).map_err(|e| classify(&e.into()))?;
    for name in m.store.names().map(String::from).collect::<Vec<_>>() {
        let shape = m.store.shape(&name).unwrap().to_vec();
        m.store.f32(&name, &shape).map_err(|e| classify(&e.into()))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn config_parse_never_panics_on_any_text(text in ".{0,200}") {
        let _ = ModelConfig::parse(&text, "fuzz");
    }

    #[test]
    fn config_with_a_mutated_field_is_accepted_or_classified(field in 0..FIELDS.len(), value in json_value(), drop in any::<bool>()) {
        let (cfg, weights) = valid();
        let mut v: serde_json::Value = serde_json::from_str(cfg).unwrap();
        if drop { v.as_object_mut().unwrap().remove(FIELDS[field]); } else { v[FIELDS[field]] = value; }
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), &v.to_string(), weights);
        if let Err(class) = open_and_read(dir.path()) {
            prop_assert!(class != ErrorClass::Other, "unclassified error");
        }
    }

    #[test]
    fn safetensors_with_flipped_bytes_never_panics(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let (cfg, weights) = valid();
        let mut w = weights.clone();
        // flip mostly in the header, where the structure is
        let header = 8 + u64::from_le_bytes(w[..8].try_into().unwrap()) as usize;
        for (i, b) in flips {
            let at = if b % 2 == 0 { i.index(header.min(w.len())) } else { i.index(w.len()) };
            w[at] ^= b | 1;
        }
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), cfg, &w);
        if let Err(class) = open_and_read(dir.path()) {
            prop_assert!(class != ErrorClass::Other, "unclassified error");
        }
    }

    #[test]
    fn safetensors_truncated_anywhere_is_refused(cut in any::<prop::sample::Index>()) {
        let (cfg, weights) = valid();
        let at = cut.index(weights.len());
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), cfg, &weights[..at]);
        prop_assert_eq!(open_and_read(dir.path()), Err(ErrorClass::CorruptWeights));
    }

    #[test]
    fn random_bytes_are_not_a_weight_store(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
        prop_assert!(WeightStore::open(dir.path()).is_err());
    }
}
