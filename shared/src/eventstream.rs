//! AWS event stream (`application/vnd.amazon.eventstream`), the binary framing of Bedrock's
//! `ConverseStream` and `InvokeModelWithResponseStream` answers, decoded chunk by chunk.
//!
//! A message is: total length (u32, big endian), headers length (u32), a CRC-32 of those 8 bytes,
//! the headers (name length u8, name, value type u8, value), the payload, and a CRC-32 of everything
//! before it. Bedrock's payloads are JSON: `ConverseStream` sends one event per `:event-type`
//! (`contentBlockDelta` with `{"delta":{"text":...}}`, `metadata` with `{"usage":{"inputTokens":...}}`);
//! `InvokeModelWithResponseStream` sends `chunk` events whose payload is `{"bytes":"<base64>"}`, the
//! model's own stream event (Anthropic's `message_start` / `message_delta` with usage, and a last one
//! carrying `amazon-bedrock-invocationMetrics`).
//!
//! Both CRCs are checked: a stream whose framing is broken cannot be re-synchronised (a length could
//! be anywhere), so the decoder stops at the first bad message and says so ([`Decoder::broken`]); the
//! caller then charges what it cannot read as unreadable. Memory is bounded by [`MAX_MESSAGE`].

use crate::encoding::base64_decode;
use serde_json::Value;

/// Largest message accepted (Bedrock's are a few KB; the AWS format allows 16 MiB).
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// Prelude (12 bytes) plus the message CRC (4).
const OVERHEAD: usize = 16;

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `:message-type`: `event`, `exception` or `error`.
    pub message_type: Option<String>,
    /// `:event-type` (for events) or `:exception-type`.
    pub event_type: Option<String>,
    pub payload: Vec<u8>,
}

impl Message {
    /// The JSON the model server sent in this message: the payload itself, or for an
    /// `InvokeModelWithResponseStream` chunk (`{"bytes":"<base64>"}`) the decoded inner event.
    /// `None` when the payload is not JSON.
    pub fn event_json(&self) -> Option<Value> {
        let v: Value = serde_json::from_slice(&self.payload).ok()?;
        if self.event_type.as_deref() == Some("chunk") {
            if let Some(b) = v.get("bytes").and_then(Value::as_str) {
                let inner = base64_decode(b).ok()?;
                return serde_json::from_slice(&inner).ok();
            }
        }
        Some(v)
    }
}

/// Why decoding stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// The prelude's CRC did not match (not an event stream, or a corrupted one).
    PreludeCrc,
    /// The message's CRC did not match.
    MessageCrc,
    /// A length outside `16..=MAX_MESSAGE`, or headers longer than the message.
    Length,
    /// A header that runs past its section or has an unknown value type.
    Header,
}

/// Incremental decoder: [`Decoder::feed`] every chunk in order; complete messages come out.
#[derive(Debug, Default, Clone)]
pub struct Decoder {
    buf: Vec<u8>,
    broken: Option<Broken>,
}

impl Decoder {
    /// Feed one chunk; returns the messages it completed. After a broken message nothing more is decoded.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        if self.broken.is_some() {
            return out;
        }
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        loop {
            match next_message(self.buf.get(start..).unwrap_or_default()) {
                Ok(Some((m, used))) => {
                    out.push(m);
                    start += used;
                }
                Ok(None) => break,
                Err(e) => {
                    self.broken = Some(e);
                    break;
                }
            }
        }
        if self.broken.is_some() {
            self.buf = Vec::new();
        } else {
            self.buf.drain(..start.min(self.buf.len()));
        }
        out
    }

    /// Why decoding stopped, if it did.
    pub fn broken(&self) -> Option<Broken> {
        self.broken
    }

    /// Bytes of an unfinished message held (a stream cut mid-message ends with some).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The first message of `b` and the bytes it used; `None` while it is incomplete.
fn next_message(b: &[u8]) -> Result<Option<(Message, usize)>, Broken> {
    let (Some(total), Some(headers_len), Some(prelude_crc), Some(prelude)) =
        (be32_at(b, 0), be32_at(b, 4), be32_at(b, 8), b.get(..8))
    else {
        return Ok(None);
    };
    if crc32(prelude) != prelude_crc {
        return Err(Broken::PreludeCrc);
    }
    let (total, headers_len) = (total as usize, headers_len as usize);
    if !(OVERHEAD..=MAX_MESSAGE).contains(&total) || headers_len > total - OVERHEAD {
        return Err(Broken::Length);
    }
    let (Some(covered), Some(message_crc)) = (b.get(..total - 4), be32_at(b, total - 4)) else {
        return Ok(None);
    };
    if crc32(covered) != message_crc {
        return Err(Broken::MessageCrc);
    }
    let headers = covered.get(12..12 + headers_len).ok_or(Broken::Length)?;
    let payload = covered.get(12 + headers_len..).ok_or(Broken::Length)?;
    Ok(Some((parse_message(headers, payload)?, total)))
}

