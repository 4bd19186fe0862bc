//! Property-based fuzzing of the command line and of plan files, in-process and without GPU
//! work: parsing plus the range checks (`Cli::validate`) never panic on any argument vector,
//! and what they accept is in range; plan text of any shape (random bytes, random JSON,
//! mutated valid plans) never panics the plan reader or its checks, and a plan they accept
//! gives every layer keep fractions in (0, 1].

use std::path::Path;

use clap::Parser;
use lorap_gpu::cli::{validate::gib_to_bytes, Cli, Command};
use lorap_gpu::format::plan::Plan;
use lorap_gpu::methods::{LayerSetting, CompressOptions};
use proptest::prelude::*;

const SUBCOMMANDS: &[&str] = &["compress", "search", "eval", "generate", "export", "report", "synth", "gpu-info", "nope"];

const FLAGS: &[&str] = &[
    "--model", "--calib", "--out", "--ratio", "--plan", "--method", "--samples", "--seq-len", "--search-windows", "--surgical",
    "--surgical-skip-first", "--surgical-last-layers", "--surgical-tolerance", "--mpo-cores", "--mpo-max-bond",
    "--mpo-share-centre", "--mpo-matrices", "--power-iters", "--oversample", "--max-vram", "--batch-tokens", "--ratios",
    "--target-ratio", "--evaluations", "--step", "--no-drop", "--allocation", "--seed", "--force", "--resume", "--json",
    "--text", "--max-tokens", "--task", "--prompt", "--max-new", "--preset", "--layers", "--format", "--base", "--adapter",
    "--max-binding", "--quiet", "--max-abs-weight", "--sfsd-centred", "--plain-svd", "--no-reserve", "--ffn-reserve", "--magnitude-ffn",
    "--layer-allocation", "--help", "--version", "-q",
];

const VALUES: &[&str] = &[
    "0", "1", "-1", "2", "0.5", "0.3", "1e-12", "1e308", "-0", "nan", "NaN", "inf", "-inf", "18446744073709551616",
    "4294967296", "", " ", "abc", "q,k", "q,x,q", "0.1,0.2", "0.2,nan", "lorap", "sfsd", "mpo", "smollm2-135m",
    "hf-dense", "fixed31", "uniform", "sensitivity", "/nonexistent/x", ".", "m", "--", "-",
];

/// One argument: a known flag, a known value, or any short text.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(FLAGS).prop_map(String::from),
        4 => prop::sample::select(VALUES).prop_map(String::from),
        1 => ".{0,12}",
    ]
}

/// An argument vector: the binary's name, usually a subcommand, then arguments.
fn argv() -> impl Strategy<Value = Vec<String>> {
    (prop::sample::select(SUBCOMMANDS), prop::collection::vec(token(), 0..14), any::<bool>()).prop_map(|(sub, rest, with_sub)| {
        let mut v = vec!["lorap-gpu".to_string()];
        if with_sub {
            v.push(sub.to_string());
        }
        v.extend(rest);
        v
    })
}

/// A subcommand with its required arguments, then flag/value pairs (so parsing succeeds
/// often and the range checks see every flag with odd values).
fn structured_argv() -> impl Strategy<Value = Vec<String>> {
    const BASES: &[&[&str]] = &[
        &["compress", "--model", "m", "--calib", "c", "--out", "o"],
        &["search", "--model", "m", "--calib", "c", "--out", "o"],
        &["eval", "--model", "m", "--text", "t"],
        &["generate", "--model", "m", "--prompt", "p"],
        &["synth", "--preset", "smollm2-135m", "--out", "o"],
        &["report", "--model", "m"],
        &["export", "--model", "m", "--out", "o"],
    ];
    let pair = (prop::sample::select(FLAGS), prop::sample::select(VALUES));
    (prop::sample::select(BASES), prop::collection::vec(pair, 0..4)).prop_map(|(base, pairs)| {
        let mut v = vec!["lorap-gpu".to_string()];
        v.extend(base.iter().map(|s| s.to_string()));
        for (f, x) in pairs {
            v.push(f.to_string());
            v.push(x.to_string());
        }
        v
    })
}

