//! Built-in detectors in ONE pass over the text.
//!
//! No regular expressions: the scanner walks the bytes once, and only at a token start whose first byte
//! can begin some entity (a digit, `+`, `(`, a letter that starts a known secret prefix, `@` run, `-----`)
//! does it look further, with bounded look-ahead and a validator (Luhn, mod-97, NHS weights, SSN ranges,
//! IBAN country lengths, IPv6 parse, JWT header decode). A token that is nothing is skipped whole, so the
//! work is linear in the text. Works on bytes, so non-UTF-8 input is scanned too (every shape is ASCII).

use serde::{Deserialize, Serialize};

/// The built-in entity types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    Email,
    Phone,
    CreditCard,
    UsSsn,
    Iban,
    Ipv4,
    Ipv6,
    UkNhs,
    AwsAccessKey,
    GithubToken,
    GitlabToken,
    OpenaiKey,
    AnthropicKey,
    SlackToken,
    GoogleApiKey,
    StripeKey,
    HuggingfaceToken,
    PrivateKey,
    Jwt,
}

impl Builtin {
    pub const ALL: [Builtin; 19] = [
        Builtin::Email,
        Builtin::Phone,
        Builtin::CreditCard,
        Builtin::UsSsn,
        Builtin::Iban,
        Builtin::Ipv4,
        Builtin::Ipv6,
        Builtin::UkNhs,
        Builtin::AwsAccessKey,
        Builtin::GithubToken,
        Builtin::GitlabToken,
        Builtin::OpenaiKey,
        Builtin::AnthropicKey,
        Builtin::SlackToken,
        Builtin::GoogleApiKey,
        Builtin::StripeKey,
        Builtin::HuggingfaceToken,
        Builtin::PrivateKey,
        Builtin::Jwt,
    ];

    /// Config / stat name.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Email => "email",
            Builtin::Phone => "phone",
            Builtin::CreditCard => "credit_card",
            Builtin::UsSsn => "us_ssn",
            Builtin::Iban => "iban",
            Builtin::Ipv4 => "ipv4",
            Builtin::Ipv6 => "ipv6",
            Builtin::UkNhs => "uk_nhs",
            Builtin::AwsAccessKey => "aws_access_key",
            Builtin::GithubToken => "github_token",
            Builtin::GitlabToken => "gitlab_token",
            Builtin::OpenaiKey => "openai_key",
            Builtin::AnthropicKey => "anthropic_key",
            Builtin::SlackToken => "slack_token",
            Builtin::GoogleApiKey => "google_api_key",
            Builtin::StripeKey => "stripe_key",
            Builtin::HuggingfaceToken => "huggingface_token",
            Builtin::PrivateKey => "private_key",
            Builtin::Jwt => "jwt",
        }
    }

    /// Placeholder label (`<EMAIL_1>`).
    pub fn label(self) -> &'static str {
        match self {
            Builtin::Email => "EMAIL",
            Builtin::Phone => "PHONE",
            Builtin::CreditCard => "CREDIT_CARD",
            Builtin::UsSsn => "US_SSN",
            Builtin::Iban => "IBAN",
            Builtin::Ipv4 => "IPV4",
            Builtin::Ipv6 => "IPV6",
            Builtin::UkNhs => "UK_NHS",
            Builtin::AwsAccessKey => "AWS_KEY",
            Builtin::GithubToken => "GITHUB_TOKEN",
            Builtin::GitlabToken => "GITLAB_TOKEN",
            Builtin::OpenaiKey => "OPENAI_KEY",
            Builtin::AnthropicKey => "ANTHROPIC_KEY",
            Builtin::SlackToken => "SLACK_TOKEN",
            Builtin::GoogleApiKey => "GOOGLE_API_KEY",
            Builtin::StripeKey => "STRIPE_KEY",
            Builtin::HuggingfaceToken => "HF_TOKEN",
            Builtin::PrivateKey => "PRIVATE_KEY",
            Builtin::Jwt => "JWT",
        }
    }

    /// Words that, found shortly before a candidate, raise its confidence one level.
    pub fn default_context_words(self) -> &'static [&'static str] {
        match self {
            Builtin::Phone => &[
                "phone",
                "tel",
                "telephone",
                "call",
                "mobile",
                "cell",
                "fax",
                "whatsapp",
                "contact",
                "number",
                "reach",
                "dial",
                "sms",
                "text me",
                "line",
                "hotline",
            ],
            Builtin::CreditCard => &["card", "visa", "mastercard", "amex", "credit", "debit", "payment"],
            Builtin::UsSsn => &["ssn", "social security", "social-security", "taxpayer"],
            Builtin::Iban => &["iban", "bank", "account", "transfer"],
            Builtin::UkNhs => &["nhs", "health service", "patient"],
            Builtin::Ipv4 | Builtin::Ipv6 => &["ip", "address", "host", "server", "client"],
            _ => &[],
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How sure a finding is. Context words raise a finding one level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    Low,
    Medium,
    High,
}

impl Confidence {
    pub(crate) fn raised(self) -> Confidence {
        match self {
            Confidence::Low => Confidence::Medium,
            _ => Confidence::High,
        }
    }
}

/// One finding of a built-in detector: byte range in the scanned text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    pub start: usize,
    pub end: usize,
    pub kind: Builtin,
    pub confidence: Confidence,
}

/// Which built-ins are on, their minimum confidence and context words.
#[derive(Debug, Clone)]
pub struct Scanner {
    enabled: [bool; 19],
    min_confidence: [Confidence; 19],
    context: [Vec<String>; 19],
    context_window: usize,
}

impl Default for Scanner {
    fn default() -> Self {
        let mut s = Scanner {
            enabled: [true; 19],
            min_confidence: [Confidence::Medium; 19],
            context: Default::default(),
            context_window: 48,
        };
        for b in Builtin::ALL {
            s.set_context(b, b.default_context_words().iter().map(|w| w.to_string()).collect());
        }
        s
    }
}

#[inline]
fn is_digit(b: u8) -> bool {
    b.is_ascii_digit()
}
// Byte classes for the scanner's hot loops: one table load per byte instead of several comparisons
// (most of a prompt is prose the scanner only skips, so these loops are most of its time).
const ALNUM: u8 = 1;
const WORD: u8 = 2;
/// A byte a detector can start at: `[A-Za-z0-9+(\-:@]`.
const START: u8 = 4;
const LETTER: u8 = 8;
/// A byte that ends a word without making it interesting: not a letter, digit or `_`, and none of the
/// bytes that continue a shape (`( + - : @ . % /`). A word of letters followed by one can start nothing.
const PLAIN_SEPARATOR: u8 = 16;
/// A byte a character [`separator_at`] reads can start with (the lead bytes of the Unicode characters, and
/// `% & +` and the tab).
const NORMALIZED_LEAD: u8 = 32;

#[allow(clippy::indexing_slicing)] // `b < 256`, the table's length (a const fn cannot use `get_mut`)
const fn byte_classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let mut k = 0;
        if c.is_ascii_alphanumeric() {
            k |= ALNUM | WORD | START;
        }
        if c == b'_' {
            k |= WORD;
        }
        if c.is_ascii_alphabetic() {
            k |= LETTER;
        }
        if !c.is_ascii_alphanumeric() && !matches!(c, b'_' | b'(' | b'+' | b'-' | b':' | b'@' | b'.' | b'%' | b'/') {
            k |= PLAIN_SEPARATOR;
        }
        // `@`: an email whose local part is all non-ASCII (`иван@`) has no ASCII token start before it.
        if matches!(c, b'+' | b'(' | b'-' | b':' | b'@') {
            k |= START;
        }
        if matches!(c, 0x09 | 0xC2 | 0xCD | 0xD8 | 0xE1 | 0xE2 | 0xE3 | 0xEF | 0xF3 | b'%' | b'&' | b'+') {
            k |= NORMALIZED_LEAD;
        }
        t[b] = k;
        b += 1;
    }
    t
}

static BYTE_CLASSES: [u8; 256] = byte_classes();

#[inline]
fn class(b: u8) -> u8 {
    // A u8 indexes a 256-entry table: never out of range.
    BYTE_CLASSES.get(usize::from(b)).copied().unwrap_or(0)
}

/// The length of the run of bytes from `from` on that have (`want_set`) or lack (`!want_set`) the
/// class bits `mask`.
#[inline]
fn run_len(t: &[u8], from: usize, mask: u8, want_set: bool) -> usize {
    let rest = t.get(from..).unwrap_or(&[]);
    rest.iter().position(|&b| (class(b) & mask != 0) != want_set).unwrap_or(rest.len())
}

/// Prose fast path, from a token start `i`: the start of the first word the per-word checks must see.
/// Words of fewer than 16 letters each followed by a plain separator can start no detector (they are not
/// long, IBAN-, hex- or email-shaped): they are skipped here in one pass. Stops at the start of the
/// word that reaches 16 letters or runs into any other byte (a digit, `.`, `@`, ...).
fn skip_plain_words(t: &[u8], i: usize) -> usize {
    let mut word_start = i;
    let mut j = i;
    while let Some(&c) = t.get(j) {
        let k = class(c);
        if k & LETTER != 0 {
            if j - word_start >= 15 {
                return word_start;
            }
        } else if k & PLAIN_SEPARATOR != 0 {
            word_start = j + 1;
        } else {
            return word_start;
        }
        j += 1;
    }
    word_start
}

#[inline]
fn is_alnum(b: u8) -> bool {
    class(b) & ALNUM != 0
}
#[inline]
fn is_word(b: u8) -> bool {
    class(b) & WORD != 0
}
#[inline]
fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}
#[inline]
fn at(t: &[u8], i: usize) -> u8 {
    t.get(i).copied().unwrap_or(0)
}

impl Scanner {
    /// Nothing enabled.
    pub fn none() -> Self {
        Scanner { enabled: [false; 19], ..Scanner::default() }
    }

    pub fn set_enabled(&mut self, b: Builtin, on: bool) {
        if let Some(e) = self.enabled.get_mut(b.index()) {
            *e = on;
        }
    }

    pub fn set_min_confidence(&mut self, b: Builtin, c: Confidence) {
        if let Some(e) = self.min_confidence.get_mut(b.index()) {
            *e = c;
        }
    }

    /// Context words are matched case-insensitively; give them in lower case.
    pub fn set_context(&mut self, b: Builtin, words: Vec<String>) {
        if let Some(e) = self.context.get_mut(b.index()) {
            *e = words.into_iter().map(|w| w.to_ascii_lowercase()).filter(|w| !w.is_empty()).collect();
        }
    }

    pub fn set_context_window(&mut self, bytes: usize) {
        self.context_window = bytes;
    }

    pub fn any_enabled(&self) -> bool {
        self.enabled.iter().any(|e| *e)
    }

    fn on(&self, b: Builtin) -> bool {
        self.enabled.get(b.index()).copied().unwrap_or(false)
    }

    /// Every finding, in order, non-overlapping.
    pub fn scan(&self, t: &[u8]) -> Vec<Finding> {
        let mut out = Vec::new();
        self.scan_with(t, |f| out.push(f));
        out
    }

    /// The single pass (over the text with Unicode separators normalised, see [`normalize_separators`];
    /// findings are in `t`'s offsets).
    pub fn scan_with(&self, t: &[u8], emit: impl FnMut(Finding)) {
        self.scan_normalized(t, true, emit);
    }

    fn scan_normalized(&self, t: &[u8], prose_fast_path: bool, mut emit: impl FnMut(Finding)) {
        match normalize_separators(t) {
            None => self.scan_text(t, prose_fast_path).into_iter().for_each(emit),
            Some(norm) => {
                for f in self.scan_text(&norm.text, prose_fast_path) {
                    // Back to the original offsets: the span covers every original byte between the first and
                    // the last normalised byte (separators and zero-width characters inside included).
                    let (start, end) = norm.orig_span(f.start, f.end, t.len());
                    emit(Finding { start, end, ..f })
                }
            }
        }
    }

    /// The pass, and AWS secret access keys ([`aws_secret_keys`]: they have no prefix the pass could start
    /// at) merged into its findings in order; findings that overlap are masked as one (their union, of the
    /// kind of the first).
    fn scan_text(&self, t: &[u8], prose_fast_path: bool) -> Vec<Finding> {
        let mut found = Vec::new();
        self.scan_pass(t, prose_fast_path, |f| found.push(f));
        if !self.on(Builtin::AwsAccessKey) {
            return found;
        }
        let secrets = aws_secret_keys(t, &found);
        if secrets.is_empty() {
            return found;
        }
        found.extend(secrets);
        found.sort_by_key(|f| (f.start, f.end));
        let mut out: Vec<Finding> = Vec::with_capacity(found.len());
        for f in found {
            match out.last_mut() {
                Some(c) if f.start < c.end => c.end = c.end.max(f.end),
                _ => out.push(f),
            }
        }
        out
    }

    /// [`Scanner::scan`] without the prose fast path: the reference that the unit test and the
    /// `pii_mask_restore` fuzz target compare the fast path with (it must change no finding).
    #[doc(hidden)]
    pub fn scan_without_prose_fast_path(&self, t: &[u8]) -> Vec<Finding> {
        let mut out = Vec::new();
        self.scan_normalized(t, false, |f| out.push(f));
        out
    }

    fn scan_pass(&self, t: &[u8], prose_fast_path: bool, mut emit: impl FnMut(Finding)) {
        let n = t.len();
        let mut i = 0;
        // End of the last finding: a finding extended back (an email's non-ASCII local part) never
        // reaches into the one before.
        let mut last_end = 0;
        while i < n {
            // Skip the bytes no detector starts at (spaces, punctuation) in one tight loop.
            i += run_len(t, i, START, false);
            if i >= n {
                break;
            }
            let b = at(t, i);
            // Token start: the previous byte must not continue a word. An `@` is tried after a word too:
            // an email whose local part holds punctuation (`jo~e&co@`, `__jane@`) may have no token start
            // the email detector was tried at.
            if i > 0 && is_word(at(t, i - 1)) && b != b'@' {
                i += 1;
                continue;
            }
            // Literal prefilter: a plain word (letters/digits followed by a space or punctuation that
            // continues no shape) is skipped without trying any detector.
            if b.is_ascii_alphabetic() {
                let w = if prose_fast_path { skip_plain_words(t, i) } else { i };
                if w > i {
                    i = w;
                    continue;
                }
                let j = i + 1 + run_len(t, i + 1, ALNUM, true);
                let next = at(t, j);
                let continues = matches!(next, b'@' | b'.' | b'_' | b'%' | b'+' | b'-' | b':' | b'/');
                let long = j - i >= 16; // AWS / Google keys are one alphanumeric word of 20+ characters
                let iban_like = j - i >= 4
                    && at(t, i + 1).is_ascii_alphabetic()
                    && is_digit(at(t, i + 2))
                    && is_digit(at(t, i + 3));
                let hex = j - i <= 4 && next == b':';
                if !(continues || long || iban_like || hex) {
                    i = j;
                    continue;
                }
            }
            if let Some(f) = self.try_at(t, i) {
                if f.end > i {
                    let f = self.with_context(t, f);
                    if f.confidence >= self.min_confidence.get(f.kind.index()).copied().unwrap_or(Confidence::High) {
                        emit(Finding { start: f.start.max(last_end), ..f });
                        i = f.end;
                        last_end = f.end;
                        continue;
                    }
                }
            }
            // Digit groups with one separator (space or dash) from whose start nothing is reported are
            // one number (an order, invoice or tracking number): none of its later groups starts a
            // finding (`1234 5678 9012 3456` holds no card `5678 9012 3456`).
            if is_digit(b) {
                if let Some(end) = uniform_run_end(t, i) {
                    i = end;
                    continue;
                }
            }
            // An IBAN-shaped span that fails its check is skipped whole (its digit groups are not phones).
            if b.is_ascii_alphabetic() && self.on(Builtin::Iban) {
                if let Some((end, false)) = iban_span(t, i) {
                    i = end;
                    continue;
                }
            }
            // Skip this word (a punctuation start only itself).
            if !is_word(b) {
                i += 1;
                continue;
            }
            i += 1 + run_len(t, i + 1, WORD, true);
        }
    }

    fn with_context(&self, t: &[u8], mut f: Finding) -> Finding {
        if f.confidence == Confidence::High {
            return f;
        }
        let words = match self.context.get(f.kind.index()) {
            Some(w) if !w.is_empty() => w,
            _ => return f,
        };
        let from = f.start.saturating_sub(self.context_window);
        let window = t.get(from..f.start).unwrap_or(&[]);
        let after = t.get(f.end..(f.end + self.context_window / 2).min(t.len())).unwrap_or(&[]);
        if words.iter().any(|w| contains_ci(window, w.as_bytes()) || contains_ci(after, w.as_bytes())) {
            f.confidence = f.confidence.raised();
        }
        f
    }

