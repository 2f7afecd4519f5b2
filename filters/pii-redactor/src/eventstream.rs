//! Restoring placeholders in Bedrock streamed answers (`application/vnd.amazon.eventstream`): the AWS
//! binary event stream of `ConverseStream` and `InvokeModelWithResponseStream`.
//!
//! Every message is decoded by the shared [`Decoder`] (both CRCs checked; a message cut across network
//! chunks is held until it is complete), its text rewritten, and re-encoded with [`encode_raw`]: the
//! headers byte for byte, a new prelude and new CRCs. A message whose text does not change is written
//! back with its own payload, which gives the original bytes.
//!
//! - `ConverseStream`: `contentBlockDelta` payloads `{"contentBlockIndex":N,"delta":{"text":..}}`, also
//!   `delta.reasoningContent.text` and `delta.toolUse.input` (a string of JSON).
//! - `InvokeModelWithResponseStream`: `chunk` payloads `{"bytes":"<base64>"}`; the decoded model event
//!   (Anthropic `content_block_delta` with `delta.text` / `delta.partial_json`, OpenAI-shaped chunks) is
//!   rewritten and encoded back into `bytes`.
//!
//! A placeholder cut across two deltas is handled as in SSE streams: per channel (the pointer of the
//! text plus `contentBlockIndex` / `index`), only a tail that may start a placeholder is held back and
//! prepended to the channel's next delta. Held text is flushed in a synthetic message cloned from the
//! channel's last delta (same headers, other texts blank) before any message that is not a delta
//! (`contentBlockStop`, `messageStop`, `metadata`, an exception, ...; Anthropic `ping` excepted), before
//! the bytes of a broken stream, and at the end of the stream. Other strings of a message are rewritten
//! whole.
//!
//! Broken framing (a CRC mismatch, a length over 1 MiB, a bad header): held text is flushed, then the
//! bytes from the broken message on, and every later chunk, are passed as they are ([`Self::broken`]).

use crate::restore::Restorer;
use meshwarden_shared::encoding::{base64_decode, base64_encode};
use meshwarden_shared::eventstream::{encode_raw, Broken, Decoder, Message};
use meshwarden_shared::stream_rewrite::DeltaChannels;
use serde_json::Value;

/// The JSON of one message.
#[derive(Debug, Clone)]
enum Body {
    /// `ConverseStream`: the payload is the event.
    Plain(Value),
    /// `InvokeModelWithResponseStream` `chunk`: the payload (`{"bytes":..}`) and the decoded event.
    Chunk { wrapper: Value, inner: Value },
}

impl Body {
    fn parse(m: &Message) -> Option<Body> {
        if matches!(m.message_type.as_deref(), Some("exception" | "error")) {
            return None;
        }
        let v: Value = serde_json::from_slice(&m.payload).ok()?;
        if m.event_type.as_deref() == Some("chunk") {
            let bytes = v.get("bytes").and_then(Value::as_str).and_then(|b| base64_decode(b).ok())?;
            let inner = serde_json::from_slice(&bytes).ok()?;
            return Some(Body::Chunk { wrapper: v, inner });
        }
        Some(Body::Plain(v))
    }

    #[cfg(test)]
    fn event(&self) -> &Value {
        match self {
            Body::Plain(v) | Body::Chunk { inner: v, .. } => v,
        }
    }

    fn event_mut(&mut self) -> &mut Value {
        match self {
            Body::Plain(v) | Body::Chunk { inner: v, .. } => v,
        }
    }

    fn into_payload(self) -> Vec<u8> {
        match self {
            Body::Plain(v) => serde_json::to_vec(&v).unwrap_or_default(),
            Body::Chunk { mut wrapper, inner } => {
                let encoded = base64_encode(&serde_json::to_vec(&inner).unwrap_or_default());
                if let Some(slot) = wrapper.get_mut("bytes") {
                    *slot = Value::String(encoded);
                }
                serde_json::to_vec(&wrapper).unwrap_or_default()
            }
        }
    }
}

/// How to send a flush: the headers of the channel's last delta message, and for an
/// `InvokeModelWithResponseStream` chunk its wrapper (`bytes` blank; re-encoded on flush).
#[derive(Debug, Clone)]
struct Meta {
    headers_raw: Vec<u8>,
    wrapper: Option<Value>,
}

