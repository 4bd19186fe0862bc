//! Issue 15, item 6 (memory): texts and config files are read with size caps, non-regular
//! files are refused, texts are tokenized in pieces with the same token ids as whole, and
//! `generate` runs in constant GPU memory with a KV cache and a bounded `--max-new`.

mod common;

use std::path::Path;
use std::process::Command;

use lorap_gpu::calib;
use lorap_gpu::cli::classify;
use lorap_gpu::error::ErrorClass;
use lorap_gpu::model::forward::Runner;
use lorap_gpu::model::tokens::TextFile;
use lorap_gpu::model::{decode, Model};

fn word_model(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("dense");
    let shape = lorap_gpu::model::synthetic::Shape { model_type: "llama", layers: 2, hidden: 64, ffn: 160, heads: 4, kv_heads: 2, vocab: 101, tied: true };
    lorap_gpu::model::synthetic::write_random_model(&src, &lorap_gpu::model::synthetic::config_json(shape), 11).unwrap();
    lorap_gpu::model::synthetic::write_word_tokenizer(&src, 101).unwrap();
    src
}

/// Runs the binary; returns the exit code, stdout and stderr (never a panic).
fn run_cli(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lorap-gpu")).arg("--quiet").args(args).env("WGPU_BACKEND", "vulkan").output().expect("run lorap-gpu");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).to_string(), err)
}

/// Asserts a refusal: the exit code of `class`, one error line mentioning each of
/// `mentions`, nothing under `tree` changed.
fn assert_refused(what: &str, args: &[&std::ffi::OsStr], class: ErrorClass, mentions: &[&str], tree: &Path) {
    let before = common::tree_listing(tree);
    let (code, _, err) = run_cli(args);
    assert_eq!(code, class.exit_code() as i32, "{what}: exit {code}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{what}: one error line expected: {err}");
    for m in mentions {
        assert!(err.contains(m), "{what}: {m:?} not in {err}");
    }
    assert_eq!(common::tree_listing(tree), before, "{what}: files changed");
}

fn os_args(v: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<std::ffi::OsString> {
    v.iter().map(|a| a.as_ref().to_owned()).collect()
}

fn refs(v: &[std::ffi::OsString]) -> Vec<&std::ffi::OsStr> {
    v.iter().map(|a| a.as_os_str()).collect()
}

#[cfg(unix)]
fn fifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().expect("mkfifo").success();
    assert!(ok, "mkfifo {}", path.display());
}

// ---- texts and config files ----

/// The streamed tokens of the real test texts are the whole texts' tokens, with pieces
/// small enough for hundreds of cuts, and the calibration windows drawn from the stream
/// (in one pass, and in the two-pass mode for long texts) are the same token ids.
#[cfg(feature = "real-model")]
#[test]
fn streamed_tokens_of_the_real_texts_equal_whole_text_tokens() {
    let model = common::assets().join("smollm2-135m");
    let tok = lorap_gpu::model::load_tokenizer(&model).unwrap();
    for name in ["wiki.txt", "c4.txt", "tiny.txt"] {
        let path = common::assets().join("text").join(name);
        let whole = common::tokenize(&model, name);
        for chunk in [4096, lorap_gpu::model::tokens::CHUNK_BYTES] {
            let text = TextFile { chunk_bytes: chunk, ..TextFile::new(&tok, &path) };
            assert!(text.first_tokens(None).unwrap() == whole, "{name}: pieces of {chunk} bytes give other tokens");
        }
        // compress's default windows and the golden check's; one pass and two
        let text = TextFile { chunk_bytes: 4096, ..TextFile::new(&tok, &path) };
        for (samples, seq_len, keep) in [(128, 128, calib::KEEP_TOKENS), (4, 128, calib::KEEP_TOKENS), (128, 128, 1000), (36, 64, 1000)] {
            let want = calib::calibration_windows(&whole, samples, seq_len).unwrap();
            let got = calib::calibration_windows_of(text, samples, seq_len, keep).unwrap();
            assert!(got == want, "{name}: {samples} x {seq_len} windows (keep {keep}) differ");
        }
    }
}

