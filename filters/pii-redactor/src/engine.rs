//! The detection engine built from the config (built-in scanner + user regexes) and the per-request
//! masker that applies actions and remembers placeholders.
//!
//! ## Placeholders and client look-alikes
//! A placeholder is `<LABEL_N>` (`<EMAIL_1>`). The same value gets the same placeholder within one
//! request. Before numbering, the masker collects every placeholder-shaped literal the client itself sent
//! (in any scanned text) and never hands out those: if the prompt already contains `<EMAIL_1>`, the first
//! real email becomes `<EMAIL_2>`. Restoration only replaces placeholders this request created, so a
//! look-alike sent by the client is never turned into someone's data; it passes through as text.

use crate::base64_runs::{decode_text, encode_like, find_runs, Run};
use crate::config::{Action, Config, Validator};
use crate::detect::{contains_ci, luhn, mod97, Builtin, Confidence, Scanner};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Which detector produced a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DetId {
    Builtin(Builtin),
    Custom(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub start: usize,
    pub end: usize,
    pub det: DetId,
}

struct Custom {
    name: String,
    label: String,
    re: regex_lite::Regex,
    /// A literal every match starts with, from the pattern's head: texts without it skip the regex.
    literal: Option<Vec<u8>>,
    validator: Validator,
    context: Vec<String>,
    /// A match's confidence with no context word near it (raised one level by one).
    confidence: Confidence,
    min_confidence: Confidence,
    action: Action,
    keep_last: usize,
}

pub struct Engine {
    scanner: Scanner,
    custom: Vec<Custom>,
    actions: HashMap<Builtin, Action>,
    keep_last: HashMap<Builtin, usize>,
    default_keep_last: usize,
    context_window: usize,
    redact_text: String,
    salt: (u64, u64),
    pub response_action: Action,
    /// Decode base64 written into texts and mask what it encodes (`scan_base64_in_text`).
    base64_in_text: bool,
}

/// A base64 run of a scanned text whose decoded text holds findings.
#[derive(Debug)]
pub struct EncodedRun {
    run: Run,
    text: String,
    hits: Vec<Hit>,
}

/// One thing to replace in a scanned text: a value found, or a base64 run encoding some.
enum Edit {
    Value(Hit),
    Encoded(EncodedRun),
}

impl Edit {
    fn span(&self) -> (usize, usize) {
        match self {
            Edit::Value(h) => (h.start, h.end),
            Edit::Encoded(r) => (r.run.start, r.run.end),
        }
    }
}

/// `hits` and `runs` (which never overlap) in text order.
fn in_text_order(hits: Vec<Hit>, runs: Vec<EncodedRun>) -> Vec<Edit> {
    let mut edits: Vec<Edit> = hits.into_iter().map(Edit::Value).collect();
    if !runs.is_empty() {
        edits.extend(runs.into_iter().map(Edit::Encoded));
        edits.sort_by_key(Edit::span);
    }
    edits
}

impl Engine {
    pub fn new(cfg: &Config) -> Engine {
        let mut scanner = Scanner::default();
        scanner.set_context_window(cfg.context_window);
        let mut actions = HashMap::new();
        let mut keep_last = HashMap::new();
        for b in Builtin::ALL {
            scanner.set_min_confidence(b, cfg.min_confidence);
            if let Some(d) = cfg.detector(b) {
                scanner.set_enabled(b, d.enabled);
                if let Some(c) = d.min_confidence {
                    scanner.set_min_confidence(b, c);
                }
                if let Some(w) = &d.context_words {
                    scanner.set_context(b, w.clone());
                }
                if let Some(k) = d.keep_last {
                    keep_last.insert(b, k);
                }
            }
            actions.insert(b, cfg.action_of(b));
        }
        let custom = cfg
            .custom_detectors
            .iter()
            .filter(|d| d.enabled)
            .filter_map(|d| {
                Some(Custom {
                    name: d.name.clone(),
                    label: d.name.to_ascii_uppercase(),
                    re: regex_lite::Regex::new(&d.pattern).ok()?,
                    literal: required_prefix(&d.pattern),
                    validator: d.validator,
                    context: d.context_words.iter().map(|w| w.to_ascii_lowercase()).collect(),
                    confidence: d.base_confidence(),
                    min_confidence: d.min_confidence.unwrap_or(cfg.min_confidence),
                    action: d.action.unwrap_or(cfg.default_action),
                    keep_last: d.keep_last.unwrap_or(cfg.partial_keep_last),
                })
            })
            .collect();
        Engine {
            scanner,
            custom,
            actions,
            keep_last,
            default_keep_last: cfg.partial_keep_last,
            context_window: cfg.context_window,
            redact_text: cfg.redact_text.clone(),
            salt: salt_keys(cfg.hash_salt.as_bytes()),
            response_action: cfg.response_action,
            base64_in_text: cfg.scan_base64_in_text,
        }
    }

    /// Every detector's name, for stats.
    pub fn detector_names(&self) -> Vec<String> {
        let mut v: Vec<String> = Builtin::ALL.iter().map(|b| b.name().to_string()).collect();
        v.extend(self.custom.iter().map(|c| c.name.clone()));
        v
    }

    pub fn name(&self, d: DetId) -> &str {
        match d {
            DetId::Builtin(b) => b.name(),
            DetId::Custom(i) => self.custom.get(i).map_or("custom", |c| c.name.as_str()),
        }
    }

    pub fn label(&self, d: DetId) -> &str {
        match d {
            DetId::Builtin(b) => b.label(),
            DetId::Custom(i) => self.custom.get(i).map_or("CUSTOM", |c| c.label.as_str()),
        }
    }

    pub fn action(&self, d: DetId) -> Action {
        match d {
            DetId::Builtin(b) => self.actions.get(&b).copied().unwrap_or(Action::Mask),
            DetId::Custom(i) => self.custom.get(i).map_or(Action::Mask, |c| c.action),
        }
    }

    fn keep_last(&self, d: DetId) -> usize {
        match d {
            DetId::Builtin(b) => self.keep_last.get(&b).copied().unwrap_or(self.default_keep_last),
            DetId::Custom(i) => self.custom.get(i).map_or(self.default_keep_last, |c| c.keep_last),
        }
    }

    /// Whether user-defined detectors are configured (they may match anything).
    pub fn has_custom(&self) -> bool {
        !self.custom.is_empty()
    }

    /// All hits in `text`, ordered and non-overlapping: overlapping hits are merged into one over their
    /// union (built-ins win ties for the label).
    pub fn find(&self, text: &[u8]) -> Vec<Hit> {
        let mut hits: Vec<Hit> = Vec::new();
        self.scanner.scan_with(text, |f| hits.push(Hit { start: f.start, end: f.end, det: DetId::Builtin(f.kind) }));
        if !self.custom.is_empty() {
            // regex-lite works on str: custom detectors scan each run of valid UTF-8 (an invalid byte
            // elsewhere in the text must not switch them off for all of it).
            {
                let mut extra = Vec::new();
                for (ci, c) in self.custom.iter().enumerate() {
                    if c.literal.as_deref().is_some_and(|l| crate::detect::find(text, l).is_none()) {
                        continue; // regex-lite is slow in V8: skip it when its literal head is absent
                    }
                    let mut offset = 0;
                    for chunk in text.utf8_chunks() {
                        let s = chunk.valid();
                        for m in c.re.find_iter(s) {
                            let (start, end) = (offset + m.start(), offset + m.end());
                            if start == end || !self.custom_ok(c, text, start, end) {
                                continue;
                            }
                            extra.push(Hit { start, end, det: DetId::Custom(ci) });
                        }
                        offset += s.len() + chunk.invalid().len();
                    }
                }
                if !extra.is_empty() {
                    hits.extend(extra);
                    hits.sort_by_key(|h| (h.start, std::cmp::Reverse(h.end)));
                    // Overlapping hits become one hit over their union (labelled by the one that starts
                    // first, the longer on a tie): dropping the later one would leave the part of it
                    // that sticks out unmasked. A hit whose action is `reject` labels the union whatever
                    // starts first: the request must still be refused.
                    let mut merged: Vec<Hit> = Vec::with_capacity(hits.len());
                    for h in hits {
                        match merged.last_mut() {
                            Some(last) if h.start < last.end => {
                                last.end = last.end.max(h.end);
                                if self.action(h.det) == Action::Reject && self.action(last.det) != Action::Reject {
                                    last.det = h.det;
                                }
                            }
                            _ => merged.push(h),
                        }
                    }
                    hits = merged;
                }
            }
        }
        hits
    }

    /// The base64 runs of `text` (outside `hits`) whose decoded text holds findings (see
    /// [`crate::base64_runs`]); one level deep: base64 inside the decoded text is not decoded again.
    pub fn encoded_runs(&self, text: &[u8], hits: &[Hit]) -> Vec<EncodedRun> {
        if !self.base64_in_text {
            return Vec::new();
        }
        let mut found = Vec::new();
        for run in find_runs(text) {
            // A finding over a run (an AWS session token, a key id) is masked as itself.
            if hits.iter().any(|h| h.start < run.end && run.start < h.end) {
                continue;
            }
            let Some(decoded) = decode_text(text, &run) else {
                continue;
            };
            let hits = self.find(decoded.as_bytes());
            if !hits.is_empty() {
                found.push(EncodedRun { run, text: decoded, hits });
            }
        }
        found
    }

    fn custom_ok(&self, c: &Custom, text: &[u8], start: usize, end: usize) -> bool {
        let m = text.get(start..end).unwrap_or(&[]);
        let valid = match c.validator {
            Validator::None => true,
            Validator::Luhn => luhn(m),
            Validator::Mod97 => {
                let chars: Vec<u8> = m.iter().copied().filter(u8::is_ascii_alphanumeric).collect();
                mod97(&chars)
            }
        };
        if !valid {
            return false;
        }
        if c.confidence >= c.min_confidence {
            return true; // no context word can change the answer: skip the search
        }
        let before = text.get(start.saturating_sub(self.context_window)..start).unwrap_or(&[]);
        let after = text.get(end..(end + self.context_window).min(text.len())).unwrap_or(&[]);
        let near = c.context.iter().any(|w| contains_ci(before, w.as_bytes()) || contains_ci(after, w.as_bytes()));
        near && c.confidence.raised() >= c.min_confidence
    }

    /// The irreversible replacement for `value` under `action` (`redact`, `partial`, `hash`).
    pub fn irreversible(&self, det: DetId, action: Action, value: &[u8]) -> String {
        match action {
            Action::Partial => partial(value, self.keep_last(det)),
            Action::Hash => {
                let h = siphash24(self.salt, value);
                format!("[{}:{:012x}]", self.label(det), h >> 16)
            }
            _ => self.redact_text.clone(),
        }
    }

    /// [`Self::irreversible`] of `value` as written in JSON text (escapes included): `partial` reads the
    /// escapes as the characters they stand for (`\n` is a separator, not the letter `n`) and writes its
    /// result JSON-escaped, so the text stays JSON. The others give ASCII JSON keeps as it is.
    pub fn irreversible_json(&self, det: DetId, action: Action, value: &[u8]) -> String {
        match action {
            Action::Partial => partial_json(value, self.keep_last(det)),
            a => self.irreversible(det, a, value),
        }
    }

    /// Findings of the response scanner in model-written text (`response_action` applied).
    pub fn scan_response_text(&self, text: &str, counts: &mut Counts) -> Option<String> {
        self.scan_response_text_after("", text, counts)
    }

    /// Bytes of text before a piece that the detectors read for it: context words within
    /// `context_window` bytes, the 24 bytes of "order / invoice / ..." before a number, with slack for
    /// separators the scan normalises and the byte before a token.
    pub fn context_reach(&self) -> usize {
        self.context_window.max(24) + 16
    }

    /// [`Self::scan_response_text`] of `text`, a piece of a stream that follows `before` (the end of the
    /// text passed on before it, as the model wrote it): `before` is read for context words as in the
    /// whole text, and only findings that start in `text` are replaced (a value that starts in `before`
    /// was the earlier piece's: stream hold-back keeps values whole).
    pub fn scan_response_text_after(&self, before: &str, text: &str, counts: &mut Counts) -> Option<String> {
        self.scan_response_after(before, text, false, counts)
    }

    /// [`Self::scan_response_text_after`] of JSON text (tool-call arguments): replacements keep it JSON.
    pub fn scan_response_json_text_after(&self, before: &str, text: &str, counts: &mut Counts) -> Option<String> {
        self.scan_response_after(before, text, true, counts)
    }

    fn scan_response_after(&self, before: &str, text: &str, json: bool, counts: &mut Counts) -> Option<String> {
        let joined: std::borrow::Cow<'_, str> =
            if before.is_empty() { text.into() } else { format!("{before}{text}").into() };
        let skip = before.len();
        let hits = self.find(joined.as_bytes());
        let mut out = String::with_capacity(text.len());
        let mut last = skip;
        for h in hits {
            if h.start < last {
                continue;
            }
            let value = joined.as_bytes().get(h.start..h.end).unwrap_or(&[]);
            out.push_str(joined.get(last..h.start).unwrap_or(""));
            if json {
                out.push_str(&self.irreversible_json(h.det, self.response_action, value));
            } else {
                out.push_str(&self.irreversible(h.det, self.response_action, value));
            }
            counts.add(self.name(h.det), self.response_action);
            last = h.end;
        }
        if last == skip {
            return None;
        }
        out.push_str(joined.get(last..).unwrap_or(""));
        Some(out)
    }
}

impl Engine {
    /// Findings of the response scanner in a raw answer (plain text, an error body, JSON text too large
    /// to parse), `response_action` applied. JSON string escapes are decoded for the scan
    /// (`jane\u0040corp.example` is an email to whoever reads the answer) and each finding replaced over
    /// the original bytes it came from, escapes included. `json_strings`: the text is JSON and these are
    /// the ranges inside its strings; only findings inside one are replaced, JSON-escaped.
    /// `before`: the end of the text passed on before `text` (a stream's earlier pieces), read for
    /// context words only (see [`Self::scan_response_text_after`]); `json_strings` are ranges of `text`.
    pub fn scan_response_bytes(
        &self,
        before: &[u8],
        text: &[u8],
        json_strings: Option<&[(usize, usize)]>,
        counts: &mut Counts,
    ) -> Option<Vec<u8>> {
        let skip = before.len();
        let joined: std::borrow::Cow<'_, [u8]> = if skip == 0 { text.into() } else { [before, text].concat().into() };
        let text: &[u8] = &joined;
        let decoded = crate::request::decode_json_escapes(text);
        let (scan, map) = match &decoded {
            Some((d, m)) => (d.as_slice(), Some(m.as_slice())),
            None => (text, None),
        };
        let hits = self.find(scan);
        if hits.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(text.len() + 16);
        let mut last = skip;
        for h in hits {
            let (start, end) = orig_span(map, text.len(), (h.start, h.end));
            if start < last {
                continue; // in `before`, or two findings in one escape: the first one covers it
            }
            if json_strings.is_some_and(|r| !r.iter().any(|&(a, b)| a + skip <= start && end <= b + skip)) {
                continue; // not inside one JSON string: a number, a key's quote, structure
            }
            let value = scan.get(h.start..h.end).unwrap_or(&[]);
            let replacement = self.irreversible(h.det, self.response_action, value);
            out.extend_from_slice(text.get(last..start).unwrap_or(&[]));
            if json_strings.is_some() {
                out.extend_from_slice(json_escaped(&replacement).as_bytes());
            } else {
                out.extend_from_slice(replacement.as_bytes());
            }
            counts.add(self.name(h.det), self.response_action);
            last = end;
        }
        if last == skip {
            return None;
        }
        out.extend_from_slice(text.get(last..).unwrap_or(&[]));
        Some(out)
    }
}

/// `s` escaped for the inside of a JSON string (no quotes around it).
fn json_escaped(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_default();
    quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or("").to_string()
}

/// The span of the original bytes a hit in the decoded text came from (`map`: per decoded byte, the
/// original bytes it was decoded from; `None`: the text was not decoded).
fn orig_span(map: Option<&[(usize, usize)]>, orig_len: usize, (s, e): (usize, usize)) -> (usize, usize) {
    match map {
        None => (s, e),
        Some(m) => {
            let start = m.get(s).map_or(orig_len, |x| x.0);
            let end = e.checked_sub(1).and_then(|e| m.get(e)).map_or(start, |x| x.1);
            (start, end.max(start))
        }
    }
}

/// The literal a pattern's every match starts with (`EMP-[0-9]{6}` -> `EMP-`), if the pattern starts with
/// at least two plain characters and has no top-level alternation or inline flags; `None` otherwise.
pub fn required_prefix(pattern: &str) -> Option<Vec<u8>> {
    let b = pattern.as_bytes();
    if b.first() == Some(&b'^') || pattern.starts_with("(?") {
        return None;
    }
    // Any `|` outside a class or group could make the head optional: be conservative.
    let mut depth = 0i32;
    let mut in_class = false;
    let mut esc = false;
    for &c in b {
        match c {
            _ if esc => esc = false,
            b'\\' => esc = true,
            b'[' if !in_class => in_class = true,
            b']' if in_class => in_class = false,
            b'(' if !in_class => depth += 1,
            b')' if !in_class => depth -= 1,
            b'|' if !in_class && depth == 0 => return None,
            _ => {}
        }
    }
    let mut lit = Vec::new();
    for (k, &c) in b.iter().enumerate() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'@' | b':' | b'/' | b'=' | b'#' | b'<' | b'>' | b' ')
        {
            // A quantifier after this character makes it optional or repeated: stop before it.
            if matches!(b.get(k + 1), Some(b'?' | b'*' | b'{')) {
                break;
            }
            lit.push(c);
        } else {
            break;
        }
    }
    (lit.len() >= 2).then_some(lit)
}

