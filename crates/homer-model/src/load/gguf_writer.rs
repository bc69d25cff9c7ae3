//! A small GGUF v3 writer: metadata and raw tensor blocks. Used by tests to build malformed or
//! special-purpose files, and by tools that emit GGUF.

use super::gguf::Value;

/// A tensor to write: GGUF dims (fastest first), GGML type id, and its encoded bytes.
pub struct RawTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.push(*x as u8),
        Value::U16(x) => b.extend(x.to_le_bytes()),
        Value::I16(x) => b.extend(x.to_le_bytes()),
        Value::U32(x) => b.extend(x.to_le_bytes()),
        Value::I32(x) => b.extend(x.to_le_bytes()),
        Value::F32(x) => b.extend(x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::String(s) => put_str(b, s),
        Value::Array(a) => {
            b.extend(a.first().map_or(4, type_id).to_le_bytes());
            b.extend((a.len() as u64).to_le_bytes());
            for x in a {
                put_value(b, x);
            }
        }
        Value::U64(x) => b.extend(x.to_le_bytes()),
        Value::I64(x) => b.extend(x.to_le_bytes()),
        Value::F64(x) => b.extend(x.to_le_bytes()),
    }
}

/// Encode a GGUF v3 file (alignment 32).
pub fn encode(metadata: &[(&str, Value)], tensors: &[RawTensor]) -> Vec<u8> {
    let headers: Vec<TensorHeader> = tensors
        .iter()
        .map(|t| TensorHeader {
            name: t.name.clone(),
            dims: t.dims.clone(),
            type_id: t.type_id,
            bytes: t.data.len() as u64,
        })
        .collect();
    let mut b = Vec::new();
    write_streaming(&mut b, metadata, &headers, &mut |i, w| {
        w.write_all(&tensors[i].data)
    })
    .expect("writing to a Vec cannot fail");
    b
}

/// A tensor whose bytes are produced while the file is written (files too large to hold in
/// memory): GGUF dims (fastest first), GGML type id, byte length.
pub struct TensorHeader {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub bytes: u64,
}

/// [`encode`] streamed into `w`: `fill(i, w)` writes exactly `tensors[i].bytes` bytes of tensor i.
pub fn write_streaming(
    w: &mut dyn std::io::Write,
    metadata: &[(&str, Value)],
    tensors: &[TensorHeader],
    fill: &mut dyn FnMut(usize, &mut dyn std::io::Write) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    const ALIGN: u64 = 32;
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut b, k);
        b.extend(type_id(v).to_le_bytes());
        put_value(&mut b, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(t.type_id.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += t.bytes.div_ceil(ALIGN) * ALIGN;
    }
    b.resize(
        (b.len() as u64).div_ceil(ALIGN) as usize * ALIGN as usize,
        0,
    );
    w.write_all(&b)?;
    let mut total = b.len() as u64;
    for (i, t) in tensors.iter().enumerate() {
        fill(i, w)?;
        let pad = (t.bytes.div_ceil(ALIGN) * ALIGN - t.bytes) as usize;
        w.write_all(&vec![0u8; pad])?;
        total += t.bytes + pad as u64;
    }
    Ok(total)
}