/// Calibration windows of a synthetic text: the stream, in one or two passes, picks the
/// windows the whole text's tokens give.
#[test]
fn streamed_calibration_windows_equal_whole_text_windows() {
    let dir = tempfile::tempdir().unwrap();
    let src = word_model(dir.path());
    let tok = lorap_gpu::model::load_tokenizer(&src).unwrap();
    let path = dir.path().join("calib.txt");
    let text: String = (0..5000).map(|i| format!("{} ", ["the quick brown fox", "jumps over the", "lazy dog.\n", "\n"][i % 4])).collect();
    std::fs::write(&path, &text).unwrap();
    let whole = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    for (samples, seq_len) in [(1, 2), (7, 16), (50, 100), (1, whole.len())] {
        let want = calib::calibration_windows(&whole, samples, seq_len).unwrap();
        for (chunk, keep) in [(300, 1 << 30), (300, 10), (1 << 20, 0)] {
            let f = TextFile { chunk_bytes: chunk, ..TextFile::new(&tok, &path) };
            assert_eq!(calib::calibration_windows_of(f, samples, seq_len, keep).unwrap(), want, "{samples} x {seq_len}, pieces {chunk}, keep {keep}");
        }
    }
    let e = calib::calibration_windows_of(TextFile::new(&tok, &path), 2, whole.len(), 0).unwrap_err();
    assert_eq!(lorap_gpu::cli::classify(&e), lorap_gpu::error::ErrorClass::CalibrationTooShort, "{e:#}");
}

/// Texts and model files that are not regular files, too large or not UTF-8 are refused
/// before they are read (a FIFO would block, /dev/zero never ends), each with its class,
/// one line naming the file, and nothing changed.
#[cfg(unix)]
#[test]
fn hostile_texts_and_model_files_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let src = word_model(dir.path());
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, "the quick brown fox jumps over the lazy dog . ".repeat(40)).unwrap();
    let out = dir.path().join("out");
    let compress = |calib: &Path, extra: &[&str]| {
        let mut v = os_args(&[&"compress", &"--ratio", &"0.3", &"--samples", &"2", &"--seq-len", &"8", &"--model", &src, &"--calib", &calib, &"--out", &out]);
        v.extend(extra.iter().map(std::ffi::OsString::from));
        v
    };
    let refused = |what: &str, args: Vec<std::ffi::OsString>, class: ErrorClass, mentions: &[&str]| {
        assert_refused(what, &refs(&args), class, mentions, dir.path());
        assert!(!out.exists() && !dir.path().join(".out.partial").exists(), "{what}: output left behind");
    };
    refused("--calib /dev/zero", compress(Path::new("/dev/zero"), &[]), ErrorClass::BadArgument, &["/dev/zero: is a device, not a regular file"]);
    let pipe = dir.path().join("pipe.txt");
    fifo(&pipe);
    refused("--calib FIFO", compress(&pipe, &[]), ErrorClass::BadArgument, &["pipe.txt: is a FIFO (named pipe), not a regular file"]);
    let folder = dir.path().join("texts");
    std::fs::create_dir(&folder).unwrap();
    refused("--calib folder", compress(&folder, &[]), ErrorClass::BadArgument, &["texts: is a folder, not a regular file"]);
    let big = dir.path().join("big.txt");
    std::fs::File::create(&big).unwrap().set_len((256 << 20) + 1).unwrap();
    refused("--calib over 256 MiB", compress(&big, &[]), ErrorClass::BadArgument, &["big.txt: 268435457 bytes, over the 256 MiB limit for a text file"]);
    std::fs::remove_file(&big).unwrap();
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"the quick brown fox caf\xe9 over the lazy dog").unwrap();
    refused("--calib not UTF-8", compress(&latin1, &[]), ErrorClass::BadArgument, &["latin1.txt: not UTF-8 text (invalid byte at offset 23)"]);
    let unbroken = dir.path().join("unbroken.txt");
    std::fs::write(&unbroken, "x".repeat(3 << 20)).unwrap();
    refused("--calib without a line break or space", compress(&unbroken, &[]), ErrorClass::BadArgument, &["unbroken.txt: no line break or space between bytes"]);
    refused("--plan FIFO", compress(&calib, &["--plan", pipe.to_str().unwrap()]), ErrorClass::BadArgument, &["pipe.txt: is a FIFO"]);
    // the model's own files
    let cfg = src.join("config.json");
    let good_cfg = std::fs::read(&cfg).unwrap();
    std::fs::File::create(&cfg).unwrap().set_len((4 << 20) + 1).unwrap();
    refused("config.json over 4 MiB", compress(&calib, &[]), ErrorClass::BadConfig, &["config.json: 4194305 bytes, over the 4 MiB limit for a config file"]);
    std::fs::remove_file(&cfg).unwrap();
    fifo(&cfg);
    refused("config.json a FIFO", compress(&calib, &[]), ErrorClass::BadConfig, &["config.json: is a FIFO"]);
    std::fs::remove_file(&cfg).unwrap();
    std::fs::write(&cfg, &good_cfg).unwrap();
    for (name, class) in [("tokenizer.json", ErrorClass::BadConfig), ("model.safetensors", ErrorClass::CorruptWeights)] {
        let file = src.join(name);
        let kept = dir.path().join(format!("{name}.kept"));
        std::fs::rename(&file, &kept).unwrap();
        fifo(&file);
        refused(&format!("{name} a FIFO"), compress(&calib, &[]), class, &[&format!("{name}: is a FIFO")]);
        std::fs::remove_file(&file).unwrap();
        std::fs::rename(&kept, &file).unwrap();
    }
    // eval's text and task
    let eval = |what: &str, file: &Path| os_args(&[&"eval", &"--model", &src, &what, &file, &"--seq-len", &"8"]);
    refused("eval --text /dev/zero", eval("--text", Path::new("/dev/zero")), ErrorClass::BadArgument, &["/dev/zero: is a device"]);
    refused("eval --task FIFO", eval("--task", &pipe), ErrorClass::BadArgument, &["pipe.txt: is a FIFO"]);
}

