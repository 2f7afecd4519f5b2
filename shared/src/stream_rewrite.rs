//! Rewriting the text of a streamed LLM answer (SSE) on the fly, for filters that replace pieces of
//! what the model writes (restoring masked values, redacting leaks).
//!
//! The hard part is that a piece to replace can be cut across two deltas (two SSE events) or two
//! network chunks. [`SseTextRewriter`] handles both:
//! - network chunks: the shared [`SseParser`] only dispatches complete events;
//! - deltas: text is rewritten per *channel* (one per choice / content block / tool call), and a
//!   [`TextRewrite`] says how much of the pending text is safe to emit; the rest (a possible prefix of
//!   something to replace) is held back and prepended to the next delta of the same channel. Before an
//!   event that ends the deltas (OpenAI `finish_reason` chunk, Anthropic `content_block_stop`,
//!   Responses `*.done` / `response.completed`, `[DONE]`, end of stream), held text is flushed in a
//!   synthetic delta event cloned from the channel's last delta, so nothing is lost or reordered.
//!
//! Non-delta strings (ids, full texts in `response.completed`, ...) are rewritten whole. Text is
//! handled decoded (JSON escapes resolved), so `\u003cEMAIL_1\u003e` is seen as `<EMAIL_1>`.

use crate::llm::extract_stream_delta_texts;
use crate::sse::{encode_event, SseEvent, SseParser};
use serde_json::Value;
use std::collections::BTreeMap;

/// A text transformation applied to streamed text.
pub trait TextRewrite {
    /// How many bytes at the start of `pending` (a char boundary) may be emitted now; the rest is held
    /// back until the channel's next delta or its end. Return `pending.len()` to hold nothing.
    fn ready_len(&self, pending: &str) -> usize;
    /// Rewrite final text; `None` when unchanged.
    fn rewrite(&mut self, text: &str) -> Option<String>;
}

/// JSON pointers of the streamed text deltas in one event: the content deltas of
/// [`extract_stream_delta_texts`] plus tool-call argument deltas (OpenAI `tool_calls[].function.arguments`,
/// Anthropic `input_json_delta.partial_json`, Responses `response.function_call_arguments.delta`).
pub fn stream_delta_pointers(event: &Value) -> Vec<String> {
    let mut out: Vec<String> = extract_stream_delta_texts(event).into_iter().map(|s| s.pointer).collect();
    if let Some(choices) = event.get("choices").and_then(Value::as_array) {
        for (i, c) in choices.iter().enumerate() {
            if let Some(calls) = c.pointer("/delta/tool_calls").and_then(Value::as_array) {
                for (j, call) in calls.iter().enumerate() {
                    if call.pointer("/function/arguments").is_some_and(Value::is_string) {
                        out.push(format!("/choices/{i}/delta/tool_calls/{j}/function/arguments"));
                    }
                }
            }
        }
    }
    match event.get("type").and_then(Value::as_str) {
        Some("content_block_delta") if event.pointer("/delta/partial_json").is_some_and(Value::is_string) => {
            out.push("/delta/partial_json".to_string())
        }
        Some("response.function_call_arguments.delta") if event.get("delta").is_some_and(Value::is_string) => {
            out.push("/delta".to_string())
        }
        _ => {}
    }
    out
}

/// Events that carry no text but must not flush held text (keep-alives).
fn is_keepalive(event: &Value) -> bool {
    matches!(event.get("type").and_then(Value::as_str), Some("ping"))
}

/// One delta stream: the text held back and the last event to clone for a flush.
#[derive(Debug)]
struct Channel {
    held: String,
    template: Value,
    pointer: String,
    event_name: Option<String>,
    order: u64,
}

/// Incremental SSE rewriter; feed network chunks, get bytes to send.
#[derive(Debug, Default)]
pub struct SseTextRewriter {
    parser: SseParser,
    channels: BTreeMap<String, Channel>,
    seq: u64,
    /// Events whose data was not JSON (passed through, rewritten whole).
    pub non_json_events: u64,
}

