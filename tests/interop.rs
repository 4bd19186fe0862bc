//! The interop exports on a small random model compressed with a plan that drops a layer
//! and keeps different FFN widths: the GGUF read back (layout, llama.cpp's per-layer widths
//! and `deci` architecture, q/k rows interleaved for llama.cpp's rope, factor pairs
//! multiplied back, the tokenizer embedded) and the Hugging Face custom-code folder (the
//! stored tensors under their module names, auto_map, the modeling files); a
//! SentencePiece-style tokenizer embedded as llama.cpp's `llama` vocabulary (scores from the
//! merge ranks, token types, special ids) and the tokenizers it refuses; a Qwen2 model (q/k/v
//! biases, its pre-tokenizer) as `llama` and, compressed with per-layer widths, as `deci`.
//! Loading them in llama.cpp and transformers is `scripts/check-interop.sh` (docs/interop.md).

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

/// A SentencePiece-style tokenizer.json (BPE with byte fallback, "▁" for spaces, Llama-2's
/// normalizer): <unk>, <s>, </s>, the 256 byte tokens, then `pieces`, with a merge for every
/// split of a piece into two pieces, ranked by the piece's id (as transformers converts a
/// SentencePiece model); `edit` changes the JSON before it is written.
fn write_spm_tokenizer(dir: &std::path::Path, edit: impl Fn(&mut serde_json::Value)) -> Vec<String> {
    let pieces = ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "▁abc"];
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].iter().map(|s| s.to_string()).collect();
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    tokens.extend(pieces.iter().map(|s| s.to_string()));
    let vocab: serde_json::Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::json!(i))).collect();
    let mut merges = Vec::new();
    for t in &tokens {
        for (k, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(k);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                merges.push(serde_json::json!([a, b]));
            }
        }
    }
    let special = |id: usize, text: &str| serde_json::json!({"id": id, "content": text, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let mut tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    edit(&mut tok);
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok).unwrap()).unwrap();
    tokens
}