/// Tokenizing a 20 MB text for calibration stays far under the ~2.2 GB whole-text
/// tokenization took (measured from /proc while the run goes; it ends short of windows).
#[cfg(target_os = "linux")]
#[test]
fn tokenizing_a_20_mb_text_takes_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let src = word_model(dir.path());
    let text = dir.path().join("big.txt");
    let line = "the quick brown fox jumps over the lazy dog , and a fox is in the dog of the w17 .\n";
    std::fs::write(&text, line.repeat(20_000_000 / line.len())).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lorap-gpu"))
        .args(["--quiet", "compress", "--ratio", "0.3", "--seq-len", "128", "--samples", "1000000"])
        .arg("--model").arg(&src).arg("--calib").arg(&text).arg("--out").arg(dir.path().join("out"))
        .env("WGPU_BACKEND", "vulkan")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let code = loop {
        if let Ok(s) = std::fs::read_to_string(&status) {
            let hwm = s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            peak_kib = peak_kib.max(hwm.unwrap_or(0));
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st.code().unwrap_or(-1);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    // 20 MB of this text is 5.06M tokens: 39,533 windows of 128, short of a million
    assert_eq!(code, ErrorClass::CalibrationTooShort.exit_code() as i32, "{err}");
    assert!(err.contains("big.txt: calibration text has 5060223 tokens"), "{err}");
    assert!(peak_kib > 0 && peak_kib < 300 << 10, "peak RSS {} MiB", peak_kib >> 10);
}

// ---- failures before long work ----

/// Failures found only after long work are now found first: compress checks its output
/// before tokenizing, eval reads its task before the perplexity run, report checks its
/// output before its two perplexity runs. Each case pairs the early failure with a later
/// one that would have come first before (a text that fails to tokenize, or a perplexity
/// run that fails), so the class shows the order.
#[test]
fn output_and_task_failures_come_before_the_long_work() {
    let dir = tempfile::tempdir().unwrap();
    let src = word_model(dir.path());
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, "the quick brown fox jumps over the lazy dog . ".repeat(40)).unwrap();
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9").unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let args = os_args(&[&"compress", &"--ratio", &"0.3", &"--samples", &"2", &"--seq-len", &"8", &"--model", &src, &"--calib", &latin1, &"--out", &out]);
    assert_refused("compress onto an existing output, text not UTF-8", &refs(&args), ErrorClass::OutputExists, &["out: output folder exists"], dir.path());
    let bad_task = dir.path().join("task.jsonl");
    std::fs::write(&bad_task, "{\"context\": \"the\"}\n").unwrap();
    let args = os_args(&[&"eval", &"--model", &src, &"--text", &latin1, &"--task", &bad_task]);
    assert_refused("eval with a bad task, text not UTF-8", &refs(&args), ErrorClass::BadArgument, &["task.jsonl:1: no choices/endings field"], dir.path());
    // report --out onto a file
    std::fs::remove_dir(&out).unwrap();
    let args = os_args(&[&"compress", &"--ratio", &"0.3", &"--samples", &"2", &"--seq-len", &"8", &"--model", &src, &"--calib", &calib, &"--out", &out]);
    let (code, _, err) = run_cli(&refs(&args));
    assert_eq!(code, 0, "{err}");
    let file = dir.path().join("report.txt");
    std::fs::write(&file, "mine").unwrap();
    let args = os_args(&[&"report", &"--model", &out, &"--text", &latin1, &"--out", &file]);
    assert_refused("report --out a file, text not UTF-8", &refs(&args), ErrorClass::OutputExists, &["report.txt: exists and is not a folder"], dir.path());
    let args = os_args(&[&"report", &"--model", &out, &"--text", &latin1, &"--out", &src]);
    assert_refused("report --out the dense model, text not UTF-8", &refs(&args), ErrorClass::OutputExists, &["is the input"], dir.path());
}

