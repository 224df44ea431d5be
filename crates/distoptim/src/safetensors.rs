//! The safetensors file format, written and read by hand (it is a u64 header length, a
//! JSON header naming each tensor's dtype, shape and byte range, then the raw data), so
//! the files open in Python's `safetensors` without this crate depending on anything.
//! Tensors are written as f32, bf16 or f16 (one type per file) and read as f32; the
//! header's `__metadata__` carries strings.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::precision::FloatDtype;
use distoptim_collective::{bf16, f16};

/// The bytes before the data: the header length (u64 LE) and the JSON header, padded
/// with spaces so the data starts 8-byte aligned, as the reference writer does.
/// `tensors` are (name, shape), all of type `dtype`; the data follows in the same order.
/// Returns the prefix and the data's length in bytes.
pub fn header(tensors: &[(String, Vec<usize>)], dtype: FloatDtype, metadata: &BTreeMap<String, String>) -> (Vec<u8>, usize) {
    let mut header = Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let end = offset + shape.iter().product::<usize>() * dtype.size();
        header.insert(name.clone(), json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut text = Value::Object(header).to_string().into_bytes();
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    (out, offset)
}

/// Appends f32 values little-endian.
pub fn push_f32(out: &mut Vec<u8>, values: &[f32]) {
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Appends `values` rounded to `dtype` (nearest even), little-endian.
pub fn push_as(out: &mut Vec<u8>, values: &[f32], dtype: FloatDtype) {
    match dtype {
        FloatDtype::F32 => push_f32(out, values),
        FloatDtype::Bf16 => values.iter().for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
        FloatDtype::F16 => values.iter().for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
    }
}

/// Encodes named 1-D f32 tensors (in the given order) and metadata.
pub fn encode(tensors: &[(String, &[f32])], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let shapes: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, d)| (n.clone(), vec![d.len()])).collect();
    let (mut out, len) = header(&shapes, FloatDtype::F32, metadata);
    out.reserve(len);
    for (_, data) in tensors {
        push_f32(&mut out, data);
    }
    out
}

/// A parsed header: each tensor's byte range within the data, and the metadata.
#[derive(Debug, Default)]
pub struct Header {
    /// Each tensor's byte range within the data.
    pub tensors: BTreeMap<String, (usize, usize)>,
    /// Each tensor's shape.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// Each tensor's element type (read back as f32).
    pub dtypes: BTreeMap<String, FloatDtype>,
    /// The header's `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// Where the data starts in the file.
    pub data_start: usize,
}

/// Parses the header at the start of `bytes` (which must hold at least all of it);
/// `file_len` bounds the tensors' ranges. Every inconsistency is an error naming it.
fn parse_header(bytes: &[u8], file_len: usize) -> Result<Header, String> {
    let len = bytes.get(..8).ok_or("shorter than the 8-byte header length")?;
    let n = u64::from_le_bytes(len.try_into().map_err(|_| "bad header length")?) as usize;
    let end = 8usize.checked_add(n).filter(|&e| e <= file_len).ok_or("header runs past the end of the file")?;
    let header = bytes.get(8..end).ok_or("header runs past the end of the file")?;
    let header: Map<String, Value> = serde_json::from_slice(header).map_err(|e| format!("header is not JSON: {e}"))?;
    let mut out = Header { data_start: end, ..Header::default() };
    for (name, entry) in header {
        if name == "__metadata__" {
            let meta = entry.as_object().ok_or("__metadata__ is not an object")?;
            for (k, v) in meta {
                out.metadata.insert(k.clone(), v.as_str().ok_or_else(|| format!("metadata '{k}' is not a string"))?.to_string());
            }
            continue;
        }
        let dtype = FloatDtype::ALL
            .into_iter()
            .find(|d| entry["dtype"] == d.safetensors_name())
            .ok_or_else(|| format!("tensor '{name}' is {}, only F32, BF16 and F16 are supported", entry["dtype"]))?;
        let size = dtype.size();
        let offsets =
            entry["data_offsets"].as_array().filter(|a| a.len() == 2).ok_or_else(|| format!("tensor '{name}' has no data_offsets"))?;
        let (a, b) = (offsets[0].as_u64().unwrap_or(u64::MAX) as usize, offsets[1].as_u64().unwrap_or(u64::MAX) as usize);
        if a > b || (b - a) % size != 0 || b > file_len - end {
            return Err(format!("tensor '{name}' lies outside the data"));
        }
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| format!("tensor '{name}' has no shape"))?;
        if shape.iter().try_fold(size, |n, &d| n.checked_mul(d)) != Some(b - a) {
            return Err(format!("tensor '{name}': shape {shape:?} does not match its {} bytes", b - a));
        }
        out.shapes.insert(name.clone(), shape);
        out.dtypes.insert(name.clone(), dtype);
        out.tensors.insert(name, (a, b));
    }
    Ok(out)
}

