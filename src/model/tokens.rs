//! Streaming tokenization of a text file: the text is read and tokenized in pieces of about
//! `CHUNK_BYTES`, so memory stays bounded whatever the text's size (the tokenizer's own
//! working memory is about 100 times the text it is given at once: offsets, token strings
//! and pre-token splits per byte).
//!
//! Why the pieces give the same token ids as the whole text: a cut is placed only after a
//! line break or before a space that follows a non-space, and only where the tokenizer
//! itself shows the cut changes nothing. The tokenizers of LLaMA-family models (byte-level
//! BPE after a regex pre-tokenizer: GPT-2, LLaMA-3, Qwen2, SmolLM2; SentencePiece-style
//! BPE) merge only inside pre-tokens, and their pre-token regexes look at most one
//! character ahead and never behind, so once a boundary is known at a cut, what lies
//! beyond the surrounding few characters cannot move it. Each candidate cut `c` is checked
//! on `CONTEXT` bytes either side: the tokens of text[c-CONTEXT..c] must be a prefix of the
//! tokens of text[c-CONTEXT..c+CONTEXT] (a pre-token running across `c` changes the last
//! tokens of the left part, e.g. GPT-2 keeps "\n\n" before a word as two tokens but a text
//! ending in "\n\n" as one; a candidate that fails is skipped). Each piece is tokenized
//! with the `CONTEXT` bytes before it prepended and the tokens of that context dropped, so
//! a start-of-text effect (a prefix space or metaspace some tokenizers add) lands in the
//! dropped part, never in the kept tokens. The equality with whole-text tokenization is
//! tested on the real test texts with pieces small enough for hundreds of cuts.

use std::io::Read;
use std::path::Path;

use crate::error::ErrorClass;
use crate::format::input::{self, InputError, InputKind};

/// Text bytes tokenized at once (the pieces end at the first checked cut after this).
pub const CHUNK_BYTES: usize = 256 << 10;
/// Bytes either side of a cut that check it, and the context kept before each piece.
const CONTEXT: usize = 1024;
/// Longest stretch searched for a cut after a piece's nominal end: a text without a usable
/// line break or space over this span is refused rather than tokenized whole.
pub const MAX_CUT_SEARCH: usize = 1 << 20;
/// Candidate cuts checked per piece at most: each check tokenizes two contexts, and in real
/// text the first candidate almost always holds (a text where hundreds fail in a row is
/// refused rather than checked byte by byte for minutes).
const MAX_CHECKS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("{path}: no line break or space between bytes {from} and {to} where the text can be cut for tokenization (texts are tokenized in pieces of about {} KiB)", CHUNK_BYTES >> 10)]
    NoCut { path: String, from: u64, to: u64 },
    #[error("{path}: this tokenizer gives other tokens for the text in pieces than whole (at byte {at}); texts cannot be streamed through it")]
    NotStreamable { path: String, at: u64 },
    #[error("{path}: the tokenizer failed: {what}")]
    Tokenizer { path: String, what: String },
    #[error("{path}: the file changed while it was read ({first} tokens the first time, {second} the second)")]
    Changed { path: String, first: usize, second: usize },
}

impl TextError {
    pub fn class(&self) -> ErrorClass {
        match self {
            TextError::Input(e) => e.class(),
            TextError::NoCut { .. } => ErrorClass::BadArgument,
            TextError::NotStreamable { .. } => ErrorClass::Unsupported,
            TextError::Tokenizer { .. } | TextError::Changed { .. } => ErrorClass::Other,
        }
    }
}

/// A text file and the tokenizer that cuts it into tokens.
#[derive(Clone, Copy)]
pub struct TextFile<'a> {
    pub tok: &'a tokenizers::Tokenizer,
    pub path: &'a Path,
    /// Nominal piece size (tests lower it to force many cuts).
    pub chunk_bytes: usize,
}

impl<'a> TextFile<'a> {
    pub fn new(tok: &'a tokenizers::Tokenizer, path: &'a Path) -> Self {
        TextFile { tok, path, chunk_bytes: CHUNK_BYTES }
    }

    /// A stream of the text's tokens, piece by piece.
    pub fn stream(&self) -> Result<TokenStream<'a>, TextError> {
        let (file, _) = input::open_regular(self.path, InputKind::Text)?;
        let limit = InputKind::Text.max_bytes();
        Ok(TokenStream { text: *self, file: file.take(limit.saturating_add(1)), buf: Vec::new(), base: 0, cut: 0, eof: false })
    }

    /// The first `max` tokens of the text (all with `None`); reading stops once they are in.
    pub fn first_tokens(&self, max: Option<usize>) -> Result<Vec<u32>, TextError> {
        let mut s = self.stream()?;
        let mut out = Vec::new();
        while let Some(piece) = s.next_piece()? {
            out.extend(piece);
            if max.is_some_and(|m| out.len() >= m) {
                break;
            }
        }
        if let Some(m) = max {
            out.truncate(m);
        }
        Ok(out)
    }

    fn path_str(&self) -> String {
        self.path.display().to_string()
    }
}

