//! The tokenizer a GGUF export embeds: tokenizer.json (and tokenizer_config.json, where the
//! folder has one) mapped to llama.cpp's `tokenizer.ggml.*` metadata, for the two BPE
//! families llama.cpp rebuilds from those fields alone:
//!
//! - byte-level BPE (`tokenizer.ggml.model = "gpt2"`): the vocabulary, the merges and a
//!   pre-tokenizer llama.cpp knows by name (GPT-2, SmolLM, LLaMA-3, Qwen2);
//! - SentencePiece-style BPE (`"llama"`: LLaMA 1/2, Mistral, TinyLlama): pieces with "▁" for
//!   spaces, `<0xXX>` byte tokens for what no piece covers. llama.cpp's tokenizer for these
//!   reads no merges: it joins the adjacent pair whose concatenation is a token of the
//!   highest score. tokenizer.json holds merges instead (a converted SentencePiece model
//!   has one for every split of a piece into two pieces, ranked by the piece's score), so
//!   a piece's score here is minus the rank of its first merge, and a tokenizer where some
//!   piece splits into two pieces with no merge for them is refused: llama.cpp would join
//!   them where tokenizer.json does not.
//!
//! Whatever else a tokenizer.json does (another model type, a normalizer llama.cpp does not
//! apply, a pre-tokenizer it has no name for, a space handling it cannot reproduce) is
//! refused naming it, before anything is written.

use anyhow::{Context, Result};
use serde_json::Value as Json;

use crate::format::gguf::Value;
use crate::format::input::{self, InputKind};
use crate::model::config::ConfigError;
use crate::model::Model;

/// llama.cpp's token types (`tokenizer.ggml.token_type`, LLAMA_TOKEN_TYPE_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum TokenType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// The pre-tokenizer regex set llama.cpp applies to byte-level BPE (`tokenizer.ggml.pre`),
/// recognized from tokenizer.json's `pre_tokenizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PreTokenizer {
    /// ByteLevel with GPT-2's regex.
    Gpt2,
    /// Single digits split first, then GPT-2's regex (SmolLM, StarCoder).
    Smollm,
    /// LLaMA-3's split regex, then ByteLevel without its own regex.
    Llama3,
    /// Qwen2's split regex (LLaMA-3's with single digits), then ByteLevel without its regex.
    Qwen2,
}

impl PreTokenizer {
    fn name(self) -> &'static str {
        match self {
            PreTokenizer::Gpt2 => "gpt2",
            PreTokenizer::Smollm => "smollm",
            PreTokenizer::Llama3 => "llama-bpe",
            PreTokenizer::Qwen2 => "qwen2",
        }
    }

    const LLAMA3_REGEX: &'static str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2_REGEX: &'static str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    pub(super) fn detect(pre: &Json) -> Option<Self> {
        let byte_level = |v: &Json, regex: bool| kind(v) == "ByteLevel" && v.get("use_regex").and_then(Json::as_bool).unwrap_or(true) == regex;
        // a split that keeps every match as its own piece, as llama.cpp's regex pass does
        fn split(v: &Json) -> Option<&str> {
            (kind(v) == "Split" && v["behavior"].as_str() == Some("Isolated") && v["invert"].as_bool() != Some(true)).then(|| v.pointer("/pattern/Regex").and_then(Json::as_str)).flatten()
        }
        if byte_level(pre, true) {
            return Some(PreTokenizer::Gpt2);
        }
        let parts = pre.get("pretokenizers")?.as_array()?;
        match parts.as_slice() {
            [one] if byte_level(one, true) => Some(PreTokenizer::Gpt2),
            [digits, bl] if kind(digits) == "Digits" && digits["individual_digits"].as_bool() == Some(true) && byte_level(bl, true) => Some(PreTokenizer::Smollm),
            [s, bl] if byte_level(bl, false) => match split(s)? {
                Self::LLAMA3_REGEX => Some(PreTokenizer::Llama3),
                Self::QWEN2_REGEX => Some(PreTokenizer::Qwen2),
                _ => None,
            },
            _ => None,
        }
    }
}

/// The tokenizer family (`tokenizer.ggml.model`) and what llama.cpp needs to know of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    ByteLevel(PreTokenizer),
    /// `add_space_prefix`: a "▁" put before the text (llama.cpp: before the text and after
    /// each special token; tokenizer.json's Prepend normalizer: before each piece of text
    /// between added tokens, the same places).
    SentencePiece { add_space_prefix: bool },
}

