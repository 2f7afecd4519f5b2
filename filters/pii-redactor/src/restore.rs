//! Putting the original values back into the answer: JSON bodies, SSE streams (placeholders split across
//! events and network chunks, JSON escapes) and other bodies as raw bytes; optionally scanning what the
//! model wrote for PII of its own first.
//!
//! Hold-back is minimal: only a tail that is a prefix of a placeholder this request handed out is held
//! (at most [`MAX_PLACEHOLDER`] bytes), so `<div` or `a < b` streams through untouched.

use crate::detect::{find, normalized_before, separator_at};
use crate::engine::{Counts, Engine, MAX_PLACEHOLDER};
use meshwarden_shared::stream_rewrite::{rewrite_strings, DeltaChannels, SseTextRewriter, TextRewrite};
use serde_json::Value;
use std::cell::OnceCell;
use std::collections::HashMap;
use std::rc::Rc;

/// The per-request restore map plus (optionally) the response scanner.
pub struct Restorer {
    map: HashMap<String, String>,
    scan: Option<Rc<Engine>>,
    /// The map's labels with their largest number, built on the first hold-back question (streams only).
    labels: OnceCell<Vec<(Vec<u8>, u64)>>,
    pub restored: u64,
    pub response_counts: Counts,
}

/// How a tail after `<` (or `\u003c`) relates to this request's placeholders.
#[derive(PartialEq)]
enum PlaceholderPrefix {
    /// Not the start of any of them.
    No,
    /// `EMAIL`, `EMAIL_`: a label's start.
    Label,
    /// `EMAIL_1`: a label and a number handed out (or the start of one), only `>` may be missing.
    Numbered,
}

impl Restorer {
    pub fn new(map: HashMap<String, String>, scan: Option<Rc<Engine>>) -> Self {
        Self { map, scan, labels: OnceCell::new(), restored: 0, response_counts: Counts::default() }
    }

    /// Whether `body` (what follows the opening bracket, no closing one) may begin one of this request's
    /// placeholders. Answered from the labels (a handful) rather than every placeholder: asking each of
    /// thousands of placeholders for every event of a stream echoing them made restore quadratic. A
    /// number up to the label's largest counts even if it was skipped (a client look-alike): holding a
    /// few bytes until the next event costs nothing.
    fn placeholder_prefix(&self, body: &[u8]) -> PlaceholderPrefix {
        let labels = self.labels.get_or_init(|| {
            let mut labels: Vec<(Vec<u8>, u64)> = Vec::new();
            for p in self.map.keys() {
                let inner = p.as_bytes().get(1..p.len().saturating_sub(1)).unwrap_or(&[]);
                let Some(us) = inner.iter().rposition(|c| *c == b'_') else { continue };
                let label = inner.get(..us).unwrap_or(&[]);
                let n = std::str::from_utf8(inner.get(us + 1..).unwrap_or(&[])).ok().and_then(|d| d.parse().ok());
                let n = n.unwrap_or(u64::MAX);
                match labels.iter_mut().find(|(l, _)| l == label) {
                    Some((_, max)) => *max = (*max).max(n),
                    None => labels.push((label.to_vec(), n)),
                }
            }
            labels
        });
        let mut best = PlaceholderPrefix::No;
        for (label, max) in labels {
            if body.len() <= label.len() {
                if label.starts_with(body) {
                    best = PlaceholderPrefix::Label;
                }
                continue;
            }
            let Some(rest) = body.strip_prefix(label.as_slice()).and_then(|r| r.strip_prefix(b"_")) else {
                continue;
            };
            if rest.is_empty() {
                best = PlaceholderPrefix::Label;
                continue;
            }
            let number = (rest.len() <= 19 && rest.first() != Some(&b'0') && rest.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(rest).ok().and_then(|d| d.parse::<u64>().ok()))
                .flatten();
            if number.is_some_and(|n| n <= *max) {
                return PlaceholderPrefix::Numbered;
            }
        }
        best
    }

    pub fn is_noop(&self) -> bool {
        self.map.is_empty() && self.scan.is_none()
    }

    /// Bytes of `pending` that cannot start a placeholder of this request.
    pub fn ready_bytes(&self, pending: &[u8]) -> usize {
        if self.map.is_empty() {
            return pending.len();
        }
        let from = pending.len().saturating_sub(MAX_PLACEHOLDER);
        let tail = pending.get(from..).unwrap_or(&[]);
        // The earliest '<' in the tail whose suffix is a proper prefix of a known placeholder.
        for (k, c) in tail.iter().enumerate() {
            if *c != b'<' {
                continue;
            }
            let body = tail.get(k + 1..).unwrap_or(&[]);
            if !body.contains(&b'>') && self.placeholder_prefix(body) != PlaceholderPrefix::No {
                return from + k;
            }
        }
        pending.len()
    }

    /// Replace every placeholder of this request in `text`; `escape_json` writes values JSON-escaped
    /// (for raw JSON text).
    pub fn restore_bytes(&mut self, text: &[u8], escape_json: bool) -> Option<Vec<u8>> {
        if self.map.is_empty() || !text.contains(&b'<') {
            return None;
        }
        let mut out: Vec<u8> = Vec::with_capacity(text.len() + 32);
        let mut last = 0;
        let mut i = 0;
        let mut any = false;
        while let Some(p) = text.get(i..).and_then(|r| memchr::memchr(b'<', r)) {
            let s = i + p;
            let end = text.get(s..).and_then(|r| r.iter().take(MAX_PLACEHOLDER + 1).position(|c| *c == b'>'));
            if let Some(e) = end {
                let cand = text.get(s..s + e + 1).and_then(|b| std::str::from_utf8(b).ok());
                if let Some(value) = cand.and_then(|c| self.map.get(c)) {
                    out.extend_from_slice(text.get(last..s).unwrap_or(&[]));
                    if escape_json {
                        let q = serde_json::to_string(value).unwrap_or_default();
                        out.extend_from_slice(q.get(1..q.len().saturating_sub(1)).unwrap_or("").as_bytes());
                    } else {
                        out.extend_from_slice(value.as_bytes());
                    }
                    self.restored += 1;
                    any = true;
                    last = s + e + 1;
                    i = last;
                    continue;
                }
            }
            i = s + 1;
        }
        if !any {
            return None;
        }
        out.extend_from_slice(text.get(last..).unwrap_or(&[]));
        Some(out)
    }

    /// [`Self::ready_bytes`] for raw JSON text, where a placeholder may also be written
    /// `\u003cEMAIL_1\u003e`: a tail that may start either spelling is not ready.
    pub fn ready_bytes_json(&self, pending: &[u8]) -> usize {
        let mut n = self.ready_bytes(pending);
        if self.map.is_empty() {
            return n;
        }
        let from = pending.len().saturating_sub(MAX_PLACEHOLDER + 10);
        let tail = pending.get(from..).unwrap_or(&[]);
        for (k, c) in tail.iter().enumerate() {
            if *c != b'\\' {
                continue;
            }
            let suffix = tail.get(k..).unwrap_or(&[]);
            if self.may_start_escaped_placeholder(suffix) {
                n = n.min(from + k);
                break;
            }
        }
        n
    }

    /// Whether `suffix` (starting with a backslash) is a proper prefix of one of this request's
    /// placeholders spelled `\u003cEMAIL_1\u003e` (the escapes in either letter case).
    fn may_start_escaped_placeholder(&self, suffix: &[u8]) -> bool {
        const OPEN: &[u8] = b"\\u003c";
        const CLOSE: &[u8] = b"\\u003e";
        let ci_prefix = |part: &[u8], of: &[u8]| {
            part.len() < of.len() && of.get(..part.len()).is_some_and(|o| o.eq_ignore_ascii_case(part))
        };
        if suffix.len() < OPEN.len() {
            return ci_prefix(suffix, OPEN);
        }
        if !suffix.get(..OPEN.len()).is_some_and(|o| o.eq_ignore_ascii_case(OPEN)) {
            return false;
        }
        let rest = suffix.get(OPEN.len()..).unwrap_or(&[]);
        match rest.iter().position(|c| *c == b'\\') {
            None => self.placeholder_prefix(rest) != PlaceholderPrefix::No,
            Some(j) => {
                ci_prefix(rest.get(j..).unwrap_or(&[]), CLOSE)
                    && self.placeholder_prefix(rest.get(..j).unwrap_or(&[])) == PlaceholderPrefix::Numbered
            }
        }
    }

    /// Restore placeholders in raw JSON text (streamed tool arguments): values JSON-escaped, and the
    /// `\u003c…\u003e` spelling matched too (as [`Self::rewrite_json_body`] does by parsing).
    pub fn restore_json_text(&mut self, text: &[u8]) -> Option<Vec<u8>> {
        if self.map.is_empty() {
            return None;
        }
        let mut out: Vec<u8> = Vec::with_capacity(text.len() + 32);
        let mut last = 0;
        let mut i = 0;
        let mut any = false;
        while i < text.len() {
            let rest = text.get(i..).unwrap_or(&[]);
            // `<NAME>`, or `\u003cNAME\u003e` whose backslash is not itself escaped.
            let found = if rest.first() == Some(&b'<') {
                let end = rest.iter().take(MAX_PLACEHOLDER + 1).position(|c| *c == b'>');
                end.and_then(|e| rest.get(..=e)).map(|c| (String::from_utf8_lossy(c).into_owned(), c.len()))
            } else if rest.get(..6).is_some_and(|h| h.eq_ignore_ascii_case(b"\\u003c"))
                && text.get(..i).unwrap_or(&[]).iter().rev().take_while(|c| **c == b'\\').count() % 2 == 0
            {
                let body = rest.get(6..).unwrap_or(&[]);
                let end = body.windows(6).take(MAX_PLACEHOLDER).position(|w| w.eq_ignore_ascii_case(b"\\u003e"));
                end.and_then(|e| body.get(..e))
                    .map(|mid| (format!("<{}>", String::from_utf8_lossy(mid)), mid.len() + 12))
            } else {
                None
            };
            if let Some(value) = found.as_ref().and_then(|(c, _)| self.map.get(c)) {
                let len = found.as_ref().map_or(1, |(_, n)| *n);
                out.extend_from_slice(text.get(last..i).unwrap_or(&[]));
                let q = serde_json::to_string(value).unwrap_or_default();
                out.extend_from_slice(q.get(1..q.len().saturating_sub(1)).unwrap_or("").as_bytes());
                self.restored += 1;
                any = true;
                i += len;
                last = i;
                continue;
            }
            i += 1;
        }
        if !any {
            return None;
        }
        out.extend_from_slice(text.get(last..).unwrap_or(&[]));
        Some(out)
    }

    /// Scan (if enabled) then restore one piece of model-written text.
    pub fn rewrite_str(&mut self, text: &str) -> Option<String> {
        self.rewrite_str_after("", text)
    }

