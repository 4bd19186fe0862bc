//! Bad input never panics and never leaves an output folder behind: each case asserts the
//! exact error class (and, through the binary, its exit code); interrupted runs resume to
//! the same bytes as uninterrupted ones.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use lorap_gpu::methods::LorapOptions;
use lorap_gpu::pipeline::{self, Run, RunControl};
use lorap_gpu::cli::classify;
use lorap_gpu::error::ErrorClass;
use lorap_gpu::model::{synthetic, Model};

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n).map(|i| ((i as u64 * 2654435761 + seed * 97) % vocab as u64) as u32).collect()
}

fn small_model(dir: &Path, layers: usize) -> PathBuf {
    let src = dir.join("dense");
    synthetic::write_random_model(&src, &synthetic::config_json(synthetic::Shape { model_type: "llama", layers, hidden: 64, ffn: 160, heads: 4, kv_heads: 2, vocab: 101, tied: true }), 11).unwrap();
    src
}

/// Nothing named like the output, hidden partial folder included, exists in `parent`.
fn assert_no_output(parent: &Path, name: &str) {
    assert!(!parent.join(name).exists(), "{name} left behind");
    assert!(!parent.join(format!(".{name}.partial")).exists(), "partial folder of {name} left behind");
}

fn compress_lib(model: &Model, out: &Path, opts: &LorapOptions, control: &RunControl) -> anyhow::Result<pipeline::CompressionReport> {
    let calib = tokens(6 * 16, 101, 1);
    pipeline::compress(&common::gpu(), &Run::new(model, &calib, 16, opts, out).with_control(control.clone()), &mut |_, _, _| {}).map(|(_, r)| r)
}

/// Runs the binary's `compress` on `model` with a tiny calibration text; returns the exit
/// code and stderr.
fn compress_cli(model: &Path, calib: &Path, out: &Path, extra: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorap-gpu"));
    cmd.args(["compress", "--ratio", "0.3", "--samples", "2", "--seq-len", "8", "--quiet"]);
    cmd.arg("--model").arg(model).arg("--calib").arg(calib).arg("--out").arg(out).args(extra);
    cmd.env("WGPU_BACKEND", "vulkan");
    let o = cmd.output().expect("run lorap-gpu");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    (o.status.code().unwrap_or(-1), err)
}

