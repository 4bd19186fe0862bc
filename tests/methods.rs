//! The related methods on small exact references: feature-space decomposition (output
//! covariance kernel, eigen-pairs vs an exact eigen-decomposition, end to end), MPO stored and
//! run by the forward pass, per-layer plans (dropped layers renumbered, keep fractions).

mod common;

use lorap_gpu::format::plan;
use lorap_gpu::format::linear::Linear;
use lorap_gpu::methods::mpo::MpoOptions;
use lorap_gpu::methods::{self, sfsd, svd::SvdOptions};
use lorap_gpu::pipeline::{self, Run};
use lorap_gpu::search::{self, surgical};

use lorap_gpu::model::{forward::Runner, reference, synthetic, Model};
use nalgebra::{DMatrix, SymmetricEigen};

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n).map(|i| ((i as u64 * 2654435761 + seed * 97) % vocab as u64) as u32).collect()
}

/// GPU NLL of `model` vs the f64 CPU reference on the same windows.
fn gpu_vs_reference(gpu: &std::sync::Arc<lorap_gpu::gpu::Gpu>, model: &Model, toks: &[u32], window: usize) -> (Vec<f32>, f64) {
    let mut r = Runner::new(gpu.clone(), model.cfg.clone(), model.store.clone(), true);
    let got = r.window_nll(toks, window, &mut |_, _| {}).unwrap();
    let mut want = Vec::new();
    for w in toks.chunks(window) {
        want.extend(reference::window_nll_ref(&model.cfg, &model.store, w).unwrap());
    }
    let e = lorap_gpu::gpu::rel_frobenius(&got, &want);
    (got, e)
}

fn small_model(dir: &std::path::Path, layers: usize) -> Model {
    let src = dir.join("dense");
    synthetic::write_random_model(&src, &synthetic::config_json(synthetic::Shape { model_type: "llama", layers, hidden: 64, ffn: 160, heads: 4, kv_heads: 2, vocab: 101, tied: true }), 11).unwrap();
    Model::open(&src).unwrap()
}

#[test]
fn output_covariance_matches_the_cpu_reference_at_awkward_shapes() {
    let gpu = common::gpu();
    for (out, inp) in [(37, 53), (64, 64), (5, 130)] {
        let w = common::random(out * inp, out as u64);
        // a symmetric positive definite input covariance: X^T X / n of random X
        let x = common::random(3 * inp * inp.min(40), inp as u64);
        let rows = x.len() / inp;
        let mut sigma = vec![0f32; inp * inp];
        for a in 0..inp {
            for b in 0..inp {
                sigma[a * inp + b] = (0..rows).map(|r| x[r * inp + a] as f64 * x[r * inp + b] as f64).sum::<f64>() as f32 / rows as f32;
            }
        }
        let (wg, sg) = (gpu.upload(&w).unwrap(), gpu.upload(&sigma).unwrap());
        let got = gpu.read(&sfsd::output_covariance(&gpu, &wg, &sg, out, inp).unwrap()).unwrap();
        let want = sfsd::output_covariance_ref(&w, &sigma, out, inp);
        let e = lorap_gpu::gpu::rel_frobenius(&got, &want);
        assert!(e < 1e-4, "{out}x{inp}: {e:e}");
    }
}

/// The feature pair's projection error is within 2% of the optimum (exact eigenvalues), and
/// A B equals U U^T W for the exact top eigenvectors' subspace up to the same tolerance.
#[test]
fn feature_pair_reaches_the_optimal_output_error() {
    // wide (through C) and tall (through W L) matrices, exact and randomized paths
    for (out, inp, r) in [(40, 48, 10), (48, 40, 10), (30, 30, 7)] {
        for exact_max in [usize::MAX, 0] {
            feature_pair_case(out, inp, r, exact_max);
        }
    }
}