fn kind(v: &Json) -> &str {
    v.get("type").and_then(Json::as_str).unwrap_or("")
}

/// tokenizer.json's `Replace` of " " by "▁" (llama.cpp escapes every space so).
fn replaces_spaces(v: &Json) -> bool {
    kind(v) == "Replace" && v.pointer("/pattern/String").and_then(Json::as_str) == Some(" ") && v["content"].as_str() == Some("▁")
}

impl Family {
    /// The family of `tok` (a parsed tokenizer.json), or what has no llama.cpp counterpart.
    pub(super) fn detect(tok: &Json) -> std::result::Result<Self, String> {
        let m = &tok["model"];
        if m["type"].as_str() != Some("BPE") {
            return Err(format!("tokenizer model {} (GGUF export embeds BPE tokenizers: byte-level, or SentencePiece-style with byte fallback)", m["type"]));
        }
        if m["ignore_merges"].as_bool() == Some(true) && m["byte_fallback"].as_bool() == Some(true) {
            return Err("a byte-fallback BPE with ignore_merges has no llama.cpp counterpart".into());
        }
        let (norm, pre) = (&tok["normalizer"], &tok["pre_tokenizer"]);
        if m["byte_fallback"].as_bool() != Some(true) {
            // llama.cpp normalizes nothing: NFC (Qwen2's) changes only text that is not NFC
            // already, which is what llama.cpp's own converter accepts too; anything else is
            // refused rather than embedded as a different tokenizer
            if !(norm.is_null() || kind(norm) == "NFC") {
                return Err(format!("normalizer {norm} is not applied by llama.cpp's byte-level BPE"));
            }
            return PreTokenizer::detect(pre)
                .map(Family::ByteLevel)
                .ok_or_else(|| format!("pre-tokenizer {pre} has no llama.cpp counterpart this export knows (gpt2, smollm, llama-bpe, qwen2)"));
        }
        // SentencePiece-style: spaces become "▁", with or without one put in front
        let spaces = |add_space_prefix| Ok(Family::SentencePiece { add_space_prefix });
        match (norm, pre) {
            (n, Json::Null) if replaces_spaces(n) => spaces(false),
            (n, Json::Null) if kind(n) == "Sequence" => match n["normalizers"].as_array().map(Vec::as_slice) {
                Some([p, r]) if kind(p) == "Prepend" && p["prepend"].as_str() == Some("▁") && replaces_spaces(r) => spaces(true),
                Some([r]) if replaces_spaces(r) => spaces(false),
                _ => Err(format!("normalizer {n} of a SentencePiece-style tokenizer has no llama.cpp counterpart (Prepend \"▁\" then Replace \" \" by \"▁\" has)")),
            },
            (Json::Null, p) if kind(p) == "Metaspace" && p["replacement"].as_str() == Some("▁") && p["split"].as_bool() == Some(false) => {
                let scheme = p["prepend_scheme"].as_str().unwrap_or(if p["add_prefix_space"].as_bool() == Some(false) { "never" } else { "always" });
                match scheme {
                    "never" => spaces(false),
                    // HF's Metaspace skips the "▁" when the text already starts with a space;
                    // llama.cpp's SentencePiece tokenizer always puts one (" Hello" gives
                    // "▁▁Hello" there, "▁Hello" here): the same text would get other ids
                    _ => Err(format!("Metaspace pre-tokenizer with prepend_scheme {scheme:?}: llama.cpp always prepends a space where this tokenizer.json skips it before a leading space, so texts starting with a space would tokenize differently")),
                }
            }
            _ => Err(format!("normalizer {norm} with pre-tokenizer {pre}: a SentencePiece-style space handling llama.cpp has no counterpart for")),
        }
    }

    fn model_name(self) -> &'static str {
        match self {
            Family::ByteLevel(_) => "gpt2",
            Family::SentencePiece { .. } => "llama",
        }
    }

    fn pre_name(self) -> &'static str {
        match self {
            Family::ByteLevel(p) => p.name(),
            // llama.cpp reads no pre-tokenizer for SentencePiece; its converter writes this
            Family::SentencePiece { .. } => "default",
        }
    }
}