/// A decoded file: f32 tensors by name, and the metadata.
#[derive(Debug, Default)]
pub struct Decoded {
    /// f32 values by tensor name.
    pub tensors: BTreeMap<String, Vec<f32>>,
    /// Shapes by tensor name.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// The header's `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// Little-endian values of type `dtype`, widened to f32.
fn to_f32(raw: &[u8], dtype: FloatDtype) -> Box<dyn Iterator<Item = f32> + '_> {
    match dtype {
        FloatDtype::F32 => Box::new(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        FloatDtype::Bf16 => Box::new(raw.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        FloatDtype::F16 => Box::new(raw.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
    }
}

/// Decodes a whole file held in memory.
pub fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    let h = parse_header(bytes, bytes.len())?;
    let data = &bytes[h.data_start..];
    let dtypes = &h.dtypes;
    let tensors = h.tensors.iter().map(|(name, &(a, b))| (name.clone(), to_f32(&data[a..b], dtypes[name]).collect())).collect();
    Ok(Decoded { tensors, shapes: h.shapes, metadata: h.metadata })
}

/// Reads single tensors from a file without loading the rest (consolidation streams a
/// checkpoint tensor by tensor this way).
#[derive(Debug)]
pub struct Reader {
    file: File,
    /// The file's parsed header.
    pub header: Header,
}

impl Reader {
    /// Opens `path` and parses its header (bounded, checked against the file's length).
    pub fn open(path: &Path) -> Result<Reader, String> {
        let mut file = File::open(path).map_err(|e| e.to_string())?;
        let file_len = file.metadata().map_err(|e| e.to_string())?.len() as usize;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|_| "shorter than the 8-byte header length")?;
        let n = u64::from_le_bytes(len) as usize;
        if n > file_len.saturating_sub(8) {
            return Err("header runs past the end of the file".into());
        }
        let mut bytes = len.to_vec();
        bytes.resize(8 + n, 0);
        file.read_exact(&mut bytes[8..]).map_err(|e| e.to_string())?;
        let header = parse_header(&bytes, file_len)?;
        Ok(Reader { file, header })
    }

    /// Reads tensor `name` into `out`, whose length must be the tensor's.
    pub fn read(&mut self, name: &str, out: &mut [f32]) -> Result<(), String> {
        let &(a, b) = self.header.tensors.get(name).ok_or_else(|| format!("no tensor '{name}'"))?;
        let dtype = self.header.dtypes.get(name).copied().unwrap_or(FloatDtype::F32);
        if b - a != out.len() * dtype.size() {
            return Err(format!("tensor '{name}' has {} elements, expected {}", (b - a) / dtype.size(), out.len()));
        }
        let mut raw = vec![0u8; b - a];
        self.file
            .seek(SeekFrom::Start((self.header.data_start + a) as u64))
            .and_then(|_| self.file.read_exact(&mut raw))
            .map_err(|e| e.to_string())?;
        out.iter_mut().zip(to_f32(&raw, dtype)).for_each(|(o, v)| *o = v);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hostile_input() {
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let bytes = encode(&[("a".into(), &[1.0, -2.5][..]), ("b.c".into(), &[][..])], &meta);
        assert_eq!((8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize) % 8, 0);
        let d = decode(&bytes).unwrap();
        assert_eq!(d.tensors["a"], vec![1.0, -2.5]);
        assert!(d.tensors["b.c"].is_empty());
        assert_eq!(d.metadata, meta);
        for cut in [0, 5, 9, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = 0xff;
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn reader_reads_single_tensors_with_their_shapes() {
        let (mut bytes, len) = header(&[("w".into(), vec![2, 3]), ("b".into(), vec![2])], FloatDtype::F32, &BTreeMap::new());
        assert_eq!(len, 32);
        push_f32(&mut bytes, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        push_f32(&mut bytes, &[7.0, 8.0]);
        let path = std::env::temp_dir().join(format!("distoptim-st-{}.safetensors", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let mut r = Reader::open(&path).unwrap();
        let mut b = [0.0; 2];
        r.read("b", &mut b).unwrap();
        assert_eq!(b, [7.0, 8.0]);
        assert!(r.read("w", &mut b).unwrap_err().contains("has 6 elements, expected 2"));
        assert!(r.read("x", &mut b).unwrap_err().contains("no tensor 'x'"));
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        assert!(Reader::open(&path).unwrap_err().contains("outside the data"));
        let _ = std::fs::remove_file(&path);
    }
}