/// Restores one Bedrock event stream, chunk by chunk.
#[derive(Debug, Default)]
pub struct EventStreamRestore {
    decoder: Decoder,
    /// The held texts, per channel: the logic of SSE streams ([`DeltaChannels`]).
    channels: DeltaChannels<Meta>,
    /// Why the framing broke, if it did: from there on the stream is passed as it is.
    pub broken: Option<Broken>,
    /// Messages re-encoded with a changed payload (restored text, or a flush).
    pub rewritten: u64,
}

impl EventStreamRestore {
    /// Feed one network chunk (`end`: the last one); returns the bytes to send now.
    pub fn feed(&mut self, r: &mut Restorer, chunk: &[u8], end: bool) -> Vec<u8> {
        if self.broken.is_some() {
            return chunk.to_vec();
        }
        let mut out = Vec::with_capacity(chunk.len() + 64);
        for m in self.decoder.feed(chunk) {
            self.on_message(m, r, &mut out);
        }
        if let Some(b) = self.decoder.broken() {
            self.broken = Some(b);
            self.flush_all(r, &mut out);
            out.extend(self.decoder.take_unread());
        } else if end {
            self.flush_all(r, &mut out);
            // A stream cut mid-message: its bytes as they came.
            out.extend(self.decoder.take_unread());
        }
        out
    }

    fn flush_all(&mut self, r: &mut Restorer, out: &mut Vec<u8>) {
        let mut flushes = Vec::new();
        self.channels.flush_all(r, &mut flushes);
        self.write_flushes(flushes, out);
    }

    fn write_flushes(&mut self, flushes: Vec<(Meta, Value)>, out: &mut Vec<u8>) {
        for (meta, event) in flushes {
            let body = match meta.wrapper {
                Some(wrapper) => Body::Chunk { wrapper, inner: event },
                None => Body::Plain(event),
            };
            out.extend(encode_raw(&meta.headers_raw, &body.into_payload()));
            self.rewritten += 1;
        }
    }

