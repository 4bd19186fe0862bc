//! The GPU forward pass against the f64 CPU reference on tiny random models (GQA, biases,
//! untied heads, several windows), and layer streaming under a small memory footprint.

mod common;

use std::sync::Arc;

use lorap_gpu::model::{forward::Runner, reference, synthetic, Model};

fn tiny(dir: &std::path::Path, model_type: &str, layers: usize, tied: bool, seed: u64) -> Model {
    let cfg = synthetic::config_json(model_type, layers, 48, 80, 6, 2, 97, tied);
    synthetic::write_random_model(dir, &cfg, seed).unwrap();
    Model::open(dir).unwrap()
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n).map(|i| ((i as u64 * 2654435761 + seed * 97) % vocab as u64) as u32).collect()
}

fn compare(model: &Model, window: usize, windows: usize, resident: bool) {
    let toks = tokens(window * windows, model.cfg.vocab_size, 3);
    let mut runner = Runner::new(common::gpu(), model.cfg.clone(), model.store.clone(), resident);
    runner.batch_tokens = window * 2; // several batches
    let got = runner.window_nll(&toks, window, &mut |_, _| {}).unwrap();
    let mut want = Vec::new();
    for w in toks.chunks(window) {
        want.extend(reference::window_nll_ref(&model.cfg, &model.store, w).unwrap());
    }
    let e = lorap_gpu::gpu::rel_frobenius(&got, &want);
    assert!(e < 1e-4, "GPU vs CPU forward NLL relative error {e:e}");
}

#[test]
fn llama_gqa_matches_cpu_reference() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path(), "llama", 3, true, 1);
    compare(&m, 9, 5, true);
}

#[test]
fn qwen2_biases_and_untied_head_match_cpu_reference() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path(), "qwen2", 2, false, 2);
    assert!(m.cfg.qkv_bias());
    compare(&m, 17, 3, false);
}

/// A model whose layers together exceed the memory used while running: weights are
/// streamed one layer at a time, and the peak stays below the whole model's size.
#[test]
fn streaming_keeps_one_layer_resident() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synthetic::config_json("llama", 12, 256, 1024, 4, 2, 64, true);
    synthetic::write_random_model(dir.path(), &cfg, 5).unwrap();
    let m = Model::open(dir.path()).unwrap();
    let gpu = common::gpu_with_binding(1 << 20);
    let layer_bytes = (m.cfg.layer_params(0) * 4) as u64;
    let all_layers = layer_bytes * m.cfg.num_hidden_layers as u64;
    gpu.trim_pool();
    gpu.reset_peak();
    let mut runner = Runner::new(gpu.clone(), m.cfg.clone(), m.store.clone(), false);
    let toks = tokens(64, m.cfg.vocab_size, 9);
    let nll = runner.window_nll(&toks, 16, &mut |_, _| {}).unwrap();
    assert_eq!(nll.len(), 4 * 15);
    assert!(nll.iter().all(|x| x.is_finite()));
    let (_, peak) = gpu.memory_stats();
    assert!(peak < all_layers / 3, "peak {peak} B is not well below the {all_layers} B of all layers");
    assert!(peak >= layer_bytes, "peak {peak} B below one layer ({layer_bytes} B): accounting broken");
    let _ = Arc::strong_count(&gpu);
}
