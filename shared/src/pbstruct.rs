//! Decode a serialized `google.protobuf.Struct` (and Envoy's `Metadata`) into JSON.
//!
//! Envoy hands message-typed Wasm properties (for example
//! `metadata.filter_metadata["envoy.filters.http.jwt_authn"]`, where `jwt_authn` puts the verified JWT
//! payload) to a filter as binary protobuf. This is a minimal, allocation-bounded reader for exactly
//! `Struct` / `Value` / `ListValue` (wire types varint, 64-bit and length-delimited), so filters need no
//! protobuf dependency. Malformed input is an error, never a panic; nesting is limited to 64 levels.

use serde_json::{Map, Number, Value};

const MAX_DEPTH: usize = 64;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err("varint too long")
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        let s = self.buf.get(self.pos..end).ok_or("truncated field")?;
        self.pos = end;
        Ok(s)
    }

    /// (field number, wire type)
    fn tag(&mut self) -> Result<(u64, u8), &'static str> {
        let t = self.varint()?;
        Ok((t >> 3, (t & 7) as u8))
    }

    fn len_delimited(&mut self) -> Result<&'a [u8], &'static str> {
        let n = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
        self.bytes(n)
    }

    fn skip(&mut self, wire: u8) -> Result<(), &'static str> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.bytes(8).map(|_| ()),
            2 => self.len_delimited().map(|_| ()),
            5 => self.bytes(4).map(|_| ()),
            _ => Err("unsupported wire type"),
        }
    }
}

/// From a serialized `envoy.config.core.v3.Metadata` (what Envoy returns for the Wasm property
/// `metadata`), decode `filter_metadata[namespace]` (a `Struct`) with exact JSON types. `Ok(None)` when
/// the namespace is absent. (Asking Envoy for the deeper path `metadata.filter_metadata.<ns>` instead
/// returns a CEL map flattened to untyped pairs, where strings, numbers and lists look alike.)
pub fn decode_metadata_namespace(buf: &[u8], namespace: &str) -> Result<Option<Map<String, Value>>, &'static str> {
    let mut r = Reader { buf, pos: 0 };
    while !r.done() {
        let (field, wire) = r.tag()?;
        if field == 1 && wire == 2 {
            let entry = r.len_delimited()?;
            let mut e = Reader { buf: entry, pos: 0 };
            let mut key: &[u8] = &[];
            let mut value: &[u8] = &[];
            while !e.done() {
                let (f, w) = e.tag()?;
                match (f, w) {
                    (1, 2) => key = e.len_delimited()?,
                    (2, 2) => value = e.len_delimited()?,
                    (_, w) => e.skip(w)?,
                }
            }
            if key == namespace.as_bytes() {
                return struct_at(value, 0).map(Some);
            }
        } else {
            r.skip(wire)?;
        }
    }
    Ok(None)
}

/// Decode a `google.protobuf.Struct` message into a JSON object.
pub fn decode_struct(buf: &[u8]) -> Result<Map<String, Value>, &'static str> {
    struct_at(buf, 0)
}

fn struct_at(buf: &[u8], depth: usize) -> Result<Map<String, Value>, &'static str> {
    if depth > MAX_DEPTH {
        return Err("nesting too deep");
    }
    let mut r = Reader { buf, pos: 0 };
    let mut out = Map::new();
    while !r.done() {
        let (field, wire) = r.tag()?;
        if field == 1 && wire == 2 {
            let entry = r.len_delimited()?;
            let mut e = Reader { buf: entry, pos: 0 };
            let mut key = String::new();
            let mut value = Value::Null;
            while !e.done() {
                let (f, w) = e.tag()?;
                match (f, w) {
                    (1, 2) => key = String::from_utf8(e.len_delimited()?.to_vec()).map_err(|_| "key not UTF-8")?,
                    (2, 2) => value = value_at(e.len_delimited()?, depth + 1)?,
                    (_, w) => e.skip(w)?,
                }
            }
            out.insert(key, value);
        } else {
            r.skip(wire)?;
        }
    }
    Ok(out)
}