// ---- generation ----

fn runner(gpu: std::sync::Arc<lorap_gpu::gpu::Gpu>, model: &lorap_gpu::model::Model, resident: bool) -> Runner {
    Runner::new(gpu, model.cfg.clone(), model.store.clone(), resident)
}

/// Greedy generation with the KV cache picks the tokens the full recomputation picks, with
/// resident and streamed layers, for a short prompt and one longer than a prefill piece.
#[test]
fn kv_cached_generation_equals_full_recomputation() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(&word_model(dir.path())).unwrap();
    for (prompt_len, resident) in [(3, true), (1, false), (300, true)] {
        let prompt: Vec<u32> = (0..prompt_len).map(|i| (i * 37 % 101) as u32).collect();
        let want = runner(common::gpu(), &model, resident).generate_recompute(&prompt, 8, None).unwrap();
        let mut seen = Vec::new();
        let got = decode::generate(&mut runner(common::gpu(), &model, resident), &prompt, 8, None, &mut |t| {
            seen.push(t);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, want, "prompt of {prompt_len}, resident {resident}");
        assert_eq!(seen, want, "every token is handed on as it is chosen");
    }
    // the last position's logits of a cached step and of a full pass agree closely
    let seq: Vec<u32> = (0..20).map(|i| (i * 13 % 101) as u32).collect();
    let mut r = runner(common::gpu(), &model, true);
    let mut cache = decode::KvCache::new(&r.gpu.clone(), &model.cfg, 32).unwrap();
    decode::feed(&mut r, &mut cache, &seq[..19]).unwrap();
    let cached = decode::feed(&mut r, &mut cache, &seq[19..]).unwrap();
    assert_eq!(cache.len(), 20);
    let mut batches = vec![(r.embed(&seq).unwrap(), 20)];
    r.run_layers(&mut batches, 20, &mut |_, _| {}).unwrap();
    let full = r.logits_rows(&batches[0].0, 20, &[19]).unwrap().pop().unwrap();
    let diff = cached.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-4, "cached vs full logits differ by {diff}");
}

