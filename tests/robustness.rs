//! Bad input never panics and never leaves an output folder behind: each case asserts the
//! exact error class (and, through the binary, its exit code); interrupted runs resume to
//! the same bytes as uninterrupted ones.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use lorap_gpu::methods::CompressOptions;
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

fn compress_lib(model: &Model, out: &Path, opts: &CompressOptions, control: &RunControl) -> anyhow::Result<pipeline::CompressionReport> {
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
    let opts = CompressOptions { ratio: 0.3, ..Default::default() };
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
    let opts = CompressOptions { ratio: 0.4, ..Default::default() };
    let whole = compress_lib(&model, &dir.path().join("whole"), &opts, &RunControl::default()).unwrap();
    let out = dir.path().join("out");
    for stop in [1, 2] {
        let e = compress_lib(&model, &out, &opts, &RunControl { stop_after_layers: Some(stop), force: true, resume: stop > 1, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains(&format!("stopped after {stop} layers")), "{e}");
        assert!(!out.exists(), "an interrupted run must not look complete");
    }
    // other options: refused, and the partial is kept
    let other = CompressOptions { ratio: 0.3, ..Default::default() };
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
    let opts = CompressOptions { ratio: 0.3, ..Default::default() };
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

// ---- issue 15, items 3, 4, 5, 8, 9: resume fingerprint, weight values, config features,
// argument ranges, exit classes ----

/// The error line's causes (split at ": "), each said once: no part of the line repeats.
fn assert_said_once(err: &str) {
    let line = err.trim().trim_start_matches("error: ");
    let parts: Vec<&str> = line.split(": ").map(str::trim).filter(|p| p.len() >= 6).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "cause said twice ({p:?}): {err}");
    }
}

fn osv(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(|s| s.into()).collect()
}

/// Runs the binary on `args`: the exit code of `class`, one `error:` line holding every
/// `mention` with no cause said twice, and no file under `dir` changed. Returns the line.
fn assert_refused(dir: &Path, what: &str, args: &[std::ffi::OsString], class: ErrorClass, mentions: &[&str]) -> String {
    let before = common::tree_listing(dir);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (code, err) = run_cli(&refs);
    assert_eq!(code, class.exit_code() as i32, "{what}: exit {code}, stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{what}: one error line expected: {err}");
    assert!(err.starts_with("error: "), "{what}: {err}");
    for m in mentions {
        assert!(err.contains(m), "{what}: {m:?} not in: {err}");
    }
    assert_said_once(&err);
    assert_eq!(common::tree_listing(dir), before, "{what}: files changed");
    err
}

/// Runs the binary on `args` and expects success.
fn assert_runs(what: &str, args: &[std::ffi::OsString]) {
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (code, err) = run_cli(&refs);
    assert_eq!(code, 0, "{what}: {err}");
}

/// Arguments of a command on `model` with `calib` or `text`, as OS strings.
fn with_paths(head: &[&str], pairs: &[(&str, &Path)], tail: &[&str]) -> Vec<std::ffi::OsString> {
    let mut v = osv(head);
    for (flag, p) in pairs {
        v.push(flag.into());
        v.push(p.as_os_str().to_owned());
    }
    v.extend(osv(tail));
    v
}

/// Rewrites tensor `name` of `dir`/model.safetensors as `dtype` with element `index` set
/// to `value` (the rest keeps its values).
fn poison(dir: &Path, name: &str, dtype: safetensors::Dtype, index: usize, value: f32) {
    common::rewrite_tensor(dir, name, |stored, data| {
        assert_eq!(stored, safetensors::Dtype::F16);
        let mut vals: Vec<f32> = data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        vals[index] = value;
        (dtype, lorap_gpu::format::dtype::encode(&vals, dtype))
    });
}