    fn on_message(&mut self, m: Message, r: &mut Restorer, out: &mut Vec<u8>) {
        let Some(mut body) = Body::parse(&m) else {
            // An exception, or a payload that is not JSON: it ends any text in flight; passed as it is.
            self.flush_all(r, out);
            out.extend(encode_raw(&m.headers_raw, &m.payload));
            return;
        };
        let wrapper = match &body {
            Body::Plain(_) => None,
            Body::Chunk { wrapper, .. } => {
                let mut w = wrapper.clone();
                if let Some(slot) = w.get_mut("bytes") {
                    *slot = Value::String(String::new());
                }
                Some(w)
            }
        };
        let meta = Meta { headers_raw: m.headers_raw.clone(), wrapper };
        let mut flushes = Vec::new();
        let changed = self.channels.on_event(body.event_mut(), &meta, m.payload.len(), r, &mut flushes);
        self.write_flushes(flushes, out);
        if changed {
            self.rewritten += 1;
            out.extend(encode_raw(&m.headers_raw, &body.into_payload()));
        } else {
            out.extend(encode_raw(&m.headers_raw, &m.payload));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::{Engine, MaskState};
    use meshwarden_shared::config::parse_config;
    use meshwarden_shared::eventstream::encode;
    use meshwarden_shared::stream_rewrite::{channel_key, stream_delta_pointers as delta_pointers};
    use serde_json::json;
    use std::collections::HashMap;
    use std::rc::Rc;

    fn event(kind: &str, payload: &Value) -> Vec<u8> {
        encode(
            &[(":event-type", kind), (":content-type", "application/json"), (":message-type", "event")],
            payload.to_string().as_bytes(),
        )
    }

    fn chunk(inner: &Value) -> Vec<u8> {
        event("chunk", &json!({"bytes": base64_encode(inner.to_string().as_bytes()), "p": "abcdefgh"}))
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    /// Decode a whole output: every frame valid, nothing left over; the messages.
    fn decode_all(out: &[u8]) -> Vec<Message> {
        let mut d = Decoder::default();
        let msgs = d.feed(out);
        assert_eq!((d.broken(), d.pending()), (None, 0), "output frames are valid");
        msgs
    }

    /// Text per channel (`<pointer>#<index>`) of decoded messages, in order.
    fn texts(msgs: &[Message]) -> HashMap<String, String> {
        let mut t: HashMap<String, String> = HashMap::new();
        for m in msgs {
            let Some(b) = Body::parse(m) else { continue };
            for p in delta_pointers(b.event()) {
                let s = b.event().pointer(&p).and_then(Value::as_str).unwrap();
                t.entry(channel_key(b.event(), &p)).or_default().push_str(s);
            }
        }
        t
    }

    /// Feed `wire` cut at `cut`, then the rest with `end`.
    fn run(r: &mut Restorer, wire: &[u8], cut: usize) -> (Vec<u8>, EventStreamRestore) {
        let mut s = EventStreamRestore::default();
        let (a, b) = wire.split_at(cut);
        let mut out = s.feed(r, a, false);
        out.extend(s.feed(r, b, true));
        (out, s)
    }

    /// restore(mask(x)) == x in ConverseStream text, reasoning and tool-input channels streamed in
    /// 3-character deltas (placeholders cut across events), the wire cut at every 7th byte (every byte
    /// takes 20 s in a debug build); the messages without text come out byte for byte, in order.
    #[test]
    fn converse_stream_restored_at_every_split() {
        let engine = Engine::new(&parse_config::<Config>(b"{}").unwrap());
        let x = "Mail john.doe@example.com or call (415) 555-2671; card 4111 1111 1111 1111, é 日本.";
        let mut st = MaskState::default();
        st.reserve_lookalikes(x.as_bytes());
        let masked = String::from_utf8(st.mask(&engine, x.as_bytes()).unwrap()).unwrap();
        assert!(masked.contains("<EMAIL_1>") && masked.contains("<CREDIT_CARD_1>"), "{masked}");
        let chars: Vec<char> = masked.chars().collect();
        let pieces: Vec<String> = chars.chunks(3).map(|c| c.iter().collect()).collect();
        let start = event("messageStart", &json!({"role":"assistant"}));
        let metadata = event("metadata", &json!({"usage":{"inputTokens":5,"outputTokens":9,"totalTokens":14}}));
        let mut wire = start.clone();
        for p in &pieces {
            wire.extend(event(
                "contentBlockDelta",
                &json!({"contentBlockIndex":0,"delta":{"reasoningContent":{"text":p}}}),
            ));
            wire.extend(event("contentBlockDelta", &json!({"contentBlockIndex":1,"delta":{"text":p},"p":"abc"})));
        }
        wire.extend(event("contentBlockStop", &json!({"contentBlockIndex":1})));
        let args = serde_json::to_string(&json!({"to": masked})).unwrap();
        for p in args.chars().collect::<Vec<_>>().chunks(4) {
            let p: String = p.iter().collect();
            wire.extend(event("contentBlockDelta", &json!({"contentBlockIndex":2,"delta":{"toolUse":{"input":p}}})));
        }
        wire.extend(event("contentBlockStop", &json!({"contentBlockIndex":2})));
        wire.extend(event("messageStop", &json!({"stopReason":"tool_use"})));
        wire.extend(&metadata);
        for cut in (0..=wire.len()).step_by(7) {
            let mut r = Restorer::new(st.restore.clone(), None);
            let (out, s) = run(&mut r, &wire, cut);
            assert_eq!(s.broken, None);
            let msgs = decode_all(&out);
            let t = texts(&msgs);
            assert_eq!(t["/delta/reasoningContent/text#0"], x, "cut {cut}");
            assert_eq!(t["/delta/text#1"], x, "cut {cut}");
            let input: Value = serde_json::from_str(&t["/delta/toolUse/input#2"]).unwrap();
            assert_eq!(input["to"], x, "cut {cut}");
            assert!(!String::from_utf8_lossy(&out).contains("<EMAIL_1>"), "cut {cut}");
            // Messages without text: byte for byte, first and last.
            assert!(out.starts_with(&start) && out.ends_with(&metadata), "cut {cut}");
            // Every delta kept its headers; the stop events come after the last delta of their block.
            let kinds: Vec<&str> = msgs.iter().map(|m| m.event_type.as_deref().unwrap()).collect();
            let last_delta = kinds.iter().rposition(|k| *k == "contentBlockDelta").unwrap();
            assert!(kinds[last_delta + 1..] == ["contentBlockStop", "messageStop", "metadata"], "{kinds:?}");
        }
    }

    /// InvokeModelWithResponseStream: Anthropic events base64-encoded in `chunk` payloads; a placeholder
    /// cut across two deltas with a `ping` between them (a keep-alive does not flush) is restored.
    #[test]
    fn invoke_model_chunks_restored() {
        let inner = |t: &str| json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":t}});
        let mut wire =
            chunk(&json!({"type":"message_start","message":{"role":"assistant","usage":{"input_tokens":3}}}));
        wire.extend(chunk(&json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}})));
        wire.extend(chunk(&inner("Mail <EMA")));
        wire.extend(chunk(&json!({"type":"ping"})));
        wire.extend(chunk(&inner("IL_1> or <PHO")));
        wire.extend(chunk(&inner("NE_1>.")));
        wire.extend(chunk(&json!({"type":"content_block_stop","index":0})));
        wire.extend(chunk(&json!({"type":"message_stop","amazon-bedrock-invocationMetrics":{"outputTokenCount":9}})));
        for cut in 0..=wire.len() {
            let mut r = Restorer::new(map(&[("<EMAIL_1>", "bob@corp.io"), ("<PHONE_1>", "415-555-2671")]), None);
            let (out, _) = run(&mut r, &wire, cut);
            let msgs = decode_all(&out);
            assert_eq!(msgs.len(), 8, "no flush message was needed");
            assert_eq!(texts(&msgs)["/delta/text#0"], "Mail bob@corp.io or 415-555-2671.", "cut {cut}");
            assert_eq!(r.restored, 2);
            let last = msgs.last().unwrap().event_json().unwrap();
            assert_eq!(last["amazon-bedrock-invocationMetrics"]["outputTokenCount"], 9);
            // The wrapper's other fields are kept.
            let w: Value = serde_json::from_slice(&msgs[2].payload).unwrap();
            assert_eq!(w["p"], "abcdefgh");
        }
    }

