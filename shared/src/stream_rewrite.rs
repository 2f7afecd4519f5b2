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
//!   That logic is [`DeltaChannels`], shared with other transports (Bedrock event streams). At most
//!   [`MAX_HELD_CHANNELS`] channels hold text (the oldest is flushed past it), and an event over
//!   [`MAX_TEMPLATE_BYTES`] holds nothing back (no large template is kept).
//! - tool-call arguments are JSON text: they go through [`TextRewrite::rewrite_json`] /
//!   [`TextRewrite::ready_len_json`], so a replacement can keep them JSON.
//! - a rewriter that reads context (a scanner's context words before a value) says how much with
//!   [`TextRewrite::context_len`]: each channel keeps that much of the end of the text it emitted and
//!   hands it to [`TextRewrite::rewrite_after`] with the next piece, so a piece is judged as in the whole
//!   text.
//!
//! Non-delta strings (ids, full texts in `response.completed`, ...) are rewritten whole. Text is
//! handled decoded (JSON escapes resolved), so `\u003cEMAIL_1\u003e` is seen as `<EMAIL_1>`.

use crate::json;
use crate::llm::extract_stream_delta_texts;
use crate::sse::{encode_event, SseBlockSplitter, SseEvent, SseParser};
use serde_json::Value;
use std::collections::BTreeMap;

/// A text transformation applied to streamed text.
pub trait TextRewrite {
    /// How many bytes at the start of `pending` (a char boundary) may be emitted now; the rest is held
    /// back until the channel's next delta or its end. Return `pending.len()` to hold nothing.
    fn ready_len(&self, pending: &str) -> usize;
    /// Rewrite final text; `None` when unchanged.
    fn rewrite(&mut self, text: &str) -> Option<String>;
    /// [`Self::ready_len`] for streamed JSON text (tool-call arguments), where what is replaced may
    /// also be written with JSON escapes.
    fn ready_len_json(&self, pending: &str) -> usize {
        self.ready_len(pending)
    }
    /// [`Self::rewrite`] for streamed JSON text: a replacement must keep it JSON.
    fn rewrite_json(&mut self, text: &str) -> Option<String> {
        self.rewrite(text)
    }
    /// How many bytes of the text a channel already emitted [`Self::rewrite_after`] wants to read before
    /// its next piece (a scanner's context words); 0 keeps none.
    fn context_len(&self) -> usize {
        0
    }
    /// [`Self::rewrite`] (`json`: [`Self::rewrite_json`]) of `text`, which follows `before` on its channel:
    /// the end of the text emitted before it, as the source wrote it. `before` is read, never rewritten.
    fn rewrite_after(&mut self, before: &str, text: &str, json: bool) -> Option<String> {
        let _ = before;
        if json {
            self.rewrite_json(text)
        } else {
            self.rewrite(text)
        }
    }
    /// Whether an SSE event too large to read (over [`SseTextRewriter::new`]'s bound) may be passed on
    /// unread, as it came; `false` withholds it. A restorer can pass it (a placeholder in it stays a
    /// placeholder); a scanner must not (its text would go out unscanned).
    fn may_pass_unread(&self) -> bool {
        false
    }
}