/// The tokens of a text file, one piece at a time. Holds at most a piece, the cut search
/// span and two contexts of text.
pub struct TokenStream<'a> {
    text: TextFile<'a>,
    file: std::io::Take<std::fs::File>,
    /// Bytes [base, base + buf.len()) of the file.
    buf: Vec<u8>,
    base: u64,
    /// Where the next piece starts, in `buf`.
    cut: usize,
    eof: bool,
}

impl TokenStream<'_> {
    /// Reads until `buf` holds `want` bytes or the file ends.
    fn fill(&mut self, want: usize) -> Result<(), TextError> {
        let limit = InputKind::Text.max_bytes();
        while !self.eof && self.buf.len() < want {
            let have = self.buf.len();
            self.buf.resize(want.max(have + (64 << 10)), 0);
            let n = self.file.read(&mut self.buf[have..]).map_err(|source| InputError::Io { path: self.text.path_str(), kind: InputKind::Text, source })?;
            self.buf.truncate(have + n);
            self.eof = n == 0;
            let read = self.base + self.buf.len() as u64;
            if read > limit {
                // the file grew past the cap after it was opened
                return Err(InputError::TooLarge { path: self.text.path_str(), kind: InputKind::Text, size: read, limit }.into());
            }
        }
        Ok(())
    }

    fn str_at(&self, from: usize, to: usize) -> Result<&str, TextError> {
        std::str::from_utf8(&self.buf[from..to]).map_err(|e| {
            InputError::NotUtf8 { path: self.text.path_str(), kind: InputKind::Text, at: self.base + (from + e.valid_up_to()) as u64 }.into()
        })
    }

    fn encode(&self, from: usize, to: usize) -> Result<Vec<u32>, TextError> {
        if from == to {
            return Ok(Vec::new());
        }
        let s = self.str_at(from, to)?;
        let enc = self.text.tok.encode(s, false).map_err(|e| TextError::Tokenizer { path: self.text.path_str(), what: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// `CONTEXT` bytes before `at` (fewer at the start of the file), moved forward to a
    /// character boundary.
    fn context_start(&self, at: usize) -> usize {
        let mut a = at.saturating_sub(CONTEXT);
        while a < at && (self.buf[a] & 0xC0) == 0x80 {
            a += 1;
        }
        a
    }

    /// A line break ends just before `c`, or a space that follows a non-space starts at it.
    fn is_candidate(&self, c: usize) -> bool {
        self.buf[c - 1] == b'\n' || (self.buf[c] == b' ' && !self.buf[c - 1].is_ascii_whitespace())
    }

    /// Whether cutting at `c` leaves the tokens before it unchanged (module comment).
    fn cut_holds(&self, c: usize) -> Result<bool, TextError> {
        let a = self.context_start(c);
        let mut b = (c + CONTEXT).min(self.buf.len());
        while b > c && b < self.buf.len() && (self.buf[b] & 0xC0) == 0x80 {
            b -= 1;
        }
        let left = self.encode(a, c)?;
        let joint = self.encode(a, b)?;
        Ok(joint.len() > left.len() && joint.starts_with(&left))
    }

    /// The end of the piece that starts at `start`: the first cut that holds at or after
    /// `start + chunk_bytes`, or the end of the text.
    fn find_cut(&mut self, start: usize) -> Result<usize, TextError> {
        let mut c = start + self.text.chunk_bytes.max(1);
        let mut checks = 0;
        loop {
            if c + CONTEXT >= self.buf.len() {
                self.fill(c + CONTEXT + self.text.chunk_bytes.max(64 << 10))?;
                if self.eof && c + CONTEXT >= self.buf.len() {
                    // what is left fits in this piece: it ends the text
                    return Ok(self.buf.len());
                }
            }
            if c - start > self.text.chunk_bytes + MAX_CUT_SEARCH || checks == MAX_CHECKS {
                let from = self.base + (start + self.text.chunk_bytes) as u64;
                return Err(TextError::NoCut { path: self.text.path_str(), from, to: self.base + c as u64 });
            }
            if self.is_candidate(c) {
                if self.cut_holds(c)? {
                    return Ok(c);
                }
                checks += 1;
            }
            c += 1;
        }
    }

    /// The tokens of the next piece; `None` after the last.
    pub fn next_piece(&mut self) -> Result<Option<Vec<u32>>, TextError> {
        let start = self.cut;
        self.fill(start + self.text.chunk_bytes + CONTEXT + 1)?;
        if start == self.buf.len() {
            return Ok(None);
        }
        let end = self.find_cut(start)?;
        let a = self.context_start(start);
        let context = self.encode(a, start)?;
        let mut tokens = self.encode(a, end)?;
        if !tokens.starts_with(&context) {
            return Err(TextError::NotStreamable { path: self.text.path_str(), at: self.base + start as u64 });
        }
        tokens.drain(..context.len());
        // keep only the context the next piece needs
        let keep = end.saturating_sub(CONTEXT + 4);
        self.buf.drain(..keep);
        self.base += keep as u64;
        self.cut = end - keep;
        Ok(Some(tokens))
    }
}

/// The text of generated tokens as they come. Each step decodes only the tokens since the
/// last printed piece began (so it costs the same however long the output grows) and
/// holds back text that ends inside a character (byte-level tokens may split one). The
/// window always starts at a token whose text is already out, so a decoder's
/// start-of-text effects (a stripped leading space) fall on that text, and the pieces join
/// to the decode of all tokens.
pub struct TextStreamer<'t> {
    tok: &'t tokenizers::Tokenizer,
    ids: Vec<u32>,
    /// Start of the window: the first token of the last printed piece.
    prefix: usize,
    /// Tokens printed so far.
    read: usize,
}

impl<'t> TextStreamer<'t> {
    pub fn new(tok: &'t tokenizers::Tokenizer) -> Self {
        TextStreamer { tok, ids: Vec::new(), prefix: 0, read: 0 }
    }

    fn window_texts(&self) -> tokenizers::Result<(String, String)> {
        Ok((self.tok.decode(&self.ids[self.prefix..self.read], true)?, self.tok.decode(&self.ids[self.prefix..], true)?))
    }

    /// The text `id` adds (empty while it is held back).
    pub fn push(&mut self, id: u32) -> tokenizers::Result<String> {
        self.ids.push(id);
        let (before, now) = self.window_texts()?;
        if now.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        match now.strip_prefix(before.as_str()) {
            Some(new) if !new.is_empty() => {
                let new = new.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(new)
            }
            _ => Ok(String::new()),
        }
    }

    /// What is still held back at the end (an incomplete character comes out as the full
    /// decode gives it).
    pub fn finish(&mut self) -> tokenizers::Result<String> {
        let (before, now) = self.window_texts()?;
        // the part of `now` past its longest common prefix with what is out
        let common = before.char_indices().zip(now.chars()).take_while(|((_, a), b)| a == b).last().map_or(0, |((i, a), _)| i + a.len_utf8());
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now[common..].to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word_tokenizer(dir: &Path) -> tokenizers::Tokenizer {
        crate::model::synthetic::write_word_tokenizer(dir, 50).unwrap();
        crate::model::load_tokenizer(dir).unwrap()
    }

    #[test]
    fn pieces_give_the_whole_texts_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let tok = word_tokenizer(dir.path());
        let path = dir.path().join("t.txt");
        let mut text = String::new();
        for i in 0..3000 {
            text.push_str(["the quick brown fox", "jumps over", "the lazy dog.\n", "\n\n", "é ü "][i % 5]);
            text.push(' ');
        }
        std::fs::write(&path, &text).unwrap();
        let whole = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        for chunk in [1, 7, 64, 1000, CHUNK_BYTES] {
            let f = TextFile { chunk_bytes: chunk, ..TextFile::new(&tok, &path) };
            assert_eq!(f.first_tokens(None).unwrap(), whole, "pieces of {chunk} bytes");
            assert_eq!(f.first_tokens(Some(100)).unwrap(), whole[..100], "first 100, pieces of {chunk} bytes");
        }
        // empty text: no tokens
        std::fs::write(&path, "").unwrap();
        assert!(TextFile::new(&tok, &path).first_tokens(None).unwrap().is_empty());
    }

    #[test]
    fn streamed_generation_text_joins_to_the_whole_decode() {
        let dir = tempfile::tempdir().unwrap();
        let tok = word_tokenizer(dir.path());
        let ids: Vec<u32> = (0..60).map(|i| (i * 7 % 50) as u32).collect();
        let mut s = TextStreamer::new(&tok);
        let mut out = String::new();
        for &id in &ids {
            out += &s.push(id).unwrap();
        }
        out += &s.finish().unwrap();
        assert_eq!(out, tok.decode(&ids, true).unwrap());
    }

    #[test]
    fn text_without_a_place_to_cut_or_not_utf8_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tok = word_tokenizer(dir.path());
        let path = dir.path().join("t.txt");
        std::fs::write(&path, "x".repeat(3 * MAX_CUT_SEARCH)).unwrap();
        let e = TextFile { chunk_bytes: 1000, ..TextFile::new(&tok, &path) }.first_tokens(None).unwrap_err();
        assert!(matches!(e, TextError::NoCut { from: 1000, .. }) && e.class() == ErrorClass::BadArgument, "{e}");
        let mut bad = "word ".repeat(100).into_bytes();
        bad[303] = 0xff;
        std::fs::write(&path, &bad).unwrap();
        let e = TextFile { chunk_bytes: 64, ..TextFile::new(&tok, &path) }.first_tokens(None).unwrap_err();
        assert!(matches!(e, TextError::Input(InputError::NotUtf8 { at: 303, .. })), "{e}");
    }
}
