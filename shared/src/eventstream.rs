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
//! caller then charges what it cannot read as unreadable (or, rewriting the stream, passes the
//! bytes it could not decode on unchanged: [`Decoder::take_unread`]). Memory is bounded by [`MAX_MESSAGE`].
//!
//! Rewriting a message ([`encode_raw`]) keeps its headers byte for byte ([`Message::headers_raw`]) and
//! writes a new prelude and both CRCs; a message re-encoded with its own payload is the original bytes.

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
    /// The header section exactly as received (every header, in order), for [`encode_raw`].
    pub headers_raw: Vec<u8>,
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
    /// After a break: the bytes from the broken message on, as fed (see [`Decoder::take_unread`]).
    unread: Vec<u8>,
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
            self.unread = self.buf.split_off(start.min(self.buf.len()));
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

    /// The bytes fed but not decoded, for a caller that passes them on as they are: after a break, the
    /// broken message and everything fed with it (chunks fed later are not kept: [`Decoder::feed`]
    /// returns nothing for them and the caller still has them); otherwise the unfinished message held
    /// (call it at the end of a stream cut mid-message). Taking them empties the decoder's buffer.
    pub fn take_unread(&mut self) -> Vec<u8> {
        if self.broken.is_some() {
            std::mem::take(&mut self.unread)
        } else {
            std::mem::take(&mut self.buf)
        }
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
    let mut m =
        Message { message_type: None, event_type: None, headers_raw: headers.to_vec(), payload: payload.to_vec() };
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
    encode_raw(&h, payload)
}

/// Encode one message from a header section as received ([`Message::headers_raw`], kept byte for byte)
/// and a payload: a new prelude (lengths, prelude CRC) and message CRC. A decoded message re-encoded
/// with its own payload gives back the bytes it was decoded from.
pub fn encode_raw(headers_raw: &[u8], payload: &[u8]) -> Vec<u8> {
    let total = (OVERHEAD + headers_raw.len() + payload.len()) as u32;
    let mut m = Vec::with_capacity(total as usize);
    m.extend_from_slice(&total.to_be_bytes());
    m.extend_from_slice(&(headers_raw.len() as u32).to_be_bytes());
    let prelude_crc = crc32(&m);
    m.extend_from_slice(&prelude_crc.to_be_bytes());
    m.extend_from_slice(headers_raw);
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

    /// Interoperability vectors of the AWS SDKs' event-stream decoders: every header value type (bool,
    /// byte, short, int, long, bytes, string, timestamp, uuid), no payload ...
    const ALL_HEADER_TYPES: &[u8] = b"\x00\x00\x00\x62\x00\x00\x00\x52\x03\xb5\xcb\x9c\
        \x010\x00\x011\x01\x012\x02\x02\x013\x03\x00\x03\
        \x014\x04\x00\x00\x00\x04\x015\x05\x00\x00\x00\x00\x00\x00\x00\x05\
        \x016\x06\x00\x05bytes\x017\x07\x00\x04utf8\
        \x018\x08\x00\x00\x00\x00\x00\x00\x00\x08\x019\x090123456789abcdef\
        \x63\x35\x36\x71";
    /// ... and an event with string headers and a JSON payload, as sent in three pieces.
    const INITIAL_RESPONSE: [&[u8]; 3] = [
        b"\x00\x00\x00~\x00\x00\x00O\xc5\xa3\xdd\xc6\r:message-type\x07\x00",
        b"\x05event\x0b:event-type\x07\x00\x10initial-response\r:content-type",
        b"\x07\x00\ttext/json{\"InitialResponse\": \"sometext\"}\xf6\x98$\x83",
    ];

    #[wasm_bindgen_test(unsupported = test)]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn published_test_vectors_decode() {
        let all_types = ALL_HEADER_TYPES;
        let mut d = Decoder::default();
        let m = d.feed(all_types);
        assert_eq!((m.len(), d.broken()), (1, None));
        assert!(m[0].payload.is_empty());
        let pieces = INITIAL_RESPONSE;
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

    /// decode -> `encode_raw(headers_raw, payload)` gives the published vectors back byte for byte (every
    /// header value type, and an event decoded from three pieces), and a changed payload gets a new
    /// prelude and CRCs that decode again with the same headers.
    #[wasm_bindgen_test(unsupported = test)]
    fn published_test_vectors_round_trip_through_encode_raw() {
        let all_types = ALL_HEADER_TYPES;
        let event: &[u8] = &INITIAL_RESPONSE.concat();
        for vector in [all_types, event] {
            let mut d = Decoder::default();
            let m = d.feed(vector);
            assert_eq!((m.len(), d.broken()), (1, None));
            assert_eq!(m[0].headers_raw.len() + m[0].payload.len() + 16, vector.len());
            assert_eq!(encode_raw(&m[0].headers_raw, &m[0].payload), vector);
        }
        let mut d = Decoder::default();
        let m = d.feed(event).remove(0);
        let changed = encode_raw(&m.headers_raw, br#"{"InitialResponse": "other, longer text"}"#);
        assert_eq!(changed.len(), event.len() + 10);
        let again = Decoder::default().feed(&changed).remove(0);
        assert_eq!(again.headers_raw, m.headers_raw);
        assert_eq!((&again.message_type, &again.event_type), (&m.message_type, &m.event_type));
        assert_eq!(again.event_json().unwrap()["InitialResponse"], "other, longer text");
        // `encode` is `encode_raw` over string headers.
        let e = encode(&[(":event-type", "chunk")], b"{}");
        let m = Decoder::default().feed(&e).remove(0);
        assert_eq!(encode_raw(&m.headers_raw, &m.payload), e);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn unread_bytes_after_a_break_or_a_cut() {
        let good = event("messageStart", r#"{"role":"assistant"}"#);
        let mut bad = event("contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"text":"x"}}"#);
        let n = bad.len();
        bad[n - 6] ^= 1;
        let mut stream = good.clone();
        stream.extend_from_slice(&bad);
        stream.extend_from_slice(&good);
        // Fed in two pieces cut inside the broken message: the first decodes `good` and holds the
        // start of `bad`; the second breaks, and the unread bytes are `bad` and what followed it.
        let (a, b) = stream.split_at(good.len() + 5);
        let mut d = Decoder::default();
        assert_eq!(d.feed(a).len(), 1);
        assert!(d.feed(b).is_empty());
        assert_eq!(d.broken(), Some(Broken::MessageCrc));
        assert_eq!(d.take_unread(), stream[good.len()..].to_vec());
        assert!(d.take_unread().is_empty());
        assert!(d.feed(&good).is_empty() && d.take_unread().is_empty(), "later chunks are not kept");
        // A stream cut mid-message: the unfinished message is unread.
        let mut d = Decoder::default();
        assert!(d.feed(&good[..10]).is_empty());
        assert_eq!(d.take_unread(), good[..10].to_vec());
        assert_eq!(d.pending(), 0);
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
            let again: Vec<u8> = got.iter().flat_map(|m| encode_raw(&m.headers_raw, &m.payload)).collect();
            assert_eq!(again, stream, "split {split}: re-encoded byte for byte");
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
            let bytes = crate::testing::pseudo_random_bytes(&mut x, len);
            let _ = Decoder::default().feed(&bytes);
        }
    }
}
