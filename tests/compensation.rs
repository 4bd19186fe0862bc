//! The compensations end to end on small random models: OBS channel selection, the
//! down_proj refit and the attention factor refit with their biases, stored, loaded, run on
//! the GPU against the f64 CPU reference, counted, and carried by every export (hf-dense as
//! a llama with mlp_bias/attention_bias, hf with the custom code's biases, GGUF's
//! ffn_down.bias, attn_q.bias, ...).

mod common;

use lorap_gpu::export::gguf::{export_gguf, GgufType, FILE};
use lorap_gpu::format::gguf::GgufFile;
use lorap_gpu::format::linear::Linear;
use lorap_gpu::methods::ffn::ChannelSelection;
use lorap_gpu::methods::lorap::{AttentionRefit, LorapOptions};
use lorap_gpu::methods::refit::RefitChoice;
use lorap_gpu::methods::{CompressOptions, MethodOptions};
use lorap_gpu::model::{forward::Runner, reference, synthetic, Model};
use lorap_gpu::pipeline::{self, CompressionReport, Run};

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n).map(|i| ((i as u64 * 2654435761 + seed * 97) % vocab as u64) as u32).collect()
}

fn refit_options(ratio: f64, selection: ChannelSelection) -> CompressOptions {
    CompressOptions { method: MethodOptions::Lorap(LorapOptions { ffn_refit: true, ffn_selection: selection, ..Default::default() }), ratio, ..Default::default() }
}

/// A random model of `model_type` compressed with the refit: (dense, compressed, report).
fn compressed(dir: &std::path::Path, model_type: &'static str, selection: ChannelSelection) -> (Model, Model, CompressionReport) {
    compressed_with(dir, model_type, &refit_options(0.3, selection))
}

/// A random model of `model_type` compressed with `opts` on 12 windows: (dense,
/// compressed, report).
fn compressed_with(dir: &std::path::Path, model_type: &'static str, opts: &CompressOptions) -> (Model, Model, CompressionReport) {
    let src = dir.join("dense");
    let cfg = synthetic::config_json(synthetic::Shape { model_type, layers: 2, hidden: 64, ffn: 160, heads: 4, kv_heads: 2, vocab: 101, tied: false });
    synthetic::write_random_model(&src, &cfg, 21).unwrap();
    common::write_bpe_tokenizer(&src, 101);
    let dense = Model::open(&src).unwrap();
    let out = dir.join("small");
    // 12 windows: 9 fit, 3 held out
    let (_, rep) = pipeline::compress(&common::gpu(), &Run::new(&dense, &tokens(12 * 16, 101, 4), 16, opts, &out), &mut |_, _, _| {}).unwrap();
    (dense, Model::open(&out).unwrap(), rep)
}

fn nll(m: &Model, toks: &[u32]) -> Vec<f32> {
    Runner::new(common::gpu(), m.cfg.clone(), m.store.clone(), true).window_nll(toks, 12, &mut |_, _| {}).unwrap()
}

