//! The interop exports on a small random model compressed with a plan that drops a layer
//! and keeps different FFN widths: the GGUF read back (layout, llama.cpp's per-layer widths
//! and `deci` architecture, q/k rows interleaved for llama.cpp's rope, factor pairs
//! multiplied back, the tokenizer embedded) and the Hugging Face custom-code folder (the
//! stored tensors under their module names, auto_map, the modeling files). Loading them in
//! llama.cpp and transformers is `scripts/check-interop.sh` (docs/interop.md).

mod common;

use lorap_gpu::export::gguf::{export_gguf, GgufArch, GgufType, FILE};
use lorap_gpu::format::gguf::{GgufFile, TensorType, Value};
use lorap_gpu::format::plan::{LinearRepr, Plan, PlanLayer};
use lorap_gpu::methods;
use lorap_gpu::model::{synthetic, Model};
use lorap_gpu::pipeline::{self, Run};

const VOCAB: usize = 101;

fn compressed(dir: &std::path::Path) -> (Model, Model) {
    let src = dir.join("dense");
    let cfg = synthetic::config_json(synthetic::Shape { model_type: "llama", layers: 3, hidden: 64, ffn: 160, heads: 4, kv_heads: 2, vocab: VOCAB, tied: true });
    synthetic::write_random_model(&src, &cfg, 5).unwrap();
    common::write_bpe_tokenizer(&src, VOCAB);
    let dense = Model::open(&src).unwrap();
    let plan = Plan {
        layers: vec![
            PlanLayer { attention_keep: Some(0.5), ffn_keep: Some(0.8), ..Default::default() },
            PlanLayer { dropped: true, ..Default::default() },
            PlanLayer { attention_keep: Some(0.6), ffn_keep: Some(0.4), ..Default::default() },
        ],
        note: String::new(),
    };
    let opts = methods::CompressOptions { ratio: 0.5, plan: Some(plan), ..Default::default() };
    let calib: Vec<u32> = (0..6 * 16).map(|i| (i * 37 % VOCAB) as u32).collect();
    let out = dir.join("small");
    pipeline::compress(&common::gpu(), &Run::new(&dense, &calib, 16, &opts, &out), &mut |_, _, _| {}).unwrap();
    (dense, Model::open(&out).unwrap())
}