/// A model folder with a tokenizer (the synthetic writer adds a tiny word-level one).
fn cli_case(dir: &Path) -> (PathBuf, PathBuf) {
    let src = small_model(dir, 1);
    synthetic::write_word_tokenizer(&src, 101).unwrap();
    let calib = dir.join("calib.txt");
    std::fs::write(&calib, "the quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    (src, calib)
}

#[test]
fn bad_model_files_fail_with_their_class_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let (src, calib) = cli_case(dir.path());
    let st = src.join("model.safetensors");
    let good = std::fs::read(&st).unwrap();
    let cfg_path = src.join("config.json");
    let good_cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let out = dir.path().join("out");
    let check = |what: &str, class: ErrorClass, mention: &str| {
        let (code, err) = compress_cli(&src, &calib, &out, &[]);
        assert_eq!(code, class.exit_code() as i32, "{what}: exit {code}, stderr: {err}");
        assert!(err.contains(mention), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one error line expected: {err}");
        let opened = Model::open(&src).err().map(|e| classify(&e.into()));
        assert_eq!(opened, Some(class), "{what}");
        assert_no_output(dir.path(), "out");
    };
    // truncated safetensors
    std::fs::write(&st, &good[..good.len() - 100]).unwrap();
    check("truncated", ErrorClass::CorruptWeights, "model.safetensors");
    // corrupt header
    let mut bad = good.clone();
    for b in &mut bad[8..40] {
        *b = b'#';
    }
    std::fs::write(&st, &bad).unwrap();
    check("corrupt header", ErrorClass::CorruptWeights, "model.safetensors");
    // missing weights
    std::fs::remove_file(&st).unwrap();
    check("missing", ErrorClass::MissingInput, "no model.safetensors");
    std::fs::write(&st, &good).unwrap();
    // shape mismatch with config.json
    let mut c: serde_json::Value = serde_json::from_str(&good_cfg).unwrap();
    c["intermediate_size"] = 96.into();
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    check("shape", ErrorClass::ShapeMismatch, "gate_proj");
    // unknown architecture
    let mut c: serde_json::Value = serde_json::from_str(&good_cfg).unwrap();
    c["model_type"] = "gpt_neox".into();
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    check("architecture", ErrorClass::Unsupported, "unsupported architecture");
    // config that is not JSON
    std::fs::write(&cfg_path, "{ not json").unwrap();
    check("config", ErrorClass::BadConfig, "config.json");
    std::fs::write(&cfg_path, &good_cfg).unwrap();
    // a tensor stored in an unsupported dtype
    let names = common::tensor_names(&src);
    common::rewrite_dtype(&src, &names[0], safetensors::Dtype::I16);
    check("dtype", ErrorClass::Unsupported, "dtype");
}

#[test]
fn bad_arguments_and_outputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (src, calib) = cli_case(dir.path());
    let out = dir.path().join("out");
    for r in ["0", "1", "-0.2", "1.5", "nan"] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorap-gpu"));
        cmd.args(["compress", "--ratio", r, "--quiet", "--seq-len", "8", "--samples", "2"]).arg("--model").arg(&src).arg("--calib").arg(&calib).arg("--out").arg(&out);
        let o = cmd.output().unwrap();
        assert_eq!(o.status.code(), Some(ErrorClass::BadArgument.exit_code() as i32), "ratio {r}: {}", String::from_utf8_lossy(&o.stderr));
        assert_no_output(dir.path(), "out");
    }
    // empty and too-short calibration text
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let (code, err) = compress_cli(&src, &empty, &out, &[]);
    assert_eq!(code, ErrorClass::CalibrationTooShort.exit_code() as i32, "{err}");
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "the quick brown fox").unwrap();
    let (code, err) = compress_cli(&src, &short, &out, &[]);
    assert_eq!(code, ErrorClass::CalibrationTooShort.exit_code() as i32, "{err}");
    assert!(err.contains("fewer than 2 windows"), "{err}");
    assert_no_output(dir.path(), "out");
    // an existing output folder is refused, and kept as it was
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "keep").unwrap();
    let (code, err) = compress_cli(&src, &calib, &out, &[]);
    assert_eq!(code, ErrorClass::OutputExists.exit_code() as i32, "{err}");
    assert_eq!(std::fs::read_to_string(out.join("mine.txt")).unwrap(), "keep");
    // the input folder itself, or a folder inside it
    let before: Vec<_> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().file_name()).collect();
    for target in [src.clone(), src.join("inside")] {
        let (code, err) = compress_cli(&src, &calib, &target, &["--force"]);
        assert_eq!(code, ErrorClass::OutputExists.exit_code() as i32, "{err}");
    }
    let after: Vec<_> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before, after, "input folder modified");
    // --force replaces it with a complete model
    let (code, err) = compress_cli(&src, &calib, &out, &["--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.join("mine.txt").exists());
    assert!(Model::open(&out).unwrap().cfg.lorap.is_some());
}

#[test]
fn disk_full_leaves_no_output_and_keeps_only_a_resumable_partial() {
    let dir = tempfile::tempdir().unwrap();
    let src = small_model(dir.path(), 3);
    let model = Model::open(&src).unwrap();
    let opts = LorapOptions { ratio: 0.3, ..Default::default() };
    // full at the first shard: nothing at all is left
    let out = dir.path().join("out");
    let e = compress_lib(&model, &out, &opts, &RunControl { output_byte_limit: Some(1000), ..Default::default() }).unwrap_err();
    assert_eq!(classify(&e), ErrorClass::DiskFull, "{e:#}");
    assert!(format!("{e:#}").contains("disk full"), "{e:#}");
    assert_no_output(dir.path(), "out");
    // full after the first layer: no output folder, the hidden partial holds the finished layer
    let full = compress_lib(&model, &dir.path().join("ref"), &opts, &RunControl::default()).unwrap();
    assert_eq!(full.layers.len(), 3);
    let shard = std::fs::metadata(dir.path().join("ref/model-00001-of-00004.safetensors")).unwrap().len();
    let e = compress_lib(&model, &out, &opts, &RunControl { output_byte_limit: Some(shard + 20_000), ..Default::default() }).unwrap_err();
    assert_eq!(classify(&e), ErrorClass::DiskFull, "{e:#}");
    assert!(!out.exists());
    assert!(dir.path().join(".out.partial/resume.json").exists());
    // and it resumes to the same bytes as the uninterrupted run
    compress_lib(&model, &out, &opts, &RunControl { resume: true, ..Default::default() }).unwrap();
    assert_same_model(&dir.path().join("ref"), &out);
}

fn assert_same_model(a: &Path, b: &Path) {
    for i in 1..=4 {
        let f = format!("model-{i:05}-of-00004.safetensors");
        assert!(std::fs::read(a.join(&f)).unwrap() == std::fs::read(b.join(&f)).unwrap(), "{f} differs");
    }
    assert_eq!(std::fs::read(a.join("config.json")).unwrap(), std::fs::read(b.join("config.json")).unwrap());
    assert!(!b.join("resume.json").exists());
}

#[test]
fn interrupted_compression_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let src = small_model(dir.path(), 3);
    let model = Model::open(&src).unwrap();
    let opts = LorapOptions { ratio: 0.4, ..Default::default() };
    let whole = compress_lib(&model, &dir.path().join("whole"), &opts, &RunControl::default()).unwrap();
    let out = dir.path().join("out");
    for stop in [1, 2] {
        let e = compress_lib(&model, &out, &opts, &RunControl { stop_after_layers: Some(stop), force: true, resume: stop > 1, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains(&format!("stopped after {stop} layers")), "{e}");
        assert!(!out.exists(), "an interrupted run must not look complete");
    }
    // other options: refused, and the partial is kept
    let other = LorapOptions { ratio: 0.3, ..Default::default() };
    let e = compress_lib(&model, &out, &other, &RunControl { resume: true, ..Default::default() }).unwrap_err();
    assert_eq!(classify(&e), ErrorClass::ResumeMismatch, "{e:#}");
    let resumed = compress_lib(&model, &out, &opts, &RunControl { resume: true, ..Default::default() }).unwrap();
    assert_same_model(&dir.path().join("whole"), &out);
    assert_eq!(resumed.decoder_params_after, whole.decoder_params_after);
    assert_eq!(resumed.layers.len(), 3);
    assert!(!dir.path().join(".out.partial").exists());
}

#[test]
fn gpu_out_of_memory_and_device_loss_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let src = small_model(dir.path(), 2);
    let model = Model::open(&src).unwrap();
    let opts = LorapOptions { ratio: 0.3, ..Default::default() };
    let calib = tokens(6 * 16, 101, 1);
    // a budget far below one layer: the allocation that would pass it fails, cleanly
    let gpu = lorap_gpu::gpu::Gpu::new(&common::options()).unwrap();
    gpu.set_budget(16 << 10);
    let out = dir.path().join("oom");
    let e = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &out), &mut |_, _, _| {}).unwrap_err();
    assert_eq!(classify(&e), ErrorClass::GpuOutOfMemory, "{e:#}");
    assert!(e.to_string().contains("--max-vram") || format!("{e:#}").contains("--max-vram"), "{e:#}");
    assert_no_output(dir.path(), "oom");
    // the device goes away mid-run
    let gpu = lorap_gpu::gpu::Gpu::new(&common::options()).unwrap();
    let out = dir.path().join("lost");
    let dev = gpu.clone();
    let mut calls = 0;
    let e = pipeline::compress(&gpu, &Run::new(&model, &calib, 16, &opts, &out), &mut |_, _, _| {
        calls += 1;
        if calls == 2 {
            dev.device.destroy();
        }
    })
    .unwrap_err();
    assert_eq!(classify(&e), ErrorClass::GpuLost, "{e:#}");
    assert_no_output(dir.path(), "lost");
}