#[test]
fn refit_biases_are_stored_counted_and_run_as_the_reference_does() {
    let dir = tempfile::tempdir().unwrap();
    let (_, small, rep) = compressed(dir.path(), "llama", ChannelSelection::Obs);
    let sec = small.cfg.lorap.as_ref().unwrap();
    for (l, plan) in rep.layers.iter().zip(&sec.layers) {
        let r = l.ffn_refit.as_ref().expect("every layer reports its refit");
        assert_eq!((r.fit_tokens, r.held_out_tokens), (9 * 16, 3 * 16));
        assert_eq!(r.candidates.len(), 2 + lorap_gpu::methods::refit::RIDGE_GRID.len());
        let best = r.candidates.iter().map(|c| c.held_out_rel_error).fold(f64::INFINITY, f64::min);
        assert_eq!(r.candidates.iter().find(|c| c.choice == r.choice).unwrap().held_out_rel_error, best, "the held-out minimum is chosen");
        assert_eq!(plan.biases.contains(&Linear::Down), r.choice != RefitChoice::Pruned);
        assert!(plan.ffn_width < 160);
    }
    assert!(sec.layers.iter().any(|p| p.biases == vec![Linear::Down]), "a random model's FFN gains from some compensation");
    // the bias is counted and stored
    assert_eq!(small.cfg.decoder_params(), rep.decoder_params_after);
    assert!(small.store.contains("model.layers.0.mlp.down_proj.bias") == sec.layers[0].biases.contains(&Linear::Down));
    // GPU forward with the biases equals the f64 CPU reference
    let toks = tokens(2 * 12, 101, 5);
    let got = nll(&small, &toks);
    let want: Vec<f64> = toks.chunks(12).flat_map(|w| reference::window_nll_ref(&small.cfg, &small.store, w).unwrap()).collect();
    let e = lorap_gpu::gpu::rel_frobenius(&got, &want);
    assert!(e < 1e-4, "compressed forward GPU vs CPU: {e:e}");

    // hf-dense: a stock llama with mlp_bias, computing the same function
    let hf = dir.path().join("hf-dense");
    lorap_gpu::export::export_hf_dense(&common::gpu(), &small, &hf, false, &mut |_, _| {}).unwrap();
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!((raw["model_type"].as_str(), raw["mlp_bias"].as_bool(), raw["attention_bias"].as_bool()), (Some("llama"), Some(true), Some(false)));
    let dense_export = Model::open(&hf).unwrap();
    for name in ["gate_proj", "up_proj", "down_proj"] {
        assert!(dense_export.store.contains(&format!("model.layers.1.mlp.{name}.bias")), "{name} bias (zeros where none was added)");
    }
    let e = lorap_gpu::gpu::rel_frobenius(&nll(&dense_export, &toks), &got.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(e < 1e-3, "hf-dense vs compressed NLL: {e:e}");

    // hf (custom code): the bias under the linear's own name
    let hfc = dir.path().join("hf");
    lorap_gpu::export::hf::export_hf(&small, &hfc, false, &mut |_, _| {}).unwrap();
    let exported = lorap_gpu::format::WeightStore::open(&hfc).unwrap();
    for (i, plan) in sec.layers.iter().enumerate() {
        assert_eq!(exported.contains(&format!("model.layers.{i}.mlp.down_proj.bias")), plan.biases.contains(&Linear::Down));
    }

    // GGUF: ffn_down.bias where the layer has one, counted in the file's parameters
    let gg = dir.path().join("gguf");
    let s = export_gguf(&common::gpu(), &small, GgufType::F32, &gg, false, &mut |_, _| {}).unwrap();
    let f = GgufFile::read(&gg.join(FILE)).unwrap();
    for (i, plan) in sec.layers.iter().enumerate() {
        let name = format!("blk.{i}.ffn_down.bias");
        match f.values(&name) {
            Ok(v) => assert_eq!(v, small.store.f32(&format!("model.layers.{i}.mlp.down_proj.bias"), &[64]).unwrap()),
            Err(_) => assert!(!plan.biases.contains(&Linear::Down), "{name} missing"),
        }
    }
    assert_eq!(s.params, f.tensors.iter().map(|(t, _)| t.elements()).sum::<u64>());
}

/// qwen2 keeps its q/k/v biases; with an added down_proj bias hf-dense writes a llama with
/// both bias groups on (o_proj's bias zero), the same function.
#[test]
fn qwen2_with_a_refit_exports_as_a_biased_llama() {
    let dir = tempfile::tempdir().unwrap();
    let (_, small, _) = compressed(dir.path(), "qwen2", ChannelSelection::Wanda);
    let sec = small.cfg.lorap.as_ref().unwrap();
    assert!(sec.layers.iter().any(|p| p.biases.contains(&Linear::Down)));
    assert!(small.store.contains("model.layers.0.self_attn.q_proj.bias"), "the model's own q/k/v biases stay");
    let toks = tokens(2 * 12, 101, 6);
    let got = nll(&small, &toks);
    let want: Vec<f64> = toks.chunks(12).flat_map(|w| reference::window_nll_ref(&small.cfg, &small.store, w).unwrap()).collect();
    assert!(lorap_gpu::gpu::rel_frobenius(&got, &want) < 1e-4);
    let hf = dir.path().join("hf-dense");
    lorap_gpu::export::export_hf_dense(&common::gpu(), &small, &hf, false, &mut |_, _| {}).unwrap();
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!((raw["model_type"].as_str(), raw["mlp_bias"].as_bool(), raw["attention_bias"].as_bool()), (Some("llama"), Some(true), Some(true)));
    let exported = Model::open(&hf).unwrap();
    assert!(exported.store.contains("model.layers.0.self_attn.o_proj.bias"));
    let e = lorap_gpu::gpu::rel_frobenius(&nll(&exported, &toks), &got.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(e < 1e-3, "hf-dense vs compressed NLL: {e:e}");
}

/// The attention refit: every factored matrix it covers (v/o, or q/k/v/o) reports its choice, the chosen biases are
/// stored (qwen2's own q/k/v biases added to them), counted, run as the f64 reference does,
/// and exported (hf-dense as a llama with attention_bias, GGUF's attn_*.bias).
#[test]
fn attention_refit_biases_are_stored_and_run_as_the_reference_does() {
    for (model_type, which) in [("llama", AttentionRefit::Vo), ("qwen2", AttentionRefit::Qkvo)] {
        let dir = tempfile::tempdir().unwrap();
        let opts = CompressOptions { method: MethodOptions::Lorap(LorapOptions { attention_refit: Some(which), ..Default::default() }), ratio: 0.5, ..Default::default() };
        let (dense, small, rep) = compressed_with(dir.path(), model_type, &opts);
        let sec = small.cfg.lorap.as_ref().unwrap();
        let mut refitted = 0;
        for (l, plan) in rep.layers.iter().zip(&sec.layers) {
            assert!(l.ffn_refit.is_none());
            for lin in Linear::ATTENTION {
                let r = &l.attention_refit[lin.index()];
                assert_eq!(r.is_some(), plan.rank(lin).is_some() && which.covers(lin), "{model_type} {lin:?}: refit exactly where factored and chosen");
                if let Some(r) = r {
                    refitted += 1;
                    assert_eq!((r.fit_tokens, r.held_out_tokens, r.features), (9 * 16, 3 * 16, plan.rank(lin).unwrap()));
                    let best = r.candidates.iter().map(|c| c.held_out_rel_error).fold(f64::INFINITY, f64::min);
                    assert_eq!(r.candidates.iter().find(|c| c.choice == r.choice).unwrap().held_out_rel_error, best);
                    assert_eq!(plan.biases.contains(&lin), r.choice != RefitChoice::Pruned, "{model_type} {lin:?}");
                }
            }
        }
        assert!(refitted > 0 && sec.layers.iter().any(|p| !p.biases.is_empty()), "{model_type}: some factored matrix gains a bias");
        assert_eq!(small.cfg.decoder_params(), rep.decoder_params_after);
        if model_type == "qwen2" {
            // a compensated q keeps the model's own bias inside its own
            let (i, plan) = sec.layers.iter().enumerate().find(|(_, p)| p.biases.contains(&Linear::Q)).expect("a compensated q_proj");
            let name = format!("model.layers.{i}.self_attn.q_proj.bias");
            let (own, stored) = (dense.store.f32(&name, &[64]).unwrap(), small.store.f32(&name, &[64]).unwrap());
            assert!(plan.biases.contains(&Linear::Q) && own != stored);
        }
        let toks = tokens(2 * 12, 101, 5);
        let got = nll(&small, &toks);
        let want: Vec<f64> = toks.chunks(12).flat_map(|w| reference::window_nll_ref(&small.cfg, &small.store, w).unwrap()).collect();
        let e = lorap_gpu::gpu::rel_frobenius(&got, &want);
        assert!(e < 1e-4, "{model_type}: compressed forward GPU vs CPU: {e:e}");
        let hf = dir.path().join("hf-dense");
        lorap_gpu::export::export_hf_dense(&common::gpu(), &small, &hf, false, &mut |_, _| {}).unwrap();
        let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
        assert_eq!((raw["model_type"].as_str(), raw["attention_bias"].as_bool()), (Some("llama"), Some(true)));
        let e = lorap_gpu::gpu::rel_frobenius(&nll(&Model::open(&hf).unwrap(), &toks), &got.iter().map(|&x| x as f64).collect::<Vec<_>>());
        assert!(e < 1e-3, "{model_type}: hf-dense vs compressed NLL: {e:e}");
        if model_type == "llama" {
            let gg = dir.path().join("gguf");
            export_gguf(&common::gpu(), &small, GgufType::F32, &gg, false, &mut |_, _| {}).unwrap();
            let f = GgufFile::read(&gg.join(FILE)).unwrap();
            for (i, plan) in sec.layers.iter().enumerate() {
                for (lin, name) in [(Linear::Q, "attn_q"), (Linear::K, "attn_k"), (Linear::V, "attn_v"), (Linear::O, "attn_output")] {
                    assert_eq!(f.values(&format!("blk.{i}.{name}.bias")).is_ok(), plan.biases.contains(&lin), "blk.{i}.{name}.bias");
                }
            }
        }
    }
}

/// Too few calibration windows to hold any out: refused before any work, output untouched.
#[test]
fn the_refit_needs_held_out_windows() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("dense");
    synthetic::write_random_model(&src, &synthetic::config_json(synthetic::Shape { model_type: "llama", layers: 1, hidden: 32, ffn: 64, heads: 2, kv_heads: 1, vocab: 50, tied: true }), 3).unwrap();
    let model = Model::open(&src).unwrap();
    let out = dir.path().join("never");
    let e = pipeline::compress(&common::gpu(), &Run::new(&model, &tokens(3 * 16, 50, 1), 16, &refit_options(0.2, ChannelSelection::Wanda), &out), &mut |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("at least 4 calibration windows"), "{e}");
    assert_eq!(lorap_gpu::cli::classify(&e), lorap_gpu::error::ErrorClass::BadArgument);
    assert!(!out.exists());
}

/// `compress`'s default: the FFN refit runs when the statistics have at least 4 windows,
/// is skipped with a note below that, is an error below that when asked for, and
/// `--no-ffn-refit` turns it off.
#[test]
fn compress_refits_the_ffn_by_default_when_the_windows_allow() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("dense");
    synthetic::write_random_model(&src, &synthetic::config_json(synthetic::Shape { model_type: "llama", layers: 2, hidden: 32, ffn: 64, heads: 2, kv_heads: 1, vocab: 101, tied: true }), 5).unwrap();
    common::write_bpe_tokenizer(&src, 101);
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, "the quick brown fox jumps over the lazy dog and the cat . ".repeat(40)).unwrap();
    let run = |samples: &str, extra: &[&str]| {
        let out = dir.path().join(format!("out-{samples}-{}", extra.join("")));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lorap-gpu"))
            .args(["compress", "--ratio", "0.3", "--seq-len", "8", "--samples", samples])
            .arg("--model").arg(&src).arg("--calib").arg(&calib).arg("--out").arg(&out)
            .args(extra)
            .env("WGPU_BACKEND", "vulkan")
            .output()
            .expect("run lorap-gpu");
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        let rep: Option<CompressionReport> = o.status.success().then(|| serde_json::from_str(&std::fs::read_to_string(out.join("compression_report.json")).unwrap()).unwrap());
        (rep, stderr)
    };
    let refitted = |rep: &CompressionReport| rep.layers.iter().filter(|l| l.ffn_refit.is_some()).count();
    let (rep, stderr) = run("4", &[]);
    assert_eq!(refitted(&rep.unwrap_or_else(|| panic!("default run: {stderr}"))), 2);
    let (rep, stderr) = run("4", &["--no-ffn-refit"]);
    assert_eq!(refitted(&rep.unwrap_or_else(|| panic!("--no-ffn-refit: {stderr}"))), 0);
    let (rep, stderr) = run("2", &[]);
    assert_eq!(refitted(&rep.unwrap_or_else(|| panic!("2 windows: {stderr}"))), 0);
    assert!(stderr.contains("the FFN refit is skipped"), "{stderr}");
    let (rep, stderr) = run("2", &["--ffn-refit"]);
    assert!(rep.is_none() && stderr.contains("at least 4 calibration windows"), "{stderr}");
    let (rep, stderr) = run("4", &["--ffn-refit", "--no-ffn-refit"]);
    assert!(rep.is_none() && stderr.contains("cannot be used with"), "{stderr}");
}