fn be32_at(b: &[u8], at: usize) -> Option<u32> {
    let x = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([*x.first()?, *x.get(1)?, *x.get(2)?, *x.get(3)?]))
}

fn parse_message(mut headers: &[u8], payload: &[u8]) -> Result<Message, Broken> {
    let mut m = Message { message_type: None, event_type: None, payload: payload.to_vec() };
    while let Some((&name_len, rest)) = headers.split_first() {
        let name_len = usize::from(name_len);
        let name = rest.get(..name_len).ok_or(Broken::Header)?;
        let (&kind, rest) = rest.get(name_len..).and_then(<[u8]>::split_first).ok_or(Broken::Header)?;
        // Fixed sizes per value type; 6 (bytes) and 7 (string) carry a u16 length.
        let (value_at, value_len) = match kind {
            0 | 1 => (0, 0),
            2 => (0, 1),
            3 => (0, 2),
            4 => (0, 4),
            5 | 8 => (0, 8),
            9 => (0, 16),
            6 | 7 => {
                let l = rest.get(..2).ok_or(Broken::Header)?;
                (
                    2,
                    usize::from(u16::from_be_bytes([
                        *l.first().ok_or(Broken::Header)?,
                        *l.get(1).ok_or(Broken::Header)?,
                    ])),
                )
            }
            _ => return Err(Broken::Header),
        };
        let value = rest.get(value_at..value_at + value_len).ok_or(Broken::Header)?;
        if kind == 7 {
            let text = String::from_utf8_lossy(value).into_owned();
            match name {
                b":message-type" => m.message_type = Some(text),
                b":event-type" | b":exception-type" => m.event_type = Some(text),
                _ => {}
            }
        }
        headers = rest.get(value_at + value_len..).unwrap_or_default();
    }
    Ok(m)
}

