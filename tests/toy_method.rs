//! The recipe for a new method (ARCHITECTURE.md), proven from outside the crate: a toy
//! method (magnitude pruning of the FFN, attention left dense) is one `LayerMethod` impl
//! in this file, run by the unchanged pipeline, and its output is a model the tool loads
//! and runs.

mod common;

use anyhow::Result;
use lorap_gpu::format::linear::Linear;
use lorap_gpu::methods::ffn::{gather_cols, gather_rows};
use lorap_gpu::methods::{BuiltLayer, LayerInput, LayerMethod, CompressOptions, Phase};
use lorap_gpu::model::forward::Runner;
use lorap_gpu::model::{synthetic, Model};
use lorap_gpu::pipeline::{self, Run};

/// Keeps the FFN channels with the largest weight magnitudes (|gate row| + |up row| +
/// |down column|); attention stays dense.
struct MagnitudeFfn;

impl LayerMethod for MagnitudeFfn {
    fn name(&self) -> &'static str {
        "magnitude-ffn"
    }

    fn compress_layer(&self, input: &LayerInput, built: &mut BuiltLayer, progress: &mut dyn FnMut(Phase)) -> Result<()> {
        progress(Phase::FfnScoring);
        let cfg = input.cfg;
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let full = lorap_gpu::format::plan::LayerPlan { ffn_width: f, ..Default::default() };
        // the dense layer's weights in f32, as the pipeline read them
        let weights = &input.host.weights;
        for lin in Linear::ATTENTION {
            let (out, inp) = cfg.linear_shape(&full, lin);
            built.dense(input.gpu, lin, &weights[lin], out, inp)?;
        }
        let (gate, up, down) = (&weights[Linear::Gate], &weights[Linear::Up], &weights[Linear::Down]);
        let score = |c: usize| -> f32 { gate[c * d..(c + 1) * d].iter().chain(&up[c * d..(c + 1) * d]).map(|x| x.abs()).sum::<f32>() + (0..d).map(|r| down[r * f + c].abs()).sum::<f32>() };
        let mut order: Vec<usize> = (0..f).collect();
        order.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
        let mut kept: Vec<usize> = order[..((input.setting.ffn_keep * f as f64).round() as usize).clamp(1, f)].to_vec();
        kept.sort();
        let fk = kept.len();
        built.plan.ffn_width = fk;
        built.dense(input.gpu, Linear::Gate, &gather_rows(gate, d, &kept), fk, d)?;
        built.dense(input.gpu, Linear::Up, &gather_rows(up, d, &kept), fk, d)?;
        built.dense(input.gpu, Linear::Down, &gather_cols(down, d, f, &kept), d, fk)?;
        Ok(())
    }
}

#[test]
fn a_toy_method_in_one_file_runs_through_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("dense");
    synthetic::write_random_model(&src, &synthetic::config_json(synthetic::Shape { model_type: "llama", layers: 2, hidden: 64, ffn: 160, heads: 4, kv_heads: 2, vocab: 101, tied: true }), 3).unwrap();
    let model = Model::open(&src).unwrap();
    let calib: Vec<u32> = (0..4 * 16).map(|i| (i * 37 % 101) as u32).collect();
    let opts = CompressOptions { ratio: 0.5, ..Default::default() };
    let out = dir.path().join("toy");
    let (path, rep) = pipeline::compress_with(&common::gpu(), &Run::new(&model, &calib, 16, &opts, &out), &MagnitudeFfn, &mut |_, _, _| {}).unwrap();
    assert_eq!(rep.method, "magnitude-ffn");
    let small = Model::open(&path).unwrap();
    let section = small.cfg.lorap.as_ref().unwrap();
    assert_eq!(section.method, "magnitude-ffn");
    assert!(section.layers.iter().all(|l| l.ffn_width == 80 && l.q_rank.is_none()), "{:?}", section.layers);
    assert!(rep.decoder_params_after < rep.decoder_params_before);
    // the tool runs what the toy method wrote
    let mut r = Runner::new(common::gpu(), small.cfg.clone(), small.store.clone(), true);
    let nll = r.window_nll(&calib[..32], 16, &mut |_, _| {}).unwrap();
    assert!(nll.iter().all(|x| x.is_finite()) && nll.len() == 30);
}