/// Runs the binary with `args`; returns the exit code and stderr (never a panic).
fn run_cli(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lorap-gpu")).arg("--quiet").args(args).env("WGPU_BACKEND", "vulkan").output().expect("run lorap-gpu");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    (o.status.code().unwrap_or(-1), err)
}

/// `--out` (with `--force`) that is, contains or lies inside an input is refused before
/// any work, for every command that writes, and nothing under the inputs changes.
#[test]
fn force_never_deletes_or_writes_into_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p");
    std::fs::create_dir(&p).unwrap();
    let (src, calib) = cli_case(&p);
    let compressed = p.join("compressed");
    let (code, err) = compress_cli(&src, &calib, &compressed, &[]);
    assert_eq!(code, 0, "{err}");
    let before = common::tree_listing(dir.path());
    let os = |s: &Path| s.as_os_str().to_owned();
    let refused = |what: &str, args: Vec<std::ffi::OsString>, mention: &str| {
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let (code, err) = run_cli(&refs);
        assert_eq!(code, ErrorClass::OutputExists.exit_code() as i32, "{what}: {err}");
        assert!(err.contains(mention), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one error line expected: {err}");
        assert_eq!(common::tree_listing(dir.path()), before, "{what}: files changed");
    };
    let compress = |out: &Path| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = ["compress", "--ratio", "0.3", "--samples", "2", "--seq-len", "8", "--force"].iter().map(|s| s.into()).collect();
        v.extend(["--model".into(), os(&src), "--calib".into(), os(&calib), "--out".into(), os(out)]);
        v
    };
    refused("compress into the folder holding the input", compress(&p), "contains the input");
    refused("compress over the calibration text", compress(&calib), "is the input");
    refused("compress below a missing folder inside the input", compress(&src.join("sub/out")), "lies inside the input");
    refused("compress over an ancestor", compress(dir.path()), "contains the input");
    #[cfg(unix)]
    {
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        let before_link = common::tree_listing(dir.path());
        let refs: Vec<std::ffi::OsString> = compress(&link.join("out"));
        let r: Vec<&std::ffi::OsStr> = refs.iter().map(|a| a.as_os_str()).collect();
        let (code, err) = run_cli(&r);
        assert_eq!(code, ErrorClass::OutputExists.exit_code() as i32, "through a symlink: {err}");
        assert_eq!(common::tree_listing(dir.path()), before_link, "through a symlink: files changed");
        std::fs::remove_file(&link).unwrap();
    }
    let export = |out: &Path| vec!["export".into(), "--model".into(), os(&compressed), "--out".into(), os(out), "--force".into()];
    refused("export into the folder holding the input", export(&p), "contains the input");
    refused("export over the input", export(&compressed), "is the input");
    let search = |out: &Path| {
        vec!["search".into(), "--model".into(), os(&src), "--calib".into(), os(&calib), "--out".into(), os(out), "--force".into(), "--samples".into(), "3".into(), "--search-windows".into(), "1".into(), "--seq-len".into(), "8".into()]
    };
    refused("search over the model", search(&src), "is the input");
    refused("search into the folder holding the model", search(&p), "contains the input");
    // a file or dangling symlink at --out: refused up front, even with --force, and kept
    let file = dir.path().join("a-file");
    std::fs::write(&file, "mine").unwrap();
    let before = common::tree_listing(dir.path());
    let (code, err) = compress_cli(&src, &calib, &file, &["--force"]);
    assert_eq!(code, ErrorClass::OutputExists.exit_code() as i32, "{err}");
    assert!(err.contains("not a folder"), "{err}");
    assert_eq!(common::tree_listing(dir.path()), before);
}

