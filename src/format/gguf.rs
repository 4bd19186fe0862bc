//! GGUF v3, llama.cpp's model file: typed metadata values, the tensor types this tool writes
//! (f32, f16 and q8_0 with its block quantizer), a writer that lays out the header, the
//! metadata, the tensor infos and the aligned data and then takes each tensor's values in
//! order (so no model is ever held whole in memory), and a reader (metadata, tensor infos,
//! values decoded back to f32) for tests and checks.
//!
//! Layout (all little-endian): magic `GGUF`, version u32, tensor count u64, metadata count
//! u64; each metadata entry as key string, value type u32, value; each tensor info as name
//! string, dimension count u32, dimensions u64 (innermost first: a row-major [rows, cols]
//! matrix is `[cols, rows]`), tensor type u32, data offset u64; padding to `ALIGNMENT`; the
//! data, each tensor at its offset (a multiple of `ALIGNMENT` from the data start). Strings
//! are a u64 byte length and UTF-8 bytes.

use std::io::{Read, Write};

use anyhow::{bail, ensure, Context, Result};

pub const MAGIC: [u8; 4] = *b"GGUF";
pub const VERSION: u32 = 3;
/// llama.cpp's default (`general.alignment` absent).
pub const ALIGNMENT: u64 = 32;
/// Values per q8_0 block: one f16 scale and 32 signed bytes.
pub const Q8_0_BLOCK: usize = 32;

/// Metadata value type codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum ValueType {
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    Str = 8,
    Array = 9,
}

impl ValueType {
    fn from_code(code: u32) -> Result<Self> {
        Ok(match code {
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::Str,
            9 => ValueType::Array,
            other => bail!("GGUF value type {other} is not one this reader knows"),
        })
    }
}

/// A metadata value (the kinds llama.cpp's LLaMA loader reads).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U32s(Vec<u32>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
    Strs(Vec<String>),
}

/// Tensor element encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    /// Blocks of 32 values along the innermost dimension: an f16 scale d = max|x| / 127 and
    /// 32 bytes round(x / d).
    Q8_0,
}

impl TensorType {
    /// ggml's type id.
    pub fn code(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q8_0 => 8,
        }
    }

    fn from_code(code: u32) -> Result<Self> {
        Ok(match code {
            0 => TensorType::F32,
            1 => TensorType::F16,
            8 => TensorType::Q8_0,
            other => bail!("ggml tensor type {other} is not one this reader knows"),
        })
    }

    /// Bytes of `elements` values (for q8_0, whole blocks: see `fits`).
    pub fn bytes(self, elements: u64) -> u64 {
        match self {
            TensorType::F32 => 4 * elements,
            TensorType::F16 => 2 * elements,
            TensorType::Q8_0 => elements / Q8_0_BLOCK as u64 * 34,
        }
    }

    /// Whether rows of `ne0` values can be stored in this type (q8_0 needs whole blocks).
    pub fn fits(self, ne0: u64) -> bool {
        self != TensorType::Q8_0 || ne0.is_multiple_of(Q8_0_BLOCK as u64)
    }

    /// `values` encoded (for q8_0 the innermost dimension must be a multiple of 32).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            TensorType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            TensorType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            TensorType::Q8_0 => {
                let mut out = Vec::with_capacity(values.len() / Q8_0_BLOCK * 34);
                for block in values.chunks(Q8_0_BLOCK) {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|&v| ((v * inv).round() as i8) as u8));
                }
                out
            }
        }
    }

    /// `bytes` decoded back to f32 (q8_0 with its stored f16 scale, as llama.cpp does).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            TensorType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            TensorType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            TensorType::Q8_0 => bytes
                .chunks_exact(34)
                .flat_map(|b| {
                    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    b[2..].iter().map(move |&q| q as i8 as f32 * d)
                })
                .collect(),
        }
    }
}

/// One tensor's entry: name, dimensions innermost first (ggml's order), type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: TensorType,
}