    /// [`Self::rewrite_str`] of a piece of a stream that follows `before` (what the model wrote just
    /// before it on the same channel): the scanner reads `before` for context words.
    fn rewrite_str_after(&mut self, before: &str, text: &str) -> Option<String> {
        let scanned = match &self.scan {
            Some(engine) => engine.scan_response_text_after(before, text, &mut self.response_counts),
            None => None,
        };
        let base = scanned.as_deref().unwrap_or(text);
        match self.restore_bytes(base.as_bytes(), false) {
            Some(b) => {
                Some(String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
            }
            None => scanned,
        }
    }

    /// A whole JSON response body: placeholders in every string value restored (message content, tool
    /// arguments, ...), in the raw text unless an angle bracket is escaped or responses are scanned;
    /// then by parsing. Not JSON: restored as raw text with JSON-escaped values.
    pub fn rewrite_json_body(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        // Ollama's streams (`application/x-ndjson`): one JSON object per line, one token per line, so a
        // placeholder (or a value to scan) is cut across lines: lines are rewritten as SSE events are.
        if let Some(lines) = ndjson_lines(body) {
            return self.rewrite_ndjson(lines);
        }
        // Gemini's `streamGenerateContent` without `alt=sse`: a JSON array of chunks, streamed, one text
        // piece per chunk, so a placeholder (or a value to scan) is cut across elements likewise.
        if let Some(items) = self.json_array_stream(body) {
            return self.rewrite_array_stream(body, items);
        }
        // A value JSON must escape (a quote, a backslash, a control character) inside tool-call
        // `arguments` (JSON text in a JSON string) needs escaping twice: only the parsed path knows
        // where it lands.
        let needs_escape = || self.map.values().any(|v| v.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20));
        if self.scan.is_none()
            && !body.windows(5).any(|w| w.eq_ignore_ascii_case(b"u003c") || w.eq_ignore_ascii_case(b"u003e"))
            && !(needs_escape() && body.windows(11).any(|w| w == b"\"arguments\""))
        {
            // Restore only, and no placeholder written with escaped angle brackets: placeholders are
            // ASCII that JSON never needs to escape, so restoring them in the raw text (values
            // JSON-escaped) gives the same JSON as parsing, restoring each string and re-serialising,
            // in one scan, keeping the upstream's bytes everywhere else.
            return self.restore_bytes(body, true);
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(mut v) => {
                if rewrite_strings(&mut v, self) {
                    serde_json::to_vec(&v).ok()
                } else {
                    None
                }
            }
            // Labelled JSON but not JSON: restored, and scanned, as raw JSON text.
            Err(_) => self.rewrite_raw(body, Some(&mut JsonText::default())),
        }
    }
}

impl Restorer {
    /// NDJSON lines rewritten as SSE events are ([`DeltaChannels`]: per delta stream, only a tail that may
    /// start a placeholder, or a value the scanner must see whole, held back and prepended to the next
    /// line's delta; held text flushed in a line cloned from the last delta before a `"done": true` line
    /// and at the end). Changed lines are re-serialised; the others keep their bytes.
    fn rewrite_ndjson(&mut self, lines: Vec<(&str, Option<Value>)>) -> Option<Vec<u8>> {
        let mut channels: DeltaChannels<()> = DeltaChannels::default();
        let mut out = Vec::new();
        let mut changed = false;
        let mut flushes = Vec::new();
        let write = |out: &mut Vec<u8>, flushes: &mut Vec<((), Value)>| {
            for (_, v) in flushes.drain(..) {
                out.extend_from_slice(v.to_string().as_bytes());
                out.push(b'\n');
            }
        };
        for (line, v) in lines {
            let Some(mut v) = v else {
                out.extend_from_slice(line.as_bytes());
                continue;
            };
            if v.get("done") == Some(&Value::Bool(true)) {
                channels.flush_all(self, &mut flushes);
            }
            let line_changed = channels.on_event(&mut v, &(), line.len(), self, &mut flushes);
            changed |= line_changed || !flushes.is_empty();
            write(&mut out, &mut flushes);
            if line_changed {
                out.extend_from_slice(v.to_string().as_bytes());
                out.extend_from_slice(line.get(line.trim_end().len()..).unwrap_or("").as_bytes());
            } else {
                out.extend_from_slice(line.as_bytes());
            }
        }
        channels.flush_all(self, &mut flushes);
        changed |= !flushes.is_empty();
        write(&mut out, &mut flushes);
        changed.then_some(out)
    }
}

impl Restorer {
    /// The elements of `body` when it is a streamed JSON array of Gemini chunks (at least two objects,
    /// one with `candidates`) and this answer may have something to restore or scan; `None` otherwise.
    fn json_array_stream(&self, body: &[u8]) -> Option<Vec<Value>> {
        if body.iter().find(|c| !c.is_ascii_whitespace()) != Some(&b'[') {
            return None;
        }
        if self.scan.is_none() && !body.contains(&b'<') && !body.windows(5).any(|w| w.eq_ignore_ascii_case(b"u003c")) {
            return None;
        }
        let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(body) else {
            return None;
        };
        let chunks = items.len() >= 2
            && items.iter().all(Value::is_object)
            && items.iter().any(|v| v.get("candidates").is_some_and(Value::is_array));
        chunks.then_some(items)
    }

    /// A streamed JSON array's elements rewritten as SSE events are ([`DeltaChannels`]: per candidate,
    /// a tail that may start a placeholder, or a value the scanner must see whole, held back and joined
    /// to the next element's text; held text flushed in an element cloned from the last delta, placed
    /// before an element without text and at the end). Only changed elements are re-serialised (spliced
    /// into the upstream's bytes).
    fn rewrite_array_stream(&mut self, body: &[u8], items: Vec<Value>) -> Option<Vec<u8>> {
        let mut channels: DeltaChannels<()> = DeltaChannels::default();
        let mut flushes = Vec::new();
        let last = items.len().saturating_sub(1);
        // Per changed element: its pointer and the JSON text that replaces it (flushes before it, itself,
        // and after the last element the final flushes).
        let mut edits: Vec<(String, String)> = Vec::new();
        let mut all: Vec<Value> = Vec::with_capacity(items.len() + 1);
        for (i, mut v) in items.into_iter().enumerate() {
            let size = serde_json::to_vec(&v).map_or(0, |b| b.len());
            let changed = channels.on_event(&mut v, &(), size, self, &mut flushes);
            let mut parts: Vec<String> = flushes.iter().map(|(_, f)| f.to_string()).collect();
            all.extend(flushes.drain(..).map(|(_, f)| f));
            if i == last {
                channels.flush_all(self, &mut flushes);
            }
            if changed || !parts.is_empty() || !flushes.is_empty() {
                parts.push(v.to_string());
                parts.extend(flushes.iter().map(|(_, f)| f.to_string()));
                edits.push((format!("/{i}"), parts.join(",")));
            }
            all.push(v);
            all.extend(flushes.drain(..).map(|(_, f)| f));
        }
        if edits.is_empty() {
            return None;
        }
        let refs: Vec<(&str, meshwarden_shared::splice::Edit<'_>)> =
            edits.iter().map(|(p, t)| (p.as_str(), meshwarden_shared::splice::Edit::Value(t.as_str()))).collect();
        meshwarden_shared::splice::splice(body, &refs).or_else(|| serde_json::to_vec(&Value::Array(all)).ok())
    }
}

/// `body` as NDJSON lines (each with its line ending; blank lines `None`), when it is several JSON
/// objects one per line (a `}` and a `{` separated by a line break only, which one JSON document never
/// has) and every line parses. `None` for anything else.
fn ndjson_lines(body: &[u8]) -> Option<Vec<(&str, Option<Value>)>> {
    let ws = |c: &u8| matches!(c, b' ' | b'\t' | b'\r' | b'\n');
    let split = memchr::memchr_iter(b'\n', body).any(|i| {
        let before = body.get(..i).and_then(|b| b.iter().rev().find(|c| !ws(c)));
        let after = body.get(i..).and_then(|b| b.iter().find(|c| !ws(c)));
        before == Some(&b'}') && after == Some(&b'{')
    });
    if !split {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    text.split_inclusive('\n')
        .map(|line| {
            let json = line.trim();
            if json.is_empty() {
                return Some((line, None));
            }
            serde_json::from_str::<Value>(json).ok().map(|v| (line, Some(v)))
        })
        .collect()
}

/// Longest value written in groups that a scanner must see whole (an IBAN of 34 characters in groups of
/// four with separators, an international phone number; fullwidth digits take three bytes each, an HTML
/// reference between groups six, `&nbsp;`), with slack.
const MAX_GROUPED_VALUE: usize = 256;

/// Whether `c`, as the scanner reads it, can be part of a value written in groups: digits, capital letters
/// and the separators grouped values use (` -+().`, a line break).
fn grouped_value_char(c: u8) -> bool {
    c.is_ascii_digit() || c.is_ascii_uppercase() || b" -+().\t\n\r".contains(&c)
}

/// Start of the trailing run of `text` that the scanner reads as digits, capital letters and the
/// separators grouped values use (` -+().`, a line break), if it holds a digit; `text.len()` when there is
/// none. Characters the scanner reads through count as what it reads them as ([`normalized_before`]):
/// Unicode spaces and dashes, invisible characters (dropped), fullwidth forms, percent-encoded characters
/// and HTML references. Prose ends in lower-case words, so this holds back little unless the text ends in
/// something number-like. (A line break and fullwidth forms since 2026-12-07: the scanner reads a card
/// wrapped across a line and fullwidth digits; before, `Card 4111 1111\n` or `４１１１ １１１１` was released
/// and scanned without the rest of the value. Invisible characters, Unicode spaces and encoded characters
/// also since 2026-12-07: before, `Card 4111\u{200b}1111\u{200b}1111\u{200b}1111 ` streamed with the cut
/// after its space released `Card 4111\u{200b}1111\u{200b}1111\u{200b}` to the scanner alone, and the
/// card reached the client.)
fn grouped_value_start(text: &[u8]) -> usize {
    let floor = text.len().saturating_sub(MAX_GROUPED_VALUE);
    let mut start = text.len();
    let mut digit = false;
    while start > floor {
        match text.get(start - 1) {
            Some(&c) if grouped_value_char(c) => {
                digit |= c.is_ascii_digit();
                start -= 1;
            }
            // A `%` whose two hex digits the loop took as digits and capitals: the three are one character.
            Some(b'%') => match separator_at(text, start - 1) {
                Some((3, Some(c))) if grouped_value_char(c) => start -= 1,
                _ => break,
            },
            _ => match normalized_before(text, start) {
                Some((len, read)) if start - len >= floor && read.is_none_or(grouped_value_char) => {
                    digit |= read.is_some_and(|c| c.is_ascii_digit());
                    start -= len;
                }
                _ => break,
            },
        }
    }
    // Do not hold back the separators before the run's first character that belongs to a value.
    let mut k = start;
    while digit && k < text.len() {
        let (len, read) = separator_at(text, k).unwrap_or((1, text.get(k).copied()));
        if read.is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'(')) {
            return k;
        }
        k += len;
    }
    text.len()
}

impl TextRewrite for Restorer {
    fn ready_len(&self, pending: &str) -> usize {
        let n = self.ready_bytes(pending.as_bytes());
        if self.scan.is_some() {
            scan_ready_len(pending.as_bytes(), n)
        } else {
            n
        }
    }

    fn rewrite(&mut self, text: &str) -> Option<String> {
        self.rewrite_str(text)
    }