    /// Try every detector that can start at `i` (a token start).
    fn try_at(&self, t: &[u8], i: usize) -> Option<Finding> {
        let b = at(t, i);
        // Email first: its local part may look like anything else.
        if is_local(b) && self.on(Builtin::Email) {
            if let Some(f) = email(t, i) {
                return Some(f);
            }
        }
        match b {
            b'-' => {
                if self.on(Builtin::PrivateKey) {
                    return private_key(t, i);
                }
                None
            }
            b'0'..=b'9' | b'+' | b'(' => {
                if let Some(f) = self.ipv6(t, i) {
                    return Some(f);
                }
                self.numeric(t, i)
            }
            b':' => self.ipv6(t, i),
            b'@' if self.on(Builtin::Email) => email(t, i),
            b'a'..=b'z' | b'A'..=b'Z' => {
                if let Some(f) = self.secret(t, i) {
                    return Some(f);
                }
                if self.on(Builtin::Iban) {
                    if let Some(f) = iban(t, i) {
                        return Some(f);
                    }
                }
                if b.is_ascii_hexdigit() {
                    return self.ipv6(t, i);
                }
                None
            }
            _ => None,
        }
    }

    fn ipv6(&self, t: &[u8], i: usize) -> Option<Finding> {
        if !self.on(Builtin::Ipv6) {
            return None;
        }
        let mut j = i;
        let mut colons = 0;
        while j < t.len() && j - i < 45 {
            let c = at(t, j);
            if c == b':' {
                colons += 1;
            } else if !(c.is_ascii_hexdigit() || c == b'.') {
                break;
            }
            j += 1;
        }
        if colons < 2 {
            return None;
        }
        // Trailing punctuation is not part of the address.
        // (`j >= i + 2`: a candidate of one `:` has no `::` to keep; `j - 2` must not underflow.)
        while j > i
            && matches!(at(t, j - 1), b'.' | b':')
            && !(j >= i + 2 && at(t, j - 1) == b':' && at(t, j - 2) == b':')
        {
            j -= 1;
        }
        if is_word(at(t, j)) {
            return None;
        }
        let s = std::str::from_utf8(t.get(i..j)?).ok()?;
        s.parse::<std::net::Ipv6Addr>().ok()?;
        // "::" alone or a bare "12::" are too weak to call an address.
        let hex_digits = s.bytes().filter(u8::is_ascii_hexdigit).count();
        if hex_digits < 2 {
            return None;
        }
        // Two groups of the letters a-f around `::` are a code path (`db::add`, `cafe::bad`), not an
        // address: addresses in use have a decimal digit or at least three groups.
        if !s.bytes().any(|c| c.is_ascii_digit()) && s.split(':').filter(|g| !g.is_empty()).count() < 3 {
            return None;
        }
        Some(Finding { start: i, end: j, kind: Builtin::Ipv6, confidence: Confidence::High })
    }

    /// Digits with separators: IPv4, SSN, card, NHS, phone.
    fn numeric(&self, t: &[u8], i: usize) -> Option<Finding> {
        let run = numeric_run(t, i);
        if run.groups.is_empty() {
            return None;
        }
        // Longest prefix (by groups) that classifies.
        for g in (1..=run.groups.len()).rev() {
            let end = run.groups.get(g - 1).map(|x| x.1)?;
            // A prefix must end at a token end.
            if g < run.groups.len() || run.complete {
                let groups = run.groups.get(..g)?;
                let seps = run.seps.get(..g.saturating_sub(1))?;
                let full = g == run.groups.len();
                // A wide gap (two spaces, a line break) joins groups only into a whole run that is a card:
                // never a prefix of a longer run (lines of numbers), nor a phone.
                if seps.iter().any(wide) && !(full && run.complete && run.ext_end.is_none() && !run.trunk_paren) {
                    continue;
                }
                if full && (run.ext_end.is_some() || run.trunk_paren) {
                    // Only a phone has an extension or a (0) trunk.
                    if !self.on(Builtin::Phone) {
                        return None;
                    }
                    let lens: Vec<usize> = groups.iter().map(|(a, b)| b - a).collect();
                    let digits: Vec<u8> =
                        groups.iter().flat_map(|(a, b)| t.get(*a..*b).unwrap_or(&[]).iter().copied()).collect();
                    let plus = at(t, i) == b'+';
                    let paren = at(t, i) == b'(';
                    if let Some(confidence) = phone(t, i, end, &lens, seps, plus, paren, &digits) {
                        let end = run.ext_end.unwrap_or(end);
                        return Some(Finding { start: i, end, kind: Builtin::Phone, confidence });
                    }
                    continue;
                }
                if let Some(f) = self.classify(t, i, end, groups, seps) {
                    return Some(f);
                }
            }
        }
        None
    }

    fn classify(&self, t: &[u8], start: usize, end: usize, groups: &[(usize, usize)], seps: &[u8]) -> Option<Finding> {
        let plus = at(t, start) == b'+';
        let paren = at(t, start) == b'(';
        let lens: Vec<usize> = groups.iter().map(|(a, b)| b - a).collect();
        let digits: usize = lens.iter().sum();
        let all_same_sep = seps.windows(2).all(|w| w.first() == w.get(1));
        let sep0 = seps.first().copied();
        let finding = |kind, confidence| Some(Finding { start, end, kind, confidence });
        let digit_str: Vec<u8> =
            groups.iter().flat_map(|(a, b)| t.get(*a..*b).unwrap_or(&[]).iter().copied()).collect();

        // IPv4: exactly four dot-separated groups of 1-3 digits, each <= 255.
        if !plus
            && !paren
            && groups.len() == 4
            && seps.iter().all(|s| *s == b'.')
            && lens.iter().all(|l| (1..=3).contains(l))
        {
            if !self.on(Builtin::Ipv4) {
                return None;
            }
            let ok = groups.iter().all(|(a, b)| {
                let g = t.get(*a..*b).unwrap_or(&[]);
                let v = g.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
                v <= 255 && !(g.len() > 1 && g.first() == Some(&b'0'))
            });
            if !ok {
                return None;
            }
            // "version 1.2.3.4", "v1.2.3.4": a version string, not an address.
            let before = t.get(start.saturating_sub(12)..start).unwrap_or(&[]);
            let conf = if contains_ci(before, b"version")
                || contains_ci(before, b"ver ")
                || at(t, start.wrapping_sub(1)) == b'v'
            {
                Confidence::Low
            } else {
                Confidence::High
            };
            return finding(Builtin::Ipv4, conf);
        }
        if seps.contains(&b'.') && !(all_same_sep && seps.len() >= 2) {
            return None; // 3.14, 1.2, 10.5-3
        }

        // US SSN: AAA-GG-SSSS with one separator kind, or 9 digits with a context word.
        if self.on(Builtin::UsSsn) && !plus && !paren && !seps.iter().any(wide) {
            if lens == [3, 2, 4] && all_same_sep {
                if ssn_valid(&digit_str) {
                    let conf = if sep0 == Some(b'-') { Confidence::High } else { Confidence::Medium };
                    return finding(Builtin::UsSsn, conf);
                }
                return None;
            }
            if lens == [9] && ssn_valid(&digit_str) {
                // Bare nine digits: only with a context word.
                let f = Finding { start, end, kind: Builtin::UsSsn, confidence: Confidence::Low };
                if self.with_context(t, f).confidence >= Confidence::Medium {
                    return Some(f);
                }
            }
        }

        // Credit card: 12-19 digits, single spaces or dashes between groups, Luhn, a known brand prefix.
        // Since 2026-12-07 also two spaces or one line break between groups printed the usual way (fours, the
        // last one shorter; Amex 4-6-5), spaces otherwise: `4111  1111  1111  1111`, `4111 1111\n1111 1111`.
        let wide_gaps = seps.iter().any(wide);
        let card_seps = if wide_gaps {
            let fours =
                lens.split_last().is_some_and(|(last, rest)| (1..=4).contains(last) && rest.iter().all(|l| *l == 4));
            seps.iter().all(|s| matches!(*s, b' ' | TWO_SPACES | LINE_BREAK))
                && seps.iter().filter(|s| **s == LINE_BREAK).count() <= 1
                && (fours || lens == [4, 6, 5])
        } else {
            all_same_sep && seps.iter().all(|s| *s == b' ' || *s == b'-')
        };
        if self.on(Builtin::CreditCard) && !plus && !paren && (12..=19).contains(&digits) && card_seps {
            if luhn(&digit_str) && card_brand(&digit_str) && !all_same(&digit_str) {
                // A Luhn-valid number next to "order", "invoice", "tracking"... is an id, unless a card word is there too.
                let f = Finding { start, end, kind: Builtin::CreditCard, confidence: Confidence::Medium };
                let ctx = self.with_context(t, f);
                if ctx.confidence == Confidence::Medium && negative_context(t, start) {
                    return Some(Finding { confidence: Confidence::Low, ..f });
                }
                return Some(ctx);
            }
            if groups.len() == 1 || digits > 15 {
                return None; // an order number that fails Luhn, not a phone either
            }
        }

        if wide_gaps {
            return None; // no other shape spans a wide gap
        }
        // UK NHS: 3-3-4 (spaces or dashes) or 10 digits, weights 10..2.
        let nhs_shape = (lens == [3, 3, 4] && all_same_sep && matches!(sep0, Some(b' ') | Some(b'-'))) || lens == [10];
        let nhs_ok = self.on(Builtin::UkNhs) && !plus && !paren && nhs_shape && nhs_valid(&digit_str);
        if nhs_ok {
            let f = Finding { start, end, kind: Builtin::UkNhs, confidence: Confidence::Medium };
            let with_ctx = self.with_context(t, f);
            let nanp = lens == [3, 3, 4] && nanp_plausible(&digit_str);
            if with_ctx.confidence > f.confidence || !nanp {
                // Bare ten digits need the context word (else it may still be a phone).
                if !(lens == [10] && with_ctx.confidence <= Confidence::Medium) {
                    return Some(f);
                }
            }
        }

        // Phone.
        if self.on(Builtin::Phone) {
            let confidence = phone(t, start, end, &lens, seps, plus, paren, &digit_str)?;
            // A weak shape (bare digits or groups, no `+`, trunk 0 or area code) after "order", "invoice",
            // "tracking", ... is that id, whatever context word ("number") is near.
            if confidence == Confidence::Low && negative_context(t, start) {
                return None;
            }
            return Some(Finding { start, end, kind: Builtin::Phone, confidence });
        }
        None
    }

    /// Secrets by literal prefix.
    fn secret(&self, t: &[u8], i: usize) -> Option<Finding> {
        let rest = t.get(i..)?;
        let b = *rest.first()?;
        let tok_end = |from: usize, ok: fn(u8) -> bool| {
            let mut j = from;
            while j < t.len() && ok(at(t, j)) {
                j += 1;
            }
            j
        };
        let key_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
        let high = |kind, end| Some(Finding { start: i, end, kind, confidence: Confidence::High });
        match b {
            b'A' => {
                if self.on(Builtin::AwsAccessKey) {
                    let pre = [&b"AKIA"[..], b"ASIA", b"ABIA", b"ACCA"].iter().any(|p| rest.starts_with(p))
                        || (rest.starts_with(b"A3T")
                            && at(rest, 3).is_ascii_alphanumeric()
                            && at(rest, 3).is_ascii_uppercase() | at(rest, 3).is_ascii_digit());
                    if pre {
                        let body = rest.get(4..20)?;
                        if body.iter().all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(c))
                            && !is_word(at(rest, 20))
                        {
                            return high(Builtin::AwsAccessKey, i + 20);
                        }
                    }
                }
                if self.on(Builtin::GoogleApiKey) && rest.starts_with(b"AIza") {
                    let body = rest.get(4..39)?;
                    if body.iter().all(|c| key_char(*c)) && !key_char(at(rest, 39)) {
                        return high(Builtin::GoogleApiKey, i + 39);
                    }
                }
                None
            }
            // AWS session tokens: base64 of a structure that starts `!\n\torigin` (IQoJb3JpZ2lu) or, older,
            // `\x17\n\x06er/aws` (FwoGZXIvYXdz, FQoGZXIvYXdz); 100 or more base64 characters, `=` padding kept.
            b'I' | b'F' if self.on(Builtin::AwsAccessKey) => {
                if ![&b"IQoJb3JpZ2lu"[..], b"FwoGZXIvYXdz", b"FQoGZXIvYXdz"].iter().any(|p| rest.starts_with(p)) {
                    return None;
                }
                let mut end = tok_end(i, aws_secret_char);
                while at(t, end) == b'=' && end - i < 4096 {
                    end += 1;
                }
                if end - i >= 100 && !is_word(at(t, end)) {
                    return high(Builtin::AwsAccessKey, end);
                }
                None
            }
            b'g' if self.on(Builtin::GitlabToken) && rest.starts_with(b"gl") => gitlab_token(t, i),
            b'g' if self.on(Builtin::GithubToken) => {
                if rest.starts_with(b"github_pat_") {
                    let end = tok_end(i + 11, is_word);
                    if end - (i + 11) >= 82 {
                        return high(Builtin::GithubToken, end);
                    }
                    return None;
                }
                if rest.len() >= 40
                    && rest.starts_with(b"gh")
                    && matches!(at(rest, 2), b'p' | b'o' | b'u' | b's' | b'r')
                    && at(rest, 3) == b'_'
                {
                    let body = rest.get(4..40)?;
                    if body.iter().all(u8::is_ascii_alphanumeric) && !is_word(at(rest, 40)) {
                        return high(Builtin::GithubToken, i + 40);
                    }
                }
                None
            }
            b's' | b'r' => {
                if b == b's' && rest.starts_with(b"sk-") {
                    let end = tok_end(i, key_char);
                    let tok = t.get(i..end)?;
                    if tok.starts_with(b"sk-ant-") {
                        if !self.on(Builtin::AnthropicKey) {
                            return None;
                        }
                        for p in [&b"sk-ant-api03-"[..], b"sk-ant-admin01-"] {
                            if tok.starts_with(p) && tok.len() == p.len() + 95 && tok.ends_with(b"AA") {
                                return high(Builtin::AnthropicKey, end);
                            }
                        }
                        // Any other `sk-ant-<kind><version>-` credential: OAuth access and refresh tokens
                        // (`oat01`, `ort01`), a newer key version, a key cut short (still a secret): 32 or
                        // more token characters after the prefix.
                        let after = tok.get(7..).unwrap_or(&[]);
                        let letters = after.iter().take_while(|c| c.is_ascii_lowercase()).count();
                        let digits = after.iter().skip(letters).take_while(|c| c.is_ascii_digit()).count();
                        if letters > 0
                            && digits > 0
                            && at(after, letters + digits) == b'-'
                            && after.len() >= letters + digits + 1 + 32
                        {
                            return high(Builtin::AnthropicKey, end);
                        }
                        return None;
                    }
                    if self.on(Builtin::OpenaiKey) && contains(tok, b"T3BlbkFJ") {
                        let modern = [&b"sk-proj-"[..], b"sk-svcacct-", b"sk-admin-", b"sk-None-"]
                            .iter()
                            .any(|p| tok.starts_with(p));
                        let legacy = tok.len() == 51
                            && tok.get(23..31) == Some(b"T3BlbkFJ")
                            && tok.iter().skip(3).all(u8::is_ascii_alphanumeric);
                        if (modern && tok.len() >= 40) || legacy {
                            return high(Builtin::OpenaiKey, end);
                        }
                    }
                    return None;
                }
                if self.on(Builtin::StripeKey) && at(rest, 1) == b'k' && at(rest, 2) == b'_' {
                    let after = rest.get(3..)?;
                    if ![&b"test_"[..], b"live_", b"prod_"].iter().any(|p| after.starts_with(p)) {
                        return None;
                    }
                    let body_start = i + 8;
                    let end = tok_end(body_start, |c| c.is_ascii_alphanumeric());
                    // 10 or more (gitleaks stops at 99; a longer key is no less a secret and was left whole).
                    if end - body_start >= 10 && !is_word(at(t, end)) {
                        return high(Builtin::StripeKey, end);
                    }
                }
                None
            }
            b'x' if self.on(Builtin::SlackToken) => {
                // App-level tokens (Socket Mode): `xapp-<digit>-…`.
                if rest.starts_with(b"xapp-") && at(rest, 5).is_ascii_digit() && at(rest, 6) == b'-' {
                    let end = tok_end(i + 7, |c| c.is_ascii_alphanumeric() || c == b'-');
                    if end - (i + 7) >= 20 {
                        return high(Builtin::SlackToken, end);
                    }
                    return None;
                }
                if rest.starts_with(b"xox")
                    && matches!(at(rest, 3), b'b' | b'p' | b'e' | b'a' | b's' | b'r')
                    && at(rest, 4) == b'-'
                {
                    let end = tok_end(i + 5, |c| c.is_ascii_alphanumeric() || c == b'-');
                    if end - (i + 5) >= 10 {
                        return high(Builtin::SlackToken, end);
                    }
                }
                None
            }
            b'h' => {
                if self.on(Builtin::HuggingfaceToken) && rest.starts_with(b"hf_") {
                    let body = rest.get(3..37)?;
                    if body.iter().all(u8::is_ascii_alphabetic) && !is_word(at(rest, 37)) {
                        return high(Builtin::HuggingfaceToken, i + 37);
                    }
                }
                if self.on(Builtin::SlackToken) {
                    let skip = if rest.starts_with(b"https://") { 8 } else { 0 };
                    // Incoming webhooks (`services/`) and Workflow Builder webhooks (`workflows/`, `triggers/`).
                    let path = rest.get(skip..).and_then(|r| {
                        [&b"hooks.slack.com/services/"[..], b"hooks.slack.com/workflows/", b"hooks.slack.com/triggers/"]
                            .into_iter()
                            .find(|p| r.starts_with(p))
                    });
                    if let Some(path) = path {
                        let from = i + skip + path.len();
                        let end = tok_end(from, |c| c.is_ascii_alphanumeric() || c == b'/' || c == b'_');
                        if end - from >= 20 {
                            return high(Builtin::SlackToken, end);
                        }
                    }
                }
                None
            }
            b'e' if self.on(Builtin::Jwt) => jwt(t, i),
            _ => None,
        }
    }
}