/// `****-****-****-1111`: letters and digits but the last `keep` become `*`, separators stay. At most
/// half of them are kept, so a short value (`a@b.co`, a 6-character id with `keep_last: 4`) is never
/// shown whole or nearly whole.
pub fn partial(value: &[u8], keep: usize) -> String {
    let total = value.iter().filter(|c| c.is_ascii_alphanumeric()).count();
    let keep = keep.min(total / 2);
    let mut seen = 0;
    let mut out = String::with_capacity(value.len());
    for &c in value {
        if c.is_ascii_alphanumeric() {
            seen += 1;
            if seen + keep > total {
                out.push(c as char);
            } else {
                out.push('*');
            }
        } else if c.is_ascii() {
            out.push(c as char);
        } else {
            out.push('*');
        }
    }
    out
}

/// [`partial`] of a value written in JSON text: its escapes decoded first, the result JSON-escaped.
pub fn partial_json(value: &[u8], keep: usize) -> String {
    match crate::request::decode_json_escapes(value) {
        Some((decoded, _)) => json_escaped(&partial(&decoded, keep)),
        None => partial(value, keep),
    }
}

/// Counts per (detector, action), for stats and the counts header.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts(pub BTreeMap<(String, Action), u64>);

impl Counts {
    pub fn add(&mut self, name: &str, action: Action) {
        // A few distinct (type, action) pairs per request: find before allocating a key.
        match self.0.iter_mut().find(|((k, a), _)| k == name && *a == action) {
            Some((_, n)) => *n += 1,
            None => {
                self.0.insert((name.to_string(), action), 1);
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `email=2,phone=1` (per type, actions summed), for the access log.
    pub fn summary(&self) -> String {
        // Keys are ordered by name first, so one name's actions are adjacent: sum them in one pass.
        let mut out = String::new();
        let mut entries = self.0.iter().peekable();
        while let Some(((name, _), n)) = entries.next() {
            let mut total = *n;
            while let Some(((_, _), more)) = entries.next_if(|((next, _), _)| next == name) {
                total += *more;
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(name);
            out.push('=');
            out.push_str(&total.to_string());
        }
        out
    }

    /// The counts header on the answer: the summary when this request had findings, else `None`, which
    /// means the header is **removed**, so an upstream (or anything but this filter) cannot put counts
    /// into the answer and the access log.
    pub fn header_value(&self) -> Option<String> {
        (!self.is_empty()).then(|| self.summary())
    }
}

#[derive(Debug, Default)]
struct LabelState {
    next: u32,
    by_value: HashMap<Vec<u8>, String>,
}

/// What masking a request decided.
#[derive(Debug, Default)]
pub struct MaskState {
    /// placeholder -> original value (restore map).
    pub restore: HashMap<String, String>,
    /// Per placeholder label: the last number handed out and value -> placeholder (so a repeated value
    /// gets the same placeholder). Keyed by label, then value, so a lookup allocates nothing.
    labels: HashMap<String, LabelState>,
    /// Placeholder-shaped literals the client sent: never handed out.
    taken: HashSet<String>,
    pub counts: Counts,
    /// Detector names whose action is reject and that found something.
    pub rejected: Vec<String>,
    /// Base64 runs in texts rewritten because what they encode held findings.
    pub base64_runs_masked: u64,
}

impl MaskState {
    /// Remember the client's own placeholder look-alikes in `text` (call for every text before masking).
    pub fn reserve_lookalikes(&mut self, text: &[u8]) {
        let mut i = 0;
        while let Some(p) = text.get(i..).and_then(|r| memchr::memchr(b'<', r)) {
            let s = i + p;
            if let Some(len) = placeholder_len(text.get(s..).unwrap_or(&[])) {
                if let Some(ph) = text.get(s..s + len).and_then(|b| std::str::from_utf8(b).ok()) {
                    self.taken.insert(ph.to_string());
                }
                i = s + len;
            } else {
                i = s + 1;
            }
        }
    }

    fn placeholder_for(&mut self, label: &str, value: &[u8]) -> String {
        if let Some(p) = self.labels.get(label).and_then(|l| l.by_value.get(value)) {
            return p.clone();
        }
        let state = match self.labels.get_mut(label) {
            Some(s) => s,
            None => self.labels.entry(label.to_string()).or_default(),
        };
        let ph = loop {
            state.next += 1;
            let candidate = format!("<{label}_{}>", state.next);
            if self.taken.is_empty() || !self.taken.contains(&candidate) {
                break candidate;
            }
        };
        state.by_value.insert(value.to_vec(), ph.clone());
        self.restore.insert(ph.clone(), String::from_utf8_lossy(value).into_owned());
        ph
    }

    /// Mask one text; `None` if nothing was found. Reject findings are recorded and left in place.
    pub fn mask(&mut self, engine: &Engine, text: &[u8]) -> Option<Vec<u8>> {
        self.mask_mapped(engine, text, text, None)
    }

    /// Mask JSON text (tool-call `arguments`): its escapes decoded for the scan, replacements JSON-escaped.
    pub fn mask_json(&mut self, engine: &Engine, text: &[u8]) -> Option<Vec<u8>> {
        match crate::request::decode_json_escapes(text) {
            Some((decoded, map)) => self.mask_mapped(engine, &decoded, text, Some(&map)),
            None => self.mask(engine, text),
        }
    }

    /// Mask `orig` by scanning `scan`, a decoded view of it: `map[k]` is the `(start, end)` in `orig` of
    /// what `scan[k]` was decoded from (`None`: `scan` is `orig`). A finding replaces the whole original
    /// span (escapes included); the value remembered for restoring is the decoded one.
    pub fn mask_mapped(
        &mut self,
        engine: &Engine,
        scan: &[u8],
        orig: &[u8],
        map: Option<&[(usize, usize)]>,
    ) -> Option<Vec<u8>> {
        let hits = engine.find(scan);
        let runs = engine.encoded_runs(scan, &hits);
        if hits.is_empty() && runs.is_empty() {
            return None;
        }
        let text = orig;
        let mut out = Vec::with_capacity(text.len() + 16);
        let mut last = 0;
        for edit in in_text_order(hits, runs) {
            let (start, end) = orig_span(map, orig.len(), edit.span());
            if start < last {
                continue; // two findings in one escape: the first one covers it
            }
            let Some((action, replacement)) = self.edit_replacement(engine, scan, &edit) else {
                continue;
            };
            // What was found was decoded from JSON text: what replaces its original bytes is JSON-escaped.
            let replacement =
                if action != Action::Mask && map.is_some() { json_escaped(&replacement) } else { replacement };
            out.extend_from_slice(text.get(last..start).unwrap_or(&[]));
            out.extend_from_slice(replacement.as_bytes());
            last = end;
        }
        out.extend_from_slice(text.get(last..).unwrap_or(&[]));
        Some(out)
    }
}

impl MaskState {
    /// What replaces one edit of `scan`: as [`MaskState::replacement`] for a value; for a base64 run, the
    /// run's text masked and encoded as the run was (with a non-`Mask` action: the encoding may hold line
    /// breaks to escape). `None` when nothing replaces it (a `reject` finding, remembered).
    fn edit_replacement(&mut self, engine: &Engine, scan: &[u8], edit: &Edit) -> Option<(Action, String)> {
        match edit {
            Edit::Value(h) => self.replacement(engine, h, scan.get(h.start..h.end).unwrap_or(&[])),
            Edit::Encoded(r) => {
                let text = r.text.as_bytes();
                // A look-alike the client encoded is one the model reads: never handed out from here on.
                self.reserve_lookalikes(text);
                let mut masked = Vec::with_capacity(text.len() + 16);
                let mut last = 0;
                let mut changed = false;
                for h in &r.hits {
                    let value = text.get(h.start..h.end).unwrap_or(&[]);
                    let Some((_, replacement)) = self.replacement(engine, h, value) else {
                        continue;
                    };
                    masked.extend_from_slice(text.get(last..h.start).unwrap_or(&[]));
                    masked.extend_from_slice(replacement.as_bytes());
                    last = h.end;
                    changed = true;
                }
                if !changed {
                    return None;
                }
                masked.extend_from_slice(text.get(last..).unwrap_or(&[]));
                self.base64_runs_masked += 1;
                Some((Action::Redact, encode_like(&r.run, &masked)))
            }
        }
    }

    /// Count a finding and give what replaces its `value` with the action taken: a placeholder (`Mask`, to
    /// be restored), an irreversible redaction, or `None` for `Reject` (remembered for the 4xx answer).
    fn replacement(&mut self, engine: &Engine, h: &Hit, value: &[u8]) -> Option<(Action, String)> {
        let action = engine.action(h.det);
        let name = engine.name(h.det);
        self.counts.add(name, action);
        match action {
            Action::Reject => {
                if !self.rejected.iter().any(|r| r == name) {
                    self.rejected.push(name.to_string());
                }
                None
            }
            Action::Mask => Some((action, self.placeholder_for(engine.label(h.det), value))),
            a => Some((a, engine.irreversible(h.det, a, value))),
        }
    }

    /// Mask consecutive text parts of one message (OpenAI / Anthropic / Bedrock content blocks) as the model
    /// reads them: one text. A value cut across two parts (`"my card is 4111 1111"`, `" 1111 1111"`) is
    /// found in the joined text; its placeholder (or redaction) goes where it starts and the rest of it is
    /// removed from the next parts, so the restore map holds the whole value. Per part: the masked text,
    /// or `None` when the part is unchanged.
    pub fn mask_parts(&mut self, engine: &Engine, parts: &[&[u8]]) -> Vec<Option<Vec<u8>>> {
        let joined = parts.concat();
        let hits = engine.find(&joined);
        let runs = engine.encoded_runs(&joined, &hits);
        let mut outs: Vec<Option<Vec<u8>>> = vec![None; parts.len()];
        if hits.is_empty() && runs.is_empty() {
            return outs;
        }
        // Each edit's replacement, in order (numbering as a one-text scan gives it); reject hits stay.
        let mut replaced: Vec<(usize, usize, String)> = Vec::new();
        for edit in in_text_order(hits, runs) {
            let (start, end) = edit.span();
            let Some((_, replacement)) = self.edit_replacement(engine, &joined, &edit) else {
                continue;
            };
            replaced.push((start, end, replacement));
        }
        let mut part_start = 0;
        for (k, part) in parts.iter().enumerate() {
            let part_end = part_start + part.len();
            let mut out = Vec::with_capacity(part.len());
            let mut cursor = part_start;
            let mut changed = false;
            for (start, end, replacement) in replaced.iter().filter(|(s, e, _)| *e > part_start && *s < part_end) {
                out.extend_from_slice(joined.get(cursor..(*start).max(part_start)).unwrap_or(&[]));
                if *start >= part_start {
                    out.extend_from_slice(replacement.as_bytes());
                }
                cursor = (*end).min(part_end);
                changed = true;
            }
            if changed {
                out.extend_from_slice(joined.get(cursor..part_end).unwrap_or(&[]));
                if let Some(slot) = outs.get_mut(k) {
                    *slot = Some(out);
                }
            }
            part_start = part_end;
        }
        outs
    }
}

/// Length of a placeholder `<[A-Z][A-Z0-9_]*_[0-9]+>` at the start of `s`, if there is one.
pub fn placeholder_len(s: &[u8]) -> Option<usize> {
    if s.first() != Some(&b'<') || !s.get(1).is_some_and(u8::is_ascii_uppercase) {
        return None;
    }
    let mut j = 2;
    while j < s.len() && j < MAX_PLACEHOLDER {
        let c = *s.get(j)?;
        if c == b'>' {
            let inner = s.get(1..j)?;
            let us = inner.iter().rposition(|c| *c == b'_')?;
            let num = inner.get(us + 1..)?;
            return (!num.is_empty() && num.iter().all(u8::is_ascii_digit)).then_some(j + 1);
        }
        if !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_') {
            return None;
        }
        j += 1;
    }
    None
}

/// Longest placeholder considered (labels are at most 32 characters plus a number).
pub const MAX_PLACEHOLDER: usize = 48;

/// SipHash-2-4 (written here so the hash is stable across Rust versions and platforms).
pub fn siphash24(key: (u64, u64), data: &[u8]) -> u64 {
    let (k0, k1) = key;
    let mut v0 = k0 ^ 0x736f_6d65_7073_6575;
    let mut v1 = k1 ^ 0x646f_7261_6e64_6f6d;
    let mut v2 = k0 ^ 0x6c79_6765_6e65_7261;
    let mut v3 = k1 ^ 0x7465_6462_7974_6573;
    fn round(v0: &mut u64, v1: &mut u64, v2: &mut u64, v3: &mut u64) {
        *v0 = v0.wrapping_add(*v1);
        *v1 = v1.rotate_left(13);
        *v1 ^= *v0;
        *v0 = v0.rotate_left(32);
        *v2 = v2.wrapping_add(*v3);
        *v3 = v3.rotate_left(16);
        *v3 ^= *v2;
        *v0 = v0.wrapping_add(*v3);
        *v3 = v3.rotate_left(21);
        *v3 ^= *v0;
        *v2 = v2.wrapping_add(*v1);
        *v1 = v1.rotate_left(17);
        *v1 ^= *v2;
        *v2 = v2.rotate_left(32);
    }
    let chunks = data.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        let m = u64::from_le_bytes(b);
        v3 ^= m;
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        v0 ^= m;
    }
    let mut last = [0u8; 8];
    for (k, b) in tail.iter().enumerate() {
        if let Some(slot) = last.get_mut(k) {
            *slot = *b;
        }
    }
    let m = u64::from_le_bytes(last) | ((data.len() as u64 & 0xff) << 56);
    v3 ^= m;
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    v0 ^= m;
    v2 ^= 0xff;
    for _ in 0..4 {
        round(&mut v0, &mut v1, &mut v2, &mut v3);
    }
    v0 ^ v1 ^ v2 ^ v3
}

/// A 128-bit SipHash key from the configured salt (any length).
fn salt_keys(salt: &[u8]) -> (u64, u64) {
    let a = siphash24((0x5049_495f_5245_4441, 0x4354_4f52_5f4b_3031), salt);
    let b = siphash24((a, 0x6d65_7368_7761_7264), salt);
    (a, b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_header_is_ours_or_removed() {
        let mut c = Counts::default();
        assert_eq!(c.header_value(), None, "no findings: any copy of the header is removed");
        c.add("email", Action::Mask);
        c.add("email", Action::Mask);
        c.add("phone", Action::Redact);
        assert_eq!(c.header_value().as_deref(), Some("email=2,phone=1"));
        // One type under several actions is one entry; types in name order.
        c.add("email", Action::Redact);
        c.add("credit_card", Action::Hash);
        c.add("phone", Action::Mask);
        assert_eq!(c.summary(), "credit_card=1,email=3,phone=2");
    }

    use super::*;
    use meshwarden_shared::config::parse_config;

    fn engine(cfg: &str) -> Engine {
        Engine::new(&parse_config::<Config>(cfg.as_bytes()).unwrap())
    }

    #[test]
    fn siphash_reference_vector() {
        // SipHash-2-4 paper: key 00..0f, message 00..0e -> a129ca6149be45e5
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(siphash24((k0, k1), &msg), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn mask_same_value_same_placeholder_and_lookalikes_skipped() {
        let e = engine("{}");
        let mut st = MaskState::default();
        let t1 = b"I am <EMAIL_1>, mail a@b.io and c@d.io";
        let t2 = b"again a@b.io";
        st.reserve_lookalikes(t1);
        st.reserve_lookalikes(t2);
        let o1 = String::from_utf8(st.mask(&e, t1).unwrap()).unwrap();
        let o2 = String::from_utf8(st.mask(&e, t2).unwrap()).unwrap();
        assert_eq!(o1, "I am <EMAIL_1>, mail <EMAIL_2> and <EMAIL_3>");
        assert_eq!(o2, "again <EMAIL_2>");
        assert_eq!(st.restore.get("<EMAIL_2>").map(String::as_str), Some("a@b.io"));
        assert!(!st.restore.contains_key("<EMAIL_1>"));
        assert_eq!(st.counts.summary(), "email=3");
    }

    /// The same address written plain and percent-encoded (or with an HTML reference) gets a placeholder
    /// per spelling, each restored to the bytes the client wrote: the model may repeat either in a place
    /// where only that spelling works (a link keeps `%40`, prose keeps `@`). A spelling repeated gets its
    /// placeholder again.
    #[test]
    fn plain_and_encoded_spellings_get_their_own_placeholders() {
        let e = engine("{}");
        let mut st = MaskState::default();
        let t = b"mail jane@example.com, ?to=jane%40example.com, <b>jane&#64;example.com</b>, jane@example.com";
        let out = String::from_utf8(st.mask(&e, t).unwrap()).unwrap();
        assert_eq!(out, "mail <EMAIL_1>, ?to=<EMAIL_2>, <b><EMAIL_3></b>, <EMAIL_1>");
        for (placeholder, value) in [
            ("<EMAIL_1>", "jane@example.com"),
            ("<EMAIL_2>", "jane%40example.com"),
            ("<EMAIL_3>", "jane&#64;example.com"),
        ] {
            assert_eq!(st.restore.get(placeholder).map(String::as_str), Some(value));
        }
    }

    #[test]
    fn actions() {
        let e = engine(
            r#"{"hash_salt":"0123456789abcdef","detectors":{"credit_card":{"action":"partial"},
               "email":{"action":"hash"},"us_ssn":{"action":"reject"},"phone":{"action":"redact"}}}"#,
        );
        let mut st = MaskState::default();
        let out = st.mask(&e, b"card 4111-1111-1111-1111 a@b.io 415-555-2671 ssn 536-22-8963").unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("card ****-****-****-1111 [EMAIL:"), "{out}");
        assert!(out.contains("[REDACTED]"), "{out}");
        assert!(out.contains("536-22-8963"), "reject leaves the text, the request is refused: {out}");
        assert_eq!(st.rejected, vec!["us_ssn".to_string()]);
        // stable hash across requests, different with another salt
        let mut st2 = MaskState::default();
        let again = String::from_utf8(st2.mask(&e, b"a@b.io").unwrap()).unwrap();
        assert!(out.contains(&again), "{out} / {again}");
        let other = engine(r#"{"hash_salt":"another-salt-0000","default_action":"hash"}"#);
        let h2 = String::from_utf8(MaskState::default().mask(&other, b"a@b.io").unwrap()).unwrap();
        assert_ne!(h2, again);
    }

    #[test]
    fn custom_detectors_with_validator_and_context() {
        let e = engine(
            r#"{"custom_detectors":[
                {"name":"employee_id","pattern":"EMP-[0-9]{6}","context_words":["employee"]},
                {"name":"account","pattern":"[0-9]{16}","validator":"luhn"}]}"#,
        );
        let mut st = MaskState::default();
        let out = st
            .mask(
                &e,
                b"employee EMP-123456 and ..................................................... far away EMP-654321",
            )
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("<EMPLOYEE_ID_1>") && out.contains("EMP-654321"), "{out}");
        assert!(st.mask(&e, b"acct 1234567812345678").is_none(), "fails luhn");
        let out = String::from_utf8(st.mask(&e, b"acct 4111111111111111x").unwrap()).unwrap();
        assert!(out.contains("<ACCOUNT_1>"), "{out}");
    }