fn value_at(buf: &[u8], depth: usize) -> Result<Value, &'static str> {
    if depth > MAX_DEPTH {
        return Err("nesting too deep");
    }
    let mut r = Reader { buf, pos: 0 };
    let mut out = Value::Null;
    while !r.done() {
        let (field, wire) = r.tag()?;
        out = match (field, wire) {
            (1, 0) => {
                r.varint()?;
                Value::Null
            }
            (2, 1) => {
                let b = r.bytes(8)?;
                let mut arr = [0u8; 8];
                arr.copy_from_slice(b);
                let f = f64::from_le_bytes(arr);
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    // Claims such as `exp` are integers; keep them integral in JSON.
                    Value::Number(Number::from(f as i64))
                } else {
                    Number::from_f64(f).map_or(Value::Null, Value::Number)
                }
            }
            (3, 2) => Value::String(String::from_utf8(r.len_delimited()?.to_vec()).map_err(|_| "string not UTF-8")?),
            (4, 0) => Value::Bool(r.varint()? != 0),
            (5, 2) => Value::Object(struct_at(r.len_delimited()?, depth + 1)?),
            (6, 2) => {
                let list = r.len_delimited()?;
                let mut l = Reader { buf: list, pos: 0 };
                let mut items = Vec::new();
                while !l.done() {
                    let (f, w) = l.tag()?;
                    if f == 1 && w == 2 {
                        items.push(value_at(l.len_delimited()?, depth + 1)?);
                    } else {
                        l.skip(w)?;
                    }
                }
                Value::Array(items)
            }
            (_, w) => {
                r.skip(w)?;
                continue;
            }
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn ld(field: u64, body: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }
    /// A tiny encoder, the mirror of the decoder, to build test messages.
    fn enc_value(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        match v {
            Value::Null => {
                varint(1 << 3, &mut out);
                varint(0, &mut out);
            }
            Value::Number(n) => {
                varint(2 << 3 | 1, &mut out);
                out.extend_from_slice(&n.as_f64().unwrap().to_le_bytes());
            }
            Value::String(s) => ld(3, s.as_bytes(), &mut out),
            Value::Bool(b) => {
                varint(4 << 3, &mut out);
                varint(u64::from(*b), &mut out);
            }
            Value::Object(m) => ld(5, &enc_struct(m), &mut out),
            Value::Array(a) => {
                let mut list = Vec::new();
                for i in a {
                    ld(1, &enc_value(i), &mut list);
                }
                ld(6, &list, &mut out);
            }
        }
        out
    }
    fn enc_struct(m: &Map<String, Value>) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in m {
            let mut entry = Vec::new();
            ld(1, k.as_bytes(), &mut entry);
            ld(2, &enc_value(v), &mut entry);
            ld(1, &entry, &mut out);
        }
        out
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn round_trips_a_jwt_payload() {
        let claims = json!({"jwt_payload": {"sub": "alice", "exp": 1893456000, "groups": ["finance", "eng"],
            "scope": "tools:read tools:write", "admin": false, "ratio": 0.5, "nested": {"n": null}}});
        let bytes = enc_struct(claims.as_object().unwrap());
        assert_eq!(Value::Object(decode_struct(&bytes).unwrap()), claims);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn metadata_namespaces() {
        let jwt = json!({"jwt_payload": {"sub": "alice", "groups": ["finance"]}});
        let other = json!({"x": 1});
        let mut md = Vec::new();
        for (ns, v) in [("envoy.lb", &other), ("envoy.filters.http.jwt_authn", &jwt)] {
            let mut entry = Vec::new();
            ld(1, ns.as_bytes(), &mut entry);
            ld(2, &enc_struct(v.as_object().unwrap()), &mut entry);
            ld(1, &entry, &mut md);
        }
        let got = decode_metadata_namespace(&md, "envoy.filters.http.jwt_authn").unwrap().unwrap();
        assert_eq!(Value::Object(got), jwt);
        assert_eq!(decode_metadata_namespace(&md, "missing").unwrap(), None);
        assert_eq!(decode_metadata_namespace(&[], "missing").unwrap(), None);
        assert!(decode_metadata_namespace(&md[..md.len() - 1], "envoy.filters.http.jwt_authn").is_err());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn malformed_input_is_an_error() {
        let bytes = enc_struct(json!({"a": "b"}).as_object().unwrap());
        for cut in 1..bytes.len() {
            assert!(decode_struct(&bytes[..cut]).is_err(), "cut {cut}");
        }
        assert!(decode_struct(&[0xff; 12]).is_err());
        assert_eq!(decode_struct(&[]).unwrap(), Map::new());
    }
}