/// JSON pointers of the streamed text deltas in one event: the content deltas of
/// [`extract_stream_delta_texts`] plus Anthropic `thinking_delta.thinking`, Amazon Nova
/// `contentBlockDelta.delta.text`, audio transcripts (chat `delta.audio.transcript`, Responses
/// `response.audio.transcript.delta`), and tool-call argument deltas (OpenAI `tool_calls[].function.arguments`,
/// legacy `function_call.arguments`, Anthropic `input_json_delta.partial_json`, Responses
/// `response.function_call_arguments.delta`, Bedrock ConverseStream `delta.toolUse.input`).
pub fn stream_delta_pointers(event: &Value) -> Vec<String> {
    let mut out: Vec<String> = extract_stream_delta_texts(event).into_iter().map(|s| s.pointer).collect();
    if let Some(choices) = event.get("choices").and_then(Value::as_array) {
        for (i, c) in choices.iter().enumerate() {
            // Reasoning deltas of OpenAI-compatible servers: `reasoning_content` (DeepSeek, vLLM), `reasoning`
            // (OpenRouter, vLLM, Groq, Ollama's OpenAI API); OpenAI's `refusal` (structured outputs). One
            // token per event, like the content.
            for key in ["reasoning_content", "reasoning", "refusal"] {
                if c.get("delta").and_then(|d| d.get(key)).is_some_and(Value::is_string) {
                    out.push(format!("/choices/{i}/delta/{key}"));
                }
            }
            // Audio answers (`modalities: ["text", "audio"]`) stream their transcript beside the base64 audio.
            if json::pointer(c, "/delta/audio/transcript").is_some_and(Value::is_string) {
                out.push(format!("/choices/{i}/delta/audio/transcript"));
            }
            // The legacy `functions` API streams its call in `delta.function_call.arguments`.
            if json::pointer(c, "/delta/function_call/arguments").is_some_and(Value::is_string) {
                out.push(format!("/choices/{i}/delta/function_call/arguments"));
            }
            if let Some(calls) = json::pointer(c, "/delta/tool_calls").and_then(Value::as_array) {
                for (j, call) in calls.iter().enumerate() {
                    if json::pointer(call, "/function/arguments").is_some_and(Value::is_string) {
                        out.push(format!("/choices/{i}/delta/tool_calls/{j}/function/arguments"));
                    }
                }
            }
        }
    }
    match event.get("type").and_then(Value::as_str) {
        Some("content_block_delta") => {
            for p in ["/delta/partial_json", "/delta/thinking"] {
                if json::pointer(event, p).is_some_and(Value::is_string) {
                    out.push(p.to_string());
                }
            }
        }
        // Responses function and remote MCP call arguments (JSON text).
        Some("response.function_call_arguments.delta") | Some("response.mcp_call_arguments.delta")
            if event.get("delta").is_some_and(Value::is_string) =>
        {
            out.push("/delta".to_string())
        }
        // Responses reasoning summaries and reasoning text, refusals, custom tool input (free text), code
        // interpreter code, audio transcripts.
        Some("response.reasoning_summary_text.delta")
        | Some("response.audio.transcript.delta")
        | Some("response.reasoning_text.delta")
        | Some("response.refusal.delta")
        | Some("response.custom_tool_call_input.delta")
        | Some("response.code_interpreter_call_code.delta")
        // The Realtime API's text and spoken-answer transcript deltas (GA names, then beta ones).
        | Some("response.output_audio_transcript.delta")
        | Some("response.audio_transcript.delta")
        | Some("response.text.delta")
            if event.get("delta").is_some_and(Value::is_string) =>
        {
            out.push("/delta".to_string())
        }
        // Bedrock ConverseStream tool input (a string of JSON).
        None if event.get("contentBlockIndex").is_some()
            && json::pointer(event, "/delta/toolUse/input").is_some_and(Value::is_string) =>
        {
            out.push("/delta/toolUse/input".to_string())
        }
        _ => {}
    }
    // Ollama stream lines of thinking models: `message.thinking` beside `message.content`.
    if event.get("done").is_some_and(Value::is_boolean)
        && json::pointer(event, "/message/thinking").is_some_and(Value::is_string)
    {
        out.push("/message/thinking".to_string());
    }
    // Amazon Nova through InvokeModelWithResponseStream: `{"contentBlockDelta":{"delta":{"text":..}}}`.
    if json::pointer(event, "/contentBlockDelta/delta/text").is_some_and(Value::is_string) {
        out.push("/contentBlockDelta/delta/text".to_string());
    }
    out
}

/// Events that carry no text but must not flush held text: keep-alives, a Realtime answer's audio, and citations that arrive
/// inside a text block between its deltas (Anthropic `citations_delta` and any other text-less
/// `content_block_delta`, Responses `response.output_text.annotation.added`): the block goes on after
/// them, so a placeholder (or a value to scan) cut there must still be joined. The held text follows
/// them; clients add a citation to its block whatever the order (Responses annotations carry their
/// own text positions).
fn is_keepalive(event: &Value) -> bool {
    matches!(
        event.get("type").and_then(Value::as_str),
        Some("ping")
            | Some("content_block_delta")
            | Some("response.output_text.annotation.added")
            // A Realtime spoken answer interleaves its audio deltas with its transcript deltas.
            | Some("response.output_audio.delta")
            | Some("response.audio.delta")
    )
}