fn feature_pair_case(out: usize, inp: usize, r: usize, exact_max: usize) {
    let gpu = common::gpu();
    // W with a decaying spectrum so the top subspace is well separated
    let base = common::random(out * inp, 3);
    let w: Vec<f32> = base.iter().enumerate().map(|(k, &v)| v * (1.0 + 4.0 * (-((k % inp) as f32) / 6.0).exp())).collect();
    let x = common::random(200 * inp, 4);
    let mut sigma = vec![0f32; inp * inp];
    for a in 0..inp {
        for b in 0..inp {
            sigma[a * inp + b] = ((0..200).map(|t| x[t * inp + a] as f64 * x[t * inp + b] as f64).sum::<f64>() / 200.0) as f32;
        }
    }
    let sg = gpu.upload(&sigma).unwrap();
    let pair = sfsd::feature_pair_with(&gpu, &w, &sg, inp, r, SvdOptions::default(), exact_max).unwrap();
    let c = sfsd::output_covariance_ref(&w, &sigma, out, inp);
    let eig = SymmetricEigen::new(DMatrix::from_row_slice(out, out, &c));
    let mut ev: Vec<f64> = eig.eigenvalues.iter().copied().collect();
    ev.sort_by(|a, b| b.total_cmp(a));
    let trace: f64 = ev.iter().sum();
    let optimal = (ev[r..].iter().sum::<f64>() / trace).sqrt();
    // the error actually achieved: ||(W - A B) Sigma^1/2||^2 = tr((W - AB) Sigma (W - AB)^T)
    let (a, b) = pair.truncated(r, out, inp);
    let ab = lorap_gpu::gpu::matmul::matmul_ref(&a, &b, out, r, inp);
    let diff: Vec<f32> = w.iter().zip(&ab).map(|(&x, &y)| (x as f64 - y) as f32).collect();
    let cd = sfsd::output_covariance_ref(&diff, &sigma, out, inp);
    let achieved = ((0..out).map(|i| cd[i * out + i]).sum::<f64>() / trace).sqrt();
    assert!(achieved <= optimal * 1.02 + 1e-6, "{out}x{inp}: achieved {achieved} vs optimal {optimal}");
    assert!((pair.relative_error(r) - optimal).abs() <= 0.02 * optimal, "{out}x{inp}: reported {} vs optimal {optimal}", pair.relative_error(r));
    assert!((pair.trace - trace).abs() < 1e-4 * trace, "{out}x{inp}: trace {} vs {trace}", pair.trace);
}

#[test]
fn sfsd_compresses_every_linear_to_the_ratio_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path(), 2);
    let gpu = common::gpu();
    let calib = tokens(8 * 16, 101, 1);
    let out = dir.path().join("sfsd");
    let opts = methods::CompressOptions { method: methods::MethodOptions::Sfsd(Default::default()), ratio: 0.3, ..Default::default() };
    let (_, rep) = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &out), &mut |_, _, _| {}).unwrap();
    assert!((rep.achieved_decoder_ratio - 0.3).abs() < 0.03, "{}", rep.achieved_decoder_ratio);
    let small = Model::open(&out).unwrap();
    let sec = small.cfg.lorap.as_ref().unwrap();
    assert_eq!(sec.method, "sfsd");
    for l in &sec.layers {
        assert_eq!(l.ffn_width, 160, "feature-space decomposition keeps the FFN width");
        assert!(Linear::ALL.into_iter().all(|j| l.rank(j).is_some()), "every linear factored: {l:?}");
    }
    assert!(rep.layers.iter().all(|l| l.weighted_rel_error.iter().all(|&e| e > 0.0 && e < 1.0)));
    let (nll, e) = gpu_vs_reference(&gpu, &small, &tokens(2 * 12, 101, 5), 12);
    assert!(e < 1e-4, "sfsd model GPU vs CPU: {e:e}");
    assert!(nll.iter().all(|x| x.is_finite()));
}