/// The GPU pool's live and peak bytes stay the same at every step of a KV-cached run, where
/// the full recomputation's grow with the sequence.
#[test]
fn kv_cached_generation_keeps_gpu_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(&word_model(dir.path())).unwrap();
    let prompt = [5u32, 17, 42];
    let steps = 40;
    // its own GPU context, so no other test's buffers count
    let gpu = lorap_gpu::gpu::Gpu::new(&common::options()).unwrap();
    let mut r = runner(gpu.clone(), &model, true);
    let mut stats = Vec::new();
    let stop = Some(u32::MAX);
    decode::generate(&mut r, &prompt, steps, stop, &mut |_| {
        stats.push(gpu.memory_stats());
        Ok(())
    })
    .unwrap();
    assert_eq!(stats.len(), steps);
    // from the second token on (the first single-token step fills the pool), nothing changes
    assert!(stats[2..].iter().all(|s| *s == stats[2]), "live/peak bytes per step: {stats:?}");
    // the same measure sees the full recomputation grow
    let gpu = lorap_gpu::gpu::Gpu::new(&common::options()).unwrap();
    let mut r = runner(gpu.clone(), &model, true);
    r.generate_recompute(&prompt, 2, stop).unwrap();
    let early = gpu.memory_stats().1;
    r.generate_recompute(&prompt, steps, stop).unwrap();
    assert!(gpu.memory_stats().1 > early, "the recomputation's peak should grow with the sequence");
}

/// A cache larger than one storage binding is refused before the first token.
#[test]
fn a_kv_cache_over_the_binding_limit_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(&word_model(dir.path())).unwrap();
    let mut r = runner(common::gpu_with_binding(64 << 10), &model, true);
    let mut calls = 0;
    // 32 KV dims x 4 bytes x 1000 positions = 128 KiB of keys per layer
    let e = decode::generate(&mut r, &[1, 2, 3], 997, None, &mut |_| {
        calls += 1;
        Ok(())
    })
    .unwrap_err();
    assert!(matches!(e, decode::DecodeError::CacheTooLarge { positions: 1000, .. }), "{e}");
    assert_eq!(classify(&e.into()), ErrorClass::BadArgument);
    assert_eq!(calls, 0);
}

/// `generate`: --max-new 0, or past the model's positions (a billion: the case that ran
/// forever), is refused before any GPU work; a normal run prints the recomputation's text.
#[test]
fn generate_bounds_max_new_and_prints_the_greedy_text() {
    let dir = tempfile::tempdir().unwrap();
    let src = word_model(dir.path());
    let args = |n: &str| os_args(&[&"generate", &"--model", &src, &"--prompt", &"the quick brown fox", &"--max-new", &n]);
    let started = std::time::Instant::now();
    for (n, mentions) in [("0", &["--max-new must be at least 1"][..]), ("1000000000", &["--max-new 1000000000", "4096 positions", "at most 4092 new tokens"]), ("4093", &["--max-new 4093"])] {
        assert_refused(&format!("--max-new {n}"), &refs(&args(n)), ErrorClass::BadArgument, mentions, dir.path());
    }
    assert!(started.elapsed().as_secs() < 60, "refusals should come before any work");
    // without max_position_embeddings: the documented default
    let cfg_path = src.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("max_position_embeddings");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_refused("--max-new past the default positions", &refs(&args("2045")), ErrorClass::BadArgument, &["2048 positions", "no max_position_embeddings"], dir.path());
    // a run within the bound prints the prompt and the greedy continuation
    let (code, out, err) = run_cli(&refs(&args("6")));
    assert_eq!(code, 0, "{err}");
    let model = Model::open(&src).unwrap();
    let tok = model.tokenizer().unwrap();
    let ids = tok.encode("the quick brown fox", false).unwrap().get_ids().to_vec();
    let eos = model.cfg.eos_token_id.as_ref().and_then(|e| e.first());
    let want = runner(common::gpu(), &model, true).generate_recompute(&ids, 6, eos).unwrap();
    assert_eq!(out, format!("the quick brown fox{}\n", tok.decode(&want, true).unwrap()));
}