    fn ready_len_json(&self, pending: &str) -> usize {
        self.ready_len(pending).min(self.ready_bytes_json(pending.as_bytes()))
    }

    /// Streamed JSON text (tool arguments): scanned (if enabled) as text, then restored with
    /// JSON-escaped values, `\u003c…\u003e` placeholders included, so it stays the JSON it was.
    fn rewrite_json(&mut self, text: &str) -> Option<String> {
        self.rewrite_json_after("", text)
    }

    /// With response scanning, the end of a channel's earlier text is read for context words.
    fn context_len(&self) -> usize {
        self.scan.as_ref().map_or(0, |e| e.context_reach())
    }

    fn rewrite_after(&mut self, before: &str, text: &str, json: bool) -> Option<String> {
        if json {
            self.rewrite_json_after(before, text)
        } else {
            self.rewrite_str_after(before, text)
        }
    }

    /// An SSE event too large to read passes as it came when the answer is only restored (a
    /// placeholder in it stays one); with response scanning it is withheld (it would go out unscanned).
    fn may_pass_unread(&self) -> bool {
        self.scan.is_none()
    }
}

impl Restorer {
    fn rewrite_json_after(&mut self, before: &str, text: &str) -> Option<String> {
        let scanned = match &self.scan {
            Some(engine) => engine.scan_response_json_text_after(before, text, &mut self.response_counts),
            None => None,
        };
        let base = scanned.as_deref().unwrap_or(text);
        match self.restore_json_text(base.as_bytes()) {
            Some(b) => {
                Some(String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
            }
            None => scanned,
        }
    }
}

/// A streamed body that is not SSE: raw restore with hold-back.
#[derive(Debug, Default)]
pub struct RawStream {
    held: Vec<u8>,
    /// The body is JSON text (restored values are JSON-escaped).
    pub escape_json: bool,
    /// Where the JSON text passed on so far ended (inside a string or not).
    json: JsonText,
    /// With response scanning, the end of the bytes passed on so far (as they came): read for the
    /// context words of the next piece.
    before: Vec<u8>,
}

impl RawStream {
    /// A stream of JSON text (an answer too large to buffer and parse).
    pub fn json_text() -> Self {
        Self { escape_json: true, ..Self::default() }
    }

    pub fn feed(&mut self, r: &mut Restorer, chunk: &[u8], end: bool) -> Vec<u8> {
        let mut pending = std::mem::take(&mut self.held);
        pending.extend_from_slice(chunk);
        let cut = if end { pending.len() } else { r.ready_raw(&pending, self.escape_json) };
        let later = pending.split_off(cut);
        self.held = later;
        let json = self.escape_json.then_some(&mut self.json);
        let out = r.rewrite_raw_after(&self.before, &pending, json);
        let keep = r.scan.as_ref().map_or(0, |e| e.context_reach());
        if keep > 0 {
            self.before.extend_from_slice(&pending);
            let excess = self.before.len().saturating_sub(keep);
            self.before.drain(..excess);
        }
        out.unwrap_or(pending)
    }
}

/// A position in JSON text read piece by piece: inside a string or not (pieces never end inside an
/// escape, see [`escape_start`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonText {
    in_string: bool,
}

impl JsonText {
    /// The byte ranges of `piece` inside JSON strings (between the quotes), the position moved past it.
    pub fn string_ranges(&mut self, piece: &[u8]) -> Vec<(usize, usize)> {
        let mut ranges = Vec::new();
        let mut start = 0;
        let mut escaped = false;
        for (i, &c) in piece.iter().enumerate() {
            if !self.in_string {
                if c == b'"' {
                    self.in_string = true;
                    start = i + 1;
                }
            } else if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                ranges.push((start, i));
                self.in_string = false;
            }
        }
        if self.in_string {
            ranges.push((start, piece.len()));
        }
        ranges
    }
}

impl Restorer {
    /// How much of a raw answer (not parsed: plain text, an error body, JSON too large to buffer) can be
    /// passed on now: not a tail that may start a placeholder (in JSON text, either spelling), and with
    /// response scanning not a tail that may be part of a value the scanner must see whole, nor the
    /// middle of a JSON escape (`\u00` | `40`), which the scanner decodes.
    pub fn ready_raw(&self, pending: &[u8], json: bool) -> usize {
        let n = if json { self.ready_bytes_json(pending) } else { self.ready_bytes(pending) };
        if self.scan.is_none() {
            return n;
        }
        escape_start(pending, scan_ready_len(pending, n))
    }

    /// One ready piece of a raw answer: scanned (if enabled; JSON escapes decoded for the scan, the
    /// findings replaced in the original bytes), then restored; `json` writes replacements and values
    /// JSON-escaped and restores the `\u003c…\u003e` spelling too.
    pub fn rewrite_raw(&mut self, bytes: &[u8], json: Option<&mut JsonText>) -> Option<Vec<u8>> {
        self.rewrite_raw_after(&[], bytes, json)
    }

    /// [`Self::rewrite_raw`] of a piece that follows `before` (the end of the bytes passed on before it):
    /// the scanner reads `before` for context words.
    fn rewrite_raw_after(&mut self, before: &[u8], bytes: &[u8], json: Option<&mut JsonText>) -> Option<Vec<u8>> {
        let is_json = json.is_some();
        let scanned = match &self.scan {
            Some(engine) => {
                // In JSON text only findings inside strings are replaced: a 16-digit id outside one that
                // passes Luhn stays a number, so the answer stays JSON.
                let strings = json.map(|j| j.string_ranges(bytes));
                engine.scan_response_bytes(before, bytes, strings.as_deref(), &mut self.response_counts)
            }
            None => None,
        };
        let base = scanned.as_deref().unwrap_or(bytes);
        let restored = if is_json { self.restore_json_text(base) } else { self.restore_bytes(base, false) };
        restored.or(scanned)
    }
}

/// Most of a last word held back for the scanner: a JWT signed with RS256 is 600-1,200 characters
/// without a space (its signature alone 342), a `github_pat_` 93.
const MAX_WORD_HOLD: usize = 4096;

/// `n` lowered so that the scanner sees whole values: the last word is held back (bounded: with no
/// whitespace in the last [`MAX_WORD_HOLD`] bytes, those bytes), and so is a run before the cut that may
/// be part of a value written in groups (`4111 1111 …`, `+44 20 …`, `DE89 3704 …`), which spans several
/// words: cutting `Card 4111 1111 1111 1111,` after its last space would hand the scanner twelve digits.
fn scan_ready_len(b: &[u8], mut n: usize) -> usize {
    let tail_start = b.len().saturating_sub(MAX_WORD_HOLD);
    match b.get(tail_start..n).and_then(|t| t.iter().rposition(|c| c.is_ascii_whitespace())) {
        Some(ws) => n = n.min(tail_start + ws + 1),
        // Before 2026-12-06 a word of more than 256 bytes (the old bound) was not held back at all: a
        // JWT cut across deltas reached the client unmasked.
        None => n = n.min(tail_start),
    }
    if let Some(key) = unterminated_private_key(b, n) {
        n = n.min(key);
    }
    grouped_value_start(b.get(..n).unwrap_or(b))
}

/// Most text held back for a private key block whose END line has not arrived yet: a PEM RSA 4096 key is
/// ~3.3 KB, an armored OpenPGP secret key with subkeys a few KB more.
const MAX_PRIVATE_KEY_HOLD: usize = 16 * 1024;

/// The start of a private key block in `b` whose END line does not end before the cut `n` (it has not
/// arrived, or is not complete, or `n` falls inside it), or of a `-----BEGIN` whose header line is not
/// complete yet, within [`MAX_PRIVATE_KEY_HOLD`] of the end. A block is masked from its BEGIN line to its
/// END line; cut across pieces, the scanner would see the BEGIN line in one piece and mask to that
/// piece's end, and the key's base64 lines in the next pieces would pass unmasked.
fn unterminated_private_key(b: &[u8], n: usize) -> Option<usize> {
    const BEGIN: &[u8] = b"-----BEGIN";
    let floor = b.len().saturating_sub(MAX_PRIVATE_KEY_HOLD);
    let window = b.get(floor..)?;
    let start = floor + window.windows(BEGIN.len()).rposition(|w| w == BEGIN)?;
    let rest = b.get(start..)?;
    let header_limit = rest.len().min(80);
    // The header line's closing dashes (`-----BEGIN RSA PRIVATE KEY-----`).
    let Some(close) = rest.get(BEGIN.len()..header_limit).and_then(|h| find(h, b"-----")) else {
        // Not complete yet: it may still become a private key header (a longer line is no header).
        return (rest.len() < 80).then_some(start);
    };
    let header_end = BEGIN.len() + close + 5;
    if rest.get(..header_end).is_none_or(|h| find(h, b"PRIVATE KEY").is_none()) {
        return None;
    }
    let after = rest.get(header_end..)?;
    let Some(end_at) = find(after, b"-----END") else {
        return Some(start);
    };
    // The END line must be complete (`-----END RSA PRIVATE KEY-----`) for the scanner to find it.
    let end_line = after.get(end_at + 8..).unwrap_or(&[]);
    let end_line = end_line.get(..end_line.len().min(80)).unwrap_or(&[]);
    match find(end_line, b"-----") {
        Some(close) => (start + header_end + end_at + 8 + close + 5 > n).then_some(start),
        None if end_line.len() < 80 => Some(start),
        None => None,
    }
}

/// `cut` moved back to the start of a JSON escape (`\n`, `\u0040`) it would split, so that a piece
/// never ends inside one (the scanner decodes escapes piece by piece).
fn escape_start(b: &[u8], cut: usize) -> usize {
    // An escape is at most six bytes: only a backslash in the five bytes before the cut can start one
    // that the cut splits.
    for start in cut.saturating_sub(5)..cut {
        if b.get(start) != Some(&b'\\') {
            continue;
        }
        // A backslash preceded by an odd run of backslashes is itself escaped (`\\`), not a start.
        let run = b.get(..start).map_or(0, |p| p.iter().rev().take_while(|c| **c == b'\\').count());
        if run % 2 == 1 {
            continue;
        }
        let len = if b.get(start + 1) == Some(&b'u') { 6 } else { 2 };
        if start + len > cut {
            return start;
        }
    }
    cut
}

/// SSE answers: the shared rewriter driven by the restorer.
pub struct SseRestore {
    pub rw: SseTextRewriter,
}

impl SseRestore {
    /// Events up to 1 MiB (the default `max_body_bytes`).
    pub fn new() -> Self {
        Self::with_max_event_bytes(1 << 20)
    }

    /// Events up to `max_event_bytes` (the filter passes `max_body_bytes`, the bound of a buffered JSON
    /// answer, at least 256 KiB); a larger event passes unread, or is withheld with response scanning. Before, the shared 256 KiB default applied: a
    /// Responses stream echoes `instructions` and tools in `response.created` and repeats the whole
    /// answer in `response.completed`, so a large system prompt or a long answer lost those events and
    /// the OpenAI SDK's stream failed.
    pub fn with_max_event_bytes(max_event_bytes: usize) -> Self {
        Self { rw: SseTextRewriter::new(max_event_bytes) }
    }