/// A merge's two pieces (tokenizer.json writes "a b" or ["a", "b"]).
fn merge_pair(x: &Json) -> Result<(String, String)> {
    match x {
        Json::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).context("tokenizer.json: a merge has no space between its pieces"),
        Json::Array(p) => match p.as_slice() {
            [Json::String(a), Json::String(b)] => Ok((a.clone(), b.clone())),
            _ => anyhow::bail!("tokenizer.json: a merge is not a pair of strings"),
        },
        _ => anyhow::bail!("tokenizer.json: a merge is neither a string nor a pair"),
    }
}

/// The text of a special token as tokenizer_config.json gives it (a string or an object).
fn token_text(v: &Json) -> Option<&str> {
    v.as_str().or_else(|| v["content"].as_str())
}

/// SentencePiece scores from tokenizer.json's merges: minus the rank of the first merge that
/// builds the piece; pieces no merge builds (single characters, bytes, specials) score below
/// every merge, since tokenizer.json never builds them by joining two pieces. Refuses a
/// piece that two pieces concatenate to with no merge for them (see the module comment).
fn spm_scores(tokens: &[Option<String>], merges: &[(String, String)], unsupported: &dyn Fn(String) -> anyhow::Error) -> Result<Vec<f32>> {
    let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().filter_map(|(i, t)| t.as_deref().map(|t| (t, i))).collect();
    let mut scores = vec![-(merges.len() as f32) - 1.0; tokens.len()];
    let mut built = vec![false; tokens.len()];
    let pairs: std::collections::HashSet<(&str, &str)> = merges.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    for (rank, (a, b)) in merges.iter().enumerate() {
        let id = *ids.get(format!("{a}{b}").as_str()).ok_or_else(|| unsupported(format!("merge \"{a} {b}\" builds no token of the vocabulary")))?;
        if !built[id] {
            built[id] = true;
            scores[id] = -(rank as f32);
        }
    }
    for t in tokens.iter().flatten() {
        for (k, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(k);
            if ids.contains_key(a) && ids.contains_key(b) && !pairs.contains(&(a, b)) {
                return Err(unsupported(format!(
                    "piece {t:?} = {a:?} + {b:?} has no merge: llama.cpp's SentencePiece tokenizer joins any two pieces that make a token, so it would tokenize differently from this tokenizer.json"
                )));
            }
        }
    }
    Ok(scores)
}