#[test]
fn mpo_is_stored_as_cores_and_exact_at_full_bonds() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path(), 2);
    let gpu = common::gpu();
    let calib = tokens(4 * 16, 101, 1);
    let toks = tokens(2 * 12, 101, 5);
    let (dense_nll, _) = gpu_vs_reference(&gpu, &model, &toks, 12);
    // full bonds: the cores hold W exactly up to their f16 storage (the model is f16), so
    // the model computes the same function to f16 rounding
    let exact = dir.path().join("mpo-exact");
    let opts = methods::CompressOptions { method: methods::MethodOptions::Mpo(MpoOptions { max_bond: Some(1 << 16), matrices: vec![Linear::Q, Linear::Down], ..Default::default() }), ratio: 0.01, ..Default::default() };
    let (_, rep) = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &exact), &mut |_, _, _| {}).unwrap();
    let m = Model::open(&exact).unwrap();
    let sec = m.cfg.lorap.as_ref().unwrap();
    assert!(sec.layers.iter().all(|l| l.mpo.len() == 2 && l.mpo.contains_key("self_attn.q_proj") && l.mpo.contains_key("mlp.down_proj")), "{sec:?}");
    assert!(rep.layers.iter().all(|l| l.weighted_rel_error[0] < 1e-5));
    let (nll, e) = gpu_vs_reference(&gpu, &m, &toks, 12);
    assert!(e < 1e-4, "mpo model GPU vs CPU: {e:e}");
    let d = lorap_gpu::gpu::rel_frobenius(&nll, &dense_nll.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(d < 1e-3, "full-bond MPO differs from the dense model: {d:e}");
    // one shared centre per linear: stored once, every layer refitted around it
    let shared = dir.path().join("mpo-shared");
    let opts = methods::CompressOptions { method: methods::MethodOptions::Mpo(MpoOptions { share_centre: true, matrices: vec![Linear::Q, Linear::Gate], ..Default::default() }), ratio: 0.4, ..Default::default() };
    let (_, rep) = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &shared), &mut |_, _, _| {}).unwrap();
    let m = Model::open(&shared).unwrap();
    let names: Vec<String> = m.store.names().map(String::from).collect();
    assert!(names.contains(&"model.mpo_shared.self_attn.q_proj.mpo_core_1".to_string()) && names.contains(&"model.mpo_shared.mlp.gate_proj.mpo_core_1".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("model.layers.") && n.ends_with("mpo_core_1")), "no per-layer centre");
    assert_eq!(m.cfg.shared_mpo().len(), 2);
    assert_eq!(m.cfg.decoder_params(), rep.decoder_params_after);
    assert!(rep.layers.iter().all(|l| l.weighted_rel_error[0] > 0.0 && l.weighted_rel_error[0] < 1.0));
    let (_, e) = gpu_vs_reference(&gpu, &m, &toks, 12);
    assert!(e < 1e-4, "shared-centre model GPU vs CPU: {e:e}");
    // a ratio below what one shared centre removes at full bonds is refused, not overshot
    let too_little = dir.path().join("mpo-shared-10");
    let opts = methods::CompressOptions { method: methods::MethodOptions::Mpo(MpoOptions { share_centre: true, matrices: vec![Linear::Q], ..Default::default() }), ratio: 0.1, ..Default::default() };
    let err = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &too_little), &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(err.contains("removes at least 37.5%"), "{err}");
    assert!(!too_little.exists());
    // truncated bonds: smaller, still runs, error grows
    let cut = dir.path().join("mpo-cut");
    let opts = methods::CompressOptions { method: methods::MethodOptions::Mpo(Default::default()), ratio: 0.5, ..Default::default() };
    let (_, rep) = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &cut), &mut |_, _, _| {}).unwrap();
    assert!(rep.achieved_decoder_ratio > 0.4 && rep.achieved_decoder_ratio < 0.55, "{}", rep.achieved_decoder_ratio);
    let m = Model::open(&cut).unwrap();
    assert_eq!(m.cfg.decoder_params(), rep.decoder_params_after);
    let (nll, e) = gpu_vs_reference(&gpu, &m, &toks, 12);
    assert!(e < 1e-4 && nll.iter().all(|x| x.is_finite()), "{e:e}");
}

#[test]
fn plans_drop_and_renumber_layers_and_set_keep_fractions() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path(), 3);
    let gpu = common::gpu();
    let calib = tokens(4 * 16, 101, 1);
    let mut p = plan::Plan::uniform(3, 1.0);
    p.layers[1].dropped = true;
    p.layers[2].attention_keep = Some(0.5);
    p.layers[2].ffn_keep = Some(0.25);
    let out = dir.path().join("planned");
    let opts = methods::CompressOptions { plan: Some(p.clone()), ratio: 0.0, ..Default::default() };
    let (_, rep) = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &out), &mut |_, _, _| {}).unwrap();
    let m = Model::open(&out).unwrap();
    assert_eq!(m.cfg.num_hidden_layers, 2);
    let sec = m.cfg.lorap.as_ref().unwrap();
    assert_eq!(sec.dropped_layers, vec![1]);
    // layer 0 kept whole: an exact copy of the input's layer 0
    assert!(Linear::ATTENTION.into_iter().all(|j| sec.layers[0].rank(j).is_none()) && sec.layers[0].ffn_width == 160);
    assert_eq!(m.store.raw("model.layers.0.self_attn.q_proj.weight").unwrap().2, model.store.raw("model.layers.0.self_attn.q_proj.weight").unwrap().2);
    // the input's layer 2 is the output's layer 1, at the planned shapes
    assert_eq!(sec.layers[1].ffn_width, 40);
    assert_eq!(m.store.raw("model.layers.1.input_layernorm.weight").unwrap().2, model.store.raw("model.layers.2.input_layernorm.weight").unwrap().2);
    let att: usize = Linear::ATTENTION.into_iter().map(|j| m.cfg.linear_params(&sec.layers[1], j)).sum();
    let dense_att: usize = Linear::ATTENTION.into_iter().map(|j| model.cfg.linear_params(&model.cfg.layer_plan(2), j)).sum();
    assert!((att as f64 / dense_att as f64 - 0.5).abs() < 0.03, "attention kept {}", att as f64 / dense_att as f64);
    assert_eq!(rep.layers.len(), 2);
    let (_, e) = gpu_vs_reference(&gpu, &m, &tokens(2 * 12, 101, 5), 12);
    assert!(e < 1e-4, "{e:e}");
    // bad plans are refused before any output
    for bad in [plan::Plan::uniform(2, 0.5), plan::Plan { layers: vec![plan::PlanLayer { dropped: true, ..Default::default() }; 3], note: String::new() }, plan::Plan::uniform(3, 1.5)] {
        let o = dir.path().join("never");
        let opts = methods::CompressOptions { plan: Some(bad), ratio: 0.0, ..Default::default() };
        let e = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &o), &mut |_, _, _| {}).unwrap_err();
        assert!(e.to_string().contains("plan"), "{e}");
        assert!(!o.exists());
    }
}

