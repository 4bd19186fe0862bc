//! LoRAP end to end on a small random model: achieved ratio, output folder layout, the
//! compressed model loads and runs on the GPU and matches the CPU reference forward, and
//! the randomized SVD against an exact SVD.

mod common;

use lorap_gpu::methods::{self, svd};
use lorap_gpu::pipeline::{self, Run};
use lorap_gpu::calib;
use lorap_gpu::model::{forward::Runner, reference, synthetic, Model};

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n).map(|i| ((i as u64 * 2654435761 + seed * 97) % vocab as u64) as u32).collect()
}

#[test]
fn lorap_compresses_a_random_model_to_the_requested_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("dense");
    let cfg = synthetic::config_json(synthetic::Shape { model_type: "llama", layers: 3, hidden: 64, ffn: 160, heads: 4, kv_heads: 2, vocab: 101, tied: true });
    synthetic::write_random_model(&src, &cfg, 7).unwrap();
    let model = Model::open(&src).unwrap();
    let gpu = common::gpu();
    let calib = tokens(8 * 16, 101, 1);
    for ratio in [0.2, 0.5] {
        let out = dir.path().join(format!("out{ratio}"));
        let opts = methods::CompressOptions { ratio, ..Default::default() };
        let control = pipeline::RunControl { report_files: Some(lorap_gpu::report::compress_files), ..Default::default() };
        let (path, rep) = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &out).with_control(control), &mut |_, _, _| {}).unwrap();
        assert_eq!(path, out);
        assert!((rep.achieved_decoder_ratio - ratio).abs() < 0.02, "asked {ratio}, got {}", rep.achieved_decoder_ratio);
        for f in ["config.json", "model.safetensors.index.json", "compression_report.json", "report.html", "report-ranks.svg", "report-spectrum-q_proj.svg"] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        assert!(!dir.path().join(format!(".out{ratio}.partial")).exists(), "partial folder left behind");
        let html = std::fs::read_to_string(out.join("report.html")).unwrap();
        assert_eq!(html.matches("<svg").count(), 7, "ranks, FFN, errors and four spectra charts");
        assert!(html.contains(&format!("{}", rep.decoder_params_after)));
        let small = Model::open(&out).unwrap();
        assert_eq!(small.cfg.decoder_params(), rep.decoder_params_after);
        let plan = small.cfg.lorap.as_ref().unwrap();
        assert!(plan.layers.iter().all(|l| l.ffn_width < 160));
        // GPU forward of the compressed model equals the f64 CPU reference
        let toks = tokens(2 * 12, 101, 5);
        let mut r = Runner::new(gpu.clone(), small.cfg.clone(), small.store.clone(), true);
        let got = r.window_nll(&toks, 12, &mut |_, _| {}).unwrap();
        let mut want = Vec::new();
        for w in toks.chunks(12) {
            want.extend(reference::window_nll_ref(&small.cfg, &small.store, w).unwrap());
        }
        let e = lorap_gpu::gpu::rel_frobenius(&got, &want);
        assert!(e < 1e-4, "compressed forward GPU vs CPU: {e:e}");
        // existing output is refused without --force
        let again = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &out), &mut |_, _, _| {});
        assert!(again.unwrap_err().to_string().contains("exists"));
    }
    // input folder untouched: still opens as the dense model
    assert!(Model::open(&src).unwrap().cfg.lorap.is_none());
}

#[test]
fn bad_ratios_and_short_calibration_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("dense");
    synthetic::write_random_model(&src, &synthetic::config_json(synthetic::Shape { model_type: "llama", layers: 1, hidden: 32, ffn: 64, heads: 2, kv_heads: 1, vocab: 50, tied: true }), 3).unwrap();
    let model = Model::open(&src).unwrap();
    let gpu = common::gpu();
    let calib = tokens(32, 50, 1);
    for ratio in [0.0, 1.0, -0.5, 1.5] {
        let opts = methods::CompressOptions { ratio, ..Default::default() };
        let out = dir.path().join("never");
        let e = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &out), &mut |_, _, _| {}).unwrap_err();
        assert!(e.to_string().contains("ratio"), "{e}");
        assert!(!out.exists());
    }
    let e = calib::calibration_windows(&tokens(100, 50, 1), 10, 16).unwrap_err();
    assert!(e.to_string().contains("fewer than 10 windows"), "{e}");
}

/// Randomized SVD vs exact: the truncation error at rank k is within 2% of the optimum
/// (sqrt of the sum of the discarded exact sigma^2) on a matrix with an LLM-like decaying
/// spectrum plus noise, at default settings.
#[test]
fn randomized_svd_is_near_optimal() {
    let gpu = common::gpu();
    for (m, n, k) in [(96, 80, 20), (150, 64, 40), (33, 200, 10)] {
        // A = U diag(s) V^T + noise, with s_i = i^-0.7
        let u = common::random(m * m.min(n), 1);
        let v = common::random(m.min(n) * n, 2);
        let noise = common::random(m * n, 3);
        let r = m.min(n);
        let a: Vec<f32> = (0..m * n)
            .map(|idx| {
                let (i, j) = (idx / n, idx % n);
                (0..r).map(|c| u[i * r + c] * ((c + 1) as f32).powf(-0.7) * v[c * n + j]).sum::<f32>() + 0.01 * noise[idx]
            })
            .collect();
        let exact = svd::exact_singular_values(&a, m, n);
        let optimal: f64 = exact[k..].iter().map(|s| s * s).sum::<f64>().sqrt();
        let g = gpu.upload(&a).unwrap();
        let dec = svd::randomized_svd(&gpu, &g, m, n, k, svd::SvdOptions::default()).unwrap();
        let err = svd::truncation_error(&a, &dec, k);
        assert!(err <= 1.02 * optimal, "{m}x{n} rank {k}: error {err} vs optimal {optimal}");
        for (c, (got, want)) in dec.sigma.iter().zip(&exact).take(k).enumerate() {
            assert!((got - want).abs() <= 0.02 * want, "sigma {c}: {got} vs {want}");
        }
    }
}