/// The `tokenizer.ggml.*` metadata of the model folder's tokenizer.
pub(super) fn vocab_metadata(model: &Model) -> Result<Vec<(String, Value)>> {
    let path = model.dir.join("tokenizer.json");
    let shown = path.display().to_string();
    let unsupported = |what: String| -> anyhow::Error { ConfigError::Feature { path: shown.clone(), what }.into() };
    let parse = |p: &std::path::Path| -> Result<Json> {
        serde_json::from_slice(&input::read_bytes(p, InputKind::Tokenizer)?).map_err(|e| ConfigError::Parse { path: p.display().to_string(), source: e }.into())
    };
    let tok = parse(&path)?;
    let config_path = model.dir.join("tokenizer_config.json");
    let tok_config = if config_path.exists() { parse(&config_path)? } else { Json::Null };
    let family = Family::detect(&tok).map_err(unsupported)?;
    let spm = matches!(family, Family::SentencePiece { .. });
    let m = &tok["model"];
    let n_vocab = model.cfg.vocab_size;

    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    let mut types = vec![TokenType::Normal; n_vocab];
    let mut place = |id: u64, text: &str, ty: TokenType| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| unsupported(format!("token {text:?} has id {id}, outside the vocabulary of {n_vocab}")))?;
        *slot = Some(text.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    for (text, id) in m["vocab"].as_object().context("tokenizer.json: model.vocab is not an object")? {
        // llama.cpp turns a byte it has no piece for into the token named <0xXX>
        let byte = spm && text.len() == 6 && text.starts_with("<0x") && text.ends_with('>') && text.get(3..5).is_some_and(|h| u8::from_str_radix(h, 16).is_ok());
        place(id.as_u64().context("tokenizer.json: a vocabulary id is not a number")?, text, if byte { TokenType::Byte } else { TokenType::Normal })?;
    }
    for t in tok["added_tokens"].as_array().into_iter().flatten() {
        let ty = if t["special"].as_bool() == Some(true) { TokenType::Control } else { TokenType::UserDefined };
        place(t["id"].as_u64().context("tokenizer.json: an added token has no id")?, t["content"].as_str().unwrap_or(""), ty)?;
    }
    let id_of = |text: &str| tokens.iter().position(|t| t.as_deref() == Some(text)).map(|i| i as u32);
    let unk = m["unk_token"].as_str().and_then(id_of);
    if let Some(u) = unk.filter(|_| spm) {
        types[u as usize] = TokenType::Unknown;
    }
    if spm {
        // llama.cpp looks bytes up by this exact (upper-case) name and fails without one
        if let Some(b) = (0..=255u8).find(|b| id_of(&format!("<0x{b:02X}>")).is_none()) {
            return Err(unsupported(format!("byte-fallback tokenizer has no token <0x{b:02X}> (llama.cpp needs all 256 byte tokens)")));
        }
    }
    let merges: Vec<(String, String)> = m["merges"].as_array().context("tokenizer.json: model.merges is not a list")?.iter().map(merge_pair).collect::<Result<_>>()?;
    let scores = if spm { Some(spm_scores(&tokens, &merges, &unsupported)?) } else { None };

    // ids the tokenizer never produces (a vocabulary padded past the tokenizer) still need a
    // name; llama.cpp marks them unused
    let types: Vec<i32> = tokens.iter().zip(types).map(|(t, ty)| (if t.is_none() { TokenType::Unused } else { ty }) as i32).collect();
    let tokens: Vec<String> = tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();

    // special ids: config.json's, else tokenizer_config.json's by text
    let cfg = &model.cfg;
    let by_text = |key: &str| token_text(&tok_config[key]).and_then(|t| tokens.iter().position(|x| x == t)).map(|i| i as u32);
    let bos = cfg.bos_token_id.as_ref().and_then(|v| v.as_u64()).map(|v| v as u32).or_else(|| by_text("bos_token"));
    let eos = cfg.eos_token_id.as_ref().and_then(|e| e.first()).or_else(|| by_text("eos_token"));
    let pad = cfg.raw.get("pad_token_id").and_then(|v| v.as_u64()).map(|v| v as u32).or_else(|| by_text("pad_token"));
    // the tool scores texts without a BOS; llama.cpp adds one only when told to, so say what
    // the tokenizer itself does: tokenizer_config.json's switch where it has one (transformers
    // rebuilds the post-processor from it), else a template post-processor's special tokens
    let template = &tok["post_processor"];
    let in_template = |id: Option<u32>, first: bool| {
        let text = id.and_then(|i| tokens.get(i as usize));
        let single = template["single"].as_array().filter(|_| kind(template) == "TemplateProcessing");
        let item = single.and_then(|s| if first { s.first() } else { s.last() });
        text.is_some_and(|t| item.and_then(|x| x.pointer("/SpecialToken/id")).and_then(Json::as_str) == Some(t))
    };
    let add_bos = tok_config["add_bos_token"].as_bool().unwrap_or_else(|| in_template(bos, true));
    let add_eos = tok_config["add_eos_token"].as_bool().unwrap_or_else(|| in_template(eos, false));

    let mut md = vec![
        ("tokenizer.ggml.model".to_string(), Value::Str(family.model_name().into())),
        ("tokenizer.ggml.pre".to_string(), Value::Str(family.pre_name().into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Strs(tokens)),
    ];
    if let Some(s) = scores {
        md.push(("tokenizer.ggml.scores".to_string(), Value::F32s(s)));
    }
    md.push(("tokenizer.ggml.token_type".to_string(), Value::I32s(types)));
    match family {
        Family::ByteLevel(_) => md.push(("tokenizer.ggml.merges".to_string(), Value::Strs(merges.into_iter().map(|(a, b)| format!("{a} {b}")).collect()))),
        Family::SentencePiece { add_space_prefix } => md.push(("tokenizer.ggml.add_space_prefix".to_string(), Value::Bool(add_space_prefix))),
    }
    for (key, id) in [("bos_token_id", bos), ("eos_token_id", eos), ("unknown_token_id", unk), ("padding_token_id", pad)] {
        if let Some(id) = id {
            md.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    if let Some(t) = tok_config["chat_template"].as_str() {
        md.push(("tokenizer.chat_template".into(), Value::Str(t.into())));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> Json {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn pre_tokenizers_are_recognized_by_structure() {
        let smollm = j(r#"{"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]}"#);
        assert_eq!(PreTokenizer::detect(&smollm), Some(PreTokenizer::Smollm));
        assert_eq!(PreTokenizer::detect(&j(r#"{"type": "ByteLevel", "use_regex": true}"#)), Some(PreTokenizer::Gpt2));
        assert_eq!(PreTokenizer::detect(&j(r#"{"type": "Metaspace"}"#)), None);
        let split = |re: &str, regex_again: bool| {
            let mut v = j(r#"{"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": ""}, "behavior": "Isolated", "invert": false}, {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]}"#);
            v["pretokenizers"][0]["pattern"]["Regex"] = Json::String(re.into());
            v["pretokenizers"][1]["use_regex"] = Json::Bool(regex_again);
            v
        };
        assert_eq!(PreTokenizer::detect(&split(PreTokenizer::QWEN2_REGEX, false)), Some(PreTokenizer::Qwen2));
        assert_eq!(PreTokenizer::detect(&split(PreTokenizer::LLAMA3_REGEX, false)), Some(PreTokenizer::Llama3));
        // GPT-2's regex run again after the split is another tokenizer
        assert_eq!(PreTokenizer::detect(&split(PreTokenizer::QWEN2_REGEX, true)), None);
        assert_eq!(PreTokenizer::detect(&split(r"\s+", false)), None);
    }

    #[test]
    fn sentencepiece_space_handling_maps_or_is_refused() {
        let tok = |norm: &str, pre: &str| j(&format!(r#"{{"model": {{"type": "BPE", "byte_fallback": true}}, "normalizer": {norm}, "pre_tokenizer": {pre}}}"#));
        let replace = r#"{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}"#;
        let legacy = format!(r#"{{"type": "Sequence", "normalizers": [{{"type": "Prepend", "prepend": "▁"}}, {replace}]}}"#);
        assert_eq!(Family::detect(&tok(&legacy, "null")), Ok(Family::SentencePiece { add_space_prefix: true }));
        assert_eq!(Family::detect(&tok(replace, "null")), Ok(Family::SentencePiece { add_space_prefix: false }));
        let meta = |scheme: &str, split: bool| tok("null", &format!(r#"{{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "{scheme}", "split": {split}}}"#));
        assert_eq!(Family::detect(&meta("never", false)), Ok(Family::SentencePiece { add_space_prefix: false }));
        assert!(Family::detect(&meta("first", false)).unwrap_err().contains("prepend_scheme \"first\""));
        assert!(Family::detect(&meta("never", true)).is_err(), "splitting at spaces is not SentencePiece's");
        assert!(Family::detect(&tok(r#"{"type": "NFKC"}"#, "null")).is_err());
        // byte-level: NFC passes (llama.cpp's converter accepts it), other normalizers do not
        let bl = |norm: &str| j(&format!(r#"{{"model": {{"type": "BPE"}}, "normalizer": {norm}, "pre_tokenizer": {{"type": "ByteLevel", "use_regex": true}}}}"#));
        assert_eq!(Family::detect(&bl(r#"{"type": "NFC"}"#)), Ok(Family::ByteLevel(PreTokenizer::Gpt2)));
        assert!(Family::detect(&bl(r#"{"type": "Lowercase"}"#)).is_err());
        assert!(Family::detect(&j(r#"{"model": {"type": "WordLevel"}}"#)).unwrap_err().contains("WordLevel"));
    }

    #[test]
    fn spm_scores_follow_merge_ranks_and_missing_merges_are_refused() {
        let toks: Vec<Option<String>> = ["<unk>", "a", "b", "c", "ab", "bc", "abc"].iter().map(|s| Some(s.to_string())).collect();
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        let err = |s: String| anyhow::anyhow!(s);
        let merges = vec![pair("a", "b"), pair("ab", "c"), pair("a", "bc"), pair("b", "c")];
        let s = spm_scores(&toks, &merges, &err).unwrap();
        // ab: rank 0; abc: its first merge, rank 1; bc: rank 3; the rest below every merge
        assert_eq!(s, vec![-5.0, -5.0, -5.0, -5.0, 0.0, -3.0, -1.0]);
        let e = spm_scores(&toks, &merges[..3], &err).unwrap_err().to_string();
        assert!(e.contains("\"bc\" = \"b\" + \"c\" has no merge"), "{e}");
        assert!(spm_scores(&toks, &[pair("c", "a")], &err).is_err(), "a merge must build a token");
    }
}