/// The pointer with each array position replaced by the element's own `index` field when it has one
/// (`/choices/0/delta/content` of `{"choices":[{"index":1,..}]}` is `/choices/#1/delta/content`). With
/// `n > 1` OpenAI and vLLM send one choice per chunk, always at position 0, and `index` says which
/// (Gemini `candidates[].index` alike; tool-call deltas `tool_calls[].index` too): the position alone
/// would mix the choices' texts.
fn logical_pointer(event: &Value, pointer: &str) -> String {
    let mut key = String::with_capacity(pointer.len() + 4);
    let mut cur = Some(event);
    for seg in pointer.split('/').skip(1) {
        key.push('/');
        let next = match cur {
            Some(Value::Array(items)) => seg.parse::<usize>().ok().and_then(|n| items.get(n)),
            Some(Value::Object(m)) => m.get(seg),
            _ => None,
        };
        match (cur, next.and_then(|x| x.get("index")).filter(|i| i.is_number())) {
            (Some(Value::Array(_)), Some(idx)) => {
                key.push('#');
                key.push_str(&idx.to_string());
            }
            _ => key.push_str(seg),
        }
        cur = next;
    }
    key
}

fn channel_key(event: &Value, pointer: &str) -> String {
    let mut key = logical_pointer(event, pointer);
    for f in ["index", "output_index", "content_index"] {
        if let Some(v) = event.get(f) {
            key.push('#');
            key.push_str(&v.to_string());
        }
    }
    key
}

/// A chunk without deltas whose `choices` / `candidates` are all present (a `finish_reason` chunk of
/// one choice): the channel prefixes of those choices. `None` for anything else (flush everything).
fn finishing_choices(event: &Value) -> Option<Vec<String>> {
    for arr in ["choices", "candidates"] {
        if let Some(items) = event.get(arr).and_then(Value::as_array) {
            if items.is_empty() {
                return None;
            }
            let mut out = Vec::with_capacity(items.len());
            for n in 0..items.len() {
                out.push(format!("{}/", logical_pointer(event, &format!("/{arr}/{n}"))));
            }
            return Some(out);
        }
    }
    None
}

impl SseTextRewriter {
    pub fn new(max_event_bytes: usize) -> Self {
        Self { parser: SseParser::new(max_event_bytes), ..Self::default() }
    }

    /// Bytes held back (incomplete lines/events and held delta text).
    pub fn buffered_bytes(&self) -> usize {
        self.parser.buffered_bytes() + self.channels.values().map(|c| c.held.len()).sum::<usize>()
    }

    pub fn oversized_events(&self) -> u64 {
        self.parser.oversized_events()
    }

    /// Feed one network chunk; returns what can be sent now.
    pub fn feed(&mut self, chunk: &[u8], rw: &mut dyn TextRewrite) -> Vec<u8> {
        let mut events = Vec::new();
        self.parser.feed_with(chunk, |e| events.push(e));
        let mut out = Vec::with_capacity(chunk.len() + 64);
        for e in events {
            self.on_event(e, rw, &mut out);
        }
        out
    }