    pub fn feed(&mut self, r: &mut Restorer, chunk: &[u8], end: bool) -> Vec<u8> {
        let mut out = self.rw.feed(chunk, r);
        if end {
            out.extend(self.rw.finish(r));
        }
        out
    }
}

impl Default for SseRestore {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::MaskState;
    use meshwarden_shared::config::parse_config;
    use meshwarden_shared::sse::SseParser;

    /// The strings at `pointer` of every JSON event of an SSE answer, joined.
    fn read(out: &[u8], pointer: &str) -> String {
        SseParser::default()
            .feed(out)
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
            .filter_map(|v| v.pointer(pointer).and_then(Value::as_str).map(str::to_string))
            .collect()
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn json_body_with_escapes_and_tool_arguments() {
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "a\"b@x.io"), ("<EMAIL_3>", "c@d.io")]), None);
        let body = br#"{"choices":[{"message":{"content":"mail \u003cEMAIL_1\u003e or <EMAIL_2>","tool_calls":[{"function":{"arguments":"{\"to\":\"<EMAIL_3>\"}"}}]}}]}"#;
        let out = r.rewrite_json_body(body).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "mail a\"b@x.io or <EMAIL_2>");
        let args: Value = serde_json::from_str(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(args["to"], "c@d.io");
        assert_eq!(r.restored, 2);
        // Broken JSON: raw restore with JSON escaping keeps it JSON-string-safe.
        let out = r.rewrite_json_body(br#"{"a":"<EMAIL_1>""#).unwrap();
        assert_eq!(out, br#"{"a":"a\"b@x.io""#.to_vec());
    }

    #[test]
    fn tool_arguments_in_json_answers_stay_json_whatever_the_value() {
        let mut r = Restorer::new(map(&[("<NAME_1>", "Jane \"JJ\" Doe"), ("<EMAIL_1>", "j@d.io")]), None);
        for body in [
            // Raw placeholder, and the escaped spelling inside the arguments text.
            &br#"{"choices":[{"message":{"tool_calls":[{"function":{"arguments":"{\"n\":\"<NAME_1>\",\"m\":\"\\u003cEMAIL_1\\u003e\"}"}}]}}]}"#[..],
            // Responses API `function_call` item.
            &br#"{"output":[{"type":"function_call","arguments":"{\"n\":\"<NAME_1>\",\"m\":\"<EMAIL_1>\"}"}]}"#[..],
        ] {
            let out = r.rewrite_json_body(body).unwrap();
            let v: Value = serde_json::from_slice(&out).unwrap();
            let args = v.pointer("/choices/0/message/tool_calls/0/function/arguments").or(v.pointer("/output/0/arguments"));
            let args: Value = serde_json::from_str(args.unwrap().as_str().unwrap()).unwrap();
            assert_eq!(args, serde_json::json!({"n": "Jane \"JJ\" Doe", "m": "j@d.io"}));
        }
    }

    /// The raw fast path of `rewrite_json_body` gives the same JSON as parsing, restoring every string
    /// and re-serialising (the path it replaces), values needing escapes included.
    #[test]
    fn raw_json_restore_agrees_with_parse_restore_serialise() {
        let pairs = [("<EMAIL_1>", "a\"b@x.io"), ("<PHONE_1>", "+44 20 7946 0958"), ("<CARD_1>", "back\\slash\nline")];
        let bodies = [
            r#"{"choices":[{"message":{"role":"assistant","content":"Hi <EMAIL_1>, call <PHONE_1>."}}],"usage":{"total_tokens":3}}"#,
            r#"{"content":[{"type":"text","text":"<CARD_1><EMAIL_1><EMAIL_1> <EMAIL_2> <div> a < b > c"}],"id":"<EMAIL_1>"}"#,
            r#"{"tool_calls":[{"function":{"arguments":"{\"to\":\"<EMAIL_1>\",\"n\":1}"}}]}"#,
            r#"[1, 2.5e3, true, null, "<PHONE_1>", {"k": ["<CARD_1>", "x<PHONE_1"]}]"#,
            r#"{"nothing":"to restore <EMAIL_9>"}"#,
        ];
        for body in bodies {
            let mut raw = Restorer::new(map(&pairs), None);
            let via_raw = raw.rewrite_json_body(body.as_bytes()).unwrap_or_else(|| body.as_bytes().to_vec());
            let mut parsed = Restorer::new(map(&pairs), None);
            let mut v: Value = serde_json::from_str(body).unwrap();
            rewrite_strings(&mut v, &mut parsed);
            let via_raw: Value = serde_json::from_slice(&via_raw).unwrap();
            assert_eq!(via_raw, v, "{body}");
            assert_eq!(raw.restored, parsed.restored, "{body}");
        }
    }

    #[test]
    fn hold_back_only_known_prefixes() {
        let r = Restorer::new(map(&[("<EMAIL_1>", "x")]), None);
        assert_eq!(r.ready_bytes(b"a <div"), 6);
        assert_eq!(r.ready_bytes(b"a <EM"), 2);
        assert_eq!(r.ready_bytes(b"a <"), 2);
        assert_eq!(r.ready_bytes(b"a <EMAIL_1"), 2);
        assert_eq!(r.ready_bytes(b"a <EMAIL_1>"), 11);
    }

    /// The hold-back answered from labels agrees with asking every placeholder (what it did before
    /// 2026-12-06), for every tail of many spellings, when the numbers have no gaps.
    #[test]
    fn hold_back_from_labels_agrees_with_every_placeholder() {
        let keys = ["<EMAIL_1>", "<EMAIL_2>", "<EMAIL_3>", "<EMAIL_10>", "<CREDIT_CARD_1>", "<CREDIT_1>", "<IP_V4_1>"];
        let mut pairs: Vec<(String, &str)> = keys.iter().map(|k| (k.to_string(), "v")).collect();
        for n in 4..10 {
            pairs.push((format!("<EMAIL_{n}>"), "v"));
        }
        let r = Restorer::new(pairs.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(), None);
        let old_raw = |pending: &[u8]| {
            let from = pending.len().saturating_sub(MAX_PLACEHOLDER);
            for k in from..pending.len() {
                let suffix = &pending[k..];
                if suffix[0] == b'<' && r.map.keys().any(|p| p.len() > suffix.len() && p.as_bytes().starts_with(suffix))
                {
                    return k;
                }
            }
            pending.len()
        };
        let old_json = |pending: &[u8]| {
            let mut n = old_raw(pending);
            let from = pending.len().saturating_sub(MAX_PLACEHOLDER + 10);
            for k in from..pending.len() {
                let suffix = &pending[k..];
                let starts = |p: &String| {
                    let esc = format!("\\u003c{}\\u003e", &p[1..p.len() - 1]).into_bytes();
                    esc.len() > suffix.len() && esc[..suffix.len()].eq_ignore_ascii_case(suffix)
                };
                if suffix[0] == b'\\' && r.map.keys().any(starts) {
                    n = n.min(k);
                    break;
                }
            }
            n
        };
        let texts = [
            "to <EMAIL_10> and <EMAIL_1>, <CREDIT_CARD_1> <CREDIT_1> <IP_V4_1> <EMAIL_11> <EMAIL_0> <EMAIL_01>",
            r#"{\"to\":\"\u003cEMAIL_10\u003e\",\"c\":\"\U003CCREDIT_1\U003E\", \u003cEMAIL_3\u003E \u003cEMAIL_12\u003e"#,
            "a < b <div> <EMAIL <EMAIL_ <CREDIT_ <CREDIT_CARD_ <IP_V4_ <IP_ \\u003c \\u00 \\",
        ];
        for t in texts {
            for end in 0..=t.len() {
                let pending = &t.as_bytes()[..end];
                assert_eq!(r.ready_bytes(pending), old_raw(pending), "{:?}", String::from_utf8_lossy(pending));
                assert_eq!(r.ready_bytes_json(pending), old_json(pending), "{:?}", String::from_utf8_lossy(pending));
            }
        }
    }

    /// A stream echoing thousands of placeholders: each event ending in a cut placeholder used to ask
    /// every placeholder of the request (quadratic: ~4·10^8 comparisons here, seconds); now it asks
    /// their labels.
    #[test]
    fn hold_back_stays_linear_with_thousands_of_placeholders() {
        let n = 20_000;
        let map: HashMap<String, String> = (1..=n).map(|i| (format!("<EMAIL_{i}>"), format!("u{i}@x.io"))).collect();
        let r = Restorer::new(map, None);
        let started = std::time::Instant::now();
        let mut held = 0;
        for i in 1..=n {
            let event = format!("and <EMAIL_{i}");
            held += event.len() - r.ready_bytes(event.as_bytes());
            let escaped = format!("and \\u003cEMAIL_{i}");
            held += escaped.len() - r.ready_bytes_json(escaped.as_bytes());
        }
        assert!(held > 0);
        assert!(started.elapsed() < std::time::Duration::from_millis(800), "{:?}", started.elapsed());
    }

    /// restore(mask(x)) == x for answers echoing the masked prompt, split at every byte, as SSE
    /// (OpenAI and Anthropic shapes) and as raw streams.
    #[test]
    fn property_restore_of_mask_at_every_split() {
        let engine = Engine::new(&parse_config::<Config>(b"{}").unwrap());
        let prompts = [
            "Mail john.doe@example.com or call (415) 555-2671; card 4111 1111 1111 1111.",
            "<EMAIL_1> is mine, jane@corp.io is hers, jane@corp.io again, key AKIAIOSFODNN7EXAMPLE",
            "IBAN DE89 3704 0044 0532 0130 00 and ssn 536-22-8963 from 10.0.0.1 é ü 日本",
        ];
        for x in prompts {
            let mut st = MaskState::default();
            st.reserve_lookalikes(x.as_bytes());
            let masked = String::from_utf8(st.mask(&engine, x.as_bytes()).unwrap()).unwrap();
            assert!(!masked.contains("@example.com") && !masked.contains("jane@"), "{masked}");
            // The model streams the masked text back in small deltas (3 chars each).
            let chars: Vec<char> = masked.chars().collect();
            let pieces: Vec<String> = chars.chunks(3).map(|c| c.iter().collect()).collect();
            for anthropic in [false, true] {
                let mut wire = String::new();
                for p in &pieces {
                    if anthropic {
                        wire.push_str(&format!(
                            "event: content_block_delta\ndata: {}\n\n",
                            serde_json::json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":p}})
                        ));
                    } else {
                        wire.push_str(&format!(
                            "data: {}\n\n",
                            serde_json::json!({"choices":[{"index":0,"delta":{"content":p}}]})
                        ));
                    }
                }
                wire.push_str(if anthropic {
                    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n"
                } else {
                    "data: [DONE]\n\n"
                });
                let bytes = wire.as_bytes();
                for cut in 0..=bytes.len() {
                    let mut r = Restorer::new(st.restore.clone(), None);
                    let mut s = SseRestore::new();
                    let (a, b) = bytes.split_at(cut);
                    let mut out = s.feed(&mut r, a, false);
                    out.extend(s.feed(&mut r, b, true));
                    let mut text = String::new();
                    for e in SseParser::default().feed(&out) {
                        if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
                            for t in meshwarden_shared::llm::extract_stream_delta_texts(&v) {
                                text.push_str(&t.text);
                            }
                        }
                    }
                    assert_eq!(text, x, "anthropic={anthropic} cut={cut}");
                }
            }
            // raw stream split at every byte
            let mb = masked.as_bytes();
            for cut in 0..=mb.len() {
                let mut r = Restorer::new(st.restore.clone(), None);
                let mut s = RawStream::default();
                let (a, b) = mb.split_at(cut);
                let mut out = s.feed(&mut r, a, false);
                out.extend(s.feed(&mut r, b, true));
                assert_eq!(String::from_utf8(out).unwrap(), x, "raw cut={cut}");
            }
        }
    }

    /// Raw answers (plain text; an error body; JSON too large to buffer, streamed as text) are scanned
    /// too: split at every byte, and at every pair of bytes, into network chunks, the client gets exactly
    /// the one-piece answer: our placeholder restored, the model's own card, phone number and email
    /// (one written with a JSON escape) redacted, the JSON still valid.
    #[test]
    fn raw_answers_scanned_and_restored_at_every_cut() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let cases: [(&[u8], bool, &str); 4] = [
            // In JSON text a number outside a string stays, though it passes Luhn: the answer stays JSON.
            (br#"{"id":4111111111111111,"card":"4111 1111 1111 1111","to":"<EMAIL_1>"}"#, true,
             r#"{"id":4111111111111111,"card":"[REDACTED]","to":"me@x.io"}"#),
            (b"Hi <EMAIL_1>. Card 4111 1111 1111 1111, call +44 20 7946 0958.", false,
             "Hi me@x.io. Card [REDACTED], call [REDACTED]."),
            (br#"{"answer":"Hi \u003cEMAIL_1\u003e, write to leak\u0040evil.example.org\nor card 4111-1111-1111-1111"}"#, true,
             r#"{"answer":"Hi me@x.io, write to [REDACTED]\nor card [REDACTED]"}"#),
            (b"data: {\"error\":\"bob@leak.com is <EMAIL_1>\"}\n\n", false,
             "data: {\"error\":\"[REDACTED] is me@x.io\"}\n\n"),
        ];
        for (body, json, want) in cases {
            let fresh = || Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine.clone()));
            let mut r = fresh();
            let whole = RawStream { escape_json: json, ..RawStream::default() }.feed(&mut r, body, true);
            assert_eq!(String::from_utf8_lossy(&whole), want);
            assert!(r.response_counts.total() >= 1);
            if json {
                let _: Value = serde_json::from_slice(&whole).unwrap();
            }
            for a in 0..=body.len() {
                for b in (a..=body.len()).step_by(if a % 7 == 0 { 1 } else { 13 }) {
                    let mut r = fresh();
                    let mut s = RawStream { escape_json: json, ..RawStream::default() };
                    let mut out = s.feed(&mut r, &body[..a], false);
                    out.extend(s.feed(&mut r, &body[a..b], false));
                    out.extend(s.feed(&mut r, &body[b..], true));
                    assert_eq!(String::from_utf8_lossy(&out), want, "cuts {a} {b}");
                }
            }
        }
        // Without scanning nothing is held back for it, and nothing is redacted.
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), None);
        assert_eq!(r.ready_raw(b"card 4111 1111", false), 14);
        assert_eq!(
            r.rewrite_raw(b"card 4111 1111 1111 1111 <EMAIL_1>", None).unwrap(),
            b"card 4111 1111 1111 1111 me@x.io"
        );
        // A cut never splits an escape; an escaped backslash is not one.
        assert_eq!(escape_start(br#"ab\u00"#, 6), 2);
        assert_eq!(escape_start(br#"ab\\u00"#, 7), 7);
        assert_eq!(escape_start(br#"ab\"#, 3), 2);
        assert_eq!(escape_start(br#"ab\n"#, 4), 4);
    }

    #[test]
    fn response_scanning_redacts_new_pii_but_restores_ours() {
        let engine = Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap());
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(Rc::new(engine)));
        let out = r.rewrite_str("yours <EMAIL_1>, leaked bob@leak.com").unwrap();
        assert_eq!(out, "yours me@x.io, leaked [REDACTED]");
        assert_eq!(r.response_counts.summary(), "email=1");
    }

    /// `pieces` as the content deltas of an OpenAI chat stream, through `r`: the text the client reads.
    fn restored_chat_stream(r: &mut Restorer, pieces: &[&str]) -> String {
        let mut wire = String::new();
        for p in pieces {
            wire.push_str(&format!("data: {}\n\n", serde_json::json!({"choices":[{"index":0,"delta":{"content":p}}]})));
        }
        wire.push_str("data: [DONE]\n\n");
        let out = SseRestore::new().feed(r, wire.as_bytes(), true);
        let mut text = String::new();
        for e in SseParser::default().feed(&out) {
            if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
                for t in meshwarden_shared::llm::extract_stream_delta_texts(&v) {
                    text.push_str(&t.text);
                }
            }
        }
        text
    }

    #[test]
    fn streamed_response_scanning_sees_values_cut_across_deltas() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let pieces = ["Write to bob@le", "ak.example.org or <EMA", "IL_1> now", "."];
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine));
        let text = restored_chat_stream(&mut r, &pieces);
        assert_eq!(text, "Write to [REDACTED] or me@x.io now.");
        assert_eq!(r.response_counts.summary(), "email=1");
    }

    #[test]
    fn streamed_response_scanning_sees_grouped_values_cut_across_deltas() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        // A card in groups of four, a phone number and an IBAN, each cut between two of their groups.
        let pieces =
            ["Card 4111 1111", " 1111 1111, call +44 20", " 7946 0958 or pay DE89 3704 0044", " 0532 0130 00 now."];
        let mut r = Restorer::new(map(&[]), Some(engine.clone()));
        let text = restored_chat_stream(&mut r, &pieces);
        assert_eq!(text, "Card [REDACTED], call [REDACTED] or pay [REDACTED] now.");
        // A delta that ends right after the value: the cut before its last word must not split the value.
        let pieces = ["Card 4111 1111 1111 1111,", " ok then."];
        let mut r = Restorer::new(map(&[]), Some(engine.clone()));
        assert_eq!(restored_chat_stream(&mut r, &pieces), "Card [REDACTED], ok then.");
        // A card wrapped across a line, and one in fullwidth digits, cut between two groups.
        let pieces = ["Card 4111 1111\n", "1111 1111\nok. And ４１１１ １１１１", " １１１１ １１１１ too."];
        let mut r = Restorer::new(map(&[]), Some(engine.clone()));
        assert_eq!(restored_chat_stream(&mut r, &pieces), "Card [REDACTED]\nok. And [REDACTED] too.");
        assert_eq!(grouped_value_start(b"the answer is yes"), 17, "prose is not held back");
        assert_eq!(grouped_value_start(b"pay to DE89 37"), 7);
    }

    /// A context word the model wrote in an earlier delta (or network chunk) counts for a value in a later
    /// one, as it does in the same text answered as JSON. Before, each piece was scanned alone: a bare SSN
    /// after "Your SSN is" or a bare phone number after "Call me at" in an earlier piece reached a
    /// streaming client unredacted while the same answer as JSON was redacted.
    #[test]
    fn streamed_response_scanning_reads_context_words_of_earlier_pieces() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let whole = "Your SSN is 536228963. Call me at 4155552671 tonight.";
        let mut r = Restorer::new(map(&[]), Some(engine.clone()));
        let json = r.rewrite_str(whole).unwrap();
        assert_eq!(json, "Your SSN is [REDACTED]. Call me at [REDACTED] tonight.");
        let pieces = [
            "Your",
            " SSN",
            " is",
            " 536",
            "228",
            "963",
            ".",
            " Call",
            " me",
            " at",
            " 415",
            "555",
            "2671",
            " tonight.",
        ];
        let mut r = Restorer::new(map(&[]), Some(engine.clone()));
        assert_eq!(restored_chat_stream(&mut r, &pieces), json, "SSE deltas");
        for size in [3, 5, 16] {
            let mut r = Restorer::new(map(&[]), Some(engine.clone()));
            assert_eq!(raw_stream_in_chunks(&mut r, whole, size), json, "raw chunks of {size}");
        }
        // Context stays within its channel: another content block's words do not count.
        let wire = [(0, "Your SSN is "), (1, "536228963 ok")]
            .iter()
            .map(|(i, t)| {
                let e =
                    serde_json::json!({"type":"content_block_delta","index":i,"delta":{"type":"text_delta","text":t}});
                format!("event: content_block_delta\ndata: {e}\n\n")
            })
            .collect::<String>();
        let mut r = Restorer::new(map(&[]), Some(engine));
        let out = String::from_utf8(SseRestore::new().feed(&mut r, wire.as_bytes(), true)).unwrap();
        assert!(out.contains("536228963"), "{out}");
    }

    /// Gemini's `streamGenerateContent` without `alt=sse` answers `application/json`: a JSON array of
    /// chunks, streamed, one text piece per element. A placeholder cut across two elements is restored
    /// and a value the model wrote across two is redacted; before, each element's text was restored and
    /// scanned alone: the client read `<EMA` `IL_1>` and `bob@le` `ak.example.org` unredacted.
    #[test]
    fn gemini_json_array_stream_restored_and_scanned_across_elements() {
        let chunk = |t: &str, last: bool| {
            let mut c = serde_json::json!({"candidates":[{"content":{"parts":[{"text":t}],"role":"model"},"index":0}],
                "usageMetadata":{"promptTokenCount":9},"modelVersion":"gemini-2.0-flash"});
            if last {
                c["candidates"][0]["finishReason"] = serde_json::json!("STOP");
            }
            c.to_string()
        };
        let pieces = ["Mail <EMA", "IL_1> or bob@le", "ak.example.org", " today."];
        let elements: Vec<String> = pieces.iter().enumerate().map(|(i, p)| chunk(p, i == pieces.len() - 1)).collect();
        let body = format!("[{}]", elements.join("\r\n,\r\n"));
        let text = |out: &[u8]| -> String {
            let v: Value = serde_json::from_slice(out).unwrap();
            let items = v.as_array().unwrap();
            assert!(items.iter().all(|c| c["candidates"][0]["index"] == 0), "{v}");
            items.iter().filter_map(|c| c.pointer("/candidates/0/content/parts/0/text")?.as_str()).collect()
        };
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), None);
        let out = r.rewrite_json_body(body.as_bytes()).expect("restored");
        assert_eq!(text(&out), "Mail me@x.io or bob@leak.example.org today.");
        assert_eq!(r.restored, 1);
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine));
        let out = r.rewrite_json_body(body.as_bytes()).expect("restored and scanned");
        assert_eq!(text(&out), "Mail me@x.io or [REDACTED] today.");
        // Nothing to restore: the answer is not touched.
        let mut r = Restorer::new(map(&[("<EMAIL_2>", "x@y.io")]), None);
        assert_eq!(
            r.rewrite_json_body(br#"[{"candidates":[{"content":{"parts":[{"text":"hi"}]}}]},{"candidates":[]}]"#),
            None
        );
    }

    /// Gemini streams thought summaries (`"thought": true` parts, with `includeThoughts`) and then the
    /// answer in parts at the same position of successive chunks. With response scanning the thought's
    /// last word is held back: it used to be joined to the answer's first delta ("userHello there") and
    /// lost from the thought. Thought and answer are separate delta streams; the thought's held text is
    /// flushed before the answer's first delta.
    #[test]
    fn gemini_thought_text_is_never_joined_to_the_answer() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let ev = |t: &str, thought: bool| {
            let mut part = serde_json::json!({"text": t});
            if thought {
                part["thought"] = serde_json::json!(true);
            }
            format!(
                "data: {}\n\n",
                serde_json::json!({"candidates":[{"content":{"parts":[part],"role":"model"},"index":0}]})
            )
        };
        let fin = serde_json::json!({"candidates":[{"content":{"parts":[{"text":""}],"role":"model"},"finishReason":"STOP","index":0}]});
        let wire = format!(
            "{}{}{}{}data: {fin}\n\n",
            ev("Thinking about the", true),
            ev(" user", true),
            ev("Hello there", false),
            ev(", friend.", false)
        );
        let mut r = Restorer::new(map(&[]), Some(engine));
        let out = SseRestore::new().feed(&mut r, wire.as_bytes(), true);
        let (mut thought, mut answer, mut order) = (String::new(), String::new(), String::new());
        for e in SseParser::default().feed(&out) {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            let part = &v["candidates"][0]["content"]["parts"][0];
            let t = part["text"].as_str().unwrap_or_default();
            if part["thought"] == true {
                thought.push_str(t);
            } else {
                answer.push_str(t);
            }
            order.push_str(t);
        }
        assert_eq!((thought.as_str(), answer.as_str()), ("Thinking about the user", "Hello there, friend."));
        assert_eq!(order, "Thinking about the userHello there, friend.", "the thought comes first");
    }

    /// Refusals stream token by token too: OpenAI chat `delta.refusal` (structured outputs) and Responses
    /// `response.refusal.delta`; Responses custom tool input (`response.custom_tool_call_input.delta`)
    /// likewise. A placeholder cut across two of their events is restored and a value written across two
    /// is redacted. Before, each event was restored and scanned alone: `<EMA` `IL_1>`.
    #[test]
    fn streamed_refusals_and_custom_tool_input_restored_across_events() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let pieces = ["I can't mail <EMA", "IL_1> or bob@le", "ak.example.org", " now."];
        let want = "I can't mail me@x.io or [REDACTED] now.";
        let mut wire = String::new();
        for p in pieces {
            wire.push_str(&format!("data: {}\n\n", serde_json::json!({"choices":[{"index":0,"delta":{"refusal":p}}]})));
        }
        wire.push_str(
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
        );
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine.clone()));
        let out = SseRestore::new().feed(&mut r, wire.as_bytes(), true);
        assert_eq!(read(&out, "/choices/0/delta/refusal"), want, "chat refusal");
        for kind in ["response.refusal.delta", "response.custom_tool_call_input.delta"] {
            let mut wire = String::new();
            for p in pieces {
                let ev = serde_json::json!({"type":kind,"item_id":"x_1","output_index":0,"content_index":0,"delta":p});
                wire.push_str(&format!("event: {kind}\ndata: {ev}\n\n"));
            }
            let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine.clone()));
            let out = SseRestore::new().feed(&mut r, wire.as_bytes(), true);
            assert_eq!(read(&out, "/delta"), want, "{kind}");
        }
    }

    /// scan_responses with `response_action: partial` on tool-call arguments (JSON text): the value's
    /// JSON escapes are kept. Before, a private key's `\n` came out `\*`, and the client's
    /// `json.loads(arguments)` failed.
    #[test]
    fn partial_response_scan_keeps_tool_arguments_json() {
        let engine = Rc::new(Engine::new(
            &parse_config::<Config>(br#"{"scan_responses":true,"response_action":"partial"}"#).unwrap(),
        ));
        let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n-----END RSA PRIVATE KEY-----";
        let args = serde_json::json!({"path":"id_rsa","content":key}).to_string();
        let body = serde_json::json!({"choices":[{"index":0,"message":{"role":"assistant","content":null,
            "tool_calls":[{"id":"c1","type":"function","function":{"name":"write","arguments":args}}]}}]});
        let mut r = Restorer::new(map(&[]), Some(engine.clone()));
        let out = r.rewrite_json_body(body.to_string().as_bytes()).expect("scanned");
        let v: Value = serde_json::from_slice(&out).unwrap();
        let a = v.pointer("/choices/0/message/tool_calls/0/function/arguments").and_then(Value::as_str).unwrap();
        let a: Value = serde_json::from_str(a).unwrap_or_else(|err| panic!("{err}: {a}"));
        let content = a["content"].as_str().unwrap();
        assert!(!content.contains("MIIEow") && content.contains('\n'), "{content}");
    }

    /// Citations arrive inside a text block, between its text deltas: Anthropic `citations_delta`,
    /// Responses `response.output_text.annotation.added`. Before, they flushed the held text like an
    /// end of block: a placeholder cut there reached the client as `<EMA` `IL_1>`, and with
    /// scan_responses a number cut there was scanned in two halves and passed unredacted.
    #[test]
    fn citations_inside_a_text_block_do_not_cut_its_text() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let pieces = ["Mail <EMA", "IL_1> or call 415-555", "-2671 today."];
        let want = "Mail me@x.io or call [REDACTED] today.";
        let citation = serde_json::json!({"type":"content_block_delta","index":0,"delta":{"type":"citations_delta",
            "citation":{"type":"char_location","cited_text":"x","document_index":0,"start_char_index":0,"end_char_index":1}}});
        let mut wire = String::new();
        for p in pieces {
            let ev = serde_json::json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":p}});
            wire.push_str(&format!(
                "event: content_block_delta\ndata: {ev}\n\nevent: content_block_delta\ndata: {citation}\n\n"
            ));
        }
        wire.push_str("event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n");
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine.clone()));
        let out = SseRestore::new().feed(&mut r, wire.as_bytes(), true);
        assert_eq!(read(&out, "/delta/text"), want, "Anthropic citations_delta");
        let annotation = serde_json::json!({"type":"response.output_text.annotation.added","item_id":"msg_1","output_index":0,
            "content_index":0,"annotation_index":0,"annotation":{"type":"url_citation","url":"https://x.example","title":"x","start_index":0,"end_index":1}});
        let mut wire = String::new();
        for p in pieces {
            let ev = serde_json::json!({"type":"response.output_text.delta","item_id":"msg_1","output_index":0,"content_index":0,"delta":p});
            wire.push_str(&format!("event: response.output_text.delta\ndata: {ev}\n\nevent: response.output_text.annotation.added\ndata: {annotation}\n\n"));
        }
        let done = serde_json::json!({"type":"response.output_text.done","item_id":"msg_1","output_index":0,"content_index":0,"text":""});
        wire.push_str(&format!("event: response.output_text.done\ndata: {done}\n\n"));
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine.clone()));
        let out = SseRestore::new().feed(&mut r, wire.as_bytes(), true);
        let deltas: String = SseParser::default()
            .feed(&out)
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
            .filter(|v| v["type"] == "response.output_text.delta")
            .filter_map(|v| v["delta"].as_str().map(str::to_string))
            .collect();
        assert_eq!(deltas, want, "Responses annotation.added");
    }

    /// An event over the bound (`max_body_bytes`, at least 256 KiB) is passed on as it came, every byte,
    /// when the answer is only restored: a placeholder in it stays a placeholder (no value is restored
    /// into it, none leaks). Before, it was dropped: a Responses image generation's
    /// `response.image_generation_call.partial_image` (base64, over 1 MiB) never reached the client,
    /// whose SDK then missed the image (and `response.completed` repeating it). With scan_responses it
    /// is still withheld: its text could not be scanned.
    #[test]
    fn events_over_the_bound_pass_unchanged_when_only_restoring() {
        let image = "QUJD".repeat(3000);
        let big = serde_json::json!({"type":"response.image_generation_call.partial_image","item_id":"ig_1",
            "output_index":0,"partial_image_index":0,"partial_image_b64":image,"note":"for <EMAIL_1>"});
        let big_block = format!("event: response.image_generation_call.partial_image\r\ndata: {big}\r\n\r\n");
        let delta = |t: &str| {
            let ev = serde_json::json!({"type":"response.output_text.delta","item_id":"m","output_index":1,"content_index":0,"delta":t});
            format!("event: response.output_text.delta\ndata: {ev}\n\n")
        };
        let stream = format!("{}{}{}{}", delta("Hi <EMA"), delta("IL_1>!"), big_block, delta(" bye"));
        let texts = |out: &[u8]| -> String {
            SseParser::new(usize::MAX)
                .feed(out)
                .iter()
                .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
                .filter_map(|v| v["delta"].as_str().map(str::to_string))
                .collect()
        };
        for chunk in [7, 1000, 5000, stream.len()] {
            let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), None);
            let mut sse = SseRestore::with_max_event_bytes(4096);
            let mut out = Vec::new();
            let pieces: Vec<&[u8]> = stream.as_bytes().chunks(chunk).collect();
            for (i, c) in pieces.iter().enumerate() {
                out.extend(sse.feed(&mut r, c, i + 1 == pieces.len()));
            }
            let text = String::from_utf8(out.clone()).unwrap();
            assert!(text.contains(&big_block), "chunk {chunk}: the big event passes byte for byte");
            assert_eq!(texts(&out), "Hi me@x.io! bye", "chunk {chunk}");
            assert!(text.find("Hi ").unwrap() < text.find(&big_block).unwrap(), "order kept");
            assert_eq!(sse.rw.oversized_events(), 1);
        }
        // With scan_responses the event is withheld (it could not be scanned), the rest goes on.
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine));
        let mut sse = SseRestore::with_max_event_bytes(4096);
        let out = sse.feed(&mut r, stream.as_bytes(), true);
        assert!(!String::from_utf8_lossy(&out).contains("partial_image"));
        assert_eq!(texts(&out), "Hi me@x.io! bye");
    }

    /// SSE comments that keep an idle stream open (OpenRouter's `: OPENROUTER PROCESSING` while a model
    /// is slow to start, `: ping` of other servers) reach the client as sent. Before, the parser dropped
    /// them: the client saw no byte until the first token and a proxy or client read timeout closed it.
    #[test]
    fn keep_alive_comments_reach_the_client() {
        let stream = ": OPENROUTER PROCESSING\n\n: OPENROUTER PROCESSING\r\n\r\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi <EMAIL_1>\"}}]}\n\ndata: [DONE]\n\n";
        for chunk in [1, 5, stream.len()] {
            let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), None);
            let mut sse = SseRestore::new();
            let mut out = Vec::new();
            let pieces: Vec<&[u8]> = stream.as_bytes().chunks(chunk).collect();
            for (i, c) in pieces.iter().enumerate() {
                out.extend(sse.feed(&mut r, c, i + 1 == pieces.len()));
            }
            let text = String::from_utf8(out).unwrap();
            // (a chunk cut inside a `\r\n` sends its `\n` with the next event, which is re-encoded)
            assert!(
                text.starts_with(": OPENROUTER PROCESSING\n\n: OPENROUTER PROCESSING\r\n\r"),
                "chunk {chunk}: {text}"
            );
            assert!(text.contains("Hi me@x.io") && text.ends_with("data: [DONE]\n\n"), "{text}");
        }
    }

    /// Audio answers stream their transcript one piece per event: chat `delta.audio.transcript` (beside
    /// base64 `delta.audio.data`) and Responses `response.audio.transcript.delta`. Before, each event was
    /// rewritten alone: a placeholder cut across two reached the client as `<EMA` `IL_1>` and a value the
    /// model wrote across two passed scan_responses unredacted.
    #[test]
    fn streamed_audio_transcripts_restored_and_scanned_across_events() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let pieces = ["I will mail <EMA", "IL_1> and bob@le", "ak.example.org", " now."];
        let want = "I will mail me@x.io and [REDACTED] now.";
        let mut wire = String::new();
        for p in pieces {
            let ev = serde_json::json!({"choices":[{"index":0,"delta":{"audio":{"id":"audio_1","transcript":p}}}]});
            wire.push_str(&format!("data: {ev}\n\n"));
        }
        wire.push_str(
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
        );
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine.clone()));
        let out = SseRestore::new().feed(&mut r, wire.as_bytes(), true);
        assert_eq!(read(&out, "/choices/0/delta/audio/transcript"), want, "chat audio transcript");
        let mut wire = String::new();
        for p in pieces {
            let ev = serde_json::json!({"type":"response.audio.transcript.delta","response_id":"resp_1","delta":p});
            wire.push_str(&format!("event: response.audio.transcript.delta\ndata: {ev}\n\n"));
        }
        let ev = serde_json::json!({"type":"response.audio.transcript.done","response_id":"resp_1"});
        wire.push_str(&format!("event: response.audio.transcript.done\ndata: {ev}\n\n"));
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine.clone()));
        let out = SseRestore::new().feed(&mut r, wire.as_bytes(), true);
        assert_eq!(read(&out, "/delta"), want, "Responses audio transcript");
    }

    /// Reasoning streamed by OpenAI-compatible servers (`delta.reasoning_content`: DeepSeek, vLLM;
    /// `delta.reasoning`: OpenRouter, Groq), Responses reasoning summaries and Ollama `message.thinking`,
    /// one token per event: a placeholder cut across two events is restored and a value the model writes
    /// cut across two is redacted. Before, each event was rewritten alone: the client saw `<EMA` `IL_1>`
    /// and the model's `bob@le` `ak.example.org` unredacted.
    #[test]
    fn streamed_reasoning_restored_and_scanned_across_events() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let pieces = ["User <EMA", "IL_1> and bob@le", "ak.example.org", " agree."];
        let want = "User me@x.io and [REDACTED] agree.";
        for key in ["reasoning_content", "reasoning"] {
            let mut wire = String::new();
            for p in pieces {
                wire.push_str(&format!("data: {}\n\n", serde_json::json!({"choices":[{"index":0,"delta":{key:p}}]})));
            }
            wire.push_str("data: [DONE]\n\n");
            let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine.clone()));
            let out = SseRestore::new().feed(&mut r, wire.as_bytes(), true);
            assert_eq!(read(&out, &format!("/choices/0/delta/{key}")), want, "{key}");
        }
        let mut wire = String::new();
        for p in pieces {
            let ev = serde_json::json!({"type":"response.reasoning_summary_text.delta","item_id":"rs_1","output_index":0,"summary_index":0,"delta":p});
            wire.push_str(&format!("event: response.reasoning_summary_text.delta\ndata: {ev}\n\n"));
        }
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine.clone()));
        let out = SseRestore::new().feed(&mut r, wire.as_bytes(), true);
        assert_eq!(read(&out, "/delta"), want, "Responses reasoning summary");
        // Ollama NDJSON (`/api/chat` with a thinking model).
        let mut body = String::new();
        for p in pieces {
            body.push_str(&format!("{}\n", serde_json::json!({"model":"qwen3","message":{"role":"assistant","content":"","thinking":p},"done":false})));
        }
        body.push_str(&format!(
            "{}\n",
            serde_json::json!({"model":"qwen3","message":{"role":"assistant","content":""},"done":true})
        ));
        let mut r = Restorer::new(map(&[("<EMAIL_1>", "me@x.io")]), Some(engine));
        let out = r.rewrite_json_body(body.as_bytes()).unwrap();
        let thinking: String = String::from_utf8(out)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v.pointer("/message/thinking").and_then(Value::as_str).map(str::to_string))
            .collect();
        assert_eq!(thinking, want, "Ollama thinking");
    }

    /// A JWT signed with RS256 (its signature alone is 342 characters) streamed in small deltas or chunks:
    /// held back whole until the space after it. Before, a word over 256 bytes was not held back at all
    /// and the token reached the client cut in pieces the scanner could not recognise.
    #[test]
    fn streamed_long_jwt_redacted_whole() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let sig: String = (0..342).map(|i| char::from(b"AbC0_9-xYz"[i % 10])).collect();
        let jwt =
            format!("eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJqYW5lIiwi{}.{sig}", "aXNzIjoiaHR0cHM6".repeat(20));
        let text = format!("Use the token {jwt} now.");
        for size in [9, 100] {
            let pieces: Vec<&str> = text.as_bytes().chunks(size).map(|c| std::str::from_utf8(c).unwrap()).collect();
            let mut r = Restorer::new(map(&[]), Some(engine.clone()));
            assert_eq!(restored_chat_stream(&mut r, &pieces), "Use the token [REDACTED] now.", "deltas of {size}");
            let mut r = Restorer::new(map(&[]), Some(engine.clone()));
            assert_eq!(raw_stream_in_chunks(&mut r, &text, size), "Use the token [REDACTED] now.", "chunks of {size}");
        }
    }

    /// A private key block the model writes, streamed in small deltas (SSE) or network chunks (raw text):
    /// the block is held back until its END line, so the scanner sees it whole. Before, the BEGIN line's
    /// piece was redacted to its end and the key's base64 lines in the later pieces reached the client.
    /// `text` fed to a [`RawStream`] in network chunks of `size` bytes: what the client gets.
    fn raw_stream_in_chunks(r: &mut Restorer, text: &str, size: usize) -> String {
        let mut raw = RawStream::default();
        let mut out = Vec::new();
        for c in text.as_bytes().chunks(size) {
            out.extend(raw.feed(r, c, false));
        }
        out.extend(raw.feed(r, b"", true));
        String::from_utf8(out).unwrap()
    }

    /// With `scan_responses`, a card (or phone number, IBAN) whose groups the model separates with an
    /// invisible character (zero-width space, soft hyphen, word joiner), a no-break space, or a
    /// percent-encoded or HTML-written separator, cut anywhere across two SSE events or two network chunks
    /// of a raw answer, is redacted whole. Before 2026-12-07 the hold-back did not count these characters
    /// as part of a grouped value: with the cut after the space that follows
    /// `Card 4111\u{200b}1111\u{200b}1111\u{200b}1111`, the text up to its last group was released and
    /// scanned alone, and the card reached the client.
    #[test]
    fn streamed_values_with_invisible_separators_are_redacted_at_every_cut() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        for sep in [
            "\u{200b}",
            "\u{ad}",
            "\u{2060}",
            "\u{a0}",
            " \u{200b}",
            "\u{200b} ",
            " \u{ad}",
            "%20",
            "&nbsp;",
            "&#8203;",
        ] {
            for (template, kind) in [
                ("Card 4111{sep}1111{sep}1111{sep}1111 ok then.", "card"),
                ("Call +44{sep}20{sep}7946{sep}0958 ok then.", "phone"),
                ("Call %2B44{sep}20{sep}7946{sep}0958 ok then.", "phone"),
                ("IBAN DE89{sep}3704{sep}0044{sep}0532{sep}0130{sep}00 ok.", "iban"),
            ] {
                let text = template.replace("{sep}", sep);
                let mut r = Restorer::new(map(&[]), Some(engine.clone()));
                let whole = r.rewrite_str(&text).unwrap_or_else(|| panic!("{kind} not found in {text:?}"));
                assert!(whole.contains("[REDACTED] ok"), "{text:?}: {whole}");
                for cut in (1..text.len()).filter(|&c| text.is_char_boundary(c)) {
                    let (a, b) = text.split_at(cut);
                    let mut r = Restorer::new(map(&[]), Some(engine.clone()));
                    assert_eq!(restored_chat_stream(&mut r, &[a, b]), whole, "SSE {a:?} | {b:?}");
                    let mut r = Restorer::new(map(&[]), Some(engine.clone()));
                    let mut raw = RawStream::default();
                    let mut out = raw.feed(&mut r, a.as_bytes(), false);
                    out.extend(raw.feed(&mut r, b.as_bytes(), true));
                    assert_eq!(String::from_utf8(out).unwrap(), whole, "raw {a:?} | {b:?}");
                }
            }
        }
        assert_eq!(grouped_value_start("pay 4111\u{200b}1111 ".as_bytes()), 4);
        assert_eq!(grouped_value_start(b"phone=%2B44%2020 "), 6, "the `%` of `%2B` is held with it");
        assert_eq!(grouped_value_start(b"50%20off and more"), 17, "prose is not held back");
    }

    #[test]
    fn streamed_private_key_redacted_whole() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n\
                   VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n-----END RSA PRIVATE KEY-----";
        let text = format!("Here is the key:\n{key}\nDone.");
        for size in [1, 7, 40] {
            let pieces: Vec<&str> = text.as_bytes().chunks(size).map(|c| std::str::from_utf8(c).unwrap()).collect();
            let mut r = Restorer::new(map(&[]), Some(engine.clone()));
            assert_eq!(
                restored_chat_stream(&mut r, &pieces),
                "Here is the key:\n[REDACTED]\nDone.",
                "deltas of {size}"
            );
            let mut r = Restorer::new(map(&[]), Some(engine.clone()));
            assert_eq!(
                raw_stream_in_chunks(&mut r, &text, size),
                "Here is the key:\n[REDACTED]\nDone.",
                "chunks of {size}"
            );
        }
        // Other blocks (a certificate) and complete keys are not held back.
        assert_eq!(unterminated_private_key(b"a -----BEGIN CERTIFICATE-----\nMIIB", 0), None);
        assert_eq!(unterminated_private_key(key.as_bytes(), key.len()), None);
        assert_eq!(unterminated_private_key(b"a -----BEGIN RSA PRI", 20), Some(2));
        assert_eq!(unterminated_private_key(b"a -----BEGIN PGP PRIVATE KEY BLOCK-----\nlQ", 43), Some(2));
        assert_eq!(unterminated_private_key(b"a -----BEGIN EC PRIVATE KEY-----\nMH\n-----END EC PRIV", 50), Some(2));
        assert_eq!(unterminated_private_key(key.as_bytes(), key.len() - 8), Some(0), "a cut inside the END line");
    }

    /// Ollama streams (`/api/chat`, `/api/generate`; `application/x-ndjson`, buffered as JSON) send one
    /// JSON object per line and one token per line: a placeholder is cut across lines, and so is a value
    /// the response scanner must see whole. Restored and scanned as the SSE deltas are, lines kept JSON.
    #[test]
    fn ollama_ndjson_stream_restored_and_scanned_across_lines() {
        let line = |t: &str, done: bool| {
            format!(
                "{}\n",
                serde_json::json!({"model":"llama3","message":{"role":"assistant","content":t},"done":done})
            )
        };
        let generate =
            |t: &str, done: bool| format!("{}\n", serde_json::json!({"model":"llama3","response":t,"done":done}));
        type Make<'a> = &'a dyn Fn(&str, bool) -> String;
        let shapes: [(Make, &str); 2] = [(&line, "/message/content"), (&generate, "/response")];
        for (make, pointer) in shapes {
            let body: String = ["Write to <", "EMAIL", "_1", "> or bob@le", "ak.example.org", " now."]
                .iter()
                .map(|t| make(t, false))
                .chain([make("", true)])
                .collect();
            let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
            for scan in [None, Some(engine)] {
                let scanned = scan.is_some();
                let mut r = Restorer::new(map(&[("<EMAIL_1>", "me \"x\"@x.io")]), scan);
                let out = r.rewrite_json_body(body.as_bytes()).unwrap_or_else(|| body.as_bytes().to_vec());
                let out = String::from_utf8(out).unwrap();
                let mut text = String::new();
                let mut last_done = false;
                for l in out.lines() {
                    let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                    text.push_str(v.pointer(pointer).and_then(Value::as_str).unwrap());
                    last_done = v["done"] == true;
                }
                let expected = if scanned {
                    "Write to me \"x\"@x.io or [REDACTED] now."
                } else {
                    "Write to me \"x\"@x.io or bob@leak.example.org now."
                };
                assert_eq!(text, expected, "{pointer}: {out}");
                assert!(last_done, "the done line stays last: {out}");
            }
        }
    }

    /// SSE tool-call arguments (OpenAI `function.arguments`, Anthropic `partial_json`) are JSON text:
    /// restored values JSON-escaped and `\u003c…\u003e` placeholders matched, split at every point.
    /// Anthropic thinking deltas are restored across events too.
    #[test]
    fn sse_tool_arguments_restored_as_json_and_thinking_across_events() {
        let m = map(&[("<EMAIL_1>", "bob@corp.io"), ("<NAME_1>", "Jane \"JJ\" Doe")]);
        let input = "{\"name\":\"<NAME_1>\",\"to\":\"\\u003cEMAIL_1\\u003e\"}";
        let chars: Vec<char> = input.chars().collect();
        let openai = |t: &str| {
            let e = serde_json::json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":t}}]}}]});
            format!("data: {e}\n\n")
        };
        let anthropic = |t: &str| {
            let e = serde_json::json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":t}});
            format!("event: content_block_delta\ndata: {e}\n\n")
        };
        type Make<'a> = &'a dyn Fn(&str) -> String;
        let shapes: [(Make, &str); 2] =
            [(&openai, "/choices/0/delta/tool_calls/0/function/arguments"), (&anthropic, "/delta/partial_json")];
        for (make, pointer) in shapes {
            for at in 0..=chars.len() {
                let (a, b) = chars.split_at(at);
                let stream = format!("{}{}", make(&a.iter().collect::<String>()), make(&b.iter().collect::<String>()));
                let mut r = Restorer::new(m.clone(), None);
                let mut s = SseRestore::new();
                let out = s.feed(&mut r, stream.as_bytes(), true);
                let mut got = String::new();
                for e in SseParser::default().feed(&out) {
                    let v: Value = serde_json::from_str(&e.data).unwrap();
                    got.push_str(v.pointer(pointer).and_then(Value::as_str).unwrap());
                }
                let v: Value = serde_json::from_str(&got).unwrap_or_else(|e| panic!("{pointer} {at}: {e}: {got}"));
                assert_eq!(v, serde_json::json!({"name":"Jane \"JJ\" Doe","to":"bob@corp.io"}), "{pointer} {at}");
            }
        }
        let t = |x: &str| {
            let e = serde_json::json!({"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":x}});
            format!("event: content_block_delta\ndata: {e}\n\n")
        };
        let stream = format!("{}{}", t("user is <EMA"), t("IL_1>."));
        let mut r = Restorer::new(m, None);
        let out = SseRestore::new().feed(&mut r, stream.as_bytes(), true);
        let mut got = String::new();
        for e in SseParser::default().feed(&out) {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            got.push_str(v.pointer("/delta/thinking").and_then(Value::as_str).unwrap());
        }
        assert_eq!(got, "user is bob@corp.io.");
    }
}