/// What a separator-like character at `t[i..]` becomes for the scanner: `(its length, Some(b' '))` for
/// tabs and Unicode spaces (no-break U+00A0, U+1680, U+2000..U+200A incl. thin U+2009, narrow no-break
/// U+202F, U+205F, ideographic U+3000), `Some(b'-')` for Unicode hyphens and dashes (U+2010..U+2015 incl.
/// non-breaking hyphen U+2011 and en dash U+2013, minus U+2212, U+FE63, U+FF0D), `None` for invisible
/// characters that are dropped (zero-width U+200B..U+200D, word joiner U+2060, U+FEFF, soft hyphen
/// U+00AD, and since 2026-12-07 bidirectional controls, invisible operators, variation selectors and the
/// other format characters listed below; Unicode tag characters become the ASCII they encode), and for
/// fullwidth digits, letters and `＠ ＋ （ ） ． ＿` the ASCII character they stand for (`＠` is `@`,
/// `４` is `4`; since
/// 2026-12-07: before, `jane.doe＠example.com` and `４１１１ １１１１ …` typed with a CJK input method left the
/// gateway unmasked, and a model reads them as the ASCII value). `None` when `t[i..]` starts with none of them.
#[allow(clippy::type_complexity)]
pub(crate) fn separator_at(t: &[u8], i: usize) -> Option<(usize, Option<u8>)> {
    let (b0, b1, b2) = (at(t, i), at(t, i + 1), at(t, i + 2));
    let space = Some(b' ');
    let dash = Some(b'-');
    match (b0, b1, b2) {
        (0x09, _, _) => Some((1, space)),
        (0xC2, 0xA0, _) => Some((2, space)),
        (0xC2, 0xAD, _) => Some((2, None)),
        (0xE1, 0x9A, 0x80) => Some((3, space)),
        (0xE2, 0x80, 0x80..=0x8A) | (0xE2, 0x80, 0xAF) | (0xE2, 0x81, 0x9F) => Some((3, space)),
        (0xE2, 0x80, 0x8B..=0x8D) | (0xE2, 0x81, 0xA0) => Some((3, None)),
        (0xE2, 0x80, 0x90..=0x95) | (0xE2, 0x88, 0x92) => Some((3, dash)),
        (0xE3, 0x80, 0x80) => Some((3, space)),
        (0xEF, 0xBB, 0xBF) => Some((3, None)),
        (0xEF, 0xBC, 0x8D) | (0xEF, 0xB9, 0xA3) => Some((3, dash)),
        // Fullwidth forms that can be part of a value (typed with a CJK input method): digits, letters, `＠`,
        // `＋`, `（`, `）`, `．`, `＿`, read as the ASCII character they stand for (U+FF01 + k is 0x21 + k).
        // Fullwidth punctuation of CJK prose (`，`, `！`, `：`, ...) is not: it would only cost a copy.
        (0xEF, 0xBC, 0x88 | 0x89 | 0x8B | 0x8E | 0x90..=0x99 | 0xA0..=0xBA | 0xBF) => Some((3, Some(b2 - 0x80 + 0x20))),
        (0xEF, 0xBD, 0x81..=0x9A) => Some((3, Some(b2 - 0x80 + 0x60))),
        // Other invisible format characters, dropped like the zero-width ones: bidirectional marks, embeddings
        // and isolates (U+200E, U+200F, U+202A..U+202E, U+2066..U+2069, U+061C), invisible math operators
        // (U+2061..U+2064), the combining grapheme joiner U+034F, the Mongolian vowel separator U+180E,
        // variation selectors (U+FE00..U+FE0F), Hangul fillers (U+115F, U+1160, U+3164, U+FFA0).
        (0xCD, 0x8F, _) | (0xD8, 0x9C, _) => Some((2, None)),
        (0xE2, 0x80, 0x8E | 0x8F | 0xAA..=0xAE) | (0xE2, 0x81, 0xA1..=0xA4 | 0xA6..=0xA9) => Some((3, None)),
        (0xE1, 0xA0, 0x8E) | (0xE1, 0x85, 0x9F | 0xA0) | (0xE3, 0x85, 0xA4) | (0xEF, 0xBE, 0xA0) => Some((3, None)),
        (0xEF, 0xB8, 0x80..=0x8F) => Some((3, None)),
        // Plane 14: tag characters U+E0000..U+E007F ("ASCII smuggling": U+E0000 + c stands for the ASCII
        // character c, and models read it so) as that character, the rest of them dropped; variation
        // selectors U+E0100..U+E01EF dropped.
        (0xF3, 0xA0, 0x80 | 0x81) => {
            let b3 = at(t, i + 3);
            if !(0x80..=0xBF).contains(&b3) {
                return None;
            }
            let c = ((b2 & 0x01) << 6) | (b3 & 0x3F);
            Some((4, (0x20..=0x7E).contains(&c).then_some(c)))
        }
        (0xF3, 0xA0, 0x84..=0x87) if (0x80..=0xBF).contains(&at(t, i + 3)) => Some((4, None)),
        // The byte after the `%` or `&` first: most of them in prose are neither (`50% off`, `R&D`, `a & b`).
        (b'%', _, _) if b1.is_ascii_hexdigit() => percent_encoded_at(t, i),
        (b'&', _, _) if b1 == b'#' || b1.is_ascii_alphabetic() => character_reference_at(t, i),
        (b'+', _, _) if form_space_at(t, i) => Some((1, space)),
        _ => None,
    }
}

/// A percent-encoded printable ASCII character at `t[i..]` (`%40` is `@`, `%2B` or `%2b` is `+`, `%20` a
/// space): URLs and logs pasted into a prompt carry values encoded (`?email=jane.doe%40example.com`,
/// `phone=%2B14155552671`), and a model reads them through the encoding. Since 2026-12-07; before, such
/// values left the gateway. Control characters and bytes of non-ASCII characters stay encoded: the local
/// part of an address keeps `%C3%B6` as address characters either way.
fn percent_encoded_at(t: &[u8], i: usize) -> Option<(usize, Option<u8>)> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let c = hex(at(t, i + 1))? * 16 + hex(at(t, i + 2))?;
    let c = u8::try_from(c).ok().filter(|c| (0x20..=0x7E).contains(c))?;
    Some((3, Some(c)))
}

/// Whether the `+` at `t[i]` is a space of a form-encoded query value (`application/x-www-form-urlencoded`:
/// HTML forms, `URLSearchParams`, Python's `urlencode` write a space as `+`): between two letters or digits
/// (or a percent-encoded character after it), inside a value that follows a `key=` (`phone=%2B44+20+7946+0958`,
/// `iban=NL55+RETG+5458+1089+02`, `card=4111+1111+1111+1111`). Not in a value with an `@` after the `+`
/// (`email=jane+tag@example.com` is an address with a tag to the model), nor outside a query value (`a+b`,
/// `jane+tag@example.com` in prose), except in a `tel:` / `sms:` URI's number (since 2026-12-08).
fn form_space_at(t: &[u8], i: usize) -> bool {
    let Some(prev) = i.checked_sub(1).map(|p| at(t, p)) else {
        return false;
    };
    let next = at(t, i + 1);
    if !prev.is_ascii_alphanumeric() || !(next.is_ascii_alphanumeric() || next == b'%') {
        return false;
    }
    // A query value ends at `&`, `#`, whitespace, quotes and markup; `;` separates parameters too.
    let ends_value =
        |c: &u8| matches!(c, b'&' | b'#' | b';' | b'?' | b'"' | b'\'' | b'<' | b'>') || c.is_ascii_whitespace();
    let before = t.get(i.saturating_sub(128)..i).unwrap_or(&[]);
    let after = t.get(i + 1..(i + 129).min(t.len())).unwrap_or(&[]);
    let key = before.iter().rposition(|c| *c == b'=' || ends_value(c)).is_some_and(|p| before.get(p) == Some(&b'='));
    // A `tel:` or `sms:` URI written by a form encoder (`sms:%28415%29+555+2671?body=...`): its number is
    // the value, with `+` for its spaces (its leading `+`, after the `:`, is the country prefix).
    let token = before.iter().rposition(ends_value).map_or(before, |p| before.get(p + 1..).unwrap_or(&[]));
    let number_uri = token.get(..4).is_some_and(|s| s.eq_ignore_ascii_case(b"tel:") || s.eq_ignore_ascii_case(b"sms:"));
    let value_rest = after.iter().position(ends_value).map_or(after, |e| after.get(..e).unwrap_or(&[]));
    (key || number_uri) && !value_rest.contains(&b'@') && find(value_rest, b"%40").is_none()
}

/// HTML named references the scanner reads, with what they stand for: the characters of values (an
/// address obfuscated against scrapers, `jane&commat;example&period;com`), spaces and dashes between
/// digit groups (`+44&nbsp;20&nbsp;7946&nbsp;0958`) and invisible characters (dropped, like the characters
/// themselves). Other named references (`&amp;`, `&lt;`, ...) are no part of a value and stay as written.
const NAMED_REFERENCES: [(&[u8], Option<u8>); 24] = [
    (b"commat", Some(b'@')),
    (b"plus", Some(b'+')),
    (b"period", Some(b'.')),
    (b"lowbar", Some(b'_')),
    (b"UnderBar", Some(b'_')),
    (b"lpar", Some(b'(')),
    (b"rpar", Some(b')')),
    (b"colon", Some(b':')),
    (b"nbsp", Some(b' ')),
    (b"NonBreakingSpace", Some(b' ')),
    (b"ensp", Some(b' ')),
    (b"emsp", Some(b' ')),
    (b"thinsp", Some(b' ')),
    (b"ThinSpace", Some(b' ')),
    (b"numsp", Some(b' ')),
    (b"hyphen", Some(b'-')),
    (b"dash", Some(b'-')),
    (b"ndash", Some(b'-')),
    (b"minus", Some(b'-')),
    (b"shy", None),
    (b"ZeroWidthSpace", None),
    (b"zwnj", None),
    (b"zwj", None),
    (b"NoBreak", None),
];

/// An HTML character reference at `t[i..]` (HTML pasted into a prompt): numeric (`&#64;`, `&#064;`,
/// `&#x40;`) and the named ones of [`NAMED_REFERENCES`], with their `;`. A numeric reference to printable
/// ASCII is that character (`&#106;&#97;&#110;&#101;&#64;...`, every character encoded, is an address);
/// one to a character [`separator_at`] reads (`&#160;`, `&#8203;`, `&#xFF20;`) is read as that character
/// is. Since 2026-12-07; before, `jane&#64;example.com` left the gateway unmasked.
fn character_reference_at(t: &[u8], i: usize) -> Option<(usize, Option<u8>)> {
    let rest = t.get(i + 1..)?;
    // The longest reference read is `&NonBreakingSpace;` (18 bytes).
    let semi = rest.iter().take(17).position(|&c| c == b';')?;
    let name = rest.get(..semi)?;
    let len = semi + 2;
    let Some(num) = name.strip_prefix(b"#") else {
        return NAMED_REFERENCES.iter().find(|(n, _)| *n == name).map(|&(_, rep)| (len, rep));
    };
    let (digits, radix) = match num.first() {
        Some(b'x' | b'X') => (num.get(1..)?, 16),
        _ => (num, 10),
    };
    if digits.is_empty() || digits.len() > 7 {
        return None;
    }
    let mut cp: u32 = 0;
    for &d in digits {
        cp = cp * radix + char::from(d).to_digit(radix)?;
    }
    if (0x20..=0x7E).contains(&cp) {
        return Some((len, u8::try_from(cp).ok()));
    }
    let mut buf = [0u8; 4];
    let encoded = char::from_u32(cp)?.encode_utf8(&mut buf).as_bytes();
    match separator_at(encoded, 0) {
        Some((w, rep)) if w == encoded.len() => Some((len, rep)),
        _ => None,
    }
}

/// What the scanner reads for the character or encoded sequence of `t` that ends at `end`, if it is one
/// [`separator_at`] normalises (a Unicode space or dash, an invisible character, a fullwidth form, a
/// percent-encoded character or an HTML character reference): `(its length, what it is read as)`. For
/// the response hold-back, which must see a value written with them as one run.
pub(crate) fn normalized_before(t: &[u8], end: usize) -> Option<(usize, Option<u8>)> {
    let ends_here = |s: usize| separator_at(t, s).filter(|&(len, _)| s + len == end);
    if at(t, end.checked_sub(1)?) == b';' {
        let floor = end.saturating_sub(18);
        let amp = t.get(floor..end)?.iter().rposition(|&c| c == b'&')?;
        return ends_here(floor + amp);
    }
    (2..=4).filter_map(|w| end.checked_sub(w)).find_map(ends_here)
}

/// A character of the original text that the normalised copy reads as one ASCII byte (`out_len` 1) or
/// drops (`out_len` 0), at `norm` in the copy.
#[derive(Debug, Clone, Copy)]
struct Edit {
    norm: usize,
    orig: usize,
    orig_len: usize,
    out_len: usize,
}

/// The text as the detectors read it ([`normalize_separators`]), with the characters it reads differently:
/// every byte between two of them is the original byte, so the copy is made in stretches and a finding is
/// mapped back by a binary search over the edits. (A map of every byte, before 2026-12-07, cost 16 bytes
/// per byte of text: a 128 KB prompt with one tab or `%20` built a 2 MB map.)
#[derive(Debug)]
pub struct Normalized {
    pub text: Vec<u8>,
    edits: Vec<Edit>,
}

impl Normalized {
    /// The original `(start, end)` of what byte `k` of the copy came from.
    fn orig_of(&self, k: usize) -> (usize, usize) {
        // Edits are in text order and `norm + out_len` never decreases along them.
        let idx = self.edits.partition_point(|e| e.norm + e.out_len <= k);
        if let Some(e) = self.edits.get(idx).filter(|e| e.norm <= k) {
            return (e.orig, e.orig + e.orig_len);
        }
        let (norm, orig) = match idx.checked_sub(1).and_then(|p| self.edits.get(p)) {
            Some(e) => (e.norm + e.out_len, e.orig + e.orig_len),
            None => (0, 0),
        };
        let o = orig + (k - norm);
        (o, o + 1)
    }

    /// The span of the original text (`orig_len` bytes) that the bytes `start..end` of the copy came from:
    /// every original byte between the first and the last (separators and dropped characters inside
    /// included).
    pub fn orig_span(&self, start: usize, end: usize, orig_len: usize) -> (usize, usize) {
        let s = if start < self.text.len() { self.orig_of(start).0 } else { orig_len };
        let e = match end.checked_sub(1) {
            Some(last) if last < self.text.len() => self.orig_of(last).1,
            _ => s,
        };
        (s, e)
    }
}

/// The text as the detectors read it when it contains tabs, Unicode spaces or dashes, zero-width
/// characters, fullwidth forms, percent-encoded characters or HTML references ([`separator_at`]): each
/// becomes the ASCII byte it is read as or is dropped, so `4111\u{a0}1111…`, `536\u{2013}22\u{2013}8963`,
/// `jane\u{200b}@example.com` and `jane%40example.com` are found. `None` (no copy, the common case) when
/// there is nothing to normalise.
pub fn normalize_separators(t: &[u8]) -> Option<Normalized> {
    // Cheap test first: the lead bytes of every character concerned.
    let a = memchr::memchr3_iter(0x09, 0xC2, 0xE2, t).find(|&p| separator_at(t, p).is_some());
    let b = memchr::memchr3_iter(0xE1, 0xE3, 0xEF, t).find(|&p| separator_at(t, p).is_some());
    let c = memchr::memchr3_iter(0xCD, 0xD8, 0xF3, t).find(|&p| separator_at(t, p).is_some());
    // Percent-encoded characters, HTML references and a form's `+` for a space: a `%`, `&` or `+` that
    // decodes to nothing read (`50%`, `R&D`, `&amp;`, `C++`) costs this check only, no copy.
    let d = memchr::memchr3_iter(b'%', b'&', b'+', t).find(|&p| separator_at(t, p).is_some());
    let first = [a, b, c, d].into_iter().flatten().min()?;
    let mut out = Vec::with_capacity(t.len());
    let mut edits = Vec::new();
    let mut copied = 0;
    let mut i = first;
    while i < t.len() {
        match separator_at(t, i) {
            Some((len, read)) => {
                out.extend_from_slice(t.get(copied..i).unwrap_or(&[]));
                edits.push(Edit { norm: out.len(), orig: i, orig_len: len, out_len: usize::from(read.is_some()) });
                out.extend(read);
                i += len;
                copied = i;
            }
            // Past the bytes no such character starts with, in one tight loop.
            None => i += 1 + run_len(t, i + 1, NORMALIZED_LEAD, false),
        }
    }
    out.extend_from_slice(t.get(copied..).unwrap_or(&[]));
    Some(Normalized { text: out, edits })
}

/// Separator markers of a [`NumericRun`] for gaps wider than one character.
const TWO_SPACES: u8 = 2;
const LINE_BREAK: u8 = b'\n';

fn wide(s: &u8) -> bool {
    matches!(*s, TWO_SPACES | LINE_BREAK)
}