/// The search's candidates, front and plans: every front plan, applied by `compress --plan`,
/// gives exactly the parameter count the search reported for it.
#[test]
fn search_returns_a_front_whose_plans_compress_to_their_parameter_counts() {
    let dir = tempfile::tempdir().unwrap();
    // 4 layers: with one dropped, the other three can still hold 70% of the parameters
    let model = small_model(dir.path(), 4);
    let gpu = common::gpu();
    let calib = tokens(10 * 16, 101, 1);
    let opts = search::SearchOptions { uniform_ratios: vec![0.2, 0.4], evaluations: 4, target_ratio: Some(0.3), ..Default::default() };
    let res = search::search(&gpu, &model, &calib, 16, 2, &opts, &mut |_, _, _| {}).unwrap();
    // dense + 2 uniform + uniform at the target + 2 guided + the guided drop + up to 4 moves
    assert!(res.candidates.len() >= 7 && res.candidates.len() <= 11, "{}", res.candidates.len());
    let drop = res.candidates.iter().find(|c| c.origin.starts_with("drop layer")).expect("the guided drop is a candidate");
    let least = (0..4).min_by(|&a, &b| res.sensitivity[a].total_cmp(&res.sensitivity[b])).unwrap();
    assert_eq!(drop.origin, format!("drop layer {least}"));
    assert_eq!(drop.plan.layers.iter().filter(|l| l.dropped).count(), 1);
    assert_eq!(res.sensitivity.len(), 4);
    assert!(res.candidates.iter().all(|c| c.calib_ppl.is_finite() && c.calib_ppl > 1.0 && c.seconds_per_token > 0.0));
    let pts: Vec<[f64; 3]> = res.candidates.iter().map(|c| [c.decoder_params as f64, c.calib_ppl, c.seconds_per_token]).collect();
    for (i, p) in pts.iter().enumerate() {
        let dominated = pts.iter().any(|q| q.iter().zip(p).all(|(a, b)| a <= b) && q.iter().zip(p).any(|(a, b)| a < b));
        assert_eq!(res.front.contains(&i), !dominated, "candidate {i}");
    }
    let best = res.best_at_target.expect("the uniform plan at the target is a candidate");
    assert!(res.candidates[best].calib_ppl <= res.candidates[res.uniform_at_target.unwrap()].calib_ppl);
    let files = lorap_gpu::report::search::render(&res);
    assert!(files.iter().any(|(f, s)| f == "front.svg" && s.matches("<circle").count() >= res.candidates.len()));
    for k in [best, res.front[0]] {
        let c = &res.candidates[k];
        let out = dir.path().join(format!("applied-{k}"));
        let o = methods::CompressOptions { plan: Some(c.plan.clone()), ratio: 0.0, ..Default::default() };
        let (_, rep) = pipeline::compress(&gpu, &Run::new(&model, &calib[..8 * 16], 16, &o, &out), &mut |_, _, _| {}).unwrap();
        assert_eq!(rep.decoder_params_after, c.decoder_params, "{}", c.origin);
    }
}