#[cfg(test)]
mod large_event_tests {
    use super::*;
    use meshwarden_shared::sse::SseParser;

    /// A Responses stream echoes the request's `instructions` (and tools) in `response.created`,
    /// `response.in_progress` and `response.completed`, and repeats the whole answer in the last one:
    /// with a 300 KB system prompt (or a long answer) each is over 256 KiB. They were dropped (the SSE
    /// parser's bound), and the OpenAI SDK's `responses.stream()` raises when its first event is not
    /// `response.created` ("Expected to have received `response.created` before ...") or when no
    /// `response.completed` comes.
    #[test]
    fn responses_events_over_256_kib_reach_the_client() {
        let map: HashMap<String, String> = [("<EMAIL_1>".to_string(), "jane@x.io".to_string())].into();
        let mut r = Restorer::new(map, None);
        let instructions = format!("Write to <EMAIL_1>. {}", "Context line. ".repeat(300 * 1024 / 14));
        let created = serde_json::json!({"type": "response.created",
            "response": {"id": "resp_1", "status": "in_progress", "instructions": instructions, "output": []}});
        let delta = serde_json::json!({"type": "response.output_text.delta", "output_index": 0,
            "content_index": 0, "delta": "Hi <EMAIL_1>"});
        let completed = serde_json::json!({"type": "response.completed",
            "response": {"id": "resp_1", "status": "completed", "instructions": instructions,
                "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi <EMAIL_1>"}]}]}});
        let mut wire = String::new();
        for (name, v) in
            [("response.created", &created), ("response.output_text.delta", &delta), ("response.completed", &completed)]
        {
            wire.push_str(&format!("event: {name}\ndata: {v}\n\n"));
        }
        assert!(wire.len() > 600 * 1024);
        let out = String::from_utf8(SseRestore::new().feed(&mut r, wire.as_bytes(), true)).unwrap();
        let events: Vec<Value> = SseParser::new(usize::MAX)
            .feed(out.as_bytes())
            .into_iter()
            .filter_map(|e| serde_json::from_str(&e.data).ok())
            .collect();
        let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(types, ["response.created", "response.output_text.delta", "response.completed"]);
        let first = events.first().unwrap();
        assert!(first["response"]["instructions"].as_str().unwrap().starts_with("Write to jane@x.io."));
        let last = events.last().unwrap();
        assert_eq!(last["response"]["output"][0]["content"][0]["text"], "Hi jane@x.io");
    }
}

