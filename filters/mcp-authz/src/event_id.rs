//! Stream resumption bound to the caller. An MCP client resumes a broken SSE stream with `GET` and
//! `Last-Event-ID: <id of the last event it got>`; a server with an event store replays what followed
//! that event. The MCP Python SDK hands one event store to every session and replays whatever stream an
//! event id belongs to, so an event id is a bearer capability to another caller's tool results: whoever
//! learns one (a log, a shared trace, a browser's devtools) reads the rest of that stream.
//!
//! The gateway makes the ids it hands out unusable by anyone else: every `id:` of an MCP SSE answer
//! leaves as `<id>~<tag>`, the tag a MAC (HMAC-SHA-256, truncated to 128 bits, base64url) over the caller
//! (the owner hash of session binding), the session (`Mcp-Session-Id`) and the id, keyed with a secret
//! of this gateway. A `Last-Event-ID` is forwarded (without its tag) only when its tag is this caller's
//! and this session's; any other (another caller's, forged, untagged, or tagged under another key) is
//! refused before it reaches the server. Pure logic: the adapter supplies the key and the caller.

use meshwarden_shared::encoding::base64_encode;
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// Between an event id and its tag. Not in the base64url alphabet, so the tag is the text after the
/// last one; the id before it may contain any character (it is MACed, not parsed).
pub const TAG_SEPARATOR: u8 = b'~';
/// 16 bytes of MAC in unpadded base64url.
const TAG_CHARS: usize = 22;
const MAC_BYTES: usize = 16;
/// Shortest secret accepted from `event_id_key_env` (bytes).
pub const MIN_SECRET_BYTES: usize = 16;

/// The gateway's MAC key (32 bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct EventIdKey([u8; 32]);

impl std::fmt::Debug for EventIdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventIdKey(..)")
    }
}

impl EventIdKey {
    /// A key derived from an operator's secret (any length; [`MIN_SECRET_BYTES`] is checked by the config).
    pub fn from_secret(secret: &[u8]) -> Self {
        let d = Sha256::new().chain_update(b"meshwarden-mcp-authz-event-id-key\0").chain_update(secret).finalize();
        let mut k = [0u8; 32];
        k.copy_from_slice(&d);
        EventIdKey(k)
    }

    /// A key from 32 random bytes (the per-Envoy key when no secret is configured).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        EventIdKey(bytes)
    }

    /// 32 bytes as stored in Envoy shared data; `None` for any other length.
    pub fn from_stored(bytes: &[u8]) -> Option<Self> {
        let k: [u8; 32] = bytes.try_into().ok()?;
        Some(EventIdKey(k))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// HMAC-SHA-256 (RFC 2104) of the parts, concatenated.
fn hmac_sha256(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        if let (Some(a), Some(b)) = (ipad.get_mut(i), opad.get_mut(i)) {
            *a ^= k;
            *b ^= k;
        }
    }
    let mut inner = Sha256::new().chain_update(ipad);
    for p in parts {
        inner.update(p);
    }
    let d = Sha256::new().chain_update(opad).chain_update(inner.finalize()).finalize();
    let mut out = [0u8; 32];
    out.copy_from_slice(&d);
    out
}

/// Unpadded base64url (RFC 4648 section 5), as a `Last-Event-ID` carries it unescaped.
fn b64url(bytes: &[u8]) -> String {
    base64_encode(bytes).trim_end_matches('=').replace('+', "-").replace('/', "_")
}