    #[test]
    fn held_text_flushed_before_block_stop_at_end_and_before_exceptions() {
        let delta = |t: &str| event("contentBlockDelta", &json!({"contentBlockIndex":0,"delta":{"text":t}}));
        let m = map(&[("<EMAIL_1>", "bob@corp.io")]);
        // Before contentBlockStop: a synthetic delta with the held "<EMA" (not a placeholder after all).
        let stop = event("contentBlockStop", &json!({"contentBlockIndex":0}));
        let mut wire = delta("a <EMA");
        wire.extend(&stop);
        let mut r = Restorer::new(m.clone(), None);
        let (out, _) = run(&mut r, &wire, wire.len());
        let msgs = decode_all(&out);
        let kinds: Vec<_> = msgs.iter().map(|m| m.event_type.clone().unwrap()).collect();
        assert_eq!(kinds, ["contentBlockDelta", "contentBlockDelta", "contentBlockStop"]);
        assert_eq!(texts(&msgs)["/delta/text#0"], "a <EMA");
        assert!(out.ends_with(&stop));
        // At the end of a stream without any stop event.
        let wire = delta("a <EMAIL_");
        let mut r = Restorer::new(m.clone(), None);
        let mut s = EventStreamRestore::default();
        let first = s.feed(&mut r, &wire, false);
        assert_eq!(texts(&decode_all(&first))["/delta/text#0"], "a ");
        let last = s.feed(&mut r, &[], true);
        assert_eq!(texts(&decode_all(&last))["/delta/text#0"], "<EMAIL_");
        // An exception: held text first, then the exception byte for byte.
        let exc = encode(
            &[(":exception-type", "throttlingException"), (":message-type", "exception")],
            br#"{"message":"slow down <EMAIL_1>"}"#,
        );
        let mut wire = delta("x <EMAIL");
        wire.extend(&exc);
        let mut r = Restorer::new(m, None);
        let (out, _) = run(&mut r, &wire, 3);
        assert!(out.ends_with(&exc), "exceptions pass unchanged");
        assert_eq!(texts(&decode_all(&out))["/delta/text#0"], "x <EMAIL");
    }