#[cfg(test)]
mod legacy_function_call_tests {
    use super::*;
    use meshwarden_shared::sse::SseParser;

    /// Chat completions with the legacy `functions` parameter stream the call in
    /// `choices[].delta.function_call.arguments`, a few characters per chunk, so a placeholder is cut
    /// across chunks. Each chunk was restored alone: the client's function ran with `<EMAIL_1>` as the
    /// address (and a value with a quote would not have been JSON-escaped across chunks).
    #[test]
    fn streamed_legacy_function_call_arguments_restored_across_chunks() {
        let map: HashMap<String, String> = [("<EMAIL_1>".to_string(), "jane \"JJ\" doe@x.io".to_string())].into();
        let mut r = Restorer::new(map, None);
        let mut wire = String::new();
        let first = serde_json::json!({"choices":[{"index":0,"delta":{"role":"assistant","content":null,
            "function_call":{"name":"send_mail","arguments":""}}}]});
        wire.push_str(&format!("data: {first}\n\n"));
        for piece in ["{\"to\":\"<EMA", "IL_1>\",\"cc\":\"\\u003cEMA", "IL_1\\u003e\"}"] {
            let ev = serde_json::json!({"choices":[{"index":0,"delta":{"function_call":{"arguments":piece}}}]});
            wire.push_str(&format!("data: {ev}\n\n"));
        }
        wire.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"function_call\"}]}\n\n");
        wire.push_str("data: [DONE]\n\n");
        let out = SseRestore::new().feed(&mut r, wire.as_bytes(), true);
        let mut args = String::new();
        for e in SseParser::default().feed(&out) {
            if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
                if let Some(a) = v.pointer("/choices/0/delta/function_call/arguments").and_then(Value::as_str) {
                    args.push_str(a);
                }
            }
        }
        let parsed: Value = serde_json::from_str(&args).unwrap_or_else(|e| panic!("{e}: {args}"));
        assert_eq!(parsed, serde_json::json!({"to": "jane \"JJ\" doe@x.io", "cc": "jane \"JJ\" doe@x.io"}), "{args}");
    }
}