/// Whether the text at `pointer` is JSON text being streamed (tool-call arguments / input): restored
/// values are JSON-escaped there and `\u003c…\u003e` placeholders matched too.
pub fn is_json_text_pointer(event: &Value, pointer: &str) -> bool {
    pointer.ends_with("/function/arguments")
        || pointer.ends_with("/function_call/arguments")
        || pointer.ends_with("/partial_json")
        || pointer.ends_with("/toolUse/input")
        || (pointer == "/delta"
            && matches!(
                event.get("type").and_then(Value::as_str),
                Some("response.function_call_arguments.delta") | Some("response.mcp_call_arguments.delta")
            ))
}

/// At most this many channels hold text back; past it the oldest is flushed.
pub const MAX_HELD_CHANNELS: usize = 64;
/// An event bigger than this (serialised) never holds text back: its text is emitted whole, so no large
/// template is kept for a flush.
pub const MAX_TEMPLATE_BYTES: usize = 16 * 1024;

/// At most this many channels keep the end of their emitted text for [`TextRewrite::rewrite_after`];
/// past it the one written to longest ago forgets it.
pub const MAX_CONTEXT_CHANNELS: usize = 64;

/// One delta stream: the text held back and the last event to clone for a flush.
#[derive(Debug)]
struct Channel<M> {
    held: String,
    template: Value,
    pointer: String,
    meta: M,
    order: u64,
}

/// The transport-independent part of rewriting streamed deltas: the channels and their held text.
/// `M` is what the transport needs to send a flush (SSE event name, event-stream headers, ...).
#[derive(Debug)]
pub struct DeltaChannels<M> {
    channels: BTreeMap<String, Channel<M>>,
    /// Per channel, the end of the text it emitted (as the source wrote it, at most
    /// [`TextRewrite::context_len`] bytes) and when it was last written: what the next piece follows.
    emitted: BTreeMap<String, (String, u64)>,
    seq: u64,
}

impl<M> Default for DeltaChannels<M> {
    fn default() -> Self {
        Self { channels: BTreeMap::new(), emitted: BTreeMap::new(), seq: 0 }
    }
}

/// `tail` + `text`, cut to its last `max` bytes (at a character boundary).
fn append_tail(tail: &mut String, text: &str, max: usize) {
    tail.push_str(text);
    if tail.len() > max {
        let mut from = tail.len() - max;
        while !tail.is_char_boundary(from) {
            from += 1;
        }
        tail.drain(..from);
    }
}

impl<M: Clone> DeltaChannels<M> {
    /// Bytes of held text.
    pub fn held_bytes(&self) -> usize {
        self.channels.values().map(|c| c.held.len()).sum()
    }

    /// Channels holding text.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Flush every held text: synthetic events (cloned from each channel's last delta) appended to `out`.
    pub fn flush_all(&mut self, rw: &mut dyn TextRewrite, out: &mut Vec<(M, Value)>) {
        self.flush_where(rw, out, |_| true);
    }

    fn flush_where(&mut self, rw: &mut dyn TextRewrite, out: &mut Vec<(M, Value)>, which: impl Fn(&str) -> bool) {
        let (flush, keep): (BTreeMap<String, Channel<M>>, BTreeMap<String, Channel<M>>) =
            std::mem::take(&mut self.channels).into_iter().partition(|(k, _)| which(k));
        self.channels = keep;
        let mut chans: Vec<(String, Channel<M>)> = flush.into_iter().collect();
        chans.sort_by_key(|(_, c)| c.order);
        for (key, c) in chans {
            self.emit(&key, c, rw, out);
        }
    }