#[test]
fn gguf_export_keeps_pruned_widths_and_drops_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (_, small) = compressed(dir.path());
    let cfg = &small.cfg;
    assert_eq!(cfg.num_hidden_layers, 2);
    let widths: Vec<u32> = (0..2).map(|i| cfg.layer_plan(i).ffn_width as u32).collect();
    assert_ne!(widths[0], widths[1]);
    let out = dir.path().join("gguf");
    let s = export_gguf(&common::gpu(), &small, GgufType::F32, &out, false, &mut |_, _| {}).unwrap();
    assert_eq!(s.arch, GgufArch::Deci, "different FFN widths need llama.cpp's per-layer graph");
    let f = GgufFile::read(&out.join(FILE)).unwrap();
    assert_eq!(f.get("general.architecture"), Some(&Value::Str("deci".into())));
    assert_eq!(f.get("deci.block_count"), Some(&Value::U32(2)));
    assert_eq!(f.get("deci.feed_forward_length"), Some(&Value::U32s(widths.clone())));
    assert_eq!(f.get("tokenizer.ggml.pre"), Some(&Value::Str("gpt2".into())));
    assert_eq!(f.get("tokenizer.ggml.merges"), Some(&Value::Strs(vec!["t 1".into(), "t 2".into()])));
    assert_eq!(f.get("tokenizer.ggml.add_bos_token"), Some(&Value::Bool(false)));
    match f.get("tokenizer.ggml.token_type") {
        Some(Value::I32s(t)) => assert_eq!((t[0], t[1], t.len()), (3, 1, VOCAB)),
        other => panic!("token types {other:?}"),
    }
    assert!(f.tensors.iter().all(|(t, _)| !t.name.starts_with("blk.2.")), "the dropped layer is absent");
    assert!(f.tensors.iter().all(|(t, _)| !t.name.starts_with("output.")), "a tied head is not stored twice");
    assert_eq!(s.params, f.tensors.iter().map(|(t, _)| t.elements()).sum::<u64>());
    for (i, w) in widths.iter().enumerate() {
        let down = &f.tensors.iter().find(|(t, _)| t.name == format!("blk.{i}.ffn_down.weight")).unwrap().0;
        assert_eq!(down.dims, vec![*w as u64, 64]);
    }
    // q: the factor pair multiplied back, rows interleaved per head for llama.cpp's rope
    let plan = cfg.layer_plan(0);
    let LinearRepr::LowRank(r) = plan.repr(lorap_gpu::format::linear::Linear::Q) else { panic!("q of layer 0 should be factored") };
    let a = small.store.f32("model.layers.0.self_attn.q_proj.factor_a", &[64, r]).unwrap();
    let b = small.store.f32("model.layers.0.self_attn.q_proj.factor_b", &[r, 64]).unwrap();
    let q = f.values("blk.0.attn_q.weight").unwrap();
    let (head_dim, half) = (16, 8);
    for row in 0..64 {
        let (h, within) = (row / head_dim, row % head_dim);
        let hf_row = h * head_dim + (within % 2) * half + within / 2;
        for col in 0..64 {
            let want: f32 = (0..r).map(|k| a[hf_row * r + k] * b[k * 64 + col]).sum();
            assert!((q[row * 64 + col] - want).abs() <= 1e-4 * (1.0 + want.abs()), "q[{row}, {col}]");
        }
    }
    // q8_0 falls back to f16 for rows that are not whole blocks (here every width)
    let out8 = dir.path().join("gguf8");
    export_gguf(&common::gpu(), &small, GgufType::Q8_0, &out8, false, &mut |_, _| {}).unwrap();
    let f8 = GgufFile::read(&out8.join(FILE)).unwrap();
    let ty = |n: &str| f8.tensors.iter().find(|(t, _)| t.name == n).unwrap().0.ty;
    assert_eq!(ty("blk.0.attn_q.weight"), TensorType::Q8_0);
    assert_eq!(ty("blk.0.ffn_down.weight"), if widths[0].is_multiple_of(32) { TensorType::Q8_0 } else { TensorType::F16 });
    assert_eq!(ty("blk.0.attn_norm.weight"), TensorType::F32);
    // an existing output is refused without --force
    assert!(export_gguf(&common::gpu(), &small, GgufType::F16, &out, false, &mut |_, _| {}).is_err());
}

#[test]
fn hf_export_stores_factor_pairs_under_their_module_names() {
    let dir = tempfile::tempdir().unwrap();
    let (dense, small) = compressed(dir.path());
    let out = dir.path().join("hf");
    lorap_gpu::export::hf::export_hf(&small, &out, false, &mut |_, _| {}).unwrap();
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(raw["model_type"], "lorap");
    assert_eq!(raw["lorap_base_model_type"], "llama");
    assert_eq!(raw["auto_map"]["AutoModelForCausalLM"], "modeling_lorap.LorapForCausalLM");
    assert_eq!(raw["lorap"], serde_json::to_value(small.cfg.lorap.as_ref().unwrap()).unwrap());
    for f in ["modeling_lorap.py", "configuration_lorap.py", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let store = lorap_gpu::format::WeightStore::open(&out).unwrap();
    let names: Vec<&str> = store.names().collect();
    assert!(names.contains(&"model.layers.0.self_attn.q_proj.factor_a.weight"));
    assert!(names.iter().all(|n| !n.ends_with(".factor_a") && !n.ends_with(".factor_b")));
    let stored: usize = names.iter().map(|n| store.shape(n).unwrap().iter().product::<usize>()).sum();
    assert_eq!(stored, small.cfg.total_params(), "the export holds exactly the compressed parameters");
    assert!(stored < dense.cfg.total_params());
    // a dense model loads in transformers as it is
    assert!(lorap_gpu::export::hf::export_hf(&dense, &dir.path().join("x"), false, &mut |_, _| {}).is_err());
}