/// Two runs on one `--out`: the second fails at once naming the holder and touches
/// nothing of the first's work folder; two racing processes leave one whole model.
#[test]
fn concurrent_runs_on_one_output_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let (src, calib) = cli_case(dir.path());
    let out = dir.path().join("out");
    // a run holds the output (as a running compress does) with a shard in its work folder
    let held = lorap_gpu::format::OutputClaim::take(&out, &[src.as_path()], false).unwrap();
    held.fresh_partial().unwrap();
    std::fs::write(held.partial().join("model-00001-of-00002.safetensors"), "first run's shard").unwrap();
    let before = common::tree_listing(dir.path());
    for extra in [&["--force"][..], &["--resume"], &[]] {
        let (code, err) = compress_cli(&src, &calib, &out, extra);
        assert_eq!(code, ErrorClass::OutputBusy.exit_code() as i32, "{extra:?}: {err}");
        assert!(err.contains("another run is writing") && err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(common::tree_listing(dir.path()), before, "{extra:?}: the first run's files changed");
    }
    drop(held);
    assert!(!dir.path().join(".out.lock").exists());
    let _ = std::fs::remove_dir_all(dir.path().join(".out.partial"));
    // two real processes at once, different ratios: each ends 0 or busy, and what is left is
    // one complete model whose shards match its config
    let spawn = |ratio: &str| {
        Command::new(env!("CARGO_BIN_EXE_lorap-gpu"))
            .args(["compress", "--quiet", "--force", "--samples", "2", "--seq-len", "8", "--ratio", ratio])
            .arg("--model").arg(&src).arg("--calib").arg(&calib).arg("--out").arg(&out)
            .env("WGPU_BACKEND", "vulkan")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("0.2"), spawn("0.5"));
    let mut ok = 0;
    for child in [a, b] {
        let o = child.wait_with_output().unwrap();
        let code = o.status.code().unwrap_or(-1);
        assert!(code == 0 || code == ErrorClass::OutputBusy.exit_code() as i32, "exit {code}: {}", String::from_utf8_lossy(&o.stderr));
        ok += (code == 0) as usize;
    }
    assert!(ok >= 1);
    let m = Model::open(&out).expect("a whole, consistent model");
    let ratio = m.cfg.lorap.as_ref().unwrap().ratio;
    assert!((ratio - 0.2).abs() < 0.05 || (ratio - 0.5).abs() < 0.05, "ratio {ratio}");
    assert!(!dir.path().join(".out.lock").exists() && !dir.path().join(".out.partial").exists());
}
