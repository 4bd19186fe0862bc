//! Zero-shot multiple choice (ARC/PIQA/HellaSwag-style JSONL): each choice is scored by
//! the log-likelihood of its tokens after the context; accuracy and length-normalized
//! accuracy (log-likelihood per byte of the choice) are reported.

use std::path::Path;

use crate::model::forward::{Progress, Runner};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{path}: cannot read")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}: {what}")]
    Bad { path: String, line: usize, what: String },
    #[error("{0}: no examples")]
    Empty(String),
}

/// One question: a context, its choices, the index of the right one.
#[derive(Debug, Clone)]
pub struct Example {
    pub context: String,
    pub choices: Vec<String>,
    pub label: usize,
}

fn text_field<'a>(v: &'a serde_json::Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_str()))
}

/// Reads JSONL with fields context|query|question|ctx|goal, choices|endings (list of strings,
/// or ARC's {"text": [...]}), label|gold|answer (index, or a letter A-E / key in choices.label).
pub fn load_task(path: &Path) -> Result<Vec<Example>, TaskError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TaskError::Read { path: p.clone(), source })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |what: &str| TaskError::Bad { path: p.clone(), line: i + 1, what: what.into() };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let context = text_field(&v, &["context", "query", "question", "ctx", "goal"]).ok_or_else(|| bad("no context/query/question/ctx/goal field"))?.to_string();
        let ch = v.get("choices").or_else(|| v.get("endings")).ok_or_else(|| bad("no choices/endings field"))?;
        let (choices, keys): (Vec<String>, Vec<String>) = if let Some(arr) = ch.as_array() {
            (arr.iter().map(|x| x.as_str().map(String::from).ok_or_else(|| bad("choices must be strings"))).collect::<Result<_, _>>()?, Vec::new())
        } else {
            let texts = ch.get("text").and_then(|t| t.as_array()).ok_or_else(|| bad("choices must be a list or {text, label}"))?;
            let labels = ch.get("label").and_then(|t| t.as_array()).cloned().unwrap_or_default();
            (texts.iter().filter_map(|x| x.as_str().map(String::from)).collect(), labels.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        };
        if choices.len() < 2 {
            return Err(bad("fewer than two choices"));
        }
        let lab = v.get("label").or_else(|| v.get("gold")).or_else(|| v.get("answer")).or_else(|| v.get("answerKey")).ok_or_else(|| bad("no label/gold/answer field"))?;
        let label = match lab {
            serde_json::Value::Number(n) => n.as_u64().map(|x| x as usize),
            serde_json::Value::String(s) => s.parse::<usize>().ok().or_else(|| keys.iter().position(|k| k == s)).or_else(|| {
                let c = s.chars().next()?;
                c.is_ascii_uppercase().then(|| (c as u8 - b'A') as usize)
            }),
            _ => None,
        }
        .filter(|&l| l < choices.len())
        .ok_or_else(|| bad("label is not a valid choice index"))?;
        out.push(Example { context, choices, label });
    }
    if out.is_empty() {
        return Err(TaskError::Empty(p));
    }
    Ok(out)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ZeroShotReport {
    pub examples: usize,
    pub accuracy: f64,
    pub accuracy_norm: f64,
}

/// Scores every example; choices are tokenized as continuations of the context
/// (" " + choice when the choice does not start with whitespace).
pub fn evaluate(runner: &mut Runner, tok: &tokenizers::Tokenizer, examples: &[Example], progress: Progress) -> anyhow::Result<ZeroShotReport> {
    let enc = |s: &str| -> anyhow::Result<Vec<u32>> { Ok(tok.encode(s, false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?.get_ids().to_vec()) };
    let pad = 0u32;
    let (mut right, mut right_norm) = (0usize, 0usize);
    for (ei, ex) in examples.iter().enumerate() {
        let ctx = enc(&ex.context)?;
        anyhow::ensure!(!ctx.is_empty(), "example {}: the context tokenizes to nothing", ei + 1);
        let seqs: Vec<(Vec<u32>, usize, usize)> = ex
            .choices
            .iter()
            .map(|c| {
                let cont = if c.starts_with(char::is_whitespace) { c.clone() } else { format!(" {c}") };
                let ids = enc(&cont)?;
                let mut s = ctx.clone();
                s.extend(&ids);
                Ok((s, ids.len(), cont.len()))
            })
            .collect::<anyhow::Result<_>>()?;
        let window = seqs.iter().map(|s| s.0.len()).max().unwrap().max(2);
        let mut flat = Vec::with_capacity(window * seqs.len());
        for (s, _, _) in &seqs {
            flat.extend(s);
            flat.extend(std::iter::repeat_n(pad, window - s.len())); // padding after the end cannot affect earlier positions
        }
        let nll = runner.window_nll(&flat, window, &mut |_, _| {})?;
        let mut scores = Vec::new();
        for (i, (s, n_choice, n_bytes)) in seqs.iter().enumerate() {
            let row = &nll[i * (window - 1)..(i + 1) * (window - 1)];
            // tokens s[len-n_choice..len] are predicted at positions len-n_choice-1 .. len-1
            let ll: f64 = -row[s.len() - n_choice - 1..s.len() - 1].iter().map(|&x| x as f64).sum::<f64>();
            scores.push((ll, ll / *n_bytes as f64));
        }
        let argmax = |f: &dyn Fn(&(f64, f64)) -> f64| scores.iter().enumerate().max_by(|a, b| f(a.1).total_cmp(&f(b.1))).unwrap().0;
        right += (argmax(&|s| s.0) == ex.label) as usize;
        right_norm += (argmax(&|s| s.1) == ex.label) as usize;
        progress(ei + 1, examples.len());
    }
    let n = examples.len() as f64;
    Ok(ZeroShotReport { examples: examples.len(), accuracy: right as f64 / n, accuracy_norm: right_norm as f64 / n })
}