    /// `text` rewritten as the next piece of channel `key` (after the end of what it emitted so far),
    /// and remembered as emitted.
    fn rewrite_piece(&mut self, key: &str, text: &str, json: bool, rw: &mut dyn TextRewrite) -> Option<String> {
        let keep = rw.context_len();
        if keep == 0 {
            return rw.rewrite_after("", text, json);
        }
        let before = self.emitted.get(key).map_or("", |(t, _)| t.as_str());
        let out = rw.rewrite_after(before, text, json);
        self.seq += 1;
        let seq = self.seq;
        if !self.emitted.contains_key(key) && self.emitted.len() >= MAX_CONTEXT_CHANNELS {
            let oldest = self.emitted.iter().min_by_key(|(_, (_, o))| *o).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.emitted.remove(&k);
            }
        }
        let entry = self.emitted.entry(key.to_string()).or_insert_with(|| (String::new(), seq));
        append_tail(&mut entry.0, text, keep);
        entry.1 = seq;
        out
    }

    fn emit(&mut self, key: &str, mut c: Channel<M>, rw: &mut dyn TextRewrite, out: &mut Vec<(M, Value)>) {
        if c.held.is_empty() {
            return;
        }
        let json = is_json_text_pointer(&c.template, &c.pointer);
        let text = self.rewrite_piece(key, &c.held, json, rw);
        let text = text.unwrap_or_else(|| std::mem::take(&mut c.held));
        if let Some(slot) = json::pointer_mut(&mut c.template, &c.pointer) {
            *slot = Value::String(text);
        }
        out.push((c.meta, c.template));
    }

    /// Rewrite one JSON event in place (`size`: its serialised size, `meta`: how to send it). Flushes to
    /// send before it are appended to `before`. True if `v` changed.
    pub fn on_event(
        &mut self,
        v: &mut Value,
        meta: &M,
        size: usize,
        rw: &mut dyn TextRewrite,
        before: &mut Vec<(M, Value)>,
    ) -> bool {
        let pointers = stream_delta_pointers(v);
        if pointers.is_empty() && !is_keepalive(v) {
            match finishing_choices(v) {
                // One choice's finish chunk (n > 1): flush that choice's text only; the others go on.
                Some(prefixes) => self.flush_where(rw, before, |key| prefixes.iter().any(|p| key.starts_with(p))),
                None => self.flush_all(rw, before),
            }
        }
        // Take the deltas out, rewrite the remaining strings whole, then put the deltas back.
        let mut deltas: Vec<(String, String, bool)> = Vec::with_capacity(pointers.len());
        for p in &pointers {
            let json = is_json_text_pointer(v, p);
            if let Some(Value::String(s)) = json::pointer_mut(v, p) {
                deltas.push((p.clone(), std::mem::take(s), json));
            }
        }
        let mut changed = rewrite_strings(v, rw);
        // TGI's last event is followed by nothing (no terminator, no finish chunk): hold nothing back in it.
        let may_hold = size <= MAX_TEMPLATE_BYTES && !crate::llm::is_tgi_final_event(v);
        let mut blank_template: Option<Value> = None;
        for (p, text, json) in deltas {
            let key = channel_key(v, &p);
            // The answer of a Gemini candidate begins: its thought's held text goes out first.
            if !self.channels.is_empty() && !key.ends_with(THOUGHT) {
                let thought = format!("{key}{THOUGHT}");
                if let Some(c) = self.channels.remove(&thought) {
                    self.emit(&thought, c, rw, before);
                }
            }
            let held = self.channels.remove(&key).map(|c| c.held).unwrap_or_default();
            let had_held = !held.is_empty();
            let pending = if had_held { held + &text } else { text };
            let ready = if json { rw.ready_len_json(&pending) } else { rw.ready_len(&pending) };
            let mut cut = if may_hold { ready.min(pending.len()) } else { pending.len() };
            while !pending.is_char_boundary(cut) {
                cut -= 1;
            }
            let (now, later) = pending.split_at(cut);
            let emitted = if now.is_empty() { None } else { self.rewrite_piece(&key, now, json, rw) };
            let emitted = emitted.unwrap_or_else(|| now.to_string());
            if had_held || !later.is_empty() || emitted != pending {
                changed = true;
            }
            if !later.is_empty() {
                // Remember a template of this event (all deltas blank) to flush the held text later.
                let template = blank_template
                    .get_or_insert_with(|| {
                        let mut t = v.clone();
                        for q in &pointers {
                            if let Some(slot) = json::pointer_mut(&mut t, q) {
                                *slot = Value::String(String::new());
                            }
                        }
                        t
                    })
                    .clone();
                if self.channels.len() >= MAX_HELD_CHANNELS {
                    self.flush_oldest(rw, before);
                }
                self.seq += 1;
                let c = Channel {
                    held: later.to_string(),
                    template,
                    pointer: p.clone(),
                    meta: meta.clone(),
                    order: self.seq,
                };
                self.channels.insert(key, c);
            }
            if let Some(slot) = json::pointer_mut(v, &p) {
                *slot = Value::String(emitted);
            }
        }
        changed
    }

    fn flush_oldest(&mut self, rw: &mut dyn TextRewrite, out: &mut Vec<(M, Value)>) {
        let oldest = self.channels.iter().min_by_key(|(_, c)| c.order).map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            if let Some(c) = self.channels.remove(&k) {
                self.emit(&k, c, rw, out);
            }
        }
    }
}