    #[test]
    fn custom_detectors_enabled_confidence_and_threshold() {
        let text = b"project PRJ-1234 ... PRJ-5678 ........................................................ PRJ-9999";
        let found = |cfg: &str| {
            let e = engine(cfg);
            e.find(text).iter().map(|h| String::from_utf8_lossy(&text[h.start..h.end]).into_owned()).collect::<Vec<_>>()
        };
        // default with context words: low bare, medium with a word near: only the two near "project"
        let with_ctx = r#"{"custom_detectors":[{"name":"p","pattern":"PRJ-[0-9]{4}","context_words":["project"]}]}"#;
        assert_eq!(found(with_ctx), ["PRJ-1234", "PRJ-5678"]);
        // threshold lowered: every match; raised to high: a bare `medium` match needs a word
        let all = r#"{"custom_detectors":[{"name":"p","pattern":"PRJ-[0-9]{4}","context_words":["project"],"min_confidence":"low"}]}"#;
        assert_eq!(found(all), ["PRJ-1234", "PRJ-5678", "PRJ-9999"]);
        let strict = r#"{"custom_detectors":[{"name":"p","pattern":"PRJ-[0-9]{4}","confidence":"medium","context_words":["project"],"min_confidence":"high"}]}"#;
        assert_eq!(found(strict), ["PRJ-1234", "PRJ-5678"]);
        // no context words: medium, reported at the top-level default, dropped when that is high
        assert_eq!(found(r#"{"custom_detectors":[{"name":"p","pattern":"PRJ-[0-9]{4}"}]}"#).len(), 3);
        let top_high = r#"{"min_confidence":"high","custom_detectors":[{"name":"p","pattern":"PRJ-[0-9]{4}","confidence":"high"}]}"#;
        assert_eq!(found(top_high).len(), 3);
        // switched off: never run, and its name is not among the detectors (stats)
        let off = r#"{"custom_detectors":[{"name":"p","pattern":"PRJ-[0-9]{4}","enabled":false},{"name":"q","pattern":"9999"}]}"#;
        assert_eq!(found(off), ["9999"]);
        assert!(!engine(off).detector_names().contains(&"p".to_string()));
    }

    #[test]
    fn a_custom_hit_overlapping_a_builtin_one_is_masked_whole() {
        // `ticket` starts inside the e-mail address and runs past it: the union is masked, nothing of
        // either sticks out.
        let e = engine(r#"{"custom_detectors":[{"name":"ticket","pattern":"io/T-[0-9]{8}"}]}"#);
        let mut st = MaskState::default();
        let out = String::from_utf8(st.mask(&e, b"see alice@corp.io/T-12345678 now").unwrap()).unwrap();
        assert_eq!(out, "see <EMAIL_1> now", "{out}");
        assert_eq!(st.restore.get("<EMAIL_1>").map(String::as_str), Some("alice@corp.io/T-12345678"));
    }

    /// A custom detector whose action is `reject` must refuse the request also when a built-in detector
    /// finds the same value (or part of it): the merged hit must not fall back to the built-in's `mask`.
    #[test]
    fn a_custom_reject_survives_a_merge_with_a_builtin_hit() {
        let e = engine(
            r#"{"custom_detectors":[{"name":"staff_email","pattern":"[a-z.]+@acme\\.example","action":"reject"}]}"#,
        );
        let mut st = MaskState::default();
        let _ = st.mask(&e, b"forward it to jane.doe@acme.example please");
        assert_eq!(st.rejected, vec!["staff_email".to_string()]);
        // And the other way round: a built-in reject inside a custom `mask` hit that starts first.
        let e = engine(
            r#"{"detectors":{"us_ssn":{"action":"reject"}},"custom_detectors":[{"name":"case_ref","pattern":"CASE-[0-9-]{11}"}]}"#,
        );
        let mut st = MaskState::default();
        let _ = st.mask(&e, b"see CASE-536-22-8963 now");
        assert_eq!(st.rejected, vec!["us_ssn".to_string()]);
    }

    #[test]
    fn custom_detectors_scan_around_invalid_utf8() {
        let e = engine(r#"{"custom_detectors":[{"name":"employee_id","pattern":"EMP-[0-9]{6}"}]}"#);
        let mut st = MaskState::default();
        let out = st.mask(&e, b"bad \xff byte, then EMP-123456 and \xfe EMP-654321").unwrap();
        assert_eq!(out, b"bad \xff byte, then <EMPLOYEE_ID_1> and \xfe <EMPLOYEE_ID_2>");
    }

    #[test]
    fn literal_heads_of_custom_patterns() {
        assert_eq!(required_prefix("EMP-[0-9]{6}"), Some(b"EMP-".to_vec()));
        assert_eq!(required_prefix("ACME_ab?c"), Some(b"ACME_a".to_vec()));
        assert_eq!(required_prefix("EMP-1|X"), None);
        assert_eq!(required_prefix("(?i)emp"), None);
        assert_eq!(required_prefix("[0-9]{16}"), None);
        assert_eq!(required_prefix("a+b"), None);
        assert_eq!(required_prefix("ab+c"), Some(b"ab".to_vec()));
    }

    #[test]
    fn placeholder_grammar() {
        assert_eq!(placeholder_len(b"<EMAIL_1>x"), Some(9));
        assert_eq!(placeholder_len(b"<CREDIT_CARD_12>"), Some(16));
        assert_eq!(placeholder_len(b"<EMAIL>"), None);
        assert_eq!(placeholder_len(b"<email_1>"), None);
        assert_eq!(placeholder_len(b"<EMAIL_1"), None);
        assert_eq!(partial(b"4111-1111-1111-1111", 4), "****-****-****-1111");
    }

    #[test]
    fn partial_never_keeps_more_than_half_of_a_short_value() {
        // keep_last 4 used to keep all of `a@b.co` and most of `jo@x.io`.
        assert_eq!(partial(b"a@b.co", 4), "*@*.co");
        assert_eq!(partial(b"jo@x.io", 4), "**@*.io");
        assert_eq!(partial(b"E1234", 4), "***34");
        assert_eq!(partial(b"536-22-8963", 4), "***-**-8963");
        assert_eq!(partial(b"7", 4), "*");
    }

    /// Base64 written into a text (a pasted Kubernetes Secret, a Basic credential): what it encodes is
    /// scanned and the run re-encoded with placeholders inside, the same alphabet, padding and wrap; the
    /// restore map holds the decoded values. Before 2026-12-08 such values reached the provider.
    #[test]
    fn base64_in_text_is_decoded_masked_and_reencoded() {
        use meshwarden_shared::encoding::{base64_decode, base64_encode};
        let e = engine("{}");
        let token = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
        let secret = format!(
            "apiVersion: v1\nkind: Secret\ndata:\n  owner: {}\n  token: {}\n  password: aHVudGVyMg==\n",
            base64_encode(b"jane.doe@example.com"),
            base64_encode(format!("{token}\n").as_bytes()),
        );
        let mut st = MaskState::default();
        let out = String::from_utf8(st.mask(&e, secret.as_bytes()).unwrap()).unwrap();
        let value = |key: &str| {
            let line = out.lines().find(|l| l.trim_start().starts_with(key)).unwrap();
            String::from_utf8(base64_decode(line.split(": ").nth(1).unwrap()).unwrap()).unwrap()
        };
        assert_eq!(value("owner:"), "<EMAIL_1>");
        assert_eq!(value("token:"), "<GITHUB_TOKEN_1>\n");
        assert!(out.contains("password: aHVudGVyMg==\n"), "{out}");
        assert_eq!(st.restore.get("<EMAIL_1>").map(String::as_str), Some("jane.doe@example.com"));
        assert_eq!(st.restore.get("<GITHUB_TOKEN_1>").map(String::as_str), Some(token));
        assert_eq!(st.base64_runs_masked, 2);
        assert_eq!(st.counts.summary(), "email=1,github_token=1");

        // The same value plain and encoded gets one placeholder; numbering follows the text.
        let mut st = MaskState::default();
        let t = format!("a@b.io then {} then c@d.io", base64_encode(b"mail c@d.io or a@b.io"));
        let out = String::from_utf8(st.mask(&e, t.as_bytes()).unwrap()).unwrap();
        let run = out.split(" then ").nth(1).unwrap();
        assert_eq!(base64_decode(run).unwrap(), b"mail <EMAIL_2> or <EMAIL_1>");
        assert!(out.starts_with("<EMAIL_1> then ") && out.ends_with(" then <EMAIL_2>"), "{out}");

        // URL-safe and unpadded stays so.
        let mut st = MaskState::default();
        let enc = base64_encode(b"?>?> jane@example.com ?>").trim_end_matches('=').replace('/', "_").replace('+', "-");
        let out = String::from_utf8(st.mask(&e, format!("x {enc} y").as_bytes()).unwrap()).unwrap();
        let run = out.split(' ').nth(1).unwrap();
        assert!(!run.contains('=') && !run.contains('/') && !run.contains('+'), "{run}");
        assert_eq!(base64_decode(run).unwrap(), b"?>?> <EMAIL_1> ?>");

        // Switched off: left as sent.
        let off = engine(r#"{"scan_base64_in_text": false}"#);
        assert!(MaskState::default().mask(&off, secret.as_bytes()).is_none());
    }

    /// Wrapped base64 inside JSON text (tool-call `arguments`): its line breaks are JSON escapes, read
    /// decoded and written back escaped. Inside text parts, a run is one edit of the joined text.
    #[test]
    fn base64_in_json_text_and_text_parts() {
        use meshwarden_shared::encoding::{base64_decode, base64_encode};
        let e = engine("{}");
        let text = "Customer: jane.doe@example.com, card 4111 1111 1111 1111, tel +44 20 7946 0958.".repeat(2);
        let flat = base64_encode(text.as_bytes());
        let wrapped: Vec<&str> = flat.as_bytes().chunks(76).map(|c| std::str::from_utf8(c).unwrap()).collect();
        let args = serde_json::json!({ "attachment": wrapped.join("\n") }).to_string();
        let mut st = MaskState::default();
        let out = String::from_utf8(st.mask_json(&e, args.as_bytes()).unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let masked = v["attachment"].as_str().unwrap();
        assert!(masked.lines().all(|l| l.len() <= 76) && masked.lines().count() > 1, "{masked}");
        let decoded = String::from_utf8(base64_decode(&masked.replace('\n', "")).unwrap()).unwrap();
        assert_eq!(decoded, "Customer: <EMAIL_1>, card <CREDIT_CARD_1>, tel <PHONE_1>.".repeat(2));

        let run = base64_encode(b"owner jane.doe@example.com");
        let parts: [&[u8]; 2] = [b"see the file:", format!(" {run} (base64)").leak().as_bytes()];
        let mut st = MaskState::default();
        let outs = st.mask_parts(&e, &parts);
        assert!(outs[0].is_none());
        let second = String::from_utf8(outs[1].clone().unwrap()).unwrap();
        let inner = second.trim().split(' ').next().unwrap();
        assert_eq!(base64_decode(inner).unwrap(), b"owner <EMAIL_1>");
    }

    /// `reject` inside base64 refuses the request like a plain finding; a finding over a run (an AWS
    /// session token is base64) is masked as itself, not decoded.
    #[test]
    fn base64_in_text_rejects_and_yields_to_findings() {
        use meshwarden_shared::encoding::base64_encode;
        let e = engine(r#"{"detectors": {"credit_card": {"action": "reject"}}}"#);
        let mut st = MaskState::default();
        let _ = st.mask(&e, base64_encode(b"card 4111 1111 1111 1111 exp 12/29").as_bytes());
        assert_eq!(st.rejected, vec!["credit_card".to_string()]);
        let e = engine("{}");
        let tail = "Ab3/+Cd5Ef7Gh9Ij1Kl3Mn5".repeat(8);
        let tok = format!("IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ{tail}==");
        let mut st = MaskState::default();
        let out = String::from_utf8(st.mask(&e, format!("AWS_SESSION_TOKEN={tok}").as_bytes()).unwrap()).unwrap();
        assert_eq!(out, "AWS_SESSION_TOKEN=<AWS_KEY_1>");
        assert_eq!(st.base64_runs_masked, 0);
    }
}