#[test]
fn surgical_search_respects_its_bound_and_its_plan_applies() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path(), 3);
    let gpu = common::gpu();
    let calib = tokens(10 * 16, 101, 1);
    // a bound nothing can break: every considered linear goes to the smallest rank
    let loose = surgical::SurgicalOptions { skip_first: 1, tolerance: 1e9, grid: vec![0.2, 0.5, 0.8], ..Default::default() };
    let (plan, rep) = surgical::surgical(&gpu, &model, &calib, 16, 2, &loose, &mut |_, _, _| {}).unwrap();
    assert_eq!(rep.steps.len(), 14, "two layers of seven linears");
    assert!(rep.steps.iter().all(|s| s.keep == Some(0.2)));
    assert!(plan.layers[0].module_keep.values().all(|&k| k >= 1.0), "skipped layer stays dense");
    let out = dir.path().join("surgical");
    let o = methods::CompressOptions { method: methods::MethodOptions::Sfsd(Default::default()), plan: Some(plan), ratio: 0.0, ..Default::default() };
    let (_, crep) = pipeline::compress(&gpu, &Run::new(&model, &calib[..8 * 16], 16, &o, &out), &mut |_, _, _| {}).unwrap();
    let m = Model::open(&out).unwrap();
    let sec = m.cfg.lorap.as_ref().unwrap();
    assert!(Linear::ALL.into_iter().all(|j| sec.layers[0].rank(j).is_none()));
    assert!((1..3).all(|i| Linear::ALL.into_iter().all(|j| sec.layers[i].rank(j).is_some())));
    assert!(crep.achieved_decoder_ratio > 0.3);
    // a tight bound: every decision stays within it
    let tight = surgical::SurgicalOptions { skip_first: 1, tolerance: 0.001, grid: vec![0.2, 0.5, 0.8], ..Default::default() };
    let (_, rep) = surgical::surgical(&gpu, &model, &calib, 16, 2, &tight, &mut |_, _, _| {}).unwrap();
    assert!(rep.steps.iter().all(|s| s.ppl <= s.allowed * (1.0 + 1e-12)), "{:?}", rep.steps);
    assert!(rep.final_ppl <= rep.base_ppl * 1.001f64.powi(14) * (1.0 + 1e-12));
}

/// `compress --layer-allocation sensitivity` end to end through the binary: it writes its
/// report and the plan it compressed with (recorded in config.json as per-layer shapes),
/// never picks a plan that scored worse than uniform, and lands within 0.5% of the uniform
/// run's decoder parameters.
#[test]
fn sensitivity_allocation_compresses_at_the_uniform_parameter_count() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("dense");
    small_model(dir.path(), 3);
    synthetic::write_word_tokenizer(&src, 101).unwrap();
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, "the quick brown fox jumps over the lazy dog , a dog of the fox is in and to the . ".repeat(30)).unwrap();
    let compress = |out: &std::path::Path, extra: &[&str]| -> pipeline::CompressionReport {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lorap-gpu"))
            .args(["--quiet", "compress", "--ratio", "0.3", "--seq-len", "16"])
            .arg("--model").arg(&src).arg("--calib").arg(&calib).arg("--out").arg(out)
            .args(extra)
            .env("WGPU_BACKEND", "vulkan")
            .output()
            .expect("run lorap-gpu");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&std::fs::read_to_string(out.join("compression_report.json")).unwrap()).unwrap()
    };
    let uniform = compress(&dir.path().join("uniform"), &["--samples", "6"]);
    let out = dir.path().join("sensitivity");
    let got = compress(&out, &["--samples", "8", "--search-windows", "2", "--layer-allocation", "sensitivity"]);
    let off = (got.decoder_params_after as f64 / uniform.decoder_params_after as f64 - 1.0).abs();
    assert!(off <= 0.005, "{} vs uniform {}", got.decoder_params_after, uniform.decoder_params_after);
    // the scoring windows are left out of the statistics
    assert_eq!(got.calibration_windows, 6);
    let rep: search::SensitivityReport = serde_json::from_str(&std::fs::read_to_string(out.join("layer_allocation.json")).unwrap()).unwrap();
    assert_eq!(rep.sensitivity.len(), 3);
    assert!((1..=3).contains(&rep.candidates.len()), "{}", rep.candidates.len());
    let picked = &rep.candidates[rep.picked];
    assert!(picked.calib_ppl <= rep.candidates[0].calib_ppl);
    // the compression adds what the allocation's candidates do not have: the FFN refit's
    // down_proj biases (compress's default), one per output of each refitted layer
    let small = Model::open(&out).unwrap().cfg;
    let biases: usize = small.lorap.as_ref().unwrap().layers.iter().map(|p| p.biases.len() * small.hidden_size).sum();
    assert!(got.layers.iter().all(|l| l.ffn_refit.is_some()));
    assert_eq!(got.decoder_params_after, picked.decoder_params + biases);
    let applied = plan::Plan::load(&out.join("plan.json")).unwrap();
    assert_eq!(applied.layers, picked.plan.layers);
    assert_eq!(got.options.plan.as_ref().map(|p| &p.layers), Some(&picked.plan.layers));
    assert_eq!(Model::open(&out).unwrap().cfg.lorap.unwrap().layers.len(), 3);
}