impl TensorInfo {
    /// A tensor of row-major `shape` (outermost first, as safetensors and torch give it).
    pub fn new(name: impl Into<String>, shape: &[usize], ty: TensorType) -> Self {
        TensorInfo { name: name.into(), dims: shape.iter().rev().map(|&d| d as u64).collect(), ty }
    }

    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn bytes(&self) -> u64 {
        self.ty.bytes(self.elements())
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    let scalar = |out: &mut Vec<u8>, t: ValueType| out.extend_from_slice(&(t as u32).to_le_bytes());
    let array = |out: &mut Vec<u8>, t: ValueType, n: usize| {
        out.extend_from_slice(&(ValueType::Array as u32).to_le_bytes());
        out.extend_from_slice(&(t as u32).to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
    };
    match v {
        Value::U32(x) => {
            scalar(out, ValueType::U32);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::I32(x) => {
            scalar(out, ValueType::I32);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::F32(x) => {
            scalar(out, ValueType::F32);
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::Bool(x) => {
            scalar(out, ValueType::Bool);
            out.push(*x as u8);
        }
        Value::Str(s) => {
            scalar(out, ValueType::Str);
            put_str(out, s);
        }
        Value::U32s(xs) => {
            array(out, ValueType::U32, xs.len());
            xs.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Value::I32s(xs) => {
            array(out, ValueType::I32, xs.len());
            xs.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Value::F32s(xs) => {
            array(out, ValueType::F32, xs.len());
            xs.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Value::Strs(xs) => {
            array(out, ValueType::Str, xs.len());
            xs.iter().for_each(|s| put_str(out, s));
        }
    }
}

/// Streams a GGUF file: the whole layout is fixed up front, then each tensor's values are
/// given in the order of `tensors`.
pub struct GgufWriter<W: Write> {
    out: W,
    tensors: Vec<TensorInfo>,
    next: usize,
    /// Bytes written so far (the file's size once finished).
    written: u64,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header, `metadata` and the tensor infos (offsets computed here), padded to
    /// the data start.
    pub fn new(mut out: W, metadata: &[(String, Value)], tensors: Vec<TensorInfo>) -> Result<Self> {
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut head, k);
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        for t in &tensors {
            ensure!(t.ty.fits(t.dims[0]), "{}: rows of {} values cannot be stored as {:?} (blocks of {Q8_0_BLOCK})", t.name, t.dims[0], t.ty);
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| head.extend_from_slice(&d.to_le_bytes()));
            head.extend_from_slice(&t.ty.code().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = align(offset + t.bytes());
        }
        head.resize(align(head.len() as u64) as usize, 0);
        out.write_all(&head)?;
        Ok(GgufWriter { out, tensors, next: 0, written: head.len() as u64 })
    }

    /// The next tensor's values (row-major, as many as its dimensions say).
    pub fn write_tensor(&mut self, values: &[f32]) -> Result<()> {
        let t = self.tensors.get(self.next).context("more tensors written than the layout lists")?;
        ensure!(values.len() as u64 == t.elements(), "{}: {} values given, its shape {:?} holds {}", t.name, values.len(), t.dims, t.elements());
        let bytes = t.ty.encode(values);
        debug_assert_eq!(bytes.len() as u64, t.bytes());
        let padded = align(bytes.len() as u64);
        self.out.write_all(&bytes)?;
        self.out.write_all(&vec![0u8; (padded - bytes.len() as u64) as usize])?;
        self.written += padded;
        self.next += 1;
        Ok(())
    }

    /// Name of the tensor `write_tensor` expects next.
    pub fn next_name(&self) -> Option<&str> {
        self.tensors.get(self.next).map(|t| t.name.as_str())
    }

    /// Flushes; fails if a tensor of the layout was never written. Returns the file size.
    pub fn finish(mut self) -> Result<u64> {
        ensure!(self.next == self.tensors.len(), "only {} of {} tensors written", self.next, self.tensors.len());
        self.out.flush()?;
        Ok(self.written)
    }
}

/// A GGUF file read back: metadata in file order, tensor infos with their absolute offsets.
#[derive(Debug)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<(TensorInfo, u64)>,
    bytes: Vec<u8>,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        ensure!(self.at + n <= self.b.len(), "GGUF truncated at byte {}", self.at);
        self.at += n;
        Ok(&self.b[self.at - n..self.at])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8(self.take(n)?.to_vec())?)
    }
    fn value(&mut self, t: ValueType) -> Result<Value> {
        Ok(match t {
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(self.u32()? as i32),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32()?)),
            ValueType::Bool => Value::Bool(self.take(1)?[0] != 0),
            ValueType::Str => Value::Str(self.string()?),
            ValueType::Array => {
                let et = ValueType::from_code(self.u32()?)?;
                let n = self.u64()? as usize;
                match et {
                    ValueType::U32 => Value::U32s((0..n).map(|_| self.u32()).collect::<Result<_>>()?),
                    ValueType::I32 => Value::I32s((0..n).map(|_| self.u32().map(|x| x as i32)).collect::<Result<_>>()?),
                    ValueType::F32 => Value::F32s((0..n).map(|_| self.u32().map(f32::from_bits)).collect::<Result<_>>()?),
                    ValueType::Str => Value::Strs((0..n).map(|_| self.string()).collect::<Result<_>>()?),
                    other => bail!("GGUF arrays of {other:?} are not read here"),
                }
            }
        })
    }
}

impl GgufFile {
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let mut bytes = Vec::new();
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::parse(bytes)
    }

    pub fn parse(bytes: Vec<u8>) -> Result<Self> {
        let mut c = Cursor { b: &bytes, at: 0 };
        ensure!(c.take(4)? == MAGIC, "not a GGUF file (no magic)");
        let version = c.u32()?;
        let (n_tensors, n_kv) = (c.u64()?, c.u64()?);
        let mut metadata = Vec::new();
        for _ in 0..n_kv {
            let k = c.string()?;
            let t = ValueType::from_code(c.u32()?)?;
            metadata.push((k, c.value(t)?));
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let ty = TensorType::from_code(c.u32()?)?;
            let offset = c.u64()?;
            ensure!(offset.is_multiple_of(ALIGNMENT), "{name}: offset {offset} is not aligned to {ALIGNMENT}");
            infos.push((TensorInfo { name, dims, ty }, offset));
        }
        let data_start = align(c.at as u64);
        let tensors: Vec<(TensorInfo, u64)> = infos.into_iter().map(|(t, o)| (t, data_start + o)).collect();
        for (t, at) in &tensors {
            ensure!(at + t.bytes() <= bytes.len() as u64, "{}: data runs past the end of the file", t.name);
        }
        Ok(GgufFile { version, metadata, tensors, bytes })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Tensor `name`'s values decoded to f32, row-major.
    pub fn values(&self, name: &str) -> Result<Vec<f32>> {
        let (t, at) = self.tensors.iter().find(|(t, _)| t.name == name).with_context(|| format!("no tensor {name}"))?;
        Ok(t.ty.decode(&self.bytes[*at as usize..(*at + t.bytes()) as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> Vec<(String, Value)> {
        vec![
            ("general.architecture".into(), Value::Str("llama".into())),
            ("llama.block_count".into(), Value::U32(3)),
            ("llama.feed_forward_length".into(), Value::U32s(vec![64, 96, 32])),
            ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
            ("tokenizer.ggml.tokens".into(), Value::Strs(vec!["a".into(), "ĠThe".into(), "<|endoftext|>".into()])),
            ("tokenizer.ggml.token_type".into(), Value::I32s(vec![1, 1, 3])),
            ("tokenizer.ggml.scores".into(), Value::F32s(vec![-1.0, 0.5, -1e9])),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ]
    }

    #[test]
    fn layout_round_trips_and_every_offset_is_aligned() {
        let tensors = vec![
            TensorInfo::new("norm", &[5], TensorType::F32),
            TensorInfo::new("w16", &[3, 7], TensorType::F16),
            TensorInfo::new("wq", &[2, 64], TensorType::Q8_0),
        ];
        let values: Vec<Vec<f32>> = tensors.iter().map(|t| (0..t.elements()).map(|i| (i as f32 * 0.37).sin()).collect()).collect();
        let mut buf = Vec::new();
        let mut w = GgufWriter::new(&mut buf, &metadata(), tensors.clone()).unwrap();
        for v in &values {
            w.write_tensor(v).unwrap();
        }
        let size = w.finish().unwrap();
        assert_eq!(size, buf.len() as u64);
        let f = GgufFile::parse(buf).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.metadata, metadata());
        for ((t, at), (want, v)) in f.tensors.iter().zip(tensors.iter().zip(&values)) {
            assert_eq!(t, want);
            assert_eq!(at % ALIGNMENT, 0);
            let got = f.values(&t.name).unwrap();
            let tol = match t.ty {
                TensorType::F32 => 0.0,
                TensorType::F16 => 1e-3,
                TensorType::Q8_0 => 1.0 / 127.0,
            };
            assert!(got.iter().zip(v).all(|(a, b)| (a - b).abs() <= tol), "{}", t.name);
        }
        // [rows, cols] is stored innermost first
        assert_eq!(f.tensors[1].0.dims, vec![7, 3]);
    }

    #[test]
    fn q8_0_blocks_hold_scale_and_rounded_bytes() {
        let mut v = vec![0f32; 32];
        v[0] = -2.54;
        v[1] = 1.27;
        let b = TensorType::Q8_0.encode(&v);
        assert_eq!(b.len(), 34);
        assert_eq!(half::f16::from_le_bytes([b[0], b[1]]).to_f32(), half::f16::from_f32(0.02).to_f32());
        assert_eq!(b[2] as i8, -127);
        assert_eq!(b[3] as i8, 64);
        assert!(TensorType::Q8_0.encode(&[0.0; 32]).iter().all(|&x| x == 0));
    }

    #[test]
    fn misuse_is_refused() {
        let bad = vec![TensorInfo::new("w", &[2, 48], TensorType::Q8_0)];
        assert!(GgufWriter::new(Vec::new(), &[], bad).is_err());
        let mut w = GgufWriter::new(Vec::new(), &[], vec![TensorInfo::new("w", &[2, 2], TensorType::F32)]).unwrap();
        assert!(w.write_tensor(&[1.0; 3]).is_err());
        assert!(GgufWriter::new(Vec::new(), &[], vec![TensorInfo::new("w", &[2], TensorType::F32)]).unwrap().finish().is_err());
        assert!(GgufFile::parse(b"GGUX".to_vec()).is_err());
    }
}