struct NumericRun {
    /// Digit groups (start, end).
    groups: Vec<(usize, usize)>,
    /// The separator before each group after the first (`(415) 555` gives `)`).
    seps: Vec<u8>,
    /// The run ended at a token end (not inside a word).
    complete: bool,
    /// End of a phone extension (`x123`, ` ext. 123`) after the last group.
    ext_end: Option<usize>,
    /// `+44(0)20...`: a trunk zero in parentheses after the country code.
    trunk_paren: bool,
}

/// Digits in groups with single separators (space, dash, dot, `)` / `) `), optional leading `+` / `(`.
fn numeric_run(t: &[u8], i: usize) -> NumericRun {
    let mut run =
        NumericRun { groups: Vec::new(), seps: Vec::new(), complete: true, ext_end: None, trunk_paren: false };
    let mut j = i;
    if matches!(at(t, j), b'+' | b'(') {
        j += 1;
    }
    let mut total = 0;
    loop {
        let gs = j;
        while j < t.len() && is_digit(at(t, j)) && j - gs < 20 {
            j += 1;
        }
        if j == gs {
            break;
        }
        total += j - gs;
        run.groups.push((gs, j));
        if total > 19 || run.groups.len() > 8 {
            run.complete = false;
            return run;
        }
        // separator
        let c = at(t, j);
        let (sep, width) = match c {
            b')' if at(t, i) == b'(' && run.groups.len() == 1 => {
                if at(t, j + 1) == b' ' || at(t, j + 1) == b'-' {
                    (b')', 2)
                } else {
                    (b')', 1)
                }
            }
            // +33 (0)5 67 79 03 77, +49 (0) 9892 768719: the same with a space before the parenthesis.
            b' ' if at(t, i) == b'+'
                && run.groups.len() == 1
                && at(t, j + 1) == b'('
                && at(t, j + 2) == b'0'
                && at(t, j + 3) == b')' =>
            {
                run.trunk_paren = true;
                if at(t, j + 4) == b' ' || at(t, j + 4) == b'-' {
                    (b'(', 5)
                } else {
                    (b'(', 4)
                }
            }
            // +1 (415) 555-2671, +49 (30) 1234567, +1(415)555-2671: an area code in parentheses after the
            // country code (found from the `(` before, leaving `+1 ` unmasked).
            b' ' | b'(' if at(t, i) == b'+' && run.groups.len() == 1 && area_code_in_parens(t, j) => {
                if c == b' ' {
                    (b'(', 2)
                } else {
                    (b'(', 1)
                }
            }
            b')' if at(t, i) == b'+' && run.groups.len() == 2 && run.seps.first() == Some(&b'(') => {
                if at(t, j + 1) == b' ' || at(t, j + 1) == b'-' {
                    (b')', 2)
                } else {
                    (b')', 1)
                }
            }
            // Two spaces, or a line break, between digit groups (a card copied from a PDF or wrapped):
            // read only as a card's separators (see `classify`).
            b' ' if at(t, j + 1) == b' ' => (TWO_SPACES, 2),
            b'\n' => (LINE_BREAK, 1),
            b'\r' if at(t, j + 1) == b'\n' => (LINE_BREAK, 2),
            b' ' | b'-' | b'.' => (c, 1),
            // +44(0)20 7946 0958: the trunk zero is not part of the number.
            b'(' if at(t, i) == b'+' && run.groups.len() == 1 && at(t, j + 1) == b'0' && at(t, j + 2) == b')' => {
                run.trunk_paren = true;
                if at(t, j + 3) == b' ' || at(t, j + 3) == b'-' {
                    (b'(', 4)
                } else {
                    (b'(', 3)
                }
            }
            _ => break,
        };
        if !is_digit(at(t, j + width)) {
            break;
        }
        run.seps.push(sep);
        j += width;
    }
    // Extension: x123, ext. 123, ext 123
    let ext_from = if at(t, j) == b'x' && is_digit(at(t, j + 1)) {
        Some(j + 1)
    } else if t.get(j..).is_some_and(|r| r.starts_with(b" ext. ") || r.starts_with(b" ext ")) {
        let k = if at(t, j + 4) == b'.' { j + 6 } else { j + 5 };
        is_digit(at(t, k)).then_some(k)
    } else {
        None
    };
    if let Some(mut k) = ext_from {
        let s = k;
        while is_digit(at(t, k)) && k - s < 6 {
            k += 1;
        }
        if !is_word(at(t, k)) {
            run.ext_end = Some(k);
            return run;
        }
    }
    if is_word(at(t, j)) || (at(t, j) == b'.' && is_digit(at(t, j + 1))) || (at(t, j) == b'-' && is_alnum(at(t, j + 1)))
    {
        run.complete = false;
    }
    if at(t, i) == b'(' && run.seps.first().is_none_or(|s| *s != b')') {
        run.groups.clear();
    }
    run
}

/// At `j` (just after a country code): ` (` or `(`, then 1-5 digits and `)`, then a digit, a space or
/// a dash: an area code in parentheses. `(0)` is the trunk-zero form, handled on its own.
fn area_code_in_parens(t: &[u8], j: usize) -> bool {
    let open = if at(t, j) == b' ' { j + 1 } else { j };
    if at(t, open) != b'(' || (at(t, open + 1) == b'0' && at(t, open + 2) == b')') {
        return false;
    }
    let digits = t.get(open + 1..).map_or(0, |r| r.iter().take_while(|c| c.is_ascii_digit()).count());
    let close = open + 1 + digits;
    (1..=5).contains(&digits)
        && at(t, close) == b')'
        && (is_digit(at(t, close + 1)) || matches!(at(t, close + 1), b' ' | b'-'))
}

#[allow(clippy::too_many_arguments)]
fn phone(
    t: &[u8],
    start: usize,
    end: usize,
    lens: &[usize],
    seps: &[u8],
    plus: bool,
    paren: bool,
    digits: &[u8],
) -> Option<Confidence> {
    let n = digits.len();
    let before = t.get(start.saturating_sub(1)..start).unwrap_or(&[]);
    if before == b"$" || before == b"#" || before == b"." || before == b"/" {
        return None; // price, ticket number, path
    }
    let after = at(t, end);
    if after == b'%' || (after == b'/' && is_digit(at(t, end + 1))) {
        return None;
    }
    if plus {
        // E.164: 8-15 digits, country code not starting with 0.
        if !(8..=15).contains(&n) || digits.first() == Some(&b'0') {
            return None;
        }
        if lens.len() > 1 && lens.iter().skip(2).any(|l| *l < 2) {
            return None;
        }
        return Some(Confidence::High);
    }
    // 00 international prefix: 001-710-474-4773, 0044 20 7946 0958
    if digits.starts_with(b"00")
        && lens.len() >= 3
        && (10..=15).contains(&(n - 2))
        && lens.iter().skip(1).all(|l| *l >= 2)
    {
        return Some(Confidence::Medium);
    }
    if seps.contains(&b'.') && !seps.iter().all(|s| *s == b'.') {
        return None;
    }
    // Dates: 4-2-2, 2-2-4 with dashes/dots/spaces.
    if lens == [4, 2, 2] || lens == [2, 2, 4] || lens == [4, 2] || lens == [2, 4] {
        return None;
    }
    if paren {
        // (415) 555-2671
        if lens.len() == 3 && lens.first() == Some(&3) && lens.get(1) == Some(&3) && lens.get(2) == Some(&4) {
            return Some(if nanp_plausible(digits) { Confidence::High } else { Confidence::Medium });
        }
        if (9..=12).contains(&n) && lens.len() >= 2 {
            return Some(Confidence::Medium);
        }
        return None;
    }
    if lens.len() == 1 {
        // Bare digits: phone only with a context word (dropped at the default minimum).
        if (10..=11).contains(&n) {
            return Some(Confidence::Low);
        }
        return None;
    }
    // NANP 3-3-4, optionally with a leading 1.
    if lens == [3, 3, 4] || lens == [1, 3, 3, 4] {
        let d = if lens.len() == 4 { digits.get(1..).unwrap_or(&[]) } else { digits };
        if lens.len() == 4 && digits.first() != Some(&b'1') {
            return None;
        }
        return Some(if nanp_plausible(d) { Confidence::Medium } else { Confidence::Low });
    }
    // National formats with a trunk 0: 020 7946 0958, 0151 496 0123, 030 123456, 06 12 34 56 78
    if digits.first() == Some(&b'0') && (10..=12).contains(&n) && lens.iter().all(|l| (2..=8).contains(l)) {
        return Some(Confidence::Medium);
    }
    // Other grouped 10-12 digit numbers: weak.
    if (10..=12).contains(&n) && lens.iter().all(|l| (2..=4).contains(l)) {
        return Some(Confidence::Low);
    }
    None
}

/// The end of the run of digit groups at `i` when it has two or more groups and one separator, a space or
/// a dash, between all of them (`1234 5678 9012 3456`); `None` otherwise.
fn uniform_run_end(t: &[u8], i: usize) -> Option<usize> {
    let run = numeric_run(t, i);
    let first = *run.seps.first()?;
    let uniform = matches!(first, b' ' | b'-') && run.seps.iter().all(|s| *s == first);
    uniform.then(|| run.groups.last().map(|g| g.1)).flatten()
}

/// Words before a number that say it is an identifier, not personal data.
fn negative_context(t: &[u8], start: usize) -> bool {
    let before = t.get(start.saturating_sub(24)..start).unwrap_or(&[]);
    ["order", "invoice", "tracking", "ticket", "ref", "reference", "sku", "serial", "isbn", "build", "id "]
        .iter()
        .any(|w| contains_ci(before, w.as_bytes()))
}

/// NANP: area code and exchange start with 2-9, and the area code is not N11.
fn nanp_plausible(d: &[u8]) -> bool {
    d.len() == 10
        && matches!(d.first(), Some(b'2'..=b'9'))
        && matches!(d.get(3), Some(b'2'..=b'9'))
        && !(d.get(1) == Some(&b'1') && d.get(2) == Some(&b'1'))
}

/// The length in bytes of the character at `t[k]` if it is a non-ASCII letter or digit (`ö`, `ß`, `ü`,
/// `日`); 0 for anything else (ASCII, punctuation such as `“` or a zero-width space, broken UTF-8).
fn non_ascii_alnum_len(t: &[u8], k: usize) -> usize {
    let lead = at(t, k);
    let width = match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return 0,
    };
    let c = t.get(k..k + width).and_then(|b| std::str::from_utf8(b).ok()).and_then(|s| s.chars().next());
    if c.is_some_and(char::is_alphanumeric) {
        width
    } else {
        0
    }
}

/// The start of the non-ASCII letter or digit that ends just before `k`, if one does.
fn non_ascii_alnum_before(t: &[u8], k: usize) -> Option<usize> {
    (1..=4).filter_map(|w| k.checked_sub(w)).find(|&s| at(t, s) >= 0xC2 && non_ascii_alnum_len(t, s) == k - s)
}

/// RFC 5322 `atext` characters other than letters and digits, and the dot: the bytes an email's local part
/// may hold besides letters and digits (`jo~e&co`, `bounces+jane=example.com`, `o'reilly`).
#[inline]
fn is_local_special(b: u8) -> bool {
    matches!(
        b,
        b'.' | b'!'
            | b'#'
            | b'$'
            | b'%'
            | b'&'
            | b'\''
            | b'*'
            | b'+'
            | b'-'
            | b'/'
            | b'='
            | b'?'
            | b'^'
            | b'_'
            | b'`'
            | b'{'
            | b'|'
            | b'}'
            | b'~'
    )
}

/// Whether `t[k]` starts a letter or digit, ASCII or not.
fn alnum_at(t: &[u8], k: usize) -> bool {
    is_alnum(at(t, k)) || non_ascii_alnum_len(t, k) > 0
}

/// The start of the local part of the email whose `@` is at `j`: the run of local-part bytes before it
/// (ASCII letters and digits, RFC 5322 `atext` specials, dots, non-ASCII letters and digits), cut where
/// prose or a URL puts a delimiter rather than an address character. `None` when no local part is left.
fn local_part_start(t: &[u8], j: usize) -> Option<usize> {
    // The whole run, at most 64 bytes (RFC 5321's limit): a longer run is not an address.
    let mut s = j;
    loop {
        if let Some(p) = non_ascii_alnum_before(t, s) {
            s = p;
        } else if s > 0 && (is_alnum(at(t, s - 1)) || is_local_special(at(t, s - 1))) {
            s -= 1;
        } else {
            break;
        }
        if j - s > 64 {
            return None;
        }
    }
    let local = t.get(s..j)?;
    // A path or a query before the address (`/users/jane@`, `example.com/subscribe?email=jane@`, after a
    // scheme's `:`): the address starts after its last `/` or `?`. A `/` or `?` inside a plain word stays
    // (`jo/e@`).
    if let Some(p) = local.iter().rposition(|&c| c == b'/' || c == b'?') {
        let before = local.get(..p).unwrap_or(&[]);
        if s > 0 && at(t, s - 1) == b':' || before.iter().any(|&c| matches!(c, b'.' | b'/' | b'?')) {
            s += p + 1;
        }
    }
    // A `key=` before the address (`email=jane@`, `?a=1&to=jane@`, a log's `user=jane@`): the address is
    // the value. An `=` after anything else than a plain key stays (`bounces+jane=example.com@`, SRS).
    let local = t.get(s..j)?;
    if let Some(p) = local.iter().rposition(|&c| c == b'=') {
        let q =
            local.get(..p).unwrap_or(&[]).iter().rposition(|&c| matches!(c, b'&' | b';' | b'?')).map_or(0, |q| q + 1);
        let key = local.get(q..p).unwrap_or(&[]);
        if !key.is_empty() && key.iter().all(|&c| is_word(c) || matches!(c, b'-' | b'.')) {
            s += p + 1;
        }
    }
    // Every dot-separated atom starts with a letter or digit: a special opening one is a delimiter
    // (`'jane@` in quotes, `etc.'jane@`, `**jane@` in bold, `.jane@` after a sentence), and `..` never
    // occurs in an address.
    let local = t.get(s..j)?;
    let mut cut = 0;
    let mut k = 0;
    while k < local.len() {
        let atom_start = k == 0 || local.get(k - 1) == Some(&b'.');
        if atom_start && !alnum_at(local, k) {
            cut = k + 1;
        }
        k += 1;
    }
    s += cut;
    // Past the cut, any byte left that is not a letter or digit opens nothing more: skip to the first one.
    while s < j && !alnum_at(t, s) {
        s += 1;
    }
    let local = t.get(s..j)?;
    if local.is_empty() || local.last() == Some(&b'.') {
        return None;
    }
    Some(s)
}

fn email(t: &[u8], i: usize) -> Option<Finding> {
    // Local part: ASCII local characters and non-ASCII letters and digits (`jörg.müller`, RFC 6531).
    let mut j = i;
    while j < t.len() && j - i <= 64 {
        if is_local(at(t, j)) {
            j += 1;
        } else {
            match non_ascii_alnum_len(t, j) {
                0 => break,
                w => j += w,
            }
        }
    }
    if at(t, j) != b'@' {
        return None;
    }
    // The scanner starts at ASCII token starts (or at an `@`) and skips bytes of non-ASCII words and words
    // followed by punctuation: the local part is taken from the `@` back (`jörg.müller@` found from `rg.`,
    // `иван@` at its `@`, `jo~e&co@` from `co`), so no part of it is left unmasked and its start does not
    // depend on the token the scanner came from. Before 2026-12-07 only `'` between letters was taken back
    // among the RFC 5322 specials: `jo~e&co@example.com` left `jo~e&` unmasked.
    let i = local_part_start(t, j)?;
    // Domain: labels of [A-Za-z0-9-] and non-ASCII letters and digits (IDN: `bücher.de`), at least two,
    // TLD letters >= 2.
    let mut k = j + 1;
    let mut labels = 0;
    let mut last_label = (k, k);
    loop {
        let ls = k;
        while k < t.len() && k - ls < 63 {
            if is_alnum(at(t, k)) || at(t, k) == b'-' {
                k += 1;
            } else {
                match non_ascii_alnum_len(t, k) {
                    0 => break,
                    w => k += w,
                }
            }
        }
        if k == ls || at(t, ls) == b'-' || at(t, k - 1) == b'-' {
            if labels > 0 {
                // "user@host." then a non-label: end before the dot.
                k = last_label.1;
                break;
            }
            return None;
        }
        labels += 1;
        last_label = (ls, k);
        if at(t, k) == b'.' && (is_alnum(at(t, k + 1)) || non_ascii_alnum_len(t, k + 1) > 0) {
            k += 1;
            continue;
        }
        break;
    }
    if labels < 2 {
        return None;
    }
    let tld = t.get(last_label.0..last_label.1)?;
    let tld_ok = if tld.is_ascii() {
        // Letters, or an IDN top-level domain in its ASCII (punycode) form: `xn--p1ai` is `.рф`.
        (tld.len() >= 2 && tld.iter().all(u8::is_ascii_alphabetic))
            || (tld.len() > 4
                && tld.get(..4).is_some_and(|p| p.eq_ignore_ascii_case(b"xn--"))
                && tld.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-'))
    } else {
        // An IDN top-level domain (`.рф`, `.中国`): letters only.
        std::str::from_utf8(tld).is_ok_and(|s| s.chars().all(char::is_alphabetic) && s.chars().count() >= 2)
    };
    if !tld_ok {
        return None;
    }
    if is_word(at(t, k)) || at(t, k) == b'@' {
        return None;
    }
    Some(Finding { start: i, end: last_label.1, kind: Builtin::Email, confidence: Confidence::High })
}

/// GitLab tokens (gitleaks' GitLab rules): a personal, project or group access token `glpat-`, pipeline
/// trigger `glptt-`, runner `glrt-`, deploy `gldt-`, feed `glft-`, incoming mail `glimt-`, Kubernetes agent
/// `glagent-`, OAuth application secret `gloas-`, SCIM `glsoat-`, CI/CD job `glcbt-`, feature flag client
/// `glffct-`, then 20 or more of `[A-Za-z0-9_-]` (routable tokens, GitLab 17+, add `.` parts: `glpat-….01.…`);
/// the token ends at a character that continues no token (a `.` ending a sentence is not part of it).
fn gitlab_token(t: &[u8], i: usize) -> Option<Finding> {
    const PREFIXES: [&[u8]; 11] = [
        b"glpat-",
        b"glptt-",
        b"glrt-",
        b"gldt-",
        b"glft-",
        b"glimt-",
        b"glagent-",
        b"gloas-",
        b"glsoat-",
        b"glcbt-",
        b"glffct-",
    ];
    let rest = t.get(i..)?;
    let prefix = PREFIXES.iter().find(|p| rest.starts_with(p))?;
    let from = i + prefix.len();
    let tok = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
    let mut end = from;
    while end < t.len() && tok(at(t, end)) {
        end += 1;
    }
    if end - from < 20 {
        return None;
    }
    // Routable tokens: `.` parts, each of token characters.
    while at(t, end) == b'.' && tok(at(t, end + 1)) {
        end += 1;
        while end < t.len() && tok(at(t, end)) {
            end += 1;
        }
    }
    if is_word(at(t, end)) {
        return None;
    }
    Some(Finding { start: i, end, kind: Builtin::GitlabToken, confidence: Confidence::High })
}

/// Characters of an AWS secret access key (base64).
fn aws_secret_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'/' || c == b'+'
}