/// Incremental SSE rewriter; feed network chunks, get bytes to send.
#[derive(Debug)]
pub struct SseTextRewriter {
    /// Network chunks cut into raw event blocks (an event too large to hold is taken out of it raw).
    blocks: SseBlockSplitter,
    /// Reads the complete blocks.
    parser: SseParser,
    max_event_bytes: usize,
    /// Inside an event over the bound: `Some(pass)`, its bytes passed on as they come or withheld
    /// ([`TextRewrite::may_pass_unread`]).
    oversized_event: Option<bool>,
    oversized: u64,
    channels: DeltaChannels<Option<String>>,
    /// Events whose data was not JSON (passed through, rewritten whole).
    pub non_json_events: u64,
}

impl Default for SseTextRewriter {
    fn default() -> Self {
        Self::new(crate::sse::DEFAULT_MAX_EVENT_BYTES)
    }
}

/// The pointer with each array position replaced by the element's own `index` field when it has one
/// (`/choices/0/delta/content` of `{"choices":[{"index":1,..}]}` is `/choices/#1/delta/content`). With
/// `n > 1` OpenAI and vLLM send one choice per chunk, always at position 0, and `index` says which
/// (Gemini `candidates[].index` alike; tool-call deltas `tool_calls[].index` too): the position alone
/// would mix the choices' texts.
pub fn logical_pointer(event: &Value, pointer: &str) -> String {
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

/// The channel of the delta at `pointer`: its logical pointer plus the event's block indexes
/// (Anthropic `index`, Responses `output_index` / `content_index`, Bedrock `contentBlockIndex`, also
/// nested in Nova's `contentBlockDelta`).
pub fn channel_key(event: &Value, pointer: &str) -> String {
    let mut key = logical_pointer(event, pointer);
    // TGI's top-level `index` counts tokens (one per event), it names no stream: its tokens are one.
    let tgi = crate::llm::is_tgi_stream_event(event);
    for f in ["index", "output_index", "content_index", "contentBlockIndex"] {
        if tgi && f == "index" {
            continue;
        }
        if let Some(v) = event.get(f) {
            key.push('#');
            key.push_str(&v.to_string());
        }
    }
    if let Some(v) = json::pointer(event, "/contentBlockDelta/contentBlockIndex") {
        key.push('#');
        key.push_str(&v.to_string());
    }
    // Gemini sends thought summaries (`parts[].thought: true`) and then the answer in parts at the same
    // position of successive chunks: two streams, so a thought's held tail never joins the answer.
    if is_thought_part(event, pointer) {
        key.push_str(THOUGHT);
    }
    key
}

/// Suffix of a Gemini thought part's channel key.
const THOUGHT: &str = "#thought";

/// Whether the text at `pointer` is a Gemini thought part's (`{"text": .., "thought": true}`).
fn is_thought_part(event: &Value, pointer: &str) -> bool {
    pointer.ends_with("/text")
        && pointer.rsplit_once('/').and_then(|(parent, _)| json::pointer(event, parent)).and_then(|p| p.get("thought"))
            == Some(&Value::Bool(true))
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
    /// Events are read up to `max_event_bytes` (at least 64); a larger one is passed on unread, as it
    /// came, or withheld, as [`TextRewrite::may_pass_unread`] says (counted in
    /// [`Self::oversized_events`]).
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            blocks: SseBlockSplitter::default(),
            parser: SseParser::new(usize::MAX),
            max_event_bytes: max_event_bytes.max(64),
            oversized_event: None,
            oversized: 0,
            channels: DeltaChannels::default(),
            non_json_events: 0,
        }
    }

    /// Bytes held back (an incomplete event and held delta text).
    pub fn buffered_bytes(&self) -> usize {
        self.blocks.held() + self.channels.held_bytes()
    }

    /// Events over the bound (passed on unread or withheld).
    pub fn oversized_events(&self) -> u64 {
        self.oversized
    }

    /// Feed one network chunk; returns what can be sent now.
    pub fn feed(&mut self, chunk: &[u8], rw: &mut dyn TextRewrite) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len() + 64);
        for block in self.blocks.feed(chunk) {
            self.on_block(&block, rw, &mut out);
        }
        if self.blocks.held() > self.max_event_bytes {
            let raw = self.blocks.take_held();
            self.on_oversized(&raw, rw, &mut out);
        }
        out
    }

    /// End of the stream: a last unterminated event, then every held text.
    pub fn finish(&mut self, rw: &mut dyn TextRewrite) -> Vec<u8> {
        let mut out = Vec::new();
        let rest = self.blocks.take_held();
        if let Some(pass) = self.oversized_event.take() {
            if pass {
                out.extend_from_slice(&rest);
            }
        } else {
            let mut events = Vec::new();
            self.parser.feed_with(&rest, |e| events.push(e));
            events.extend(self.parser.finish());
            for e in events {
                self.on_event(e, rw, &mut out);
            }
        }
        self.flush_all(rw, &mut out);
        out
    }

    /// One complete event block (or the end of an event over the bound).
    fn on_block(&mut self, block: &[u8], rw: &mut dyn TextRewrite, out: &mut Vec<u8>) {
        if self.oversized_event.is_some() || block.len() > self.max_event_bytes {
            self.on_oversized(block, rw, out);
            self.oversized_event = None; // the block ends the event
            return;
        }
        let mut events = Vec::new();
        self.parser.feed_with(block, |e| events.push(e));
        if events.is_empty() {
            // No event: comments (a `: keep-alive` that keeps an idle stream open), `retry:`; as sent.
            out.extend_from_slice(block);
        }
        for e in events {
            self.on_event(e, rw, out);
        }
    }

    /// Bytes of an event over the bound: the first ones decide whether it passes (held text goes out
    /// before it, in order), the rest follow that.
    fn on_oversized(&mut self, raw: &[u8], rw: &mut dyn TextRewrite, out: &mut Vec<u8>) {
        let pass = match self.oversized_event {
            Some(pass) => pass,
            None => {
                self.oversized += 1;
                let pass = rw.may_pass_unread();
                if pass {
                    self.flush_all(rw, out);
                }
                self.oversized_event = Some(pass);
                pass
            }
        };
        if pass {
            out.extend_from_slice(raw);
        }
    }

    fn flush_all(&mut self, rw: &mut dyn TextRewrite, out: &mut Vec<u8>) {
        let mut flushes = Vec::new();
        self.channels.flush_all(rw, &mut flushes);
        write_flushes(flushes, out);
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
        let mut flushes = Vec::new();
        let changed = self.channels.on_event(&mut v, &e.event, e.data.len(), rw, &mut flushes);
        write_flushes(flushes, out);
        if changed {
            let data = v.to_string();
            out.extend_from_slice(encode_event(&SseEvent { event: e.event, data, id: e.id }).as_bytes());
        } else {
            out.extend_from_slice(encode_event(&e).as_bytes());
        }
    }
}