#[test]
fn gguf_export_embeds_a_sentencepiece_tokenizer_and_refuses_what_llama_cpp_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("spm");
    // 4 ids past the tokenizer: a padded embedding
    let vocab = 3 + 256 + 9 + 4;
    let mut cfg = synthetic::config_json(synthetic::Shape { model_type: "llama", layers: 1, hidden: 32, ffn: 64, heads: 2, kv_heads: 2, vocab, tied: false });
    cfg["bos_token_id"] = serde_json::json!(1);
    cfg["eos_token_id"] = serde_json::json!(2);
    synthetic::write_random_model(&src, &cfg, 3).unwrap();
    let tokens = write_spm_tokenizer(&src, |_| {});
    std::fs::write(src.join("tokenizer_config.json"), r#"{"add_eos_token": false, "chat_template": "{{ messages }}"}"#).unwrap();
    let model = Model::open(&src).unwrap();
    let out = dir.path().join("gguf");
    export_gguf(&common::gpu(), &model, GgufType::F16, &out, false, &mut |_, _| {}).unwrap();
    let f = GgufFile::read(&out.join(FILE)).unwrap();
    let str_of = |k: &str| f.get(k).cloned();
    assert_eq!(str_of("tokenizer.ggml.model"), Some(Value::Str("llama".into())));
    assert_eq!(str_of("tokenizer.ggml.pre"), Some(Value::Str("default".into())));
    assert_eq!(str_of("tokenizer.ggml.merges"), None, "llama.cpp's SentencePiece tokenizer works from scores");
    let Some(Value::Strs(names)) = f.get("tokenizer.ggml.tokens") else { panic!("no tokens") };
    assert_eq!(names[..tokens.len()], tokens[..]);
    assert_eq!(names[vocab - 1], format!("[PAD{}]", vocab - 1));
    let Some(Value::I32s(types)) = f.get("tokenizer.ggml.token_type") else { panic!("no token types") };
    // unknown, control, control, bytes, normal pieces, unused padding
    assert_eq!((types[0], types[1], types[2], types[3], types[258], types[259], types[vocab - 1]), (2, 3, 3, 6, 6, 1, 5));
    let Some(Value::F32s(scores)) = f.get("tokenizer.ggml.scores") else { panic!("no scores") };
    let id = |t: &str| tokens.iter().position(|x| x == t).unwrap();
    // merges in id order: "▁ a" (rank 0), "a b" (1), "▁ ab" and "▁a b" (2, 3), "b c" (4),
    // "▁a bc", "▁ab c" (5, 6): a piece scores minus its first merge's rank
    assert_eq!([scores[id("▁a")], scores[id("ab")], scores[id("▁ab")], scores[id("bc")], scores[id("▁abc")]], [0.0, -1.0, -2.0, -4.0, -5.0]);
    assert!(scores[id("a")] < -7.0 && scores[id("<0x41>")] < -7.0, "pieces no merge builds score below every merge");
    for (k, v) in [("bos_token_id", 1), ("eos_token_id", 2), ("unknown_token_id", 0)] {
        assert_eq!(f.get(&format!("tokenizer.ggml.{k}")), Some(&Value::U32(v)), "{k}");
    }
    assert_eq!(f.get("tokenizer.ggml.add_bos_token"), Some(&Value::Bool(true)), "the template puts <s> first");
    assert_eq!(f.get("tokenizer.ggml.add_eos_token"), Some(&Value::Bool(false)));
    assert_eq!(f.get("tokenizer.ggml.add_space_prefix"), Some(&Value::Bool(true)));
    assert_eq!(f.get("tokenizer.chat_template"), Some(&Value::Str("{{ messages }}".into())));

    // refusals: each names the cause, and leaves no output behind
    let refused = |edit: &dyn Fn(&mut serde_json::Value), want: &str| {
        write_spm_tokenizer(&src, edit);
        let model = Model::open(&src).unwrap();
        let out = dir.path().join("refused");
        let e = format!("{:#}", export_gguf(&common::gpu(), &model, GgufType::F16, &out, false, &mut |_, _| {}).unwrap_err());
        assert!(e.contains(want), "{e}");
        assert!(!out.exists(), "a refused export leaves nothing at {}", out.display());
    };
    // a piece two pieces make without a merge: llama.cpp would join them anyway
    refused(&|t| t["model"]["merges"].as_array_mut().unwrap().retain(|m| m != &serde_json::json!(["b", "c"])), r#""bc" = "b" + "c" has no merge"#);
    // HF's Metaspace skips the prefix before a leading space, llama.cpp does not
    refused(
        &|t| {
            t["normalizer"] = serde_json::Value::Null;
            t["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false});
        },
        "prepend_scheme \"first\"",
    );
    refused(&|t| t["model"]["vocab"].as_object_mut().unwrap().remove("<0x7F>").map(|_| ()).unwrap(), "no token <0x7F>");
    refused(&|t| t["normalizer"] = serde_json::json!({"type": "NFKC"}), "has no counterpart for");
    refused(&|t| t["model"]["type"] = serde_json::json!("Unigram"), "Unigram");
}

/// A byte-level tokenizer.json with Qwen2's pre-tokenizer (its split regex, then ByteLevel
/// without GPT-2's regex) and normalizer.
fn write_qwen2_tokenizer(dir: &std::path::Path, vocab_size: usize) {
    common::write_bpe_tokenizer(dir, vocab_size);
    let path = dir.join("tokenizer.json");
    let mut tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let regex = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    tok["normalizer"] = serde_json::json!({"type": "NFC"});
    tok["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]});
    std::fs::write(path, serde_json::to_string(&tok).unwrap()).unwrap();
}

#[test]
fn gguf_export_writes_qwen2_with_its_qkv_biases() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("qwen2");
    let cfg = synthetic::config_json(synthetic::Shape { model_type: "qwen2", layers: 2, hidden: 64, ffn: 160, heads: 4, kv_heads: 2, vocab: VOCAB, tied: true });
    synthetic::write_random_model(&src, &cfg, 7).unwrap();
    write_qwen2_tokenizer(&src, VOCAB);
    let dense = Model::open(&src).unwrap();
    let out = dir.path().join("gguf");
    let s = export_gguf(&common::gpu(), &dense, GgufType::F32, &out, false, &mut |_, _| {}).unwrap();
    assert_eq!(s.arch, GgufArch::Llama);
    let f = GgufFile::read(&out.join(FILE)).unwrap();
    assert_eq!(f.get("tokenizer.ggml.model"), Some(&Value::Str("gpt2".into())));
    assert_eq!(f.get("tokenizer.ggml.pre"), Some(&Value::Str("qwen2".into())));
    assert_eq!(s.params, f.tensors.iter().map(|(t, _)| t.elements()).sum::<u64>());
    // q/k biases interleaved per head like their rows (head_dim 16), v's as it is
    for (hf, name, n) in [("q", "attn_q", 64), ("k", "attn_k", 32), ("v", "attn_v", 32)] {
        let want = dense.store.f32(&format!("model.layers.1.self_attn.{hf}_proj.bias"), &[n]).unwrap();
        let got = f.values(&format!("blk.1.{name}.bias")).unwrap();
        for (row, g) in got.iter().enumerate() {
            let hf_row = if hf == "v" { row } else { row / 16 * 16 + (row % 16 % 2) * 8 + row % 16 / 2 };
            assert_eq!(*g, want[hf_row], "{name}.bias[{row}]");
        }
    }
    assert!(f.tensors.iter().all(|(t, _)| !t.name.contains("attn_output.bias") && !t.name.contains("ffn_down.bias")), "qwen2 has no o or FFN biases");

    // compressed with different FFN widths and the FFN refit's bias: deci, which loads q/k/v
    // biases as llama does
    let plan = Plan {
        layers: vec![PlanLayer { attention_keep: Some(0.5), ffn_keep: Some(0.8), ..Default::default() }, PlanLayer { attention_keep: Some(0.7), ffn_keep: Some(0.4), ..Default::default() }],
        note: String::new(),
    };
    let opts = methods::CompressOptions { ratio: 0.5, plan: Some(plan), ..Default::default() };
    let calib: Vec<u32> = (0..6 * 16).map(|i| (i * 37 % VOCAB) as u32).collect();
    let small_dir = dir.path().join("small");
    pipeline::compress(&common::gpu(), &Run::new(&dense, &calib, 16, &opts, &small_dir), &mut |_, _, _| {}).unwrap();
    let small = Model::open(&small_dir).unwrap();
    let out = dir.path().join("gguf-deci");
    let s = export_gguf(&common::gpu(), &small, GgufType::F16, &out, false, &mut |_, _| {}).unwrap();
    assert_eq!(s.arch, GgufArch::Deci);
    let f = GgufFile::read(&out.join(FILE)).unwrap();
    for i in 0..2 {
        for name in ["attn_q", "attn_k", "attn_v"] {
            assert!(f.tensors.iter().any(|(t, _)| t.name == format!("blk.{i}.{name}.bias")), "blk.{i}.{name}.bias");
        }
    }

    // a sliding window becomes the training context (full attention up to it is the same
    // function; llama.cpp's llama graph attends over the whole context)
    let mut windowed = cfg.clone();
    windowed["use_sliding_window"] = serde_json::json!(true);
    windowed["sliding_window"] = serde_json::json!(8);
    std::fs::write(src.join("config.json"), serde_json::to_string(&windowed).unwrap()).unwrap();
    let s = export_gguf(&common::gpu(), &Model::open(&src).unwrap(), GgufType::F16, &dir.path().join("w"), false, &mut |_, _| {}).unwrap();
    assert_eq!(s.window_as_context, Some(8));
    let f = GgufFile::read(&dir.path().join("w").join(FILE)).unwrap();
    assert_eq!(f.get("llama.context_length"), Some(&Value::U32(8)));
}