#[cfg(test)]
mod responses_tool_delta_tests {
    use super::*;
    use crate::config::Config;
    use meshwarden_shared::config::parse_config;
    use meshwarden_shared::sse::SseParser;

    fn read(out: &[u8]) -> String {
        SseParser::default()
            .feed(out)
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
            .filter_map(|v| v.pointer("/delta").and_then(Value::as_str).map(str::to_string))
            .collect()
    }

    /// Responses code interpreter code (`response.code_interpreter_call_code.delta`) and remote MCP call
    /// arguments (`response.mcp_call_arguments.delta`, JSON text) are streamed a token per event: a
    /// placeholder cut across two events is restored and a value the model writes across two is
    /// redacted by `scan_responses`. Before, each event was restored and scanned alone: the client read
    /// `<EMA` `IL_1>` and `bob@le` `ak.example.org` unredacted.
    #[test]
    fn streamed_code_interpreter_code_and_mcp_arguments_restored_across_events() {
        let engine = Rc::new(Engine::new(&parse_config::<Config>(br#"{"scan_responses":true}"#).unwrap()));
        for (kind, pieces, want) in [
            (
                "response.code_interpreter_call_code.delta",
                vec!["send('<EMA", "IL_1>'); cc('bob@le", "ak.example.org')"],
                "send('me\"x@x.io'); cc('[REDACTED]')",
            ),
            (
                "response.mcp_call_arguments.delta",
                vec!["{\"to\":\"<EMA", "IL_1>\",\"cc\":\"bob@le", "ak.example.org\"}"],
                "{\"to\":\"me\\\"x@x.io\",\"cc\":\"[REDACTED]\"}",
            ),
        ] {
            let mut wire = String::new();
            for p in &pieces {
                let ev = serde_json::json!({"type":kind,"item_id":"x_1","output_index":0,"delta":p});
                wire.push_str(&format!("event: {kind}\ndata: {ev}\n\n"));
            }
            let done = serde_json::json!({"type":"response.output_item.done","output_index":0,"item":{"id":"x_1"}});
            wire.push_str(&format!("event: response.output_item.done\ndata: {done}\n\n"));
            let map: HashMap<String, String> = [("<EMAIL_1>".to_string(), "me\"x@x.io".to_string())].into();
            let mut r = Restorer::new(map, Some(engine.clone()));
            let out = SseRestore::new().feed(&mut r, wire.as_bytes(), true);
            assert_eq!(read(&out), want, "{kind}");
        }
    }
}
