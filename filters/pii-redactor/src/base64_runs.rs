//! Base64 written into a prompt's text: a Kubernetes Secret pasted as YAML (`password: aHVudGVyMg==`), a
//! `.dockerconfigjson`, a token in a `curl -H "Authorization: Basic ..."` line, a log line with an encoded
//! payload. Any model reads base64 as easily as the text it encodes, so a value inside it leaves the
//! network as surely as one written plainly. The runs are found here, decoded, and (when the decoded
//! bytes are text) scanned by the caller; a run holding findings is replaced by the base64 of its masked
//! text, in the same alphabet, padding and line layout, so the model still reads a well-formed encoding
//! and meets `<EMAIL_1>` where the value was.
//!
//! What a run is: a maximal span of base64 symbols (`A-Za-z0-9`, and `+/` or `-_`, not both), ending in
//! at most two `=`, whose length without padding is a possible base64 length, at least
//! [`MIN_SYMBOLS`] long, and whose decoded bytes are UTF-8 text without control characters other than tab
//! and line breaks. Lines of the same length (a multiple of four) separated by single line breaks, as
//! MIME, PEM and `base64` (76 columns) wrap them, are one run. A plain English word of 12 or more letters
//! is a run candidate too; it decodes to bytes that are almost never printable UTF-8 (~1 in 10^4 for 12
//! letters), and even then only a detector's finding in them changes anything.

use meshwarden_shared::encoding::{base64_decode_accepting, base64_encode};

/// Shortest run decoded, in symbols without padding: 12 symbols are 9 bytes, as short as a US SSN
/// written without dashes; shorter runs hold nothing a detector reports.
pub const MIN_SYMBOLS: usize = 12;

/// A base64 run in a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Byte span in the text, padding and inner line breaks included.
    pub start: usize,
    pub end: usize,
    /// Written in the URL-safe alphabet (`-_`).
    pub url_safe: bool,
    /// Ends with `=` padding.
    pub padded: bool,
    /// Wrapped: the length of every line but the last, and the line break (`\n` or `\r\n`).
    pub wrap: Option<(usize, &'static [u8])>,
}

// Byte classes: a base64 symbol of either alphabet, and which alphabet's own symbols it is.
const SYMBOL: u8 = 1;
const STANDARD_ONLY: u8 = 2;
const URL_SAFE_ONLY: u8 = 4;

#[allow(clippy::indexing_slicing)] // `b < 256`, the table's length (a const fn cannot use `get_mut`)
const fn classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => SYMBOL,
            b'+' | b'/' => SYMBOL | STANDARD_ONLY,
            b'-' | b'_' => SYMBOL | URL_SAFE_ONLY,
            _ => 0,
        };
        b += 1;
    }
    t
}

static CLASSES: [u8; 256] = classes();

fn class(t: &[u8], i: usize) -> u8 {
    t.get(i).map_or(0, |&b| CLASSES.get(usize::from(b)).copied().unwrap_or(0))
}

/// End of the run of symbols starting at `i`, and the alphabet classes seen in it.
fn symbols_end(t: &[u8], i: usize) -> (usize, u8) {
    let rest = t.get(i..).unwrap_or(&[]);
    let mut seen = 0;
    let len = rest
        .iter()
        .position(|&b| {
            let c = CLASSES.get(usize::from(b)).copied().unwrap_or(0);
            seen |= c;
            c & SYMBOL == 0
        })
        .unwrap_or(rest.len());
    (i + len, seen & !SYMBOL)
}

/// Whether `b` is a base64 symbol, as comparisons (which the compiler turns into vector code over a
/// block of bytes, unlike a table lookup).
fn is_symbol(b: u8) -> bool {
    (b | 0x20).wrapping_sub(b'a') < 26 || b.wrapping_sub(b'0') < 10 || matches!(b, b'+' | b'/' | b'-' | b'_')
}

/// End of the run of symbols starting at `i`, 32 bytes at a time: how a long binary run (an image in a
/// body scanned whole) is passed over.
fn skip_symbols(t: &[u8], i: usize) -> usize {
    let rest = t.get(i..).unwrap_or(&[]);
    let mut n = 0;
    for block in rest.chunks_exact(32) {
        if !block.iter().fold(true, |all, &b| all & is_symbol(b)) {
            break;
        }
        n += 32;
    }
    let tail = rest.get(n..).unwrap_or(&[]);
    i + n + tail.iter().position(|&b| !is_symbol(b)).unwrap_or(tail.len())
}

