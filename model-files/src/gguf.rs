//! The header of a llama.cpp GGUF file: its metadata and its tensors' names, types, shapes and
//! offsets, read without touching the tensor data.
//!
//! Layout (GGUF v2 and v3, little-endian): magic `GGUF`, version, tensor count, metadata count,
//! the metadata (key, type, value), the tensor infos (name, dimensions, ggml type, offset), then
//! the data, aligned to `general.alignment` (32 by default). Every length read from the file is
//! checked against the bytes that remain before anything is allocated for it, so a hostile or
//! truncated file fails with a message instead of an allocation of its choosing.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use crate::error::{FilesError, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The GGUF type name, for messages.
    pub fn value_type(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F32(_) => "f32",
            Self::F64(_) => "f64",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
        }
    }

    /// The value as an unsigned integer, whatever its integer width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// ggml type id (0 f32, 1 f16, 2 q4_0, 3 q4_1, 8 q8_0, 12 q4_k, ...).
    pub ggml_type: u32,
    /// Dimensions as the file lists them (innermost first).
    pub dims: Vec<u64>,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

/// Elements per block and bytes per block of the ggml types whose layout is known here.
pub fn ggml_block(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),      // f32
        1 => (1, 2),      // f16
        2 => (32, 18),    // q4_0
        3 => (32, 20),    // q4_1
        6 => (32, 22),    // q5_0
        7 => (32, 24),    // q5_1
        8 => (32, 34),    // q8_0
        9 => (32, 36),    // q8_1
        10 => (256, 84),  // q2_k
        11 => (256, 110), // q3_k
        12 => (256, 144), // q4_k
        13 => (256, 176), // q5_k
        14 => (256, 210), // q6_k
        15 => (256, 292), // q8_k
        30 => (1, 2),     // bf16
        _ => return None,
    })
}

/// The header of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Where the data section starts in the file.
    pub data_offset: u64,
    /// The file's length in bytes.
    pub file_len: u64,
}

/// Longest nesting of arrays accepted (llama.cpp writes one level).
const MAX_DEPTH: usize = 4;
/// Most entries reserved up front for a count read from the file. A count is already checked
/// against the bytes left, but an entry in memory is larger than its smallest encoding, so a
/// hostile count could still ask for many times the file's size before a byte is read; past
/// this the collections grow as entries actually arrive.
const MAX_RESERVED: usize = 1 << 16;

/// The fewest bytes one array item of GGUF type `ty` takes in the file.
fn min_item_bytes(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        // A string's length, an array's type and count.
        8 => 8,
        9 => 12,
        _ => 8,
    }
}

struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<R> {
    fn bad(&self, what: String) -> FilesError {
        FilesError::Gguf(format!("{what} (at byte {})", self.pos))
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(self.bad(format!("{what} of {n} bytes runs past the end of the file ({} bytes)", self.len)));
        }
        let mut buf = vec![0; n as usize];
        self.inner.read_exact(&mut buf).map_err(|e| self.bad(format!("cannot read {what}: {e}")))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let v = self.bytes(N as u64, what)?;
        let mut out = [0; N];
        out.copy_from_slice(&v);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let bytes = self.bytes(n, what)?;
        String::from_utf8(bytes).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }

    /// A count of items of at least `min_bytes` each, checked against what is left.
    fn count(&mut self, min_bytes: u64, what: &str) -> Result<u64> {
        let n = self.u64(what)?;
        if n.saturating_mul(min_bytes) > self.len.saturating_sub(self.pos) {
            return Err(self.bad(format!("{what} says {n} entries, more than the file holds")));
        }
        Ok(n)
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.bad(format!("{key}: arrays nested deeper than {MAX_DEPTH}")));
                }
                let item = self.u32(key)?;
                let n = self.count(min_item_bytes(item), key)?;
                let mut items = Vec::with_capacity((n as usize).min(MAX_RESERVED));
                for _ in 0..n {
                    items.push(self.value(item, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.bad(format!("{key}: unknown metadata type {other}"))),
        })
    }
}

impl GgufHeader {
    /// Reads the header of the GGUF file at `path`, and checks that every tensor has a known
    /// type and lies inside the file.
    pub fn read(path: &Path) -> Result<Self> {
        let io = |source| FilesError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let at = |e: FilesError| match e {
            FilesError::Gguf(reason) => FilesError::InvalidGguf { path: path.to_path_buf(), reason },
            other => other,
        };
        Self::from_reader(std::io::BufReader::new(file), len).map_err(at)
    }

    /// Reads a header from `reader`, a file of `len` bytes.
    pub fn from_reader(reader: impl Read, len: u64) -> Result<Self> {
        let mut r = Reader { inner: reader, pos: 0, len };
        if &r.array::<4>("magic")? != b"GGUF" {
            return Err(r.bad("not a GGUF file (no GGUF magic)".into()));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(r.bad(format!("GGUF version {version} is not supported (2 or 3)")));
        }
        // A tensor info takes at least 8 + 4 + 4 + 8 bytes; a metadata entry at least 8 + 4 + 1.
        let n_tensors = r.count(24, "tensor count")?;
        let n_meta = r.count(13, "metadata count")?;
        let mut metadata = HashMap::with_capacity((n_meta as usize).min(MAX_RESERVED));
        for _ in 0..n_meta {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32(&name)?;
            if n_dims > 4 {
                return Err(r.bad(format!("tensor {name} has {n_dims} dimensions (at most 4)")));
            }
            let dims = (0..n_dims).map(|_| r.u64(&name)).collect::<Result<Vec<_>>>()?;
            let ggml_type = r.u32(&name)?;
            let offset = r.u64(&name)?;
            tensors.insert(name, TensorInfo { ggml_type, dims, offset });
        }
        let alignment = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32).max(1);
        let data_offset = r.pos.div_ceil(alignment).saturating_mul(alignment);
        let header = Self { version, metadata, tensors, data_offset, file_len: len };
        header.check_tensors()?;
        Ok(header)
    }

    /// Every tensor has a type whose layout is known and ends inside the file: a truncated
    /// download keeps a readable header, and is found here rather than by a worker reading
    /// the last layer.
    fn check_tensors(&self) -> Result<()> {
        for (name, t) in &self.tensors {
            let (block, bytes) = ggml_block(t.ggml_type)
                .ok_or_else(|| FilesError::Gguf(format!("tensor {name} has ggml type {}, which is not supported", t.ggml_type)))?;
            let elems = t.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
            let elems = elems.ok_or_else(|| FilesError::Gguf(format!("tensor {name} of shape {:?} has too many elements", t.dims)))?;
            if elems % block != 0 {
                return Err(FilesError::Gguf(format!("tensor {name} of shape {:?} does not fill whole {block}-element blocks", t.dims)));
            }
            // Checked: a shape near u64::MAX elements would otherwise wrap to a small size that
            // fits the file (found by tests/gguf_hostile.rs).
            let size = (elems / block)
                .checked_mul(bytes)
                .ok_or_else(|| FilesError::Gguf(format!("tensor {name} of shape {:?} is larger than any file", t.dims)))?;
            let end = self.data_offset.saturating_add(t.offset).saturating_add(size);
            if end > self.file_len {
                return Err(FilesError::Gguf(format!(
                    "tensor {name} ends at byte {end}, past the end of the file ({} bytes): the file is truncated",
                    self.file_len
                )));
            }
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn string(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}