    #[test]
    fn answers_without_placeholders_pass_byte_for_byte() {
        let mut wire = event("messageStart", &json!({"role":"assistant"}));
        wire.extend(event("contentBlockDelta", &json!({"contentBlockIndex":0,"delta":{"text":"a < b, <div>"}})));
        wire.extend(chunk(&json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"<b>"}})));
        wire.extend(event("metadata", &json!({"usage":{"inputTokens":1}})));
        for cut in 0..=wire.len() {
            let mut r = Restorer::new(map(&[("<EMAIL_1>", "bob@corp.io")]), None);
            let (out, s) = run(&mut r, &wire, cut);
            assert_eq!(out, wire, "cut {cut}");
            assert_eq!(s.rewritten, 0);
        }
    }

    /// A CRC mismatch or an oversized length: held text flushed, then the rest passed as it is, later
    /// chunks too; never a panic. A stream cut mid-message ends with its bytes as they came.
    #[test]
    fn broken_or_cut_framing_passes_the_rest_unchanged() {
        let delta = |t: &str| event("contentBlockDelta", &json!({"contentBlockIndex":0,"delta":{"text":t}}));
        let m = map(&[("<EMAIL_1>", "bob@corp.io")]);
        let mut bad = delta("<EMAIL_1> again");
        let n = bad.len();
        bad[n - 7] ^= 1;
        let tail = delta("<EMAIL_1> later");
        let mut wire = delta("hi <EMAIL_1> <EMA");
        let good_len = wire.len();
        wire.extend(&bad);
        wire.extend(&tail);
        let mut r = Restorer::new(m.clone(), None);
        let mut s = EventStreamRestore::default();
        let mut out = s.feed(&mut r, &wire[..good_len + 20], false);
        out.extend(s.feed(&mut r, &wire[good_len + 20..], false));
        out.extend(s.feed(&mut r, b"more", true));
        assert_eq!(s.broken, Some(Broken::MessageCrc));
        let mut d = Decoder::default();
        let msgs = d.feed(&out);
        assert_eq!(d.broken(), Some(Broken::MessageCrc), "the broken message is passed as it came");
        assert_eq!(texts(&msgs)["/delta/text#0"], "hi bob@corp.io <EMA");
        let mut rest = bad.clone();
        rest.extend(&tail);
        rest.extend(b"more");
        assert!(out.ends_with(&rest));
        // A valid prelude announcing more than 1 MiB.
        let mut huge = (2u32 * 1024 * 1024).to_be_bytes().to_vec();
        huge.extend_from_slice(&0u32.to_be_bytes());
        let c = meshwarden_shared::eventstream::crc32(&huge);
        huge.extend_from_slice(&c.to_be_bytes());
        huge.extend_from_slice(b"<EMAIL_1>");
        let mut r = Restorer::new(m.clone(), None);
        let (out, s) = run(&mut r, &huge, 5);
        assert_eq!((out, s.broken), (huge.clone(), Some(Broken::Length)));
        // Cut mid-message.
        let mut wire = delta("<EMAIL_1>");
        let whole = wire.len();
        wire.extend(&delta("<EMAIL_1>")[..20]);
        let mut r = Restorer::new(m.clone(), None);
        let (out, s) = run(&mut r, &wire, 7);
        assert_eq!(s.broken, None);
        assert_eq!(texts(&decode_all(&out[..out.len() - 20]))["/delta/text#0"], "bob@corp.io");
        assert_eq!(out[out.len() - 20..], wire[whole..]);
        // Random bytes at every length and cut never panic.
        let mut x = 0x2545_f491u32;
        for len in 0..120 {
            let bytes = meshwarden_shared::testing::pseudo_random_bytes(&mut x, len);
            let mut r = Restorer::new(m.clone(), None);
            let (out, _) = run(&mut r, &bytes, len / 2);
            assert_eq!(out, bytes);
        }
    }

    #[test]
    fn response_scanning_applies_to_event_streams() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let mut wire = Vec::new();
        for t in ["Write to bob@le", "ak.example.org or <EMA", "IL_1> now", "."] {
            wire.extend(event("contentBlockDelta", &json!({"contentBlockIndex":0,"delta":{"text":t}})));
        }
        wire.extend(event("messageStop", &json!({"stopReason":"end_turn"})));
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine));
        let (out, _) = run(&mut r, &wire, wire.len());
        assert_eq!(texts(&decode_all(&out))["/delta/text#0"], "Write to [REDACTED] or me@x.io now.");
        assert_eq!(r.response_counts.summary(), "email=1");
    }

    fn rjj() -> Restorer {
        Restorer::new(map(&[("<EMAIL_1>", "bob@corp.io"), ("<NAME_1>", "Jane \"JJ\" Doe")]), None)
    }

    fn inner_events(out: &[u8]) -> Vec<Value> {
        decode_all(out).iter().filter_map(|m| m.event_json()).collect()
    }

    /// OpenAI-shaped chunks in InvokeModelWithResponseStream, n=2: one choice per chunk at position 0;
    /// choice 0's placeholder split across its deltas is restored and no text moves to choice 1. A
    /// `finish_reason` chunk of choice 1 flushes only choice 1.
    #[test]
    fn openai_choices_are_separate_channels() {
        let c = |i: u64, t: &str| chunk(&json!({"choices":[{"index":i,"delta":{"content":t}}]}));
        let fin = |i: u64| chunk(&json!({"choices":[{"index":i,"delta":{},"finish_reason":"stop"}]}));
        let mut wire = c(0, "a <EMA");
        wire.extend(c(1, "hello <EMA"));
        wire.extend(fin(1));
        wire.extend(c(0, "IL_1>"));
        wire.extend(fin(0));
        for cut in 0..=wire.len() {
            let mut r = rjj();
            let (out, _) = run(&mut r, &wire, cut);
            let mut per: HashMap<u64, String> = HashMap::new();
            for e in inner_events(&out) {
                let i = e.pointer("/choices/0/index").and_then(Value::as_u64).unwrap();
                let t = e.pointer("/choices/0/delta/content").and_then(Value::as_str).unwrap_or("");
                per.entry(i).or_default().push_str(t);
            }
            assert_eq!(per[&0], "a bob@corp.io", "cut {cut}");
            assert_eq!(per[&1], "hello <EMA", "cut {cut}");
            assert_eq!(r.restored, 1);
        }
    }

    #[test]
    fn openai_parallel_tool_calls_are_separate_channels() {
        let c = |i: u64, t: &str| {
            chunk(&json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":i,"function":{"arguments":t}}]}}]}))
        };
        let mut wire = c(0, "{\"to\":\"<EMA");
        wire.extend(c(1, "{\"q\":\"x\"}"));
        wire.extend(c(0, "IL_1>\"}"));
        let mut r = rjj();
        let (out, _) = run(&mut r, &wire, wire.len());
        let mut per: HashMap<u64, String> = HashMap::new();
        for e in inner_events(&out) {
            let i = e.pointer("/choices/0/delta/tool_calls/0/index").and_then(Value::as_u64).unwrap();
            let t = e.pointer("/choices/0/delta/tool_calls/0/function/arguments").and_then(Value::as_str).unwrap();
            per.entry(i).or_default().push_str(t);
        }
        assert_eq!(per[&1], "{\"q\":\"x\"}");
        assert_eq!(per[&0], "{\"to\":\"bob@corp.io\"}");
    }

    /// Anthropic thinking deltas and Amazon Nova text deltas through InvokeModelWithResponseStream.
    #[test]
    fn thinking_and_nova_deltas_restored_across_events() {
        let t = |x: &str| {
            chunk(&json!({"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":x}}))
        };
        let mut wire = t("user is <EMA");
        wire.extend(t("IL_1>."));
        let mut r = rjj();
        let (out, _) = run(&mut r, &wire, 0);
        let txt: String =
            inner_events(&out).iter().map(|e| e.pointer("/delta/thinking").and_then(Value::as_str).unwrap()).collect();
        assert_eq!(txt, "user is bob@corp.io.");
        let n = |x: &str| chunk(&json!({"contentBlockDelta":{"delta":{"text":x},"contentBlockIndex":0}}));
        let mut wire = n("hi <EMAIL");
        wire.extend(n("_1>!"));
        wire.extend(chunk(&json!({"contentBlockStop":{"contentBlockIndex":0}})));
        let mut r = rjj();
        let (out, _) = run(&mut r, &wire, 0);
        let txt: String = inner_events(&out)
            .iter()
            .filter_map(|e| e.pointer("/contentBlockDelta/delta/text").and_then(Value::as_str).map(str::to_string))
            .collect();
        assert_eq!(txt, "hi bob@corp.io!");
    }

    fn tool_input(out: &[u8]) -> String {
        inner_events(out)
            .iter()
            .filter_map(|e| e.pointer("/delta/toolUse/input").and_then(Value::as_str).map(str::to_string))
            .collect()
    }

    /// Tool input is JSON text: values JSON-escaped, `\u003c…\u003e` placeholders restored, also when
    /// split across deltas at every point.
    #[test]
    fn tool_input_restored_as_json() {
        let d = |x: &str| event("contentBlockDelta", &json!({"contentBlockIndex":0,"delta":{"toolUse":{"input":x}}}));
        let stop = event("contentBlockStop", &json!({"contentBlockIndex":0}));
        let input = "{\"name\":\"<NAME_1>\",\"to\":\"\\u003cEMAIL_1\\u003e\",\"cc\":\"\\u003Cemail_1\\u003E\"}";
        let chars: Vec<char> = input.chars().collect();
        for at in 0..=chars.len() {
            let (a, b) = chars.split_at(at);
            let mut wire = d(&a.iter().collect::<String>());
            wire.extend(d(&b.iter().collect::<String>()));
            wire.extend(&stop);
            let mut r = rjj();
            let (out, _) = run(&mut r, &wire, wire.len());
            let got = tool_input(&out);
            let v: Value = serde_json::from_str(&got).unwrap_or_else(|e| panic!("split {at}: {e}: {got}"));
            assert_eq!(v, json!({"name":"Jane \"JJ\" Doe","to":"bob@corp.io","cc":"<email_1>"}), "split {at}");
            assert_eq!(r.restored, 2, "split {at}");
        }
    }

    /// Many channels: linear time, at most `MAX_HELD_CHANNELS` holding text (the oldest flushed, in
    /// order), and a big event never kept as a template (its text is emitted whole).
    #[test]
    fn channels_bounded_in_number_time_and_memory() {
        use meshwarden_shared::stream_rewrite::MAX_HELD_CHANNELS;
        let n = 40_000u64;
        let mut wire = Vec::new();
        for i in 0..n {
            wire.extend(event("contentBlockDelta", &json!({"contentBlockIndex":i,"delta":{"text":"<"}})));
        }
        let mut s = EventStreamRestore::default();
        let mut r = rjj();
        let t = std::time::Instant::now();
        let mut out = s.feed(&mut r, &wire, false);
        assert!(s.channels.len() <= MAX_HELD_CHANNELS, "{}", s.channels.len());
        out.extend(s.feed(&mut r, &[], true));
        assert!(t.elapsed() < std::time::Duration::from_secs(8), "{:?}", t.elapsed());
        let msgs = decode_all(&out);
        assert_eq!(msgs.len() as u64, 2 * n, "every delta and one flush each");
        assert_eq!(texts(&msgs).values().map(String::len).sum::<usize>() as u64, n, "no text lost");
        let filler = "x".repeat(512 * 1024);
        let mut s = EventStreamRestore::default();
        let mut r = rjj();
        for i in 0..20u64 {
            let w = event("contentBlockDelta", &json!({"contentBlockIndex":i,"delta":{"text":"a <"},"f":filler}));
            let out = s.feed(&mut r, &w, false);
            assert_eq!(texts(&decode_all(&out))[&format!("/delta/text#{i}")], "a <");
            assert_eq!(s.channels.len(), 0);
        }
    }
}