    /// End of the stream: a last unterminated event, then every held text.
    pub fn finish(&mut self, rw: &mut dyn TextRewrite) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(e) = self.parser.finish() {
            self.on_event(e, rw, &mut out);
        }
        self.flush_all(rw, &mut out);
        out
    }

    fn flush_all(&mut self, rw: &mut dyn TextRewrite, out: &mut Vec<u8>) {
        self.flush_where(rw, out, |_| true);
    }

    fn flush_where(&mut self, rw: &mut dyn TextRewrite, out: &mut Vec<u8>, which: impl Fn(&str) -> bool) {
        let (flush, keep): (BTreeMap<String, Channel>, BTreeMap<String, Channel>) =
            std::mem::take(&mut self.channels).into_iter().partition(|(k, _)| which(k));
        self.channels = keep;
        let mut chans: Vec<Channel> = flush.into_values().collect();
        chans.sort_by_key(|c| c.order);
        for mut c in chans {
            if c.held.is_empty() {
                continue;
            }
            let text = rw.rewrite(&c.held).unwrap_or_else(|| std::mem::take(&mut c.held));
            if let Some(slot) = c.template.pointer_mut(&c.pointer) {
                *slot = Value::String(text);
            }
            let data = c.template.to_string();
            out.extend_from_slice(encode_event(&SseEvent { event: c.event_name, data, id: None }).as_bytes());
        }
    }

    fn on_event(&mut self, e: SseEvent, rw: &mut dyn TextRewrite, out: &mut Vec<u8>) {
        let mut v: Value = match serde_json::from_str(&e.data) {
            Ok(v) => v,
            Err(_) => {
                self.flush_all(rw, out);
                if e.is_done_marker() {
                    out.extend_from_slice(encode_event(&e).as_bytes());
                } else {
                    self.non_json_events += 1;
                    let data = rw.rewrite(&e.data).unwrap_or(e.data);
                    out.extend_from_slice(encode_event(&SseEvent { data, ..e }).as_bytes());
                }
                return;
            }
        };
        let pointers = stream_delta_pointers(&v);
        if pointers.is_empty() && !is_keepalive(&v) {
            match finishing_choices(&v) {
                // One choice's finish chunk (n > 1): flush that choice's text only; the others go on.
                Some(prefixes) => self.flush_where(rw, out, |key| prefixes.iter().any(|p| key.starts_with(p))),
                None => self.flush_all(rw, out),
            }
        }
        // Take the deltas out, rewrite the remaining strings whole, then put the deltas back.
        let mut deltas: Vec<(String, String)> = Vec::with_capacity(pointers.len());
        for p in &pointers {
            if let Some(Value::String(s)) = v.pointer_mut(p) {
                deltas.push((p.clone(), std::mem::take(s)));
            }
        }
        let mut changed = rewrite_strings(&mut v, rw);
        let mut blank_template: Option<Value> = None;
        for (p, text) in deltas {
            let key = channel_key(&v, &p);
            let held = self.channels.get_mut(&key).map(|c| std::mem::take(&mut c.held)).unwrap_or_default();
            let had_held = !held.is_empty();
            let pending = if had_held { held + &text } else { text };
            let mut cut = rw.ready_len(&pending).min(pending.len());
            while !pending.is_char_boundary(cut) {
                cut -= 1;
            }
            let (now, later) = pending.split_at(cut);
            let emitted = rw.rewrite(now).unwrap_or_else(|| now.to_string());
            if had_held || !later.is_empty() || emitted != pending {
                changed = true;
            }
            if !later.is_empty() {
                // Remember a template of this event (all deltas blank) to flush the held text later.
                let template = blank_template.get_or_insert_with(|| {
                    let mut t = v.clone();
                    for q in &pointers {
                        if let Some(slot) = t.pointer_mut(q) {
                            *slot = Value::String(String::new());
                        }
                    }
                    t
                });
                self.seq += 1;
                let order = self.seq;
                let c = self.channels.entry(key).or_insert_with(|| Channel {
                    held: String::new(),
                    template: Value::Null,
                    pointer: p.clone(),
                    event_name: e.event.clone(),
                    order,
                });
                c.held = later.to_string();
                c.template = template.clone();
                c.pointer = p.clone();
                c.event_name = e.event.clone();
            }
            if let Some(slot) = v.pointer_mut(&p) {
                *slot = Value::String(emitted);
            }
        }
        if changed {
            let data = v.to_string();
            out.extend_from_slice(encode_event(&SseEvent { event: e.event, data, id: e.id }).as_bytes());
        } else {
            out.extend_from_slice(encode_event(&e).as_bytes());
        }
    }
}