/// `export --format hf-dense` gives a plain dense checkpoint (original shapes, no `lorap`
/// section) that computes what the compressed model computes.
#[test]
fn hf_dense_export_round_trips_through_eval() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("dense");
    let cfg = synthetic::config_json(synthetic::Shape { model_type: "qwen2", layers: 2, hidden: 64, ffn: 160, heads: 4, kv_heads: 2, vocab: 101, tied: false });
    synthetic::write_random_model(&src, &cfg, 9).unwrap();
    let model = Model::open(&src).unwrap();
    let gpu = common::gpu();
    let out = dir.path().join("small");
    let opts = methods::CompressOptions { ratio: 0.4, ..Default::default() };
    pipeline::compress(&gpu, &Run::new(&model, &tokens(6 * 16, 101, 2), 16, &opts, &out), &mut |_, _, _| {}).unwrap();
    let small = Model::open(&out).unwrap();
    let exported = dir.path().join("hf");
    lorap_gpu::export::export_hf_dense(&gpu, &small, &exported, false, &mut |_, _| {}).unwrap();
    let hf = Model::open(&exported).unwrap();
    assert!(hf.cfg.lorap.is_none());
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap()).unwrap();
    assert!(raw.get("lorap").is_none());
    assert_eq!(hf.cfg.total_params(), model.cfg.total_params(), "dense shapes restored");
    assert!(exported.join("tokenizer.json").exists() == src.join("tokenizer.json").exists());
    let toks = tokens(3 * 12, 101, 8);
    let nll = |m: &Model| Runner::new(gpu.clone(), m.cfg.clone(), m.store.clone(), true).window_nll(&toks, 12, &mut |_, _| {}).unwrap();
    let (a, b) = (nll(&small), nll(&hf));
    // f16 storage rounds the multiplied-out matrices: bound 1e-3 relative
    let e = lorap_gpu::gpu::rel_frobenius(&b, &a.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(e < 1e-3, "exported vs compressed NLL relative error {e:e}: {a:?} {b:?}");
    // a dense model has nothing to export
    let err = lorap_gpu::export::export_hf_dense(&gpu, &model, &dir.path().join("x"), false, &mut |_, _| {}).unwrap_err();
    assert_eq!(lorap_gpu::cli::classify(&err), lorap_gpu::error::ErrorClass::BadArgument);
    assert!(!dir.path().join("x").exists());
}

/// With a GPU budget the calibration states would cross (beside a layer's work), they live
/// on the host and stream one batch at a time: same model bytes, and the reported peak (one
/// definition: buffers in use, idle pooled ones, staging, uniforms) stays within a budget
/// the resident run exceeds; every layer's time is charged to its phases; a budget far too
/// small fails cleanly.
#[test]
fn calibration_states_move_to_the_host_under_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("dense");
    synthetic::write_random_model(&src, &synthetic::config_json(synthetic::Shape { model_type: "llama", layers: 2, hidden: 64, ffn: 160, heads: 4, kv_heads: 2, vocab: 101, tied: true }), 5).unwrap();
    let model = Model::open(&src).unwrap();
    let calib = tokens(512 * 16, 101, 3);
    let opts = methods::CompressOptions { ratio: 0.3, ..Default::default() };
    let try_run = |out: &str, budget: u64| {
        // its own context: the budget and the peak are per device, and tests run in parallel
        let gpu = lorap_gpu::gpu::Gpu::new(&common::options()).unwrap();
        gpu.set_budget(budget);
        let control = pipeline::RunControl { batch_tokens: Some(128), ..Default::default() };
        pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &dir.path().join(out)).with_control(control.clone()), &mut |_, _, _| {}).map(|r| r.1)
    };
    let run = |out: &str, budget: u64| try_run(out, budget).unwrap();
    let resident = run("resident", 0);
    assert!(!resident.states_on_host);
    let states = (calib.len() * 64 * 4) as u64;
    assert!(resident.peak_gpu_bytes > states, "states are counted: {} <= {states}", resident.peak_gpu_bytes);
    // a budget the resident run exceeds by half the states: the streamed run fits in it
    // (the pool caches idle buffers up to the budget, so its peak is bounded, not minimal)
    let budget = resident.peak_gpu_bytes - states / 2;
    let streamed = run("streamed", budget);
    assert!(streamed.states_on_host, "states of {states} bytes stayed on the GPU under a {budget}-byte budget");
    assert!(streamed.peak_gpu_bytes <= budget, "peak {} over the budget {budget}", streamed.peak_gpu_bytes);
    for l in &streamed.layers {
        let p = &l.phases;
        assert!(p.loading > 0.0 && p.statistics > 0.0 && p.decomposition_gpu > 0.0 && p.propagation > 0.0, "{p:?}");
        assert!(p.total() <= l.seconds * 1.01 + 1e-3, "phases {} s over the layer's {} s", p.total(), l.seconds);
    }
    let e = try_run("tiny", 64 << 10).unwrap_err();
    assert!(e.to_string().contains("--max-vram"), "{e}");
    assert!(!dir.path().join("tiny").exists());
    for f in ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"] {
        assert!(std::fs::read(dir.path().join("resident").join(f)).unwrap() == std::fs::read(dir.path().join("streamed").join(f)).unwrap(), "{f} differs");
    }
}