/// What `validate` accepted is in range.
fn assert_in_range(cli: &Cli) {
    assert!(cli.max_abs_weight > 0.0);
    assert!(cli.max_binding.is_none_or(|b| b >= 256));
    match &cli.command {
        Command::Compress(a) => {
            if let Some(r) = a.ratio {
                assert!((0.0..1.0).contains(&r), "ratio {r}");
                assert!(r > 0.0 || a.plan.is_some() || a.surgical, "ratio {r} without a plan");
            }
            assert!(a.samples >= 1 && a.seq_len >= 2 && a.batch_tokens >= 1 && (2..=8).contains(&a.mpo_cores));
            assert!(a.max_vram.is_none_or(|v| gib_to_bytes("--max-vram", v).is_ok_and(|b| b > 0)));
            assert!(a.surgical_tolerance.is_finite() && a.surgical_tolerance >= 0.0);
            assert!(a.mpo_matrices().is_ok());
            if a.layer_allocation == lorap_gpu::search::LayerAllocation::Sensitivity {
                assert!(a.method == lorap_gpu::methods::Method::Lorap && a.plan.is_none() && a.samples > a.search_windows && a.search_windows >= 1);
            }
        }
        Command::Search(a) => {
            assert!(a.target_ratio.is_none_or(|t| t > 0.0 && t < 1.0), "target {:?}", a.target_ratio);
            assert!(!a.ratios.is_empty() && a.ratios.iter().all(|r| (0.0..1.0).contains(r)));
            assert!(a.step > 0.0 && a.step < 1.0 && a.samples > a.search_windows && a.search_windows >= 1 && a.seq_len >= 2);
        }
        Command::Eval(a) => {
            assert!(a.ppl.seq_len >= 2 && a.mem.batch_tokens >= 1);
            assert!(gib_to_bytes("--max-vram", a.mem.max_vram).is_ok_and(|b| b > 0));
        }
        Command::Generate(a) => {
            assert!(!a.prompt.is_empty());
            assert!(gib_to_bytes("--max-vram", a.mem.max_vram).is_ok_and(|b| b > 0));
        }
        Command::Report(a) => assert!(gib_to_bytes("--max-vram", a.mem.max_vram).is_ok_and(|b| b > 0)),
        Command::Synth(a) => assert!(a.layers.is_none_or(|l| l >= 1)),
        Command::GpuInfo | Command::Export(_) => {}
    }
}

/// A small JSON value of any shape, with plan keys (right and misspelled) among the keys.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let key = prop_oneof![
        prop::sample::select(&["layers", "note", "dropped", "attention_keep", "ffn_keep", "module_keep", "self_attn.q_proj", "mlp.down_proj", "ffn_kep", "Layers"][..]).prop_map(String::from),
        "[a-z_.]{1,10}",
    ];
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(serde_json::Value::from),
        (0.0f64..1.5).prop_map(serde_json::Value::from),
        "[a-z_0-9]{0,8}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..5).prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Reads `text` as a plan for models of 1 to 4 layers; whatever is accepted gives keep
/// fractions in (0, 1] to every layer.
fn read_plan(text: &str) {
    let Ok(plan) = Plan::parse(text, Path::new("fuzz-plan.json")) else { return };
    for n in 1..=4 {
        if plan.validate(n).is_err() {
            continue;
        }
        assert_eq!(plan.layers.len(), n);
        let opts = CompressOptions { ratio: 0.0, plan: Some(plan.clone()), ..Default::default() };
        for i in 0..n {
            let s = LayerSetting::of(&opts, i);
            let ok = |k: f64| k > 0.0 && k <= 1.0;
            assert!(ok(s.attention_keep) && ok(s.ffn_keep) && s.module_keep.values().flatten().all(|&k| ok(k)), "layer {i} of {text}");
        }
    }
}

const VALID_PLAN: &str = r#"{"layers": [{"attention_keep": 0.5, "ffn_keep": 0.7}, {"dropped": true}, {"module_keep": {"self_attn.q_proj": 0.4, "mlp.up_proj": 1.0}}], "note": "x"}"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn argument_vectors_never_panic(args in argv()) {
        if let Ok(cli) = Cli::try_parse_from(&args) {
            if cli.validate().is_ok() {
                assert_in_range(&cli);
            }
        }
    }

    #[test]
    fn structured_command_lines_never_panic(args in structured_argv()) {
        if let Ok(cli) = Cli::try_parse_from(&args) {
            if cli.validate().is_ok() {
                assert_in_range(&cli);
            }
        }
    }

    #[test]
    fn plan_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        read_plan(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn plan_json_never_panics(v in json_value(), wrap in any::<bool>()) {
        // bare, or as the layers of a plan (so the per-layer checks are reached often)
        let v = if wrap { serde_json::json!({ "layers": [v.clone(), v] }) } else { v };
        read_plan(&v.to_string());
    }

    #[test]
    fn mutated_plans_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6)) {
        let mut bytes = VALID_PLAN.as_bytes().to_vec();
        for (at, b, how) in edits {
            let i = at.index(bytes.len() + 1);
            match how {
                0 if i < bytes.len() => bytes[i] = b,
                1 => bytes.insert(i, b),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => {}
            }
        }
        read_plan(&String::from_utf8_lossy(&bytes));
    }
}

/// The accepted side: a valid plan reads and checks; the fuzzers above also reach it.
#[test]
fn a_valid_plan_and_command_line_are_accepted() {
    let plan = Plan::parse(VALID_PLAN, Path::new("p.json")).unwrap();
    plan.validate(3).unwrap();
    read_plan(VALID_PLAN);
    let cli = Cli::try_parse_from(["lorap-gpu", "compress", "--model", "m", "--calib", "c", "--out", "o", "--ratio", "0.3", "--max-vram", "0.5"]).unwrap();
    cli.validate().unwrap();
    assert_in_range(&cli);
    let cli = Cli::try_parse_from(["lorap-gpu", "search", "--model", "m", "--calib", "c", "--out", "o", "--target-ratio", "2"]).unwrap();
    assert!(cli.validate().is_err());
}