/// CRC-32 (IEEE 802.3, the polynomial of zlib and of the event-stream format).
// Indexing a 256-entry table with a byte-masked value cannot go out of bounds.
#[allow(clippy::indexing_slicing)]
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Encode one message with string headers (the mock model server and tests use it).
pub fn encode(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        h.push(name.len().min(255) as u8);
        h.extend_from_slice(name.as_bytes().get(..name.len().min(255)).unwrap_or_default());
        h.push(7);
        let v = value.as_bytes().get(..value.len().min(u16::MAX as usize)).unwrap_or_default();
        h.extend_from_slice(&(v.len() as u16).to_be_bytes());
        h.extend_from_slice(v);
    }
    let total = (OVERHEAD + h.len() + payload.len()) as u32;
    let mut m = Vec::with_capacity(total as usize);
    m.extend_from_slice(&total.to_be_bytes());
    m.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let prelude_crc = crc32(&m);
    m.extend_from_slice(&prelude_crc.to_be_bytes());
    m.extend_from_slice(&h);
    m.extend_from_slice(payload);
    let crc = crc32(&m);
    m.extend_from_slice(&crc.to_be_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn event(kind: &str, payload: &str) -> Vec<u8> {
        encode(
            &[(":event-type", kind), (":content-type", "application/json"), (":message-type", "event")],
            payload.as_bytes(),
        )
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn published_test_vectors_decode() {
        // Interoperability vectors of the AWS SDKs' event-stream decoders: every header value type
        // (bool, byte, short, int, long, bytes, string, timestamp, uuid), then an event with string
        // headers and a JSON payload sent in three pieces.
        let all_types: &[u8] = b"\x00\x00\x00\x62\x00\x00\x00\x52\x03\xb5\xcb\x9c\
            \x010\x00\x011\x01\x012\x02\x02\x013\x03\x00\x03\
            \x014\x04\x00\x00\x00\x04\x015\x05\x00\x00\x00\x00\x00\x00\x00\x05\
            \x016\x06\x00\x05bytes\x017\x07\x00\x04utf8\
            \x018\x08\x00\x00\x00\x00\x00\x00\x00\x08\x019\x090123456789abcdef\
            \x63\x35\x36\x71";
        let mut d = Decoder::default();
        let m = d.feed(all_types);
        assert_eq!((m.len(), d.broken()), (1, None));
        assert!(m[0].payload.is_empty());
        let pieces: [&[u8]; 3] = [
            b"\x00\x00\x00~\x00\x00\x00O\xc5\xa3\xdd\xc6\r:message-type\x07\x00",
            b"\x05event\x0b:event-type\x07\x00\x10initial-response\r:content-type",
            b"\x07\x00\ttext/json{\"InitialResponse\": \"sometext\"}\xf6\x98$\x83",
        ];
        let mut d = Decoder::default();
        let m: Vec<Message> = pieces.iter().flat_map(|p| d.feed(p)).collect();
        assert_eq!(d.broken(), None);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].message_type.as_deref(), Some("event"));
        assert_eq!(m[0].event_type.as_deref(), Some("initial-response"));
        assert_eq!(m[0].event_json().unwrap()["InitialResponse"], "sometext");
        // The same vector with one payload byte changed fails its CRC.
        let mut corrupted: Vec<u8> = pieces.concat();
        let n = corrupted.len();
        corrupted[n - 8] = b'X';
        let mut d = Decoder::default();
        assert!(d.feed(&corrupted).is_empty());
        assert_eq!(d.broken(), Some(Broken::MessageCrc));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn messages_split_at_every_byte_decode_the_same() {
        let mut stream = event("contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"text":"Hel"}}"#);
        stream.extend(event("metadata", r#"{"usage":{"inputTokens":12,"outputTokens":34,"totalTokens":46}}"#));
        for split in 1..stream.len() {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for c in stream.chunks(split) {
                got.extend(d.feed(c));
            }
            assert_eq!(got.len(), 2, "split {split}");
            assert_eq!(got[1].event_type.as_deref(), Some("metadata"));
            assert_eq!(got[1].message_type.as_deref(), Some("event"));
            assert_eq!(got[1].event_json().unwrap()["usage"]["outputTokens"], 34);
            assert_eq!(d.pending(), 0);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn invoke_model_chunks_are_unwrapped() {
        // base64 of {"type":"message_delta","usage":{"output_tokens":7}}
        let inner = r#"{"type":"message_delta","usage":{"output_tokens":7}}"#;
        let b64 = "eyJ0eXBlIjoibWVzc2FnZV9kZWx0YSIsInVzYWdlIjp7Im91dHB1dF90b2tlbnMiOjd9fQ==";
        let mut d = Decoder::default();
        let m = d.feed(&event("chunk", &format!(r#"{{"bytes":"{b64}"}}"#)));
        assert_eq!(m[0].event_json().unwrap(), serde_json::from_str::<Value>(inner).unwrap());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn corrupted_or_hostile_framing_stops_without_panicking() {
        let good = event("metadata", r#"{"usage":{"inputTokens":1}}"#);
        // A flipped payload byte: the message CRC fails.
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 6] ^= 1;
        let mut d = Decoder::default();
        assert!(d.feed(&bad).is_empty());
        assert_eq!(d.broken(), Some(Broken::MessageCrc));
        assert!(d.feed(&good).is_empty(), "nothing after a broken message");
        // Text instead of framing.
        let mut d = Decoder::default();
        assert!(d.feed(b"data: {\"usage\":{}}\n\n").is_empty());
        assert_eq!(d.broken(), Some(Broken::PreludeCrc));
        // A valid prelude announcing 4 GiB: refused before anything is buffered.
        let mut p = u32::MAX.to_be_bytes().to_vec();
        p.extend_from_slice(&0u32.to_be_bytes());
        let c = crc32(&p);
        p.extend_from_slice(&c.to_be_bytes());
        let mut d = Decoder::default();
        assert!(d.feed(&p).is_empty());
        assert_eq!(d.broken(), Some(Broken::Length));
        // Headers that claim more bytes than they have.
        let mut h = vec![5u8];
        h.extend_from_slice(b":evnt");
        h.push(7);
        h.extend_from_slice(&500u16.to_be_bytes());
        let total = (16 + h.len()) as u32;
        let mut m = total.to_be_bytes().to_vec();
        m.extend_from_slice(&(h.len() as u32).to_be_bytes());
        let c = crc32(&m);
        m.extend_from_slice(&c.to_be_bytes());
        m.extend_from_slice(&h);
        let c = crc32(&m);
        m.extend_from_slice(&c.to_be_bytes());
        let mut d = Decoder::default();
        assert!(d.feed(&m).is_empty());
        assert_eq!(d.broken(), Some(Broken::Header));
        // Random bytes at every length never panic.
        let mut x = 0x1234_5678u32;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = Decoder::default().feed(&bytes);
        }
    }
}
