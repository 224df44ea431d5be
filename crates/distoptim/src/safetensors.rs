//! The safetensors file format, written and read by hand (it is a u64 header length, a
//! JSON header naming each tensor's dtype, shape and byte range, then the raw data), so
//! the files open in Python's `safetensors` without this crate depending on anything.
//! Only f32 tensors are written; the header's `__metadata__` carries strings.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// Encodes named 1-D f32 tensors (in the given order) and metadata.
pub(crate) fn encode(tensors: &[(String, &[f32])], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = Map::new();
    let mut offset = 0usize;
    for (name, data) in tensors {
        let end = offset + data.len() * 4;
        header.insert(name.clone(), json!({"dtype": "F32", "shape": [data.len()], "data_offsets": [offset, end]}));
        offset = end;
    }
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut text = Value::Object(header).to_string().into_bytes();
    // The data starts 8-byte aligned: pad the header with spaces, as the reference does.
    while (8 + text.len()) % 8 != 0 {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + offset);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    for (_, data) in tensors {
        for v in data.iter() {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// A decoded file: f32 tensors by name, and the metadata.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub tensors: BTreeMap<String, Vec<f32>>,
    pub metadata: BTreeMap<String, String>,
}

/// Decodes a file written by [`encode`] (or any safetensors file of 1-D f32 tensors);
/// every inconsistency is an error naming it, never a panic.
pub(crate) fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    let len = bytes.get(..8).ok_or("shorter than the 8-byte header length")?;
    let n = u64::from_le_bytes(len.try_into().map_err(|_| "bad header length")?) as usize;
    let header = bytes.get(8..8usize.checked_add(n).ok_or("header length overflows")?).ok_or("header runs past the end of the file")?;
    let data = &bytes[8 + n..];
    let header: Map<String, Value> = serde_json::from_slice(header).map_err(|e| format!("header is not JSON: {e}"))?;
    let mut out = Decoded::default();
    for (name, entry) in header {
        if name == "__metadata__" {
            let meta = entry.as_object().ok_or("__metadata__ is not an object")?;
            for (k, v) in meta {
                out.metadata.insert(k.clone(), v.as_str().ok_or_else(|| format!("metadata '{k}' is not a string"))?.to_string());
            }
            continue;
        }
        if entry["dtype"] != "F32" {
            return Err(format!("tensor '{name}' is {}, only F32 is supported", entry["dtype"]));
        }
        let offsets =
            entry["data_offsets"].as_array().filter(|a| a.len() == 2).ok_or_else(|| format!("tensor '{name}' has no data_offsets"))?;
        let (a, b) = (offsets[0].as_u64().unwrap_or(u64::MAX) as usize, offsets[1].as_u64().unwrap_or(u64::MAX) as usize);
        let raw = data.get(a..b).filter(|r| r.len() % 4 == 0).ok_or_else(|| format!("tensor '{name}' lies outside the data"))?;
        out.tensors.insert(name, raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
    }
    Ok(out)
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
}