/// Rewrite every string value (not keys) in `v`; true if any changed.
pub fn rewrite_strings(v: &mut Value, rw: &mut dyn TextRewrite) -> bool {
    match v {
        Value::String(s) => match rw.rewrite(s) {
            Some(n) => {
                *s = n;
                true
            }
            None => false,
        },
        Value::Array(a) => a.iter_mut().fold(false, |acc, x| rewrite_strings(x, rw) | acc),
        Value::Object(o) => o.values_mut().fold(false, |acc, x| rewrite_strings(x, rw) | acc),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    /// Replaces "AB" with "xy"; holds back a trailing "A".
    struct Ab;
    impl TextRewrite for Ab {
        fn ready_len(&self, p: &str) -> usize {
            if p.ends_with('A') {
                p.len() - 1
            } else {
                p.len()
            }
        }
        fn rewrite(&mut self, t: &str) -> Option<String> {
            t.contains("AB").then(|| t.replace("AB", "xy"))
        }
    }

    fn deltas(out: &[u8]) -> String {
        let mut p = SseParser::default();
        let mut s = String::new();
        for e in p.feed(out) {
            if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
                for t in extract_stream_delta_texts(&v) {
                    s.push_str(&t.text);
                }
            }
        }
        s
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn split_across_events_and_chunks() {
        let chunk =
            |t: &str| format!("data: {}\n\n", serde_json::json!({"choices":[{"index":0,"delta":{"content":t}}]}));
        let stream = format!(
            "{}{}{}{}data: [DONE]\n\n",
            chunk("hello A"),
            chunk("B and A"),
            chunk("C"),
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"
        );
        let bytes = stream.as_bytes();
        for cut in 0..bytes.len() {
            let mut rw = SseTextRewriter::default();
            let (a, b) = bytes.split_at(cut);
            let mut out = rw.feed(a, &mut Ab);
            out.extend(rw.feed(b, &mut Ab));
            out.extend(rw.finish(&mut Ab));
            assert_eq!(deltas(&out), "hello xy and AC", "cut {cut}: {}", String::from_utf8_lossy(&out));
            let text = String::from_utf8(out).unwrap();
            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn choices_of_n_gt_1_are_separate_channels() {
        // OpenAI / vLLM with n=2: one choice per chunk at position 0, `index` alternating; choice 0's
        // "A" + "B" must join, never choice 1's. Choice 1 finishes first: only its held text is flushed.
        let c = |i: u32, t: &str| {
            format!("data: {}\n\n", serde_json::json!({"choices":[{"index":i,"delta":{"content":t}}]}))
        };
        let fin = |i: u32| {
            format!("data: {}\n\n", serde_json::json!({"choices":[{"index":i,"delta":{},"finish_reason":"stop"}]}))
        };
        let stream = format!(
            "{}{}{}{}{}{}{}data: [DONE]\n\n",
            c(0, "zero A"),
            c(1, "one A"),
            c(0, "B zero"),
            c(1, "C one A"),
            fin(1),
            c(0, " A"),
            c(0, "B")
        );
        let mut rw = SseTextRewriter::default();
        let mut out = rw.feed(stream.as_bytes(), &mut Ab);
        out.extend(rw.finish(&mut Ab));
        let mut per = [String::new(), String::new()];
        for e in SseParser::default().feed(&out) {
            if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
                let i = v.pointer("/choices/0/index").and_then(Value::as_u64).unwrap() as usize;
                per[i].push_str(v.pointer("/choices/0/delta/content").and_then(Value::as_str).unwrap_or(""));
            }
        }
        assert_eq!(
            per,
            ["zero xy zero xy".to_string(), "one AC one A".to_string()],
            "{}",
            String::from_utf8_lossy(&out)
        );
        // Gemini candidates and tool calls streamed one after the other, each at position 0.
        let mut rw = SseTextRewriter::default();
        let s = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"x A\"}}]}}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"arguments\":\"B\"}}]}}]}\n\n";
        let out = String::from_utf8(rw.feed(s.as_bytes(), &mut Ab)).unwrap();
        assert!(!out.contains("xy"), "a tool call's tail is not joined to the next call: {out}");
        assert_eq!(
            logical_pointer(
                &serde_json::json!({"candidates":[{"index":3,"content":{"parts":[{"text":"t"}]}}]}),
                "/candidates/0/content/parts/0/text"
            ),
            "/candidates/#3/content/parts/0/text"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn held_text_flushed_at_end_and_before_block_stop() {
        let mut rw = SseTextRewriter::default();
        let s = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"end A\"}}\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\nevent: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n";
        let out = rw.feed(s.as_bytes(), &mut Ab);
        let text = String::from_utf8(out).unwrap();
        let flush = text.find("\"text\":\"A\"").unwrap();
        assert!(flush < text.find("content_block_stop").unwrap(), "{text}");
        assert!(text.find("ping").unwrap() < flush, "ping does not flush: {text}");
        assert_eq!(deltas(text.as_bytes()), "end A");
        assert!(rw.finish(&mut Ab).is_empty());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn escapes_and_tool_arguments() {
        let mut rw = SseTextRewriter::default();
        let s = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"to\\\":\\\"\\u0041\"}}]}}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"B\\\"}\"}}]}}]}\n\n";
        let mut out = rw.feed(s.as_bytes(), &mut Ab);
        out.extend(rw.finish(&mut Ab));
        let mut args = String::new();
        for e in SseParser::default().feed(&out) {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            args.push_str(
                v.pointer("/choices/0/delta/tool_calls/0/function/arguments").and_then(Value::as_str).unwrap(),
            );
        }
        assert_eq!(args, "{\"to\":\"xy\"}");
    }
}