/// A byte that UTF-8 text without control characters (but tab and line breaks) can hold.
fn text_byte(b: u8) -> bool {
    !(b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r') || b == 0x7f || b == 0xc0 || b == 0xc1 || b >= 0xf5)
}

/// The runs in `t` that are long enough and of a possible length and whose first 12 symbols decode to
/// bytes text can hold, in order (not yet decoded whole).
///
/// Fast path for prose, as Boyer-Moore-Horspool skips: the window `i..i + MIN_SYMBOLS` is read from its
/// end backwards; the first byte that is no symbol rules out a run starting anywhere up to it, and the
/// next window starts after it. Prose (words of a few letters) is passed over reading about one byte in
/// three; only a window of symbols throughout is a run's start (the byte before `i` is never a symbol
/// there, except right after a run, whose end byte is none).
pub fn find_runs(t: &[u8]) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut i = 0;
    while let Some(window) = t.get(i..i + MIN_SYMBOLS) {
        if let Some(k) = window.iter().rposition(|&b| CLASSES.get(usize::from(b)).is_none_or(|c| c & SYMBOL == 0)) {
            i += k + 1;
            continue;
        }
        // The first 12 symbols already show binary (an image in a body scanned whole): the run is passed
        // over without its layout worked out or anything decoded.
        if base64_decode_accepting(t.get(i..i + MIN_SYMBOLS).unwrap_or(&[]), text_byte).is_none() {
            i = skip_symbols(t, i) + 1;
            continue;
        }
        match run_at(t, i) {
            Some(run) => {
                i = run.end;
                runs.push(run);
            }
            None => i = symbols_end(t, i).0 + 1,
        }
    }
    runs
}

/// The run starting at `start` (a symbol after a non-symbol), if it is one.
fn run_at(t: &[u8], start: usize) -> Option<Run> {
    let mut seen = 0u8;
    let mut end;
    let mut line_len = None::<usize>;
    let mut line_break: &'static [u8] = b"\n";
    let mut line_start = start;
    loop {
        let (e, s) = symbols_end(t, line_start);
        seen |= s;
        end = e;
        let len = e - line_start;
        // Another line of the same wrap follows: this line is a full one (a multiple of four, the same
        // length as the first), then one line break, then more symbols.
        let brk: Option<&'static [u8]> = match (t.get(e), t.get(e + 1)) {
            (Some(b'\n'), _) => Some(b"\n"),
            (Some(b'\r'), Some(b'\n')) => Some(b"\r\n"),
            _ => None,
        };
        let full = len >= 16 && len % 4 == 0 && line_len.is_none_or(|l| l == len);
        let next = match brk {
            Some(b) if full && (line_len.is_none() || line_break == b) => Some((b, e + b.len())),
            _ => None,
        };
        // The next line joins only if it is base64 on a line of its own (its symbols end at a line
        // break, `=` or the end of the text) in the same alphabet: not `-----END ...` after a block.
        let joins = next.and_then(|(b, from)| {
            let (next_end, next_seen) = symbols_end(t, from);
            let alone = matches!(t.get(next_end), None | Some(b'\n' | b'\r' | b'='));
            let mixed = (seen | next_seen) & STANDARD_ONLY != 0 && (seen | next_seen) & URL_SAFE_ONLY != 0;
            // Not longer than the lines before it, and of a possible length.
            let possible = next_end - from <= len && (next_end - from) % 4 != 1;
            (next_end > from && alone && !mixed && possible).then_some((b, from))
        });
        match joins {
            Some((b, from)) => {
                line_len = Some(len);
                line_break = b;
                line_start = from;
            }
            None => break,
        }
    }
    if seen & STANDARD_ONLY != 0 && seen & URL_SAFE_ONLY != 0 {
        return None; // `a-b/c_d`: a path or an identifier, not base64
    }
    let mut padding = 0;
    while padding < 2 && t.get(end) == Some(&b'=') {
        padding += 1;
        end += 1;
    }
    if t.get(end) == Some(&b'=') || class(t, end) & SYMBOL != 0 {
        return None; // `===`, or symbols after padding
    }
    let breaks = line_len.map_or(0, |l| (line_start - start) / (l + line_break.len()) * line_break.len());
    let symbols = end - start - padding - breaks;
    if symbols < MIN_SYMBOLS || symbols % 4 == 1 || (padding > 0 && (symbols + padding) % 4 != 0) {
        return None;
    }
    Some(Run {
        start,
        end,
        url_safe: seen & URL_SAFE_ONLY != 0,
        padded: padding > 0,
        wrap: line_len.map(|l| (l, line_break)),
    })
}