/// An AWS secret access key at `t[i..]`: exactly 40 base64 characters, not inside a longer token (nor
/// followed by `=` padding), with a lower-case letter, a capital and a digit, `/` or `+` (a hex hash or a
/// word is not one). Its end.
fn aws_secret_at(t: &[u8], i: usize) -> Option<usize> {
    let v = t.get(i..i + 40)?;
    if (i > 0 && aws_secret_char(at(t, i - 1)))
        || !v.iter().all(|c| aws_secret_char(*c))
        || aws_secret_char(at(t, i + 40))
        || at(t, i + 40) == b'='
    {
        return None;
    }
    let has = |f: fn(&u8) -> bool| v.iter().any(f);
    (has(u8::is_ascii_lowercase)
        && has(u8::is_ascii_uppercase)
        && has(|c| c.is_ascii_digit() || matches!(c, b'/' | b'+')))
    .then_some(i + 40)
}

/// AWS secret access keys: they have no prefix, so they are found where they are given (in practice the
/// two halves of an access key are pasted together).
///
/// - after a name that says so: an identifier with `secret`, `key` and `aws` or `access` in it
///   (`AWS_SECRET_ACCESS_KEY`, `aws_secret_access_key`, `SecretAccessKey`, `--aws-secret-access-key`),
///   then optionally a closing quote, spaces, `=`, `:`, `=>` or `:=`, spaces and an opening quote;
/// - the first 40-character token within 160 bytes after an access key id found by the pass (`found`):
///   Terraform's `access_key = "AKIA…"` then `secret_key = "…"`, the console's CSV, prose.
///
/// Sorted, non-overlapping.
fn aws_secret_keys(t: &[u8], found: &[Finding]) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    let mut push = |start: usize, end: usize| {
        if !out.iter().any(|f| f.start == start) {
            out.push(Finding { start, end, kind: Builtin::AwsAccessKey, confidence: Confidence::High });
        }
    };
    let ident = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.');
    // `secret` in any letter case: its `c` found with memchr, then the word around it.
    for c in memchr::memchr2_iter(b'c', b'C', t) {
        let Some(s) = c.checked_sub(2) else { continue };
        if !t.get(s..s + 6).is_some_and(|w| w.eq_ignore_ascii_case(b"secret")) {
            continue;
        }
        let mut a = s;
        while a > 0 && s - a < 64 && ident(at(t, a - 1)) {
            a -= 1;
        }
        let mut e = s + 6;
        while e < t.len() && e - s < 64 && ident(at(t, e)) {
            e += 1;
        }
        let name = t.get(a..e).unwrap_or(&[]).to_ascii_lowercase();
        if !(contains(&name, b"key") && (contains(&name, b"aws") || contains(&name, b"access"))) {
            continue;
        }
        let mut j = e;
        if matches!(at(t, j), b'"' | b'\'' | b'`') {
            j += 1;
        }
        let skip_spaces = |mut j: usize| {
            while matches!(at(t, j), b' ' | b'\t') {
                j += 1;
            }
            j
        };
        j = skip_spaces(j);
        for sep in [&b":="[..], b"=>", b"=", b":"] {
            if t.get(j..).is_some_and(|r| r.starts_with(sep)) {
                j += sep.len();
                break;
            }
        }
        j = skip_spaces(j);
        if matches!(at(t, j), b'"' | b'\'' | b'`') {
            j += 1;
        }
        if let Some(end) = aws_secret_at(t, j) {
            push(j, end);
        }
    }
    for f in found.iter().filter(|f| f.kind == Builtin::AwsAccessKey) {
        let limit = (f.end + 160).min(t.len());
        if let Some(start) = (f.end..limit.saturating_sub(39)).find(|&j| aws_secret_at(t, j).is_some()) {
            push(start, start + 40);
        }
    }
    out.sort_by_key(|f| f.start);
    out.dedup_by(|b, a| b.start < a.end);
    out
}

fn private_key(t: &[u8], i: usize) -> Option<Finding> {
    let rest = t.get(i..)?;
    if !rest.starts_with(b"-----BEGIN ") {
        return None;
    }
    let line_end = rest.iter().take(80).position(|c| *c == b'\n' || *c == b'\r').unwrap_or(rest.len().min(80));
    let header = rest.get(..line_end)?;
    let after_header = private_key_label_end(header)?;
    // The END line, or (a truncated key is still a secret) the end of the text. The first END line must
    // be this key's: one cut short (`-----END RSA PRIVATE K`) or another block's means the key has none.
    let end = find(rest.get(after_header..)?, b"-----END ").and_then(|p| {
        let from = after_header + p;
        let tail = rest.get(from..)?;
        Some(i + from + private_key_label_end(tail.get(..tail.len().min(80))?)?)
    });
    Some(Finding { start: i, end: end.unwrap_or(t.len()), kind: Builtin::PrivateKey, confidence: Confidence::High })
}

/// The end of the first `PRIVATE KEY-----` or `PRIVATE KEY BLOCK-----` (OpenPGP armor: `-----BEGIN PGP
/// PRIVATE KEY BLOCK-----`, gitleaks' `PRIVATE KEY( BLOCK)?-----`) in `line`.
fn private_key_label_end(line: &[u8]) -> Option<usize> {
    let p = find(line, b"PRIVATE KEY")?;
    let rest = line.get(p + 11..)?;
    [&b"-----"[..], b" BLOCK-----"].iter().find(|s| rest.starts_with(s)).map(|s| p + 11 + s.len())
}

fn jwt(t: &[u8], i: usize) -> Option<Finding> {
    let b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    if !t.get(i..)?.starts_with(b"ey") {
        return None;
    }
    let mut j = i;
    let mut parts = [(0usize, 0usize); 3];
    for (n, part) in parts.iter_mut().enumerate() {
        let s = j;
        while j < t.len() && b64(at(t, j)) {
            j += 1;
        }
        *part = (s, j);
        if n < 2 {
            if at(t, j) != b'.' {
                return None;
            }
            j += 1;
        }
    }
    let [h, p, s] = parts;
    if h.1 - h.0 < 10 || p.1 - p.0 < 2 || s.1 - s.0 < 16 || !t.get(p.0..)?.starts_with(b"ey") {
        return None;
    }
    let header = b64url_decode(t.get(h.0..h.1)?)?;
    if !header.starts_with(b"{") || !(contains(&header, b"\"alg\"") || contains(&header, b"\"typ\"")) {
        return None;
    }
    Some(Finding { start: i, end: j, kind: Builtin::Jwt, confidence: Confidence::High })
}

fn b64url_decode(s: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        })
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in s.iter().take(512) {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Some(out)
}

/// IBAN: two uppercase letters, two check digits, the country's length, optionally in groups of four.
fn iban(t: &[u8], i: usize) -> Option<Finding> {
    match iban_span(t, i)? {
        (end, true) => Some(Finding { start: i, end, kind: Builtin::Iban, confidence: Confidence::High }),
        _ => None,
    }
}

/// The end of an IBAN-shaped span at `i` and whether its mod-97 check holds.
fn iban_span(t: &[u8], i: usize) -> Option<(usize, bool)> {
    let rest = t.get(i..)?;
    let (c0, c1) = (at(rest, 0), at(rest, 1));
    // Written in capitals, or all in lower case (`de89 3704 0044 0532 0130 00`, typed on a phone): before
    // 2026-12-06 a lower-case IBAN was not found, and its digit groups were masked as a phone number,
    // leaving the country, check digits and bank code.
    let lower = c0.is_ascii_lowercase();
    let letter = |c: u8| if lower { c.is_ascii_lowercase() } else { c.is_ascii_uppercase() };
    if !(letter(c0) && letter(c1) && is_digit(at(rest, 2)) && is_digit(at(rest, 3))) {
        return None;
    }
    let want = iban_length([c0.to_ascii_uppercase(), c1.to_ascii_uppercase()])?;
    let mut chars: Vec<u8> = Vec::with_capacity(34);
    let mut j = i;
    while chars.len() < want {
        let c = at(t, j);
        if letter(c) || is_digit(c) {
            chars.push(c);
            j += 1;
        } else if chars.len() % 4 == 0 && chars.len() >= 4 && group_gap(t, j).is_some_and(|w| is_alnum(at(t, j + w))) {
            j += group_gap(t, j).unwrap_or(1);
        } else {
            return None;
        }
    }
    if is_word(at(t, j)) {
        return None;
    }
    Some((j, mod97(&chars)))
}

/// The width of a gap between two groups of an IBAN at `t[j]`: a space, a dash or a dot (`DE89-3704-…`,
/// `DE89.3704.…`), two spaces, or a line break (`\n`, `\r\n`, with a space before it) where the IBAN was
/// wrapped. Since 2026-12-07; before, only one space (`DE89-3704-0044-0532-0130-00` was not found, and its
/// digit groups were read as other numbers). The mod-97 check, the country's length and the grouping by
/// four keep these from matching other text.
fn group_gap(t: &[u8], j: usize) -> Option<usize> {
    match (at(t, j), at(t, j + 1), at(t, j + 2)) {
        (b' ', b'\r', b'\n') => Some(3),
        (b' ', b' ' | b'\n', _) | (b'\r', b'\n', _) => Some(2),
        (b' ' | b'-' | b'.' | b'\n', _, _) => Some(1),
        _ => None,
    }
}

/// IBAN lengths by country (ISO 13616 / SWIFT IBAN registry, release 99 of 2025: every country in it).
pub fn iban_length(cc: [u8; 2]) -> Option<usize> {
    Some(match &cc {
        b"AD" => 24,
        b"AE" => 23,
        b"AL" => 28,
        b"AT" => 20,
        b"AZ" => 28,
        b"BA" => 20,
        b"BE" => 16,
        b"BG" => 22,
        b"BH" => 22,
        b"BI" => 27,
        b"BR" => 29,
        b"BY" => 28,
        b"CH" => 21,
        b"CR" => 22,
        b"CY" => 28,
        b"CZ" => 24,
        b"DE" => 22,
        b"DJ" => 27,
        b"DK" => 18,
        b"DO" => 28,
        b"EE" => 20,
        b"EG" => 29,
        b"ES" => 24,
        b"FI" => 18,
        b"FK" => 18,
        b"FO" => 18,
        b"FR" => 27,
        b"GB" => 22,
        b"GE" => 22,
        b"GI" => 23,
        b"GL" => 18,
        b"GR" => 27,
        b"GT" => 28,
        b"HN" => 28,
        b"HR" => 21,
        b"HU" => 28,
        b"IE" => 22,
        b"IL" => 23,
        b"IQ" => 23,
        b"IS" => 26,
        b"IT" => 27,
        b"JO" => 30,
        b"KW" => 30,
        b"KZ" => 20,
        b"LB" => 28,
        b"LC" => 32,
        b"LI" => 21,
        b"LT" => 20,
        b"LU" => 20,
        b"LV" => 21,
        b"LY" => 25,
        b"MC" => 27,
        b"MD" => 24,
        b"ME" => 22,
        b"MK" => 19,
        b"MN" => 20,
        b"MR" => 27,
        b"MT" => 31,
        b"MU" => 30,
        b"NI" => 28,
        b"NL" => 18,
        b"NO" => 15,
        b"OM" => 23,
        b"PK" => 24,
        b"PL" => 28,
        b"PS" => 29,
        b"PT" => 25,
        b"QA" => 29,
        b"RO" => 24,
        b"RS" => 22,
        b"RU" => 33,
        b"SA" => 24,
        b"SC" => 31,
        b"SD" => 18,
        b"SE" => 24,
        b"SI" => 19,
        b"SK" => 24,
        b"SM" => 27,
        b"SO" => 23,
        b"ST" => 25,
        b"SV" => 28,
        b"TL" => 23,
        b"TN" => 24,
        b"TR" => 26,
        b"UA" => 29,
        b"VA" => 22,
        b"VG" => 24,
        b"XK" => 20,
        b"YE" => 30,
        _ => return None,
    })
}

/// ISO 7064 mod 97-10 over an IBAN (letters A=10..Z=35), first four characters moved to the end.
pub fn mod97(chars: &[u8]) -> bool {
    if chars.len() < 5 {
        return false;
    }
    let (head, tail) = chars.split_at(4);
    let mut rem: u32 = 0;
    for &c in tail.iter().chain(head.iter()) {
        match c {
            b'0'..=b'9' => rem = (rem * 10 + u32::from(c - b'0')) % 97,
            b'A'..=b'Z' => rem = (rem * 100 + u32::from(c - b'A') + 10) % 97,
            b'a'..=b'z' => rem = (rem * 100 + u32::from(c - b'a') + 10) % 97,
            _ => return false,
        }
    }
    rem == 1
}

/// Luhn over ASCII digits (non-digits ignored).
pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    let mut count = 0;
    for (k, d) in digits.iter().rev().filter(|d| d.is_ascii_digit()).enumerate() {
        let mut v = u32::from(d - b'0');
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
        count += 1;
    }
    count >= 2 && sum % 10 == 0
}

fn card_brand(d: &[u8]) -> bool {
    let n = d.len();
    let p = |k: usize| -> u32 { d.iter().take(k).fold(0u32, |a, c| a * 10 + u32::from(c - b'0')) };
    let visa = d.first() == Some(&b'4') && matches!(n, 13 | 16 | 19);
    let mastercard = n == 16 && ((51..=55).contains(&p(2)) || (2221..=2720).contains(&p(4)));
    let amex = n == 15 && matches!(p(2), 34 | 37);
    let jcb = p(2) == 35 && (16..=19).contains(&n);
    let diners = matches!(p(2), 36 | 38 | 30) && (14..=19).contains(&n);
    let discover = (16..=19).contains(&n) && (p(4) == 6011 || p(2) == 65 || (644..=649).contains(&p(3)) || p(2) == 62);
    visa || mastercard || amex || jcb || diners || discover || maestro(d)
}

/// Maestro: 12-19 digits with the Maestro prefixes.
fn maestro(d: &[u8]) -> bool {
    (12..=19).contains(&d.len())
        && [
            &b"5018"[..],
            b"5020",
            b"5038",
            b"56",
            b"57",
            b"58",
            b"6304",
            b"6759",
            b"6761",
            b"6762",
            b"6763",
            b"0604",
            b"6390",
        ]
        .iter()
        .any(|p| d.starts_with(p))
}

fn all_same(d: &[u8]) -> bool {
    d.windows(2).all(|w| w.first() == w.get(1))
}

/// US SSN ranges: area not 000/666/9xx, group not 00, serial not 0000, well-known fakes rejected.
pub fn ssn_valid(d: &[u8]) -> bool {
    if d.len() != 9 || !d.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let area = d.get(0..3).unwrap_or(&[]);
    let group = d.get(3..5).unwrap_or(&[]);
    let serial = d.get(5..9).unwrap_or(&[]);
    if area == b"000" || area == b"666" || area.first() == Some(&b'9') || group == b"00" || serial == b"0000" {
        return false;
    }
    if d == b"078051120" || d == b"123456789" || d.starts_with(b"98765432") || all_same(d) {
        return false;
    }
    true
}