/// Whether the tagged id's MAC equals `mac`, in time independent of where they differ.
fn tag_matches(tag: &[u8], mac: &[u8]) -> bool {
    let expected = b64url(mac);
    tag.len() == expected.len() && tag.iter().zip(expected.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Tags and checks the event ids of one request: one caller, one session.
#[derive(Debug, Clone)]
pub struct EventIdTagger {
    key: EventIdKey,
    owner: [u8; 16],
    session: String,
}

impl EventIdTagger {
    /// `owner`: the caller's owner hash (session binding's); `session`: the request's (or, for an
    /// initialize, its answer's) `Mcp-Session-Id`, empty without one.
    pub fn new(key: EventIdKey, owner: [u8; 16], session: &str) -> Self {
        EventIdTagger { key, owner, session: session.to_string() }
    }

    fn mac(&self, id: &str) -> [u8; MAC_BYTES] {
        let len = (self.session.len() as u64).to_le_bytes();
        let full =
            hmac_sha256(&self.key.0, &[b"mcp-event-id\0", &self.owner, &len, self.session.as_bytes(), id.as_bytes()]);
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(full.get(..MAC_BYTES).unwrap_or(&[0u8; MAC_BYTES]));
        out
    }

    /// The id as it leaves the gateway. An empty id (which resets the client's last event id) stays empty.
    pub fn tag(&self, id: &str) -> String {
        if id.is_empty() {
            return String::new();
        }
        format!("{id}{}{}", char::from(TAG_SEPARATOR), b64url(&self.mac(id)))
    }

    /// The server's id inside a `Last-Event-ID` this gateway handed to this caller in this session;
    /// `None` for any other value.
    pub fn verify<'a>(&self, tagged: &'a str) -> Option<&'a str> {
        let split = tagged.len().checked_sub(TAG_CHARS + 1)?;
        let (id, rest) = (tagged.get(..split)?, tagged.as_bytes().get(split..)?);
        let (sep, tag) = rest.split_first()?;
        if *sep != TAG_SEPARATOR || id.is_empty() {
            return None;
        }
        tag_matches(tag, &self.mac(id)).then_some(id)
    }

    /// A raw SSE block (or part of one) with the value of every `id` field line tagged; every other byte
    /// as it came (line endings, comments, other fields). `starts_mid_line`: the first bytes continue a
    /// line begun in an earlier part (not a field line start); a last line without its terminator is
    /// not rewritten when `complete` is false (its value may go on in the next part).
    pub fn tag_id_lines<'a>(&self, block: &'a [u8], starts_mid_line: bool, complete: bool) -> Cow<'a, [u8]> {
        let mut out: Option<Vec<u8>> = None;
        let mut start = 0;
        let mut first = true;
        while start < block.len() {
            let rest = block.get(start..).unwrap_or(&[]);
            let (line_len, term_len) = match rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
                Some(i) => {
                    let crlf = rest.get(i) == Some(&b'\r') && rest.get(i + 1) == Some(&b'\n');
                    (i, if crlf { 2 } else { 1 })
                }
                None => (rest.len(), 0),
            };
            let line = rest.get(..line_len).unwrap_or(&[]);
            let rewrite = !(first && starts_mid_line) && (term_len > 0 || complete);
            first = false;
            let tagged = if rewrite { self.tag_id_line(line) } else { None };
            match (tagged, &mut out) {
                (Some(t), Some(o)) => o.extend_from_slice(t.as_bytes()),
                (Some(t), None) => {
                    let mut o = block.get(..start).unwrap_or(&[]).to_vec();
                    o.extend_from_slice(t.as_bytes());
                    out = Some(o);
                }
                (None, Some(o)) => o.extend_from_slice(line),
                (None, None) => {}
            }
            if let Some(o) = &mut out {
                o.extend_from_slice(rest.get(line_len..line_len + term_len).unwrap_or(&[]));
            }
            start += line_len + term_len;
        }
        match out {
            Some(o) => Cow::Owned(o),
            None => Cow::Borrowed(block),
        }
    }

    /// `id: <tagged value>` for an `id` field line with a value a client keeps (UTF-8, no NUL, not empty).
    fn tag_id_line(&self, line: &[u8]) -> Option<String> {
        let value = match line.strip_prefix(b"id") {
            Some([b':', b' ', v @ ..]) | Some([b':', v @ ..]) => v,
            _ => return None,
        };
        let value = std::str::from_utf8(value).ok()?;
        if value.is_empty() || value.contains('\0') {
            return None;
        }
        Some(format!("id: {}", self.tag(value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagger(owner: u8, session: &str) -> EventIdTagger {
        EventIdTagger::new(EventIdKey::from_secret(b"0123456789abcdef-secret"), [owner; 16], session)
    }

    /// RFC 4231 test case 2 ("Jefe"), padded to our 32-byte key the way HMAC pads a short key.
    #[test]
    fn hmac_matches_the_rfc_4231_vector() {
        let mut key = [0u8; 32];
        key.get_mut(..4).unwrap().copy_from_slice(b"Jefe");
        let mac = hmac_sha256(&key, &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn base64url_is_unpadded_rfc_4648() {
        assert_eq!(b64url(b""), "");
        assert_eq!(b64url(b"f"), "Zg");
        assert_eq!(b64url(b"fo"), "Zm8");
        assert_eq!(b64url(b"foo"), "Zm9v");
        assert_eq!(b64url(b"foob"), "Zm9vYg");
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(b64url(&[7u8; 16]).len(), TAG_CHARS);
    }

    /// A tagged id verifies for the caller and session it was issued to, and for no one else.
    #[test]
    fn tags_verify_only_for_their_caller_and_session() {
        let alice = tagger(1, "s-1");
        let tagged = alice.tag("8f14e45f-ceea-467f-a0e6-7b5b3c4d7c1a");
        assert_eq!(alice.verify(&tagged), Some("8f14e45f-ceea-467f-a0e6-7b5b3c4d7c1a"));
        assert_eq!(tagger(2, "s-1").verify(&tagged), None, "another caller");
        assert_eq!(tagger(1, "s-2").verify(&tagged), None, "another session");
        let other_key = EventIdTagger::new(EventIdKey::from_secret(b"another-secret-0123"), [1; 16], "s-1");
        assert_eq!(other_key.verify(&tagged), None, "another gateway key");
        // The untagged id, a truncated or altered tag, and a tag moved onto another id are refused.
        assert_eq!(alice.verify("8f14e45f-ceea-467f-a0e6-7b5b3c4d7c1a"), None);
        assert_eq!(alice.verify(&tagged[..tagged.len() - 1]), None);
        let mut flipped = tagged.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(alice.verify(std::str::from_utf8(&flipped).unwrap()), None);
        let tag = &tagged[tagged.len() - TAG_CHARS - 1..];
        assert_eq!(alice.verify(&format!("other-id{tag}")), None);
        assert_eq!(alice.verify(""), None);
        assert_eq!(alice.verify(&format!("~{}", &tag[1..])), None, "a tag alone names no event");
        // Ids holding the separator (or looking tagged themselves) round-trip: the tag is the last one.
        for id in ["a~b", "x~AAAAAAAAAAAAAAAAAAAAAA", "ünïcode id", "42"] {
            assert_eq!(alice.verify(&alice.tag(id)), Some(id), "{id}");
        }
        assert_eq!(alice.tag(""), "");
    }

    #[test]
    fn id_lines_are_tagged_and_every_other_byte_kept() {
        let t = tagger(1, "s");
        let block = b"id: ev-1\r\nevent: message\r\ndata: {\"id\":\"x\"}\r\n: comment id: no\r\nretry: 500\r\n\r\n";
        let out = t.tag_id_lines(block, false, true);
        let expected = format!(
            "id: {}\r\nevent: message\r\ndata: {{\"id\":\"x\"}}\r\n: comment id: no\r\nretry: 500\r\n\r\n",
            t.tag("ev-1")
        );
        assert_eq!(std::str::from_utf8(&out).unwrap(), expected);
        // `id:` without the space, `\n` and lone `\r` endings; two id lines (the last one counts to a client).
        let out = t.tag_id_lines(b"id:a\nid:b\rdata: x\n\n", false, true);
        assert_eq!(std::str::from_utf8(&out).unwrap(), format!("id: {}\nid: {}\rdata: x\n\n", t.tag("a"), t.tag("b")));
        // Nothing to tag: the block is borrowed untouched. Empty ids (a reset), ids with NUL (ignored by
        // clients), `idx:` and `data: id: x` are no id fields.
        for raw in [&b": ping\n\n"[..], b"id\n\n", b"id:\n\n", b"id: a\0b\n\n", b"idx: 1\n\n", b"data: id: x\n\n"] {
            assert!(matches!(t.tag_id_lines(raw, false, true), Cow::Borrowed(_)), "{raw:?}");
        }
        // A part that begins mid-line, or ends inside a line, leaves those partial lines alone.
        assert!(matches!(t.tag_id_lines(b"id: tail-of-a-data-line\n\n", true, true), Cow::Borrowed(_)));
        let out = t.tag_id_lines(b"id: whole\nid: cut-her", false, false);
        assert_eq!(std::str::from_utf8(&out).unwrap(), format!("id: {}\nid: cut-her", t.tag("whole")));
    }
}