/// The text a run encodes, if it is text: UTF-8 with no control characters but tab and line breaks.
/// Binary (an image's base64 in a body scanned whole) is given up at its first byte that no text has,
/// usually within a few bytes, not decoded whole.
pub fn decode_text(t: &[u8], run: &Run) -> Option<String> {
    let text_byte =
        |b: u8| !(b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r') || b == 0x7f || b == 0xc0 || b == 0xc1 || b >= 0xf5);
    let bytes = base64_decode_accepting(t.get(run.start..run.end)?, text_byte)?;
    let text = String::from_utf8(bytes).ok()?;
    // C1 controls (U+0080-U+009F) are no text either.
    if text.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)) {
        return None;
    }
    Some(text)
}

/// `text` encoded as `run` was: its alphabet, padding and line wrap.
pub fn encode_like(run: &Run, text: &[u8]) -> String {
    let mut encoded = base64_encode(text);
    if !run.padded {
        encoded.truncate(encoded.trim_end_matches('=').len());
    }
    if run.url_safe {
        encoded = encoded.replace('+', "-").replace('/', "_");
    }
    let Some((line_len, line_break)) = run.wrap else {
        return encoded;
    };
    let line_break = std::str::from_utf8(line_break).unwrap_or("\n");
    let mut wrapped = String::with_capacity(encoded.len() + encoded.len() / line_len.max(1) * 2);
    for (k, line) in encoded.as_bytes().chunks(line_len.max(1)).enumerate() {
        if k > 0 {
            wrapped.push_str(line_break);
        }
        wrapped.push_str(std::str::from_utf8(line).unwrap_or(""));
    }
    wrapped
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code
mod tests {
    use super::*;

    fn decoded(t: &str) -> Vec<String> {
        find_runs(t.as_bytes()).iter().filter_map(|r| decode_text(t.as_bytes(), r)).collect()
    }

    #[test]
    fn runs_in_yaml_headers_and_prose() {
        let email = base64_encode(b"jane.doe@example.com");
        let t = format!("apiVersion: v1\nkind: Secret\ndata:\n  user: {email}\n  password: aHVudGVyMg==\n");
        assert_eq!(decoded(&t), vec!["jane.doe@example.com".to_string()]); // `hunter2` is under 12 symbols
        let t = "curl -H 'Authorization: Basic amFuZUBleGFtcGxlLmNvbTpzM2NyZXQ=' https://x";
        assert_eq!(decoded(t), vec!["jane@example.com:s3cret".to_string()]);
        // Prose: long words are candidates but decode to no text; identifiers mixing both alphabets are
        // not runs at all.
        let prose = "Internationalization and responsibilities of the implementation at /srv/app-data/cache_dir.";
        assert!(decoded(prose).is_empty());
        assert!(find_runs(b"see /usr/local-share/x_y/abcdefghijkl").is_empty());
    }

    #[test]
    fn run_boundaries_padding_and_lengths() {
        let t = "x=SmFuZSBEb2UgamFuZUBleGFtcGxlLmNvbQ==;";
        let runs = find_runs(t.as_bytes());
        assert_eq!(runs.len(), 1);
        assert_eq!(&t[runs[0].start..runs[0].end], "SmFuZSBEb2UgamFuZUBleGFtcGxlLmNvbQ==");
        assert!(runs[0].padded && !runs[0].url_safe);
        assert_eq!(decode_text(t.as_bytes(), &runs[0]).unwrap(), "Jane Doe jane@example.com");
        // Three `=`, symbols after the padding, an impossible length: no run.
        assert!(find_runs(b"SmFuZSBEb2UgamFu===").is_empty());
        assert!(find_runs(b"SmFuZSBEb2Ug==amFu").is_empty());
        assert!(find_runs(b"SmFuZSBEb2UgamFuZ").is_empty()); // 17 symbols: 17 % 4 == 1
                                                             // Everywhere in a text, at every offset of the fast path's window.
        for pad in 0..30 {
            let t = format!("{}{} tail", " ".repeat(pad), base64_encode(b"call +1 415 555 2671 now"));
            assert_eq!(decoded(&t), vec!["call +1 415 555 2671 now".to_string()], "offset {pad}");
        }
    }

    #[test]
    fn wrapped_runs_are_one_and_reencode_the_same_way() {
        let text = "Contact: jane.doe@example.com, card 4111 1111 1111 1111, phone +44 20 7946 0958. ".repeat(2);
        let flat = base64_encode(text.as_bytes());
        for brk in ["\n", "\r\n"] {
            let wrapped: Vec<&str> = flat.as_bytes().chunks(76).map(|c| std::str::from_utf8(c).unwrap()).collect();
            let t = format!("-----\n{}\n-----", wrapped.join(brk));
            let runs = find_runs(t.as_bytes());
            assert_eq!(runs.len(), 1, "{brk:?}");
            assert_eq!(runs[0].wrap, Some((76, brk.as_bytes())));
            assert_eq!(decode_text(t.as_bytes(), &runs[0]).unwrap(), text);
            assert_eq!(encode_like(&runs[0], text.as_bytes()), wrapped.join(brk));
        }
        // A block whose last line is full, then a line that is no base64 (`-----`, five `-`: an
        // impossible length) or mixes the alphabets.
        let text = "jane.doe@example.com: ".repeat(57 * 2 / 22 + 1);
        let flat = base64_encode(&text.as_bytes()[..114]);
        let wrapped: Vec<&str> = flat.as_bytes().chunks(76).map(|c| std::str::from_utf8(c).unwrap()).collect();
        assert_eq!(wrapped.len(), 2);
        for tail in ["-----", "a-b+c/d_e"] {
            let t = format!("{}\n{tail}", wrapped.join("\n"));
            let runs = find_runs(t.as_bytes());
            assert_eq!(runs.len(), 1, "{tail}");
            assert_eq!(&t[runs[0].start..runs[0].end], wrapped.join("\n"));
        }
        // Lines of different lengths are separate runs.
        let t = format!("{}\n{}", &flat[..40], &flat[40..]);
        assert_eq!(find_runs(t.as_bytes()).len(), 2);
    }

    #[test]
    fn url_safe_and_unpadded_round_trip() {
        let text = "??>> jane@example.com ~~ ??";
        let std = base64_encode(text.as_bytes());
        assert!(std.contains('/') || std.contains('+'));
        let url: String = std.trim_end_matches('=').replace('+', "-").replace('/', "_");
        let runs = find_runs(url.as_bytes());
        assert_eq!(runs.len(), 1);
        assert!(runs[0].url_safe && !runs[0].padded);
        assert_eq!(decode_text(url.as_bytes(), &runs[0]).unwrap(), text);
        assert_eq!(encode_like(&runs[0], text.as_bytes()), url);
    }

    #[test]
    fn both_symbol_tests_agree() {
        for b in 0..=255u8 {
            assert_eq!(is_symbol(b), CLASSES[usize::from(b)] & SYMBOL != 0, "{b}");
        }
        let t = format!("{}!{}", "a".repeat(100), "b".repeat(7));
        for i in [0, 5, 31, 32, 99, 100, 101, 108] {
            assert_eq!(skip_symbols(t.as_bytes(), i), symbols_end(t.as_bytes(), i).0, "{i}");
        }
    }

    #[test]
    fn binary_and_control_bytes_are_not_text() {
        // Binary shows in the first 12 symbols: no run at all (a PNG header's seventh byte is 0x1a).
        let png = [0x89, b'P', b'N', b'G', 13, 10, 26, 10, 0, 0, 0, 13, b'I', b'H', b'D', b'R'];
        assert!(find_runs(base64_encode(&png).as_bytes()).is_empty());
        // ... also when large, and the run after it is still found.
        let big = base64_encode(&[&png[..], &vec![b'x'; 3_000_000]].concat());
        let t = format!("{big} {}", base64_encode(b"jane.doe@example.com"));
        let runs = find_runs(t.as_bytes());
        assert_eq!(runs.len(), 1);
        assert_eq!(decode_text(t.as_bytes(), &runs[0]).unwrap(), "jane.doe@example.com");
        // Binary after a text-like start is refused by the whole decode.
        let late = base64_encode(b"plain text start, then \x01 binary");
        let runs = find_runs(late.as_bytes());
        assert_eq!(runs.len(), 1);
        assert!(decode_text(late.as_bytes(), &runs[0]).is_none());
        let c1 = base64_encode("abc\u{85}defghijkl".as_bytes());
        assert!(decoded(&c1).is_empty());
    }
}