fn write_flushes(flushes: Vec<(Option<String>, Value)>, out: &mut Vec<u8>) {
    for (event, v) in flushes {
        out.extend_from_slice(encode_event(&SseEvent { event, data: v.to_string(), id: None }).as_bytes());
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
        Value::Object(o) => o.iter_mut().fold(false, |acc, (k, x)| {
            // Tool-call `arguments` (OpenAI chat, legacy `function_call`, Responses) are JSON text:
            // rewritten as such, so a value with a quote or backslash leaves them valid JSON.
            let changed = match x {
                Value::String(s) if k == "arguments" => match rw.rewrite_json(s) {
                    Some(n) => {
                        *s = n;
                        true
                    }
                    None => false,
                },
                _ => rewrite_strings(x, rw),
            };
            changed | acc
        }),
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

    /// `bytes` rewritten with [`Ab`] as two network chunks cut at `cut`: (what the chunks gave, what
    /// `finish` gave).
    fn rewrite_in_two(bytes: &[u8], cut: usize) -> (Vec<u8>, Vec<u8>) {
        let mut rw = SseTextRewriter::default();
        let (a, b) = bytes.split_at(cut);
        let mut out = rw.feed(a, &mut Ab);
        out.extend(rw.feed(b, &mut Ab));
        (out, rw.finish(&mut Ab))
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
            let (mut out, fin) = rewrite_in_two(bytes, cut);
            out.extend(fin);
            assert_eq!(deltas(&out), "hello xy and AC", "cut {cut}: {}", String::from_utf8_lossy(&out));
            let text = String::from_utf8(out).unwrap();
            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        }
    }

    /// TGI's native stream: one token per event, each with a new top-level `index`; the last event carries
    /// the whole `generated_text` and nothing follows it. A value cut across tokens is rewritten, the
    /// final text whole, and nothing is held back past the last event. Before 2026-12-07 each token was
    /// rewritten alone (a placeholder cut across tokens reached the client as it was).
    #[wasm_bindgen_test(unsupported = test)]
    fn tgi_native_stream_tokens_are_one_channel() {
        let ev = |i: u32, t: &str, last: Option<&str>| {
            format!(
                "data:{}\n\n",
                serde_json::json!({"index": i, "token": {"id": i, "text": t, "logprob": -0.1, "special": false},
                                   "generated_text": last, "details": null})
            )
        };
        let stream =
            format!("{}{}{}", ev(1, "hello A", None), ev(2, "B and ", None), ev(3, "A", Some("hello AB and A")));
        let bytes = stream.as_bytes();
        for cut in 0..bytes.len() {
            let (out, fin) = rewrite_in_two(bytes, cut);
            assert!(fin.is_empty(), "cut {cut}: held past the last event: {}", String::from_utf8_lossy(&fin));
            assert_eq!(deltas(&out), "hello xy and A", "cut {cut}: {}", String::from_utf8_lossy(&out));
            let events: Vec<Value> =
                SseParser::default().feed(&out).iter().map(|e| serde_json::from_str(&e.data).unwrap()).collect();
            let finals: Vec<&Value> = events.iter().filter(|v| v["generated_text"].is_string()).collect();
            assert_eq!(finals.len(), 1, "cut {cut}");
            assert_eq!(finals[0]["generated_text"], "hello xy and A");
            assert!(events.last().unwrap()["generated_text"].is_string(), "cut {cut}: the final event stays last");
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

    /// Bounds: at most `MAX_HELD_CHANNELS` (64) channels hold text (the oldest flushed first, nothing
    /// lost), and an event over `MAX_TEMPLATE_BYTES` (16 KiB) holds nothing back.
    #[wasm_bindgen_test(unsupported = test)]
    fn held_channels_and_big_events_are_bounded() {
        let mut rw = SseTextRewriter::default();
        let mut out = Vec::new();
        for i in 0..1000 {
            let e =
                serde_json::json!({"type":"content_block_delta","index":i,"delta":{"type":"text_delta","text":"x A"}});
            out.extend(rw.feed(format!("data: {e}\n\n").as_bytes(), &mut Ab));
            assert!(rw.buffered_bytes() <= 64, "{} bytes held at {i}", rw.buffered_bytes());
        }
        out.extend(rw.finish(&mut Ab));
        // Every block's text whole: "x " now, its "A" in a flush (no AB to replace).
        let mut per = BTreeMap::new();
        for e in SseParser::default().feed(&out) {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            let t = v.pointer("/delta/text").and_then(Value::as_str).unwrap().to_string();
            *per.entry(v["index"].as_u64().unwrap()).or_insert_with(String::new) += &t;
        }
        assert_eq!(per.len(), 1000);
        assert!(per.values().all(|t| t == "x A"), "{per:?}");
        let filler = "f".repeat(20 * 1024);
        let mut rw = SseTextRewriter::default();
        let e = serde_json::json!({"choices":[{"index":0,"delta":{"content":"big A"}}],"f":filler});
        let out = rw.feed(format!("data: {e}\n\n").as_bytes(), &mut Ab);
        assert_eq!((deltas(&out).as_str(), rw.buffered_bytes()), ("big A", 0));
    }
}