/// UK NHS number: weights 10..2 on the first nine digits, (11 - sum mod 11) mod 11 equals the tenth; 10 is invalid.
pub fn nhs_valid(d: &[u8]) -> bool {
    if d.len() != 10 || all_same(d) {
        return false;
    }
    let sum: u32 = d.iter().take(9).enumerate().map(|(k, c)| u32::from(c - b'0') * (10 - k as u32)).sum();
    let check = (11 - sum % 11) % 11;
    check != 10 && d.get(9).map(|c| u32::from(c - b'0')) == Some(check)
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(p) = hay.get(from..).and_then(|h| h.iter().position(|c| *c == first)) {
        let at = from + p;
        if hay.get(at + 1..at + needle.len()) == Some(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// Case-insensitive containment with a word-start boundary (`needle` in lower case).
pub fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() || hay.len() < needle.len() {
        return false;
    }
    hay.windows(needle.len()).enumerate().any(|(k, w)| {
        w.iter().zip(needle).all(|(a, b)| a.to_ascii_lowercase() == *b) && (k == 0 || !is_alnum(at(hay, k - 1)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicode_separators_and_zero_width_characters() {
        let scanner = Scanner::default();
        let kinds = |t: &str| -> Vec<(Builtin, String)> {
            scanner.scan(t.as_bytes()).iter().map(|f| (f.kind, t.get(f.start..f.end).unwrap().to_string())).collect()
        };
        // No-break space, thin spaces, tabs, en dash, non-breaking hyphen, minus sign: one separator each.
        for card in [
            "4111\u{a0}1111\u{a0}1111\u{a0}1111",
            "4111\u{2009}1111\u{2009}1111\u{2009}1111",
            "4111\u{202f}1111\u{202f}1111\u{202f}1111",
            "4111\t1111\t1111\t1111",
            "4111\u{2013}1111\u{2013}1111\u{2013}1111",
            "4111\u{200b}1111 1111 1111",
            "4111\u{2060}1111\u{feff}1111\u{ad}1111",
        ] {
            let t = format!("my card {card}, thanks");
            assert_eq!(kinds(&t), vec![(Builtin::CreditCard, card.to_string())], "{t:?}");
        }
        for ssn in ["536\u{2013}22\u{2013}8963", "536\u{2011}22\u{2011}8963", "536\u{2212}22\u{2212}8963"] {
            let t = format!("ssn {ssn}.");
            assert_eq!(kinds(&t), vec![(Builtin::UsSsn, ssn.to_string())], "{t:?}");
        }
        // Zero-width characters inside an email or a phone are skipped and masked with the value.
        for (t, want) in [
            ("mail jane\u{200b}.doe@example.com now", "jane\u{200b}.doe@example.com"),
            ("mail jane.doe@exa\u{200d}mple.com now", "jane.doe@exa\u{200d}mple.com"),
            ("mail jane.doe\u{200c}@example.com now", "jane.doe\u{200c}@example.com"),
        ] {
            assert_eq!(kinds(t), vec![(Builtin::Email, want.to_string())], "{t:?}");
        }
        assert_eq!(
            kinds("call +44\u{a0}20\u{a0}7946\u{a0}0958"),
            vec![(Builtin::Phone, "+44\u{a0}20\u{a0}7946\u{a0}0958".to_string())]
        );
        // Non-ASCII local parts and IDN domains (RFC 6531) are found whole: before, `jörg.müller@…` was
        // found from `ller@`, leaving `jörg.mü` unmasked.
        for (t, want) in [
            ("email: jörg.müller@beispiel.de now", "jörg.müller@beispiel.de"),
            ("Ömer@example.com", "Ömer@example.com"),
            ("write to (Ömer.Şahin@example.com)", "Ömer.Şahin@example.com"),
            ("mail müller@bücher.de.", "müller@bücher.de"),
            ("почта иван@пример.рф сейчас", "иван@пример.рф"),
            ("“jane@example.com”", "jane@example.com"),
            ("邮件 用户@例子.中国 谢谢", "用户@例子.中国"),
        ] {
            assert_eq!(kinds(t), vec![(Builtin::Email, want.to_string())], "{t:?}");
        }
        assert!(kinds("café@ and x@y and résumé@home").is_empty());
        // An email's local part is masked whole, and a finding before it is never overlapped.
        assert_eq!(
            kinds("id 4111111111111111.jörg@example.com"),
            vec![(Builtin::Email, "4111111111111111.jörg@example.com".to_string())]
        );
        assert_eq!(kinds("ö.x@example.com"), vec![(Builtin::Email, "ö.x@example.com".to_string())]);
        let t = "call +44 20 7946 0958.jörg@example.com";
        assert_eq!(
            kinds(t),
            vec![(Builtin::Phone, "+44 20 7946 0958".to_string()), (Builtin::Email, ".jörg@example.com".to_string())]
        );
        let scanner = Scanner::default();
        for t in [t, "x jörg.müller@beispiel.de", "Ömer.Şahin@example.com", "a.ö-b@x.de", "é+1@x.de"] {
            assert_eq!(scanner.scan(t.as_bytes()), scanner.scan_without_prose_fast_path(t.as_bytes()), "{t}");
        }
        // A zero-width character before the value is not part of the span; text without any is not copied.
        assert_eq!(kinds("\u{200b}jane@example.com"), vec![(Builtin::Email, "jane@example.com".to_string())]);
        assert!(normalize_separators("plain “quoted” text — é".as_bytes()).is_some(), "the em dash");
        assert!(normalize_separators("plain “quoted” text é".as_bytes()).is_none());
        // Truncated multi-byte characters at the end are kept as bytes.
        assert!(kinds_bytes(&scanner, b"4111 1111 1111 1111\xe2\x80").len() == 1);
    }

    /// Invisible format characters other than the zero-width ones (bidirectional marks and isolates, invisible
    /// math operators, the combining grapheme joiner, the Mongolian vowel separator, variation selectors,
    /// Hangul fillers) are dropped like those, and Unicode tag characters ("ASCII smuggling") are read as the
    /// ASCII character they encode. Before 2026-12-07 any of them inside a value hid it: `4111\u{200e}1111…`
    /// and `jane\u{2062}.doe@example.com` left the gateway (the latter masked from `doe@`).
    #[test]
    fn invisible_format_characters_do_not_hide_values() {
        let scanner = Scanner::default();
        let kinds = |t: &str| -> Vec<(Builtin, String)> {
            scanner.scan(t.as_bytes()).iter().map(|f| (f.kind, t.get(f.start..f.end).unwrap().to_string())).collect()
        };
        for sep in [
            "\u{200e}",
            "\u{200f}",
            "\u{202a}",
            "\u{202c}",
            "\u{202e}",
            "\u{2066}",
            "\u{2069}",
            "\u{2061}",
            "\u{2064}",
            "\u{34f}",
            "\u{61c}",
            "\u{180e}",
            "\u{fe0f}",
            "\u{fe00}",
            "\u{e0100}",
            "\u{e01ef}",
            "\u{115f}",
            "\u{3164}",
            "\u{ffa0}",
            "\u{e0001}",
            "\u{e007f}",
        ] {
            let card = format!("4111{sep}1111{sep}1111{sep}1111");
            let t = format!("my card {card}, thanks");
            assert_eq!(kinds(&t), vec![(Builtin::CreditCard, card.clone())], "{t:?}");
            let mail = format!("jane{sep}.doe@exa{sep}mple.com");
            let t = format!("mail {mail} now");
            assert_eq!(kinds(&t), vec![(Builtin::Email, mail.clone())], "{t:?}");
        }
        // Tag characters are read as the ASCII they encode: an address written in them is one.
        let tags: String =
            "jane@example.com".chars().map(|c| char::from_u32(0xE0000 + u32::from(c)).unwrap()).collect();
        let t = format!("note {tags} end");
        assert_eq!(kinds(&t), vec![(Builtin::Email, tags.clone())], "{t:?}");
        let t = format!("mail j{}ne@example.com", char::from_u32(0xE0061).unwrap());
        assert_eq!(kinds(&t), vec![(Builtin::Email, t.get(5..).unwrap().to_string())], "{t:?}");
        // An emoji with its variation selector, Arabic and Greek text: nothing found, nothing lost.
        assert!(kinds("I \u{2764}\u{fe0f} it, \u{645}\u{631}\u{62d}\u{628}\u{627} \u{61c}, \u{3b1}\u{3b2}").is_empty());
        for t in ["x \u{200e}4111 1111 1111 1111\u{200f}", "\u{2066}jane@example.com\u{2069}"] {
            assert_eq!(scanner.scan(t.as_bytes()), scanner.scan_without_prose_fast_path(t.as_bytes()), "{t}");
        }
        // Truncated at the end: kept as bytes.
        assert!(kinds_bytes(&scanner, b"4111 1111 1111 1111\xf3\xa0\x80").len() == 1);
    }

    /// An AWS secret access key (40 base64 characters, no prefix) is found where it is given: assigned to a
    /// name that says so (`AWS_SECRET_ACCESS_KEY=`, `aws_secret_access_key = `, `"SecretAccessKey": "`), or
    /// written shortly after an access key id (`secret_key = "…"` after `access_key = "AKIA…"`, the console's
    /// CSV). Before 2026-12-07 only the key id was masked and the secret, the half that signs requests,
    /// left the gateway.
    #[test]
    fn aws_secret_access_keys_are_found_where_given() {
        let scanner = Scanner::default();
        let kinds = |t: &str| -> Vec<(Builtin, String)> {
            scanner.scan(t.as_bytes()).iter().map(|f| (f.kind, t.get(f.start..f.end).unwrap().to_string())).collect()
        };
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let id = "AKIAIOSFODNN7EXAMPLE";
        for t in [
            format!("export AWS_SECRET_ACCESS_KEY={secret}"),
            format!("[default]\naws_secret_access_key = {secret}\n"),
            format!("{{\"AccessKey\": {{\"SecretAccessKey\": \"{secret}\", \"Status\": \"Active\"}}}}"),
            format!("creds:\n  secretAccessKey: '{secret}'"),
            format!("use --aws-secret-access-key {secret} here"),
            format!("aws.secret.key=\"{secret}\""),
        ] {
            assert_eq!(kinds(&t), vec![(Builtin::AwsAccessKey, secret.to_string())], "{t:?}");
        }
        for t in [
            format!("provider \"aws\" {{\n  access_key = \"{id}\"\n  secret_key = \"{secret}\"\n}}"),
            format!("Access key ID,Secret access key\n{id},{secret}\n"),
            format!("my key is {id} and the secret {secret}."),
        ] {
            assert_eq!(
                kinds(&t),
                vec![(Builtin::AwsAccessKey, id.to_string()), (Builtin::AwsAccessKey, secret.to_string())],
                "{t:?}"
            );
        }
        // Not one: a git SHA or a lower-case hash, a token of another length, a 40-character token with no
        // key name or key id before it, a name that is not an AWS secret, a placeholder.
        for t in [
            format!("AWS_SECRET_ACCESS_KEY={}", "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3"),
            format!("AWS_SECRET_ACCESS_KEY={secret}X"),
            format!("AWS_SECRET_ACCESS_KEY={}", &secret[1..]),
            format!("the value {secret} alone"),
            format!("client_secret = {secret}"),
            "AWS_SECRET_ACCESS_KEY=<AWS_KEY_1> and AWS_SECRET_ACCESS_KEY=${{AWS_SECRET}}".to_string(),
            format!("{id} {}", "x".repeat(300) + " " + secret),
        ] {
            assert!(kinds(&t).iter().all(|(k, v)| *k != Builtin::AwsAccessKey || v == id), "{t:?}: {:?}", kinds(&t));
        }
        // Disabled with the key id's detector.
        let mut off = Scanner::default();
        off.set_enabled(Builtin::AwsAccessKey, false);
        assert!(off.scan(format!("AWS_SECRET_ACCESS_KEY={secret}").as_bytes()).is_empty());
        let t = format!("AWS_SECRET_ACCESS_KEY=\u{200b}{secret} mail jane@example.com");
        assert_eq!(scanner.scan(t.as_bytes()), scanner.scan_without_prose_fast_path(t.as_bytes()));
    }

    /// AWS session tokens (temporary credentials from STS, SSO, an instance role: `AWS_SESSION_TOKEN=`
    /// beside an `ASIA…` key id) are base64 of a binary structure that starts the same way: before
    /// 2026-12-07 they reached the provider.
    #[test]
    fn aws_session_tokens_are_found() {
        let scanner = Scanner::default();
        let kinds = |t: &str| -> Vec<(Builtin, String)> {
            scanner.scan(t.as_bytes()).iter().map(|f| (f.kind, t.get(f.start..f.end).unwrap().to_string())).collect()
        };
        let tail = "Ab3/+Cd5Ef7Gh9Ij1Kl3Mn5".repeat(8);
        for tok in [
            format!("IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ{tail}=="),
            format!("FwoGZXIvYXdzEBYaDH{tail}"),
            format!("FQoGZXIvYXdzEBYaDH{tail}="),
        ] {
            for t in [format!("export AWS_SESSION_TOKEN={tok}\n"), format!("\"SessionToken\": \"{tok}\",")] {
                assert_eq!(kinds(&t), vec![(Builtin::AwsAccessKey, tok.clone())], "{t}");
            }
        }
        // Too short to be one, or another word.
        for t in ["IQoJb3JpZ2luX2VjEJr short", "FwoGZXIvYXdzE", "IQoJb3JpZ2luX2VjEJr//wEa"] {
            assert!(kinds(t).is_empty(), "{t}");
        }
    }

    /// GitLab tokens, in gitleaks' shapes: before 2026-12-07 no detector knew them and a `glpat-` token
    /// pasted into a prompt (a `.gitlab-ci.yml`, a `git remote -v` URL) reached the provider.
    #[test]
    fn gitlab_tokens_are_found() {
        let scanner = Scanner::default();
        let kinds = |t: &str| -> Vec<(Builtin, String)> {
            scanner.scan(t.as_bytes()).iter().map(|f| (f.kind, t.get(f.start..f.end).unwrap().to_string())).collect()
        };
        for tok in [
            "glpat-xR4_kq9ZtB2mN7vLw-3c",
            "glpat-Hx7k2Lm9Qw3Rt5Yp8Zs1Av4Bn6Cd0Ef.01.120abc7de",
            "glptt-0a1b2c3d4e5f60718293a4b5c6d7e8f901234567",
            "glrt-t1_Ab3Cd5Ef7Gh9Ij1Kl3Mn",
            "gldt-AbCdEfGhIjKlMnOpQrSt",
            "glft-AbCdEfGhIjKlMnOpQrSt",
            "glimt-AbCdEfGhIjKlMnOpQrStUvWxY",
            "glagent-AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGhIjKlMnOpQrStUvWx",
            "gloas-AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGhIjKl",
            "glsoat-AbCdEfGhIjKlMnOpQrSt",
            "glcbt-64_AbCdEfGhIjKlMnOpQrSt",
            "glffct-AbCdEfGhIjKlMnOpQrSt",
        ] {
            for t in [format!("token {tok}."), format!("GITLAB_TOKEN={tok}"), format!("\"{tok}\"")] {
                assert_eq!(kinds(&t), vec![(Builtin::GitlabToken, tok.to_string())], "{t}");
            }
            // In a clone URL the token is covered (as the local part of what is also an address).
            let t = format!("git clone https://oauth2:{tok}@gitlab.example.com/g/p.git");
            assert!(scanner.scan(t.as_bytes()).iter().any(|f| t.get(f.start..f.end).unwrap().contains(tok)), "{t}");
        }
        for t in
            ["glpat-short", "glpat-AbCdEfGhIjKlMnOpQrS", "glpatAbCdEfGhIjKlMnOpQrStUv", "my glass-AbCdEfGhIjKlMnOpQrSt"]
        {
            assert!(kinds(t).is_empty(), "{t}");
        }
        let mut off = Scanner::default();
        off.set_enabled(Builtin::GitlabToken, false);
        assert!(off.scan(b"glpat-xR4_kq9ZtB2mN7vLw-3c").is_empty());
    }

    fn kinds_bytes(s: &Scanner, t: &[u8]) -> Vec<Finding> {
        s.scan(t)
    }

    #[test]
    fn prose_fast_path_changes_no_finding() {
        // Texts mixing plain prose, words of 15-17 letters, shapes and every kind of separator, from a
        // fixed pseudo-random sequence, plus the evaluation corpora: the same findings with and without it.
        let pieces = [
            "the",
            "Quick",
            "brown",
            "abcdefghijklmno",
            "abcdefghijklmnop",
            "ABCDEFGHIJKLMNOPQ",
            "jane.doe@example.com",
            "+44 20 7946 0958",
            "4111 1111 1111 1111",
            "536-22-8963",
            "GB82 WEST 1234 5698 7654 32",
            "DE89370400440532013000",
            "AKIAIOSFODNN7EXAMPLE",
            "AKIAIOSFODNNQEXAMPLE",
            "10.0.0.1",
            "fe80::1",
            "dead:beef::1",
            "sk-proj-abc",
            "ghp_x",
            "eyJhbGciOi.eyJzdWIi.sig",
            "-----BEGIN",
            "a_b",
            "x@",
            "@y",
            "(555) 010-9999",
            "IBAN",
            "AB12",
            "ab:",
            "é",
            "ü",
            "SSN",
            "call",
            "mail",
        ];
        let seps = [
            " ", "  ", ", ", ". ", "\n", ";", "!", "?", "\"", "'", ")", "(", ":", "-", "/", "_", "@", ".", "%", "+",
            "\t", "*", "\u{a0}", "\u{2013}", "\u{200b}", "\u{202f}", "\u{2011}",
        ];
        let mut texts: Vec<String> = Vec::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |m: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % m as u64) as usize
        };
        for _ in 0..3000 {
            let mut s = String::new();
            for _ in 0..next(24) {
                s.push_str(pieces[next(pieces.len())]);
                s.push_str(seps[next(seps.len())]);
            }
            texts.push(s);
        }
        for file in ["pii_eval.jsonl", "pii_eval_holdout.jsonl"] {
            let data = std::fs::read_to_string(format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
            texts.extend(data.lines().map(str::to_string));
        }
        let scanner = Scanner::default();
        let mut found = 0;
        for t in &texts {
            let fast = scanner.scan(t.as_bytes());
            assert_eq!(fast, scanner.scan_without_prose_fast_path(t.as_bytes()), "{t:?}");
            found += fast.len();
        }
        assert!(found > 1000, "the texts must contain findings to compare: {found}");
    }

    #[test]
    fn byte_class_table_matches_the_predicates() {
        for b in 0..=255u8 {
            let starts = b.is_ascii_alphanumeric() || matches!(b, b'+' | b'(' | b'-' | b':' | b'@');
            assert_eq!(class(b) & START != 0, starts, "START {b}");
            assert_eq!(is_alnum(b), b.is_ascii_alphanumeric(), "ALNUM {b}");
            assert_eq!(is_word(b), b.is_ascii_alphanumeric() || b == b'_', "WORD {b}");
        }
        assert_eq!(run_len(b"  ,;x", 0, START, false), 4);
        assert_eq!(run_len(b"abc_d e", 0, WORD, true), 5);
        assert_eq!(run_len(b"abc", 1, ALNUM, true), 2);
        assert_eq!(run_len(b"abc", 9, ALNUM, true), 0, "past the end: an empty run");
    }

    fn kinds(s: &str) -> Vec<(Builtin, String)> {
        Scanner::default()
            .scan(s.as_bytes())
            .into_iter()
            .map(|f| (f.kind, s.get(f.start..f.end).unwrap_or("?").to_string()))
            .collect()
    }

    fn one(s: &str) -> Option<(Builtin, String)> {
        let k = kinds(s);
        assert!(k.len() <= 1, "{s}: {k:?}");
        k.into_iter().next()
    }

    /// An order, invoice or tracking number written in groups is one number: before, a part of it was
    /// masked as a phone number ("order number is 1234 5678 9012 3456" left `3456` beside `<PHONE_1>`:
    /// the 12-digit prefix took "number" as a phone context word) or as a card (`5678 9012 3456`, a
    /// Luhn-valid Maestro length inside a 16-digit number).
    #[test]
    fn grouped_order_numbers_are_not_masked_in_part() {
        for t in [
            "Your order number is 1234 5678 9012 3456.",
            "tracking number 9400 1000 0000 0000 0000 00",
            "Invoice number 1234 5678 9012 today",
            "order number 4111 1111 1111 1111",
            "the sum is 1234 5678 9012 3456 units",
            "reference number 1234-5678-9012-3456",
        ] {
            assert_eq!(kinds(t), vec![], "{t}");
        }
        // Entities still found: a card beside its own words, a phone with a context word, two numbers a
        // comma apart, a phone followed by a card.
        for (t, kind, found) in [
            ("card number 4111 1111 1111 1111 ok", Builtin::CreditCard, "4111 1111 1111 1111"),
            ("phone number 020 7946 0958 ok", Builtin::Phone, "020 7946 0958"),
            ("call 415 555 2671, 4111 1111 1111 1111", Builtin::CreditCard, "4111 1111 1111 1111"),
            ("call +44 20 7946 0958 4111 1111 1111 1111", Builtin::CreditCard, "4111 1111 1111 1111"),
        ] {
            assert!(kinds(t).contains(&(kind, found.to_string())), "{t}: {:?}", kinds(t));
        }
    }

    /// Code in a prompt: a path of two identifiers made of the letters a-f (`db::add`, `cafe::bad`,
    /// `fe::ad`) parses as an IPv6 address and was masked (`<IP_ADDRESS_1>(&conn)`), or redacted for good
    /// with `action: redact`. Addresses in use have a decimal digit or at least three groups.
    #[test]
    fn two_hex_word_code_paths_are_not_ipv6() {
        for t in ["call db::add(&conn, row) first", "impl Add for fe::ad {}", "see cafe::bad here", "a::b"] {
            assert_eq!(one(t), None, "{t}");
        }
        for (t, ip) in [
            ("at fe80::1 now", "fe80::1"),
            ("docs use dead:beef::cafe here", "dead:beef::cafe"),
            ("via 2001:db8::1 too", "2001:db8::1"),
            ("mapped ::ffff:192.168.1.10 ok", "::ffff:192.168.1.10"),
            ("ula fd::ab1 ok", "fd::ab1"),
        ] {
            assert_eq!(one(t), Some((Builtin::Ipv6, ip.to_string())), "{t}");
        }
    }

    /// Fuzz find (`pii_mask_restore`, hardening issue): a text starting with `:` then `.`/`:` made the IPv6
    /// trailing-punctuation loop compute `j - 2` with `j == 1` (an overflow panic in debug builds, a wrapped
    /// index in release).
    #[test]
    fn ipv6_candidate_at_the_start_of_the_text_does_not_underflow() {
        assert!(kinds(":.:.:......\u{2}\u{0}").is_empty());
        assert!(kinds(":").is_empty() && kinds("::").is_empty() && kinds(":.").is_empty());
        assert_eq!(one("host ::1 up").map(|(k, _)| k), None, "`::1` has one hex digit: too weak");
        assert_eq!(one("at fe80::1 now"), Some((Builtin::Ipv6, "fe80::1".to_string())));
    }

    #[test]
    fn validators() {
        assert!(luhn(b"4111111111111111"));
        assert!(!luhn(b"4111111111111112"));
        assert!(mod97(b"DE89370400440532013000"));
        assert!(!mod97(b"DE89370400440532013001"));
        assert!(mod97(b"GB82WEST12345698765432"));
        // The registry's newer countries: each example has its country's length and a valid checksum.
        for iban in [
            "BI4210000100010000332045181",
            "DJ2100010000000154000100186",
            "FK88SC123456789012",
            "HN88CABF00000000000250005469",
            "LY83002048000020100120361",
            "MN121234123456789123",
            "NI45BAPR00000013000003558124",
            "OM810180000001299123456",
            "RU0204452560040702810412345678901",
            "SD2129010501234001",
            "SO211000001001000100141",
            "YE02CBYE0001018612345678912182",
        ] {
            let cc = [iban.as_bytes()[0], iban.as_bytes()[1]];
            assert_eq!(iban_length(cc), Some(iban.len()), "{iban}");
            assert!(mod97(iban.as_bytes()), "{iban}");
            let text = format!("pay to {iban} today");
            let found = crate::detect::Scanner::default().scan(text.as_bytes());
            assert!(found.iter().any(|f| f.kind == Builtin::Iban), "{iban}: {found:?}");
        }
        assert!(nhs_valid(b"9434765919"));
        assert!(!nhs_valid(b"9434765918"));
        assert!(ssn_valid(b"536228963"));
        for bad in
            ["000123456", "666123456", "900123456", "123001234", "123450000", "078051120", "123456789", "987654321"]
        {
            assert!(!ssn_valid(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn finds_each_type_in_prose() {
        let cases: &[(&str, Builtin, &str)] = &[
            ("mail john.doe+x@example.co.uk now", Builtin::Email, "john.doe+x@example.co.uk"),
            ("me (jane.doe@example.com)", Builtin::Email, "jane.doe@example.com"),
            ("+(jane@example.com)", Builtin::Email, "jane@example.com"),
            ("write to a@b.io.", Builtin::Email, "a@b.io"),
            ("call (415) 555-2671 today", Builtin::Phone, "(415) 555-2671"),
            ("call 415-555-2671.", Builtin::Phone, "415-555-2671"),
            ("ring +44 20 7946 0958 please", Builtin::Phone, "+44 20 7946 0958"),
            ("ring +14155552671", Builtin::Phone, "+14155552671"),
            ("tel +33 (0)5 67 79 03 77.", Builtin::Phone, "+33 (0)5 67 79 03 77"),
            // The country code before an area code in parentheses is part of the number.
            ("call +1 (415) 555-2671 now", Builtin::Phone, "+1 (415) 555-2671"),
            ("tel:+1(415)555-2671", Builtin::Phone, "+1(415)555-2671"),
            ("Tel. +49 (30) 1234567.", Builtin::Phone, "+49 (30) 1234567"),
            ("+7 (495) 123-45-67", Builtin::Phone, "+7 (495) 123-45-67"),
            ("Tel. +49 (0) 9892 768719", Builtin::Phone, "+49 (0) 9892 768719"),
            ("ring +44(0)20 7946 0958", Builtin::Phone, "+44(0)20 7946 0958"),
            ("tel 020 7946 0958", Builtin::Phone, "020 7946 0958"),
            ("card 4111 1111 1111 1111 exp", Builtin::CreditCard, "4111 1111 1111 1111"),
            ("card 378282246310005", Builtin::CreditCard, "378282246310005"),
            ("ssn 536-22-8963", Builtin::UsSsn, "536-22-8963"),
            ("IBAN DE89 3704 0044 0532 0130 00 ok", Builtin::Iban, "DE89 3704 0044 0532 0130 00"),
            ("iban GB82WEST12345698765432", Builtin::Iban, "GB82WEST12345698765432"),
            ("host 192.168.1.20 down", Builtin::Ipv4, "192.168.1.20"),
            ("host 2001:db8::8a2e:370:7334 down", Builtin::Ipv6, "2001:db8::8a2e:370:7334"),
            ("NHS number 943 476 5919", Builtin::UkNhs, "943 476 5919"),
            ("key AKIAIOSFODNN7EXAMPLE", Builtin::AwsAccessKey, "AKIAIOSFODNN7EXAMPLE"),
            (
                "tok ghp_abcdefghijklmnopqrstuvwxyz0123456789",
                Builtin::GithubToken,
                "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            ),
            (
                "k AIzaSyA1234567890abcdefghijklmnopqrstuv",
                Builtin::GoogleApiKey,
                "AIzaSyA1234567890abcdefghijklmnopqrstuv",
            ),
            ("k sk_live_abcdefghij1234567890", Builtin::StripeKey, "sk_live_abcdefghij1234567890"),
            (
                "k hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
                Builtin::HuggingfaceToken,
                "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
            ),
            ("k xoxb-123456789012-abcdefghij", Builtin::SlackToken, "xoxb-123456789012-abcdefghij"),
        ];
        for (text, kind, value) in cases {
            assert_eq!(one(text), Some((*kind, value.to_string())), "{text}");
        }
    }

    #[test]
    fn secrets_with_long_shapes() {
        let openai = format!("sk-proj-{}T3BlbkFJ{}", "a".repeat(30), "b".repeat(30));
        assert_eq!(one(&format!("key={openai} end")), Some((Builtin::OpenaiKey, openai.clone())));
        let legacy = format!("sk-{}T3BlbkFJ{}", "A1".repeat(10), "z9".repeat(10));
        assert_eq!(one(&legacy), Some((Builtin::OpenaiKey, legacy.clone())));
        let ant = format!("sk-ant-api03-{}AA", "x_-Y".repeat(24).get(..93).unwrap());
        assert_eq!(one(&format!("use {ant}")), Some((Builtin::AnthropicKey, ant.clone())));
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_eq!(one(&format!("Bearer {jwt}")), Some((Builtin::Jwt, jwt.to_string())));
        let pk = "-----BEGIN RSA PRIVATE KEY-----\nMIIabc\n-----END RSA PRIVATE KEY-----";
        assert_eq!(one(&format!("x {pk} y")), Some((Builtin::PrivateKey, pk.to_string())));
        let gh = format!("github_pat_{}", "A".repeat(82));
        assert_eq!(one(&gh), Some((Builtin::GithubToken, gh.clone())));
    }

    /// Anthropic credentials other than an API key of the exact length (Claude Code's OAuth access and
    /// refresh tokens `sk-ant-oat01-` / `sk-ant-ort01-`, a key cut short by a copy) and Slack app-level tokens
    /// (`xapp-1-…`, Socket Mode): before 2026-12-07 none was found and they reached the provider.
    #[test]
    fn anthropic_oauth_tokens_and_slack_app_tokens_are_found() {
        let body = "x_-Y".repeat(24);
        for tok in [
            format!("sk-ant-oat01-{}AA", body.get(..93).unwrap()),
            format!("sk-ant-ort01-{}AA", body.get(..93).unwrap()),
            format!("sk-ant-api03-{}", body.get(..40).unwrap()),
            format!("sk-ant-api04-{}", body.get(..60).unwrap()),
        ] {
            assert_eq!(one(&format!("token: {tok}.")), Some((Builtin::AnthropicKey, tok.clone())), "{tok}");
        }
        let xapp = "xapp-1-A0123456789-1234567890123-0a1b2c3d4e5f60718293a4b5c6d7e8f9";
        assert_eq!(one(&format!("SLACK_APP_TOKEN={xapp}")), Some((Builtin::SlackToken, xapp.to_string())));
        for t in ["sk-ant-", "sk-ant-api03-short", "the sk-ant-xyz prefix", "xapp-1-", "xapp-store"] {
            assert_eq!(one(t), None, "{t}");
        }
    }

    /// Realistic shapes that were missed or masked only in part: an apostrophe in an email's local part
    /// (`john.o'` was left beside `<EMAIL_1>`), a punycode top-level domain, an OpenPGP private key block,
    /// a Stripe key longer than 99 characters and Slack Workflow Builder webhooks (all left whole).
    #[test]
    fn realistic_shapes_found_whole() {
        let stripe = format!("sk_live_51H{}", "aB3dE5gH7j".repeat(10));
        let pgp =
            "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF2xyzABCDEF\n=abcd\n-----END PGP PRIVATE KEY BLOCK-----";
        let cases: Vec<(String, Builtin, String)> = vec![
            ("mail john.o'reilly@example.com now".into(), Builtin::Email, "john.o'reilly@example.com".into()),
            ("mail l'amour@example.fr.".into(), Builtin::Email, "l'amour@example.fr".into()),
            ("to O'Brien.Sean@example.ie".into(), Builtin::Email, "O'Brien.Sean@example.ie".into()),
            ("mail user@example.xn--p1ai now".into(), Builtin::Email, "user@example.xn--p1ai".into()),
            ("iban de89 3704 0044 0532 0130 00 ok".into(), Builtin::Iban, "de89 3704 0044 0532 0130 00".into()),
            ("iban gb82west12345698765432.".into(), Builtin::Iban, "gb82west12345698765432".into()),
            ("mail ivan@xn--e1afmkfd.xn--p1ai.".into(), Builtin::Email, "ivan@xn--e1afmkfd.xn--p1ai".into()),
            (format!("key {pgp} done"), Builtin::PrivateKey, pgp.into()),
            (format!("key={stripe}"), Builtin::StripeKey, stripe.clone()),
            (
                "hook https://hooks.slack.com/workflows/T01ABCD2EFG/A01BCDE2FGH/123456789012345678/AbCdEfGhIjKlMnOpQrStUvWx"
                    .into(),
                Builtin::SlackToken,
                "https://hooks.slack.com/workflows/T01ABCD2EFG/A01BCDE2FGH/123456789012345678/AbCdEfGhIjKlMnOpQrStUvWx"
                    .into(),
            ),
            (
                "hook https://hooks.slack.com/triggers/T01ABCD2EFG/1234567890123/0123456789abcdef0123456789abcdef".into(),
                Builtin::SlackToken,
                "https://hooks.slack.com/triggers/T01ABCD2EFG/1234567890123/0123456789abcdef0123456789abcdef".into(),
            ),
        ];
        for (text, kind, value) in &cases {
            assert_eq!(one(text), Some((*kind, value.clone())), "{text}");
        }
        // A quote around the address, a possessive or an apostrophe before a dot is not taken in.
        assert_eq!(one("send it to 'jane@example.com'"), Some((Builtin::Email, "jane@example.com".into())));
        assert_eq!(one("Bob's jane@example.com"), Some((Builtin::Email, "jane@example.com".into())));
        assert_eq!(one("etc.'jane@example.com"), Some((Builtin::Email, "jane@example.com".into())));
        assert_eq!(one("mail user@example.xn-- now"), None);
    }

    /// RFC 5322 `atext` specials in an email's local part are masked with it: before 2026-12-07 only `'`
    /// between letters was, so `jo~e&co@example.com` went out as `jo~e&<EMAIL_1>`. Where a special is a
    /// delimiter of prose, markdown or a URL, the address starts after it.
    #[test]
    fn rfc5322_specials_in_the_local_part_are_masked_whole() {
        for c in ["~", "&", "'", "+", "=", "!", "#", "$", "%", "*", "/", "?", "^", "`", "{", "|", "}", "-", "_"] {
            let value = format!("jo{c}e@example.com");
            // One `=` after a plain word is a `key=` (below): `jo=` is left as a key would be.
            if c == "=" {
                assert_eq!(one(&format!("mail {value} now")), Some((Builtin::Email, "e@example.com".into())));
                continue;
            }
            assert_eq!(one(&format!("mail {value} now")), Some((Builtin::Email, value.clone())), "{value}");
            // Two `/` or `?` before the `@` are a path or a query (below).
            if c == "/" || c == "?" {
                continue;
            }
            let value = format!("jo{c}e{c}{c}co@example.com");
            assert_eq!(one(&format!("mail {value} now")), Some((Builtin::Email, value.clone())), "{value}");
        }
        for (text, value) in [
            ("write to jo~e&co@example.com.", "jo~e&co@example.com"),
            (
                "bounce list-bounces+jane=example.com@lists.example.org",
                "list-bounces+jane=example.com@lists.example.org",
            ),
            ("srs SRS0=HHH=TT=example.com=jane@srs.example.net", "SRS0=HHH=TT=example.com=jane@srs.example.net"),
            ("mail jane~@example.com now", "jane~@example.com"),
            // Delimiters: quotes, markdown, paths, queries, keys.
            ("send it to 'jane@example.com'", "jane@example.com"),
            ("**jane@example.com** or", "jane@example.com"),
            ("`jane@example.com`", "jane@example.com"),
            ("| x |jane@example.com|", "jane@example.com"),
            ("GET /users/jane@example.com HTTP/1.1", "jane@example.com"),
            ("see https://example.com/subscribe?email=jane@example.com", "jane@example.com"),
            ("see example.com/subscribe?a=1&email=jane@example.com", "jane@example.com"),
            ("login user=jane@example.com ok", "jane@example.com"),
            ("postfix to=jane@example.com, relay", "jane@example.com"),
            ("?to=jane@example.com", "jane@example.com"),
            ("etc.'jane@example.com", "jane@example.com"),
            ("see...jane@example.com", "jane@example.com"),
            ("mailto:jane@example.com", "jane@example.com"),
        ] {
            assert_eq!(one(text), Some((Builtin::Email, value.to_string())), "{text}");
        }
        let scanner = Scanner::default();
        for t in ["x jo~e&co@example.com", "a b&c d=e@x.io", "x/y?z=q&w=jane@example.com", "é~x@x.de ~@x.de"] {
            assert_eq!(scanner.scan(t.as_bytes()), scanner.scan_without_prose_fast_path(t.as_bytes()), "{t}");
        }
        // Nothing before the `@`, or only delimiters: no email.
        for t in ["a ~@example.com b", "x @example.com", "'@example.com", ".@example.com"] {
            assert_eq!(one(t), None, "{t}");
        }
    }

    /// IBANs with dashes, dots, two spaces or a line break between their groups, and cards with two spaces
    /// or one line break between groups printed the usual way, are found whole (before 2026-12-07 only one
    /// space or dash was a separator: `DE89-3704-0044-0532-0130-00` was not found, and a card across a
    /// line break was not either). Validators keep the wider gaps from joining other numbers.
    #[test]
    fn groups_separated_by_dashes_two_spaces_or_line_breaks() {
        for (text, kind, value) in [
            ("iban DE89-3704-0044-0532-0130-00 ok", Builtin::Iban, "DE89-3704-0044-0532-0130-00"),
            ("iban DE89.3704.0044.0532.0130.00.", Builtin::Iban, "DE89.3704.0044.0532.0130.00"),
            ("iban DE89  3704  0044  0532  0130  00 ok", Builtin::Iban, "DE89  3704  0044  0532  0130  00"),
            ("iban DE89 3704 0044\n0532 0130 00\nthanks", Builtin::Iban, "DE89 3704 0044\n0532 0130 00"),
            ("iban DE89 3704 0044 \r\n0532 0130 00 ok", Builtin::Iban, "DE89 3704 0044 \r\n0532 0130 00"),
            ("to gb82-west-1234-5698-7654-32 now", Builtin::Iban, "gb82-west-1234-5698-7654-32"),
            ("card 4111  1111  1111  1111 ok", Builtin::CreditCard, "4111  1111  1111  1111"),
            ("card 4111 1111\n1111 1111\nexp 12/29", Builtin::CreditCard, "4111 1111\n1111 1111"),
            ("card 4111 1111 1111\r\n1111 ok", Builtin::CreditCard, "4111 1111 1111\r\n1111"),
            ("amex 3782  822463  10005 ok", Builtin::CreditCard, "3782  822463  10005"),
        ] {
            assert_eq!(one(text), Some((kind, value.to_string())), "{text:?}");
        }
        // A failing check digit: nothing (not its groups as other numbers either).
        assert_eq!(one("iban DE89-3704-0044-0532-0130-01 ok"), None);
        assert_eq!(one("iban DE89  3704  0044  0532  0130  01 ok"), None);
        // Lines of four digits, a number before a card on the line above, SSN and phone shapes: a wide gap
        // joins nothing but a card.
        assert_eq!(one("pins\n4111\n1111\n1111\n1111\n"), None);
        assert_eq!(
            kinds("see 1234 5678\n4111 1111 1111 1111 ok"),
            vec![(Builtin::CreditCard, "4111 1111 1111 1111".to_string())]
        );
        assert_eq!(one("ssn 536  22  8963 ok"), None);
        assert_eq!(
            kinds("call 415-555-2671\n415-555-2672\n"),
            vec![(Builtin::Phone, "415-555-2671".to_string()), (Builtin::Phone, "415-555-2672".to_string())]
        );
        assert_eq!(one("card 4111  1111  1111  1112 ok"), None, "Luhn fails");
    }

    /// Fullwidth forms (U+FF01..U+FF5E, typed with a CJK input method) are read as the ASCII they stand for:
    /// before 2026-12-07 `jane.doe＠example.com` and a card in fullwidth digits were not found. The finding
    /// covers the original bytes.
    #[test]
    fn fullwidth_forms_are_read_as_ascii() {
        for (fullwidth, ascii) in [
            ("mail jane.doe＠example.com now", "mail jane.doe@example.com now"),
            ("ｍａｉｌ ｊａｎｅ．ｄｏｅ＠ｅｘａｍｐｌｅ．ｃｏｍ", "mail jane.doe@example.com"),
            ("カード ４１１１　１１１１　１１１１　１１１１ です", "カード 4111 1111 1111 1111 です"),
            ("card ４１１１－１１１１－１１１１－１１１１.", "card 4111-1111-1111-1111."),
            ("電話 ＋４４ ２０ ７９４６ ０９５８", "電話 +44 20 7946 0958"),
            ("ssn ５３６－２２－８９６３", "ssn 536-22-8963"),
            ("iban ＤＥ８９ ３７０４ ００４４ ０５３２ ０１３０ ００", "iban DE89 3704 0044 0532 0130 00"),
            ("key ＡＫＩＡＩＯＳＦＯＤＮＮ７ＥＸＡＭＰＬＥ", "key AKIAIOSFODNN7EXAMPLE"),
        ] {
            let want: Vec<Builtin> = kinds(ascii).into_iter().map(|(k, _)| k).collect();
            assert_eq!(want.len(), 1, "{ascii}");
            let got = kinds(fullwidth);
            assert_eq!(got.iter().map(|(k, _)| *k).collect::<Vec<_>>(), want, "{fullwidth}");
            // The span is the whole fullwidth value: what is left around it is the text around the ASCII one.
            let (_, value) = &got[0];
            let (_, ascii_value) = &kinds(ascii)[0];
            assert_eq!(value.chars().count(), ascii_value.chars().count(), "{fullwidth}: {value}");
        }
        assert!(kinds("ｆｕｌｌｗｉｄｔｈ ｐｒｏｓｅ，ｎｏ ｖａｌｕｅ！").is_empty());
        assert!(normalize_separators("中文，标点！问题？".as_bytes()).is_none(), "CJK punctuation is not copied");
    }

    /// Values written percent-encoded (URLs and logs pasted into a prompt) are read through the encoding, as
    /// the model reads them, and the whole encoded span is the finding: before 2026-12-07
    /// `jane.doe%40example.com` and `phone=%2B14155552671` left the gateway unmasked.
    #[test]
    fn percent_encoded_values_are_found_whole() {
        for (text, kind, value) in [
            (
                "https://app.example.com/reset?email=jane.doe%40example.com&token=abc123",
                Builtin::Email,
                "jane.doe%40example.com",
            ),
            ("write to mailto:jane%40example.com please", Builtin::Email, "jane%40example.com"),
            ("GET /api?to=jane.doe%40Example.COM HTTP/1.1", Builtin::Email, "jane.doe%40Example.COM"),
            // Lower-case hex, and an encoded query inside a redirect parameter (`%3D` is `=`).
            ("next=%2Fsignup%3Femail%3Djane%40example.com", Builtin::Email, "jane%40example.com"),
            ("sms?phone=%2B14155552671&code=1", Builtin::Phone, "%2B14155552671"),
            ("sms?phone=%2b44%2020%207946%200958&x=1", Builtin::Phone, "%2b44%2020%207946%200958"),
            ("q=card%204111%201111%201111%201111&p=2", Builtin::CreditCard, "4111%201111%201111%201111"),
            // A form-encoded query value's `+` for a space, between the groups of a value.
            ("phone=%2B44+20+7946+0958&x=1", Builtin::Phone, "%2B44+20+7946+0958"),
            ("card=4111+1111+1111+1111&x=1", Builtin::CreditCard, "4111+1111+1111+1111"),
            ("pay?iban=NL91+ABNA+0417+1643+00&c=EUR", Builtin::Iban, "NL91+ABNA+0417+1643+00"),
            ("tel=%2B33+%280%295+67+79+03+77&n=J", Builtin::Phone, "%2B33+%280%295+67+79+03+77"),
            // ... and in a `sms:` / `tel:` URI's number (since 2026-12-08).
            ("<a href=\"sms:%28415%29+555+2671?body=Hi\">", Builtin::Phone, "%28415%29+555+2671"),
            ("call TEL:%2B44+20+7946+0958 now", Builtin::Phone, "%2B44+20+7946+0958"),
            // A `+` tag in an address stays a tag, in a query value too.
            ("signup?email=jane+news@example.com&x=1", Builtin::Email, "jane+news@example.com"),
            ("signup?email=jane+news%40example.com&x=1", Builtin::Email, "jane+news%40example.com"),
            ("mail user1+2@example.com now", Builtin::Email, "user1+2@example.com"),
        ] {
            assert_eq!(kinds(text), vec![(kind, value.to_string())], "{text}");
        }
        // `%40` without an address around it, encoded paths and prose percentages are nothing.
        for text in [
            "the path a%40b and x%40y.z is no address",
            "https://cdn.example.com/npm/%40babel%2Fcore@7.24.0/lib/index.js",
            "GET /files/My%20Report%202024-01-15.pdf and /q?name=R%26D%20team",
            "up 50% in 2024, 20%-30% of %s and 100%40 ok",
            "%40 alone, %2B alone, %%40, %4 and %G0",
            "1+1=2, 2+2=4, C++ and g++, version 1.0.0+20130313144700",
        ] {
            assert_eq!(kinds(text), vec![], "{text}");
        }
    }

    /// The copy maps back through its edits (a binary search) exactly as a map of every byte would:
    /// generated texts mixing plain bytes, dropped characters, Unicode spaces, fullwidth forms, percent
    /// encodings and HTML references, every byte of each copy compared.
    #[test]
    fn normalised_copy_maps_back_like_a_map_of_every_byte() {
        let pieces = [
            "a",
            "1",
            " ",
            "\u{200b}",
            "\u{a0}",
            "%40",
            "%2B",
            "&#64;",
            "&nbsp;",
            "+",
            "=",
            "&shy;",
            "\t",
            "４",
            "@",
            "%zz",
            "&amp;",
            "q=",
            "\u{ad}\u{ad}",
        ];
        let mut seed: u64 = 0x2026_1207;
        for _ in 0..2000 {
            let mut t = String::new();
            for _ in 0..(seed % 24) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                t.push_str(pieces[(seed >> 33) as usize % pieces.len()]);
            }
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let t = t.as_bytes();
            let Some(n) = normalize_separators(t) else { continue };
            // The reference: per byte of the copy, the original bytes it came from.
            let mut text = Vec::new();
            let mut map = Vec::new();
            let mut i = 0;
            while i < t.len() {
                match separator_at(t, i) {
                    Some((len, read)) => {
                        if let Some(c) = read {
                            text.push(c);
                            map.push((i, i + len));
                        }
                        i += len;
                    }
                    None => {
                        text.push(t[i]);
                        map.push((i, i + 1));
                        i += 1;
                    }
                }
            }
            assert_eq!(n.text, text, "{:?}", String::from_utf8_lossy(t));
            for start in 0..=text.len() {
                for end in start..=text.len() {
                    let want_start = map.get(start).map_or(t.len(), |m| m.0);
                    let want_end = end.checked_sub(1).and_then(|e| map.get(e)).map_or(want_start, |m| m.1);
                    let want = (want_start, want_end);
                    assert_eq!(
                        n.orig_span(start, end, t.len()),
                        want,
                        "{:?} {start}..{end}",
                        String::from_utf8_lossy(t)
                    );
                }
            }
        }
    }

    /// Values written with HTML character references (HTML pasted into a prompt, addresses obfuscated
    /// against scrapers) are read through them: before 2026-12-07 `jane&#64;example.com` left unmasked.
    #[test]
    fn html_character_references_are_read_through() {
        for (text, kind, value) in [
            ("<p>Mail jane&#64;example.com today</p>", Builtin::Email, "jane&#64;example.com"),
            ("<p>Mail jane&#x40;example.com today</p>", Builtin::Email, "jane&#x40;example.com"),
            ("<p>Mail jane&commat;example&period;com today</p>", Builtin::Email, "jane&commat;example&period;com"),
            ("mail jane&#064;example&#46;com.", Builtin::Email, "jane&#064;example&#46;com"),
            (
                "&#106;&#97;&#110;&#101;&#64;&#101;&#120;&#97;&#109;&#112;&#108;&#101;&#46;&#99;&#111;&#109;",
                Builtin::Email,
                "&#106;&#97;&#110;&#101;&#64;&#101;&#120;&#97;&#109;&#112;&#108;&#101;&#46;&#99;&#111;&#109;",
            ),
            (
                "<td>Tel: &plus;44&nbsp;20&nbsp;7946&nbsp;0958</td>",
                Builtin::Phone,
                "&plus;44&nbsp;20&nbsp;7946&nbsp;0958",
            ),
            ("card 4111&#8203;1111&shy;1111&#xAD;1111 ok", Builtin::CreditCard, "4111&#8203;1111&shy;1111&#xAD;1111"),
        ] {
            assert_eq!(kinds(text), vec![(kind, value.to_string())], "{text}");
        }
        for text in [
            "&#64; alone, &commat; alone, and &#64;example.com",
            "R&amp;D &lt;b&gt; &#9731; &#xZZ; &#64 &commat &#1114112; &#99999999999;",
            "Tom &amp; Jerry &mdash; 50&#37; off",
        ] {
            assert_eq!(kinds(text), vec![], "{text}");
        }
    }

    /// A key whose END line is cut (`-----END RSA PRIVATE K`, the copy stopped short) or that is followed
    /// by another block's END line has no END line of its own: masked to the end of the text like a key
    /// without any, not skipped whole.
    #[test]
    fn private_key_whose_end_line_is_not_its_own_is_masked_to_the_end() {
        let body =
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n";
        for end in
            ["-----END RSA PRIVATE K", "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----"]
        {
            let text = format!("my key: {body}{end}");
            let found: Vec<(Builtin, usize, usize)> =
                Scanner::default().scan(text.as_bytes()).iter().map(|f| (f.kind, f.start, f.end)).collect();
            assert_eq!(found, vec![(Builtin::PrivateKey, 8, text.len())], "{text}");
        }
    }

    #[test]
    fn hard_negatives() {
        for text in [
            "order 4111111111111112 shipped", // fails Luhn
            "released on 2024-01-15 at noon", // date
            "version 1.2.3.4 is out",         // version string
            "id 123e4567-e89b-12d3-a456-426614174000",
            "it costs $1,299.99 or 415.00",
            "ssn 123-45-6789 is a known fake",
            "tracking 1Z999AA10123456784",
            "time 12:30:45 and mac 00:1A:2B:3C:4D:5E",
            "IBAN DE89 3704 0044 0532 0130 01 wrong",
            "ratio 3.14159 and 10.5",
            "area 999-99-9999",
            "user@localhost and a@b",
            "rated +5 (approx) and +1 (800) x and +2 (3)", // a plus and a parenthesis are not a phone
            "café@ home and résumé@ work",
            "sk-not-a-key and AKIA123",
            "1111 1111 1111 1111 all same",
        ] {
            assert_eq!(kinds(text), vec![], "{text}");
        }
    }

    #[test]
    fn context_words_raise_bare_numbers() {
        assert_eq!(kinds("id 4155552671"), vec![]);
        assert_eq!(kinds("phone: 4155552671"), vec![(Builtin::Phone, "4155552671".into())]);
        assert_eq!(kinds("ref 536228963"), vec![]);
        assert_eq!(kinds("SSN 536228963"), vec![(Builtin::UsSsn, "536228963".into())]);
    }

    #[test]
    fn numbers_followed_by_more_numbers() {
        assert_eq!(kinds("call 415 555 2671 2 times"), vec![(Builtin::Phone, "415 555 2671".into())]);
    }

    #[test]
    fn garbage_never_panics() {
        let s = Scanner::default();
        let junk: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let _ = s.scan(&junk);
        for cut in
            ["-----BEGIN X PRIVATE KEY-----", "ey", "eyJ.eyJ.", "+", "(", "(12", "sk-ant-", "AKIA", "DE89", "::", "a@"]
        {
            let _ = s.scan(cut.as_bytes());
        }
    }
}