/// Item 3: a resume over a model with the same config.json but other weights is refused,
/// naming the partial folder and the weights, and changes nothing.
#[test]
fn resume_refuses_other_weights_with_the_same_config() {
    let dir = tempfile::tempdir().unwrap();
    let src = small_model(dir.path(), 3);
    let opts = CompressOptions { ratio: 0.4, ..Default::default() };
    let out = dir.path().join("out");
    let e = compress_lib(&Model::open(&src).unwrap(), &out, &opts, &RunControl { stop_after_layers: Some(1), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("stopped after 1 layers"), "{e}");
    // other weights under the same config.json
    let cfg_before = std::fs::read(src.join("config.json")).unwrap();
    let other = dir.path().join("other");
    synthetic::write_random_model(&other, &serde_json::from_slice(&cfg_before).unwrap(), 12).unwrap();
    std::fs::copy(other.join("model.safetensors"), src.join("model.safetensors")).unwrap();
    assert_eq!(std::fs::read(src.join("config.json")).unwrap(), cfg_before);
    let before = common::tree_listing(dir.path());
    let e = compress_lib(&Model::open(&src).unwrap(), &out, &opts, &RunControl { resume: true, ..Default::default() }).unwrap_err();
    assert_eq!(classify(&e), ErrorClass::ResumeMismatch, "{e:#}");
    let line = lorap_gpu::cli::error_line(&e);
    assert!(line.contains(".out.partial") && line.contains("cannot resume: the model's weights are not the ones it was made from"), "{line}");
    assert!(!line.contains("options") && !line.contains("config.json"), "only the weights differ: {line}");
    assert_said_once(&line);
    assert_eq!(common::tree_listing(dir.path()), before, "a refused resume changed files");
    // a checkpoint of an older tool (its fingerprint one string) is refused as such
    let ck = dir.path().join(".out.partial/resume.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&ck).unwrap()).unwrap();
    v["state"]["fingerprint"] = "{\"config\": {}}".into();
    std::fs::write(&ck, v.to_string()).unwrap();
    let before = common::tree_listing(dir.path());
    let e = compress_lib(&Model::open(&src).unwrap(), &out, &opts, &RunControl { resume: true, ..Default::default() }).unwrap_err();
    assert_eq!(classify(&e), ErrorClass::ResumeMismatch, "{e:#}");
    assert!(lorap_gpu::cli::error_line(&e).contains("cannot resume: it was made by an older lorap-gpu"), "{e:#}");
    assert_eq!(common::tree_listing(dir.path()), before, "a refused resume changed files");
}

/// Item 4: NaN, infinite and absurd weights are refused before any work or output, naming
/// the tensor and the file (exit 4); `--max-abs-weight` lets a large finite value through.
#[test]
fn non_finite_and_absurd_weights_are_refused_up_front() {
    use safetensors::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let (src, calib) = cli_case(dir.path());
    let good = std::fs::read(src.join("model.safetensors")).unwrap();
    let out = dir.path().join("out");
    let compress = |extra: &[&str]| with_paths(&["compress", "--ratio", "0.3", "--samples", "2", "--seq-len", "8"], &[("--model", &src), ("--calib", &calib), ("--out", &out)], extra);
    let eval = |extra: &[&str]| with_paths(&["eval", "--seq-len", "8"], &[("--model", &src), ("--text", &calib)], extra);
    let q = "model.layers.0.self_attn.q_proj.weight";
    let cases: [(&str, Dtype, f32, &str); 4] = [
        ("model.layers.0.self_attn.q_proj.weight", Dtype::F16, f32::NAN, "holds NaN at element 5"),
        ("model.layers.0.mlp.down_proj.weight", Dtype::F16, f32::NEG_INFINITY, "holds -infinity at element 5"),
        ("model.layers.0.self_attn.k_proj.weight", Dtype::BF16, 1e25, "beyond the largest plausible magnitude 1e6"),
        ("model.embed_tokens.weight", Dtype::F32, -3e6, "holds -3e6 at element 5"),
    ];
    for (name, dtype, value, said) in cases {
        std::fs::write(src.join("model.safetensors"), &good).unwrap();
        poison(&src, name, dtype, 5, value);
        let mentions = ["model.safetensors", name, said];
        assert_refused(dir.path(), &format!("compress, {name} = {value}"), &compress(&[]), ErrorClass::CorruptWeights, &mentions);
        assert_refused(dir.path(), &format!("eval, {name} = {value}"), &eval(&[]), ErrorClass::CorruptWeights, &mentions);
        assert_no_output(dir.path(), "out");
    }
    // the same through the library: compress refuses before its output exists
    let model = Model::open(&src).unwrap();
    let e = compress_lib(&model, &out, &CompressOptions { ratio: 0.3, ..Default::default() }, &RunControl::default()).unwrap_err();
    assert_eq!(classify(&e), ErrorClass::CorruptWeights, "{e:#}");
    assert_no_output(dir.path(), "out");
    // generate and search too
    std::fs::write(src.join("model.safetensors"), &good).unwrap();
    poison(&src, q, Dtype::F16, 0, f32::INFINITY);
    let generate = with_paths(&["generate", "--prompt", "the quick"], &[("--model", &src)], &[]);
    assert_refused(dir.path(), "generate", &generate, ErrorClass::CorruptWeights, &[q, "+infinity"]);
    let search = with_paths(&["search", "--samples", "3", "--search-windows", "1", "--seq-len", "8"], &[("--model", &src), ("--calib", &calib), ("--out", &out)], &[]);
    assert_refused(dir.path(), "search", &search, ErrorClass::CorruptWeights, &[q, "+infinity"]);
    // a large finite value passes when the user raises the limit (NaN never does)
    std::fs::write(src.join("model.safetensors"), &good).unwrap();
    poison(&src, "model.layers.0.self_attn.o_proj.weight", Dtype::F32, 3, 2e6);
    assert_refused(dir.path(), "o_proj 2e6", &eval(&[]), ErrorClass::CorruptWeights, &["o_proj", "2e6", "--max-abs-weight"]);
    assert_runs("o_proj 2e6 with --max-abs-weight 1e7", &eval(&["--max-abs-weight", "1e7"]));
    poison(&src, q, Dtype::F16, 0, f32::NAN);
    assert_refused(dir.path(), "NaN with --max-abs-weight inf", &eval(&["--max-abs-weight", "inf"]), ErrorClass::CorruptWeights, &[q, "NaN"]);
}

/// A model folder named `name` with a word tokenizer whose config.json `edit` changes
/// after the weights are written.
fn edited_model(dir: &Path, name: &str, model_type: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let src = dir.join(name);
    synthetic::write_random_model(&src, &synthetic::config_json(synthetic::Shape { model_type, layers: 1, hidden: 64, ffn: 160, heads: 4, kv_heads: 2, vocab: 101, tied: true }), 11).unwrap();
    synthetic::write_word_tokenizer(&src, 101).unwrap();
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(src.join("config.json"), c.to_string()).unwrap();
    src
}

/// Item 5: config features the forward pass lacks are refused up front, naming the key
/// (biases, sliding windows shorter than the window asked for, rope types and values);
/// what is off stays off.
#[test]
fn unsupported_config_features_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, "the quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let out = dir.path().join("out");
    let compress = |m: &Path, seq: &str| with_paths(&["compress", "--ratio", "0.3", "--samples", "2", "--seq-len", seq], &[("--model", m), ("--calib", &calib), ("--out", &out)], &[]);
    let eval = |m: &Path, seq: &str| with_paths(&["eval", "--seq-len", seq], &[("--model", m), ("--text", &calib)], &[]);
    let cases: Vec<(&str, &str, serde_json::Value, ErrorClass, &str)> = vec![
        ("mistral biases", "mistral", serde_json::json!({"attention_bias": true}), ErrorClass::Unsupported, "attention_bias / mlp_bias: true on a mistral model"),
        ("qwen2 mlp bias", "qwen2", serde_json::json!({"mlp_bias": true}), ErrorClass::Unsupported, "mlp_bias: true on a qwen2 model"),
        ("yarn", "llama", serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), ErrorClass::Unsupported, "rope_scaling.rope_type \"yarn\" is not supported"),
        ("llama3 factor 0", "llama", serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 0}}), ErrorClass::BadConfig, "rope_scaling.factor must be a positive finite number, got 0"),
        ("llama3 equal frequency factors", "llama", serde_json::json!({"rope_scaling": {"rope_type": "llama3", "low_freq_factor": 2, "high_freq_factor": 2}}), ErrorClass::BadConfig, "rope_scaling.high_freq_factor"),
        ("mistral window", "mistral", serde_json::json!({"sliding_window": 4}), ErrorClass::Unsupported, "sliding_window 4 is shorter than the 8 tokens"),
        ("qwen2 window on", "qwen2", serde_json::json!({"sliding_window": 4, "use_sliding_window": true}), ErrorClass::Unsupported, "sliding_window 4 is shorter than the 8 tokens"),
    ];
    for (i, (what, model_type, extra, class, said)) in cases.into_iter().enumerate() {
        let m = edited_model(dir.path(), &format!("m{i}"), model_type, |c| {
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
        });
        assert_refused(dir.path(), &format!("compress, {what}"), &compress(&m, "8"), class, &["config.json", said]);
        assert_refused(dir.path(), &format!("eval, {what}"), &eval(&m, "8"), class, &["config.json", said]);
        assert_no_output(dir.path(), "out");
    }
    // a window no longer than the sliding window runs; generate counts the new tokens too
    let mistral = edited_model(dir.path(), "mistral", "mistral", |c| c["sliding_window"] = 8.into());
    assert_runs("mistral, windows of 8", &eval(&mistral, "8"));
    let generate = with_paths(&["generate", "--prompt", "the quick", "--max-new", "7"], &[("--model", &mistral)], &[]);
    assert_refused(dir.path(), "generate past the window", &generate, ErrorClass::Unsupported, &["sliding_window 8 is shorter than the 9 tokens of the prompt and --max-new"]);
    // qwen2's window is off unless use_sliding_window says otherwise
    let qwen = edited_model(dir.path(), "qwen", "qwen2", |c| {
        c["sliding_window"] = 4.into();
        c["use_sliding_window"] = false.into();
    });
    assert_runs("qwen2, window off", &eval(&qwen, "8"));
}

/// Item 8: every argument is range-checked before any file is read (exit 2, the flag
/// named), plan files refuse unknown keys naming the key and the file.
#[test]
fn arguments_out_of_range_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let (src, calib) = cli_case(dir.path());
    let out = dir.path().join("out");
    // the values are refused before any file is read, so the defaults' sizes never matter
    let compress = |extra: &[&str]| with_paths(&["compress"], &[("--model", &src), ("--calib", &calib), ("--out", &out)], extra);
    let search = |extra: &[&str]| with_paths(&["search"], &[("--model", &src), ("--calib", &calib), ("--out", &out)], extra);
    let eval = |extra: &[&str]| with_paths(&["eval"], &[("--model", &src), ("--text", &calib)], extra);
    let generate = |extra: &[&str]| with_paths(&["generate", "--prompt", "the"], &[("--model", &src)], extra);
    let synth = |extra: &[&str]| with_paths(&["synth", "--preset", "smollm2-135m"], &[("--out", &out)], extra);
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (search(&["--target-ratio", "2"]), "--target-ratio must be in (0, 1), got 2"),
        (search(&["--target-ratio=-1"]), "--target-ratio must be in (0, 1), got -1"),
        (search(&["--target-ratio", "nan"]), "--target-ratio must be in (0, 1), got NaN"),
        (search(&["--ratios", "0.2,1.5"]), "--ratios must be in [0, 1), got 1.5"),
        (search(&["--step", "0"]), "--step must be in (0, 1)"),
        (search(&["--evaluations", "1000000000"]), "--evaluations must be at most"),
        (with_paths(&["search", "--samples", "3", "--search-windows", "3"], &[("--model", &src), ("--calib", &calib), ("--out", &out)], &[]), "--samples (3) must exceed --search-windows (3)"),
        (compress(&["--ratio", "0.3", "--max-vram", "1e-12"]), "--max-vram 0.000000000001 GiB is less than one byte"),
        (compress(&["--ratio", "0.3", "--max-vram=-1"]), "--max-vram must be a positive number of GiB"),
        (compress(&["--ratio", "0.3", "--max-vram", "nan"]), "--max-vram must be a positive number of GiB"),
        (compress(&["--ratio", "0.3", "--max-vram", "inf"]), "--max-vram must be a positive number of GiB"),
        (compress(&["--ratio", "2"]), "--ratio must be in (0, 1), got 2"),
        (compress(&["--ratio", "0.3", "--samples", "0"]), "--samples must be at least 1"),
        (compress(&["--ratio", "0.3", "--seq-len", "1"]), "--seq-len must be at least 2"),
        (compress(&["--ratio", "0.3", "--batch-tokens", "0"]), "--batch-tokens must be at least 1"),
        (compress(&["--ratio", "0.3", "--power-iters", "1000000"]), "--power-iters must be at most 32"),
        (compress(&["--ratio", "0.3", "--oversample", "100000"]), "--oversample must be at most 1024"),
        (compress(&["--ratio", "0.3", "--mpo-cores", "1"]), "--mpo-cores must be in 2..=8"),
        (compress(&["--ratio", "0.3", "--mpo-max-bond", "0"]), "--mpo-max-bond must be at least 1"),
        (compress(&["--ratio", "0.3", "--mpo-matrices", "q,x"]), "--mpo-matrices: unknown matrix \"x\""),
        (compress(&["--ratio", "0.3", "--mpo-matrices", "q,q"]), "--mpo-matrices: \"q\" given twice"),
        (compress(&["--ratio", "0.3", "--mpo-matrices", "q"]), "--mpo-matrices applies to --method mpo, not lorap"),
        (compress(&["--ratio", "0.3", "--method", "sfsd", "--plain-svd"]), "--plain-svd applies to --method lorap, not sfsd"),
        (compress(&["--method", "sfsd", "--surgical", "--surgical-tolerance=-1"]), "--surgical-tolerance must be a finite number >= 0"),
        (compress(&["--method", "sfsd", "--surgical", "--surgical-last-layers", "0"]), "--surgical-last-layers must be at least 1"),
        (compress(&["--method", "sfsd", "--surgical", "--samples", "2", "--search-windows", "2"]), "--samples (2) must exceed --search-windows (2)"),
        (compress(&["--surgical"]), "--surgical goes with --method sfsd and no --plan"),
        (compress(&["--ratio", "0.3", "--method", "sfsd", "--layer-allocation", "sensitivity"]), "--layer-allocation sensitivity applies to --method lorap, not sfsd"),
        (compress(&["--ratio", "0.3", "--method", "mpo", "--layer-allocation", "sensitivity"]), "--layer-allocation sensitivity applies to --method lorap, not mpo"),
        (compress(&["--ratio", "0.3", "--plan", "p.json", "--layer-allocation", "sensitivity"]), "--layer-allocation sensitivity makes the plan itself: give it or --plan, not both"),
        (compress(&["--ratio", "0.3", "--layer-allocation", "sensitivity", "--samples", "4", "--search-windows", "4"]), "--samples (4) must exceed --search-windows (4)"),
        (compress(&["--ratio", "0.3", "--max-abs-weight", "0"]), "--max-abs-weight must be positive, got 0"),
        (compress(&["--ratio", "0.3", "--max-binding", "16"]), "--max-binding must be at least 256 bytes"),
        (eval(&["--max-vram", "0"]), "--max-vram must be a positive number of GiB"),
        (eval(&["--seq-len", "1"]), "--seq-len must be at least 2"),
        (eval(&["--seq-len", "8", "--max-tokens", "4"]), "--max-tokens 4 is less than one window of --seq-len 8"),
        (eval(&["--batch-tokens", "0"]), "--batch-tokens must be at least 1"),
        (generate(&["--max-vram", "0"]), "--max-vram must be a positive number of GiB"),
        (synth(&["--layers", "0"]), "--layers must be in 1..=30"),
        (synth(&["--layers", "31"]), "--layers must be in 1..=30"),
    ];
    for (args, said) in &cases {
        assert_refused(dir.path(), said, args, ErrorClass::BadArgument, &[said]);
        assert_no_output(dir.path(), "out");
    }
    // plan files: a misspelled key names itself and the file; a plan for another model too
    let plan = dir.path().join("plan.json");
    std::fs::write(&plan, r#"{"layers": [{"attention_keep": 0.5, "ffn_kep": 0.5}]}"#).unwrap();
    let planned = with_paths(&["compress", "--samples", "2", "--seq-len", "8"], &[("--model", &src), ("--calib", &calib), ("--out", &out), ("--plan", &plan)], &[]);
    assert_refused(dir.path(), "misspelled plan key", &planned, ErrorClass::BadArgument, &["plan.json: not a plan: unknown field `ffn_kep`"]);
    std::fs::write(&plan, r#"{"layers": [{"attention_keep": 0.5}], "notes": "x"}"#).unwrap();
    assert_refused(dir.path(), "misspelled top-level plan key", &planned, ErrorClass::BadArgument, &["plan.json: not a plan: unknown field `notes`"]);
    std::fs::write(&plan, r#"{"layers": [{"attention_keep": 0.5}, {}]}"#).unwrap();
    assert_refused(dir.path(), "plan for two layers", &planned, ErrorClass::BadArgument, &["plan.json: plan: 2 layers listed, the model has 1"]);
    std::fs::write(&plan, r#"{"layers": [{"attention_keep": 1.5}]}"#).unwrap();
    assert_refused(dir.path(), "plan keep above 1", &planned, ErrorClass::BadArgument, &["plan.json: plan: layer 0: keep fractions must be in (0, 1]"]);
}

/// Item 9: exit classes as the README's table says, each error line naming the file and
/// saying its cause once.
#[test]
fn exit_classes_follow_the_readme() {
    let dir = tempfile::tempdir().unwrap();
    let (src, calib) = cli_case(dir.path());
    let out = dir.path().join("out");
    let eval = |m: &Path, text: &Path, extra: &[&str]| with_paths(&["eval", "--seq-len", "8"], &[("--model", m), ("--text", text)], extra);
    let compress = |m: &Path, out: &Path| with_paths(&["compress", "--ratio", "0.3", "--samples", "2", "--seq-len", "8"], &[("--model", m), ("--calib", &calib), ("--out", out)], &[]);
    // tokenizer.json: corrupt is a bad model file (5), missing is a missing input (3), one
    // whose ids the model lacks is named with both files (5)
    let tok = src.join("tokenizer.json");
    let good_tok = std::fs::read(&tok).unwrap();
    std::fs::write(&tok, "{ not a tokenizer").unwrap();
    assert_refused(dir.path(), "corrupt tokenizer, eval", &eval(&src, &calib, &[]), ErrorClass::BadConfig, &["tokenizer.json: cannot load tokenizer"]);
    assert_refused(dir.path(), "corrupt tokenizer, compress", &compress(&src, &out), ErrorClass::BadConfig, &["tokenizer.json: cannot load tokenizer"]);
    std::fs::remove_file(&tok).unwrap();
    assert_refused(dir.path(), "missing tokenizer", &eval(&src, &calib, &[]), ErrorClass::MissingInput, &["no tokenizer.json"]);
    synthetic::write_word_tokenizer(&src, 300).unwrap();
    assert_refused(dir.path(), "vocabulary mismatch", &compress(&src, &out), ErrorClass::BadConfig, &["tokenizer.json: token", "outside the vocabulary of 101 in", "config.json"]);
    std::fs::write(&tok, &good_tok).unwrap();
    // eval and generate with --max-vram 0: a bad argument, as in compress
    assert_refused(dir.path(), "eval --max-vram 0", &eval(&src, &calib, &["--max-vram", "0"]), ErrorClass::BadArgument, &["--max-vram"]);
    let generate = |prompt: &str, extra: &[&str]| with_paths(&["generate", "--prompt", prompt], &[("--model", &src)], extra);
    assert_refused(dir.path(), "generate --max-vram 0", &generate("the", &["--max-vram", "0"]), ErrorClass::BadArgument, &["--max-vram"]);
    // empty prompts are bad arguments, too-short texts are too short (8), naming the text
    assert_refused(dir.path(), "empty prompt", &generate("", &[]), ErrorClass::BadArgument, &["--prompt is empty"]);
    assert_refused(dir.path(), "blank prompt", &generate("   ", &[]), ErrorClass::BadArgument, &["tokenizes to nothing"]);
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "the quick brown").unwrap();
    assert_refused(dir.path(), "short eval text", &eval(&src, &short, &[]), ErrorClass::CalibrationTooShort, &["short.txt: 3 tokens, fewer than one window of 8"]);
    // a task file that is not one: a bad argument naming file and line
    let task = dir.path().join("task.jsonl");
    std::fs::write(&task, "{\"context\": \"the\"}\n").unwrap();
    let tasked = with_paths(&["eval"], &[("--model", &src), ("--task", &task)], &[]);
    assert_refused(dir.path(), "bad task", &tasked, ErrorClass::BadArgument, &["task.jsonl:1: no choices/endings field"]);
    // a missing input file's cause is said once
    let plan = dir.path().join("missing-plan.json");
    let planned = with_paths(&["compress", "--samples", "2", "--seq-len", "8"], &[("--model", &src), ("--calib", &calib), ("--out", &out), ("--plan", &plan)], &[]);
    assert_refused(dir.path(), "missing plan", &planned, ErrorClass::MissingInput, &["missing-plan.json: cannot read the plan file: No such file"]);
    // output-side failures: an output class (16), not a missing input
    let file = dir.path().join("a-file");
    std::fs::write(&file, "mine").unwrap();
    assert_refused(dir.path(), "compress under a file", &compress(&src, &file.join("out")), ErrorClass::OutputUnwritable, &["a-file: cannot create the output under it: not a directory"]);
    let search = with_paths(&["search", "--samples", "3", "--search-windows", "1", "--seq-len", "8"], &[("--model", &src), ("--calib", &calib), ("--out", &file.join("out"))], &[]);
    assert_refused(dir.path(), "search under a file", &search, ErrorClass::OutputUnwritable, &["a-file: cannot create the output under it"]);
    let compressed = dir.path().join("compressed");
    assert_runs("compress", &compress(&src, &compressed));
    let report = with_paths(&["report"], &[("--model", &compressed), ("--out", &file.join("report"))], &[]);
    assert_refused(dir.path(), "report under a file", &report, ErrorClass::OutputUnwritable, &["a-file/report: cannot create"]);
}
