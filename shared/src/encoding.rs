//! Small decoders every protocol module needs: Base64 (standard and URL-safe alphabets, padding
//! optional), used for JWT segments and MCP 2026-07-28 `=?base64?...?=` header values; and the
//! standard Base64 encoder (Bedrock `InvokeModelWithResponseStream` chunks carry `{"bytes":"<base64>"}`).

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encode in the standard alphabet (`+/`) with `=` padding (RFC 4648 section 4).
pub fn base64_encode(input: &[u8]) -> String {
    let sym = |v: u32| char::from(STANDARD.get((v & 63) as usize).copied().unwrap_or(b'A'));
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for group in input.chunks(3) {
        let b = |i: usize| u32::from(group.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        out.push(sym(n >> 18));
        out.push(sym(n >> 12));
        out.push(if group.len() > 1 { sym(n >> 6) } else { '=' });
        out.push(if group.len() > 2 { sym(n) } else { '=' });
    }
    out
}

/// Decode Base64 in either the standard (`+/`) or the URL-safe (`-_`) alphabet; `=` padding is optional
/// (JWTs omit it). Whitespace and any other byte are an error, as are impossible lengths.
pub fn base64_decode(input: &str) -> Result<Vec<u8>, &'static str> {
    let trimmed = input.trim_end_matches('=');
    if input.len() - trimmed.len() > 2 {
        return Err("too much padding");
    }
    if trimmed.len() % 4 == 1 {
        return Err("impossible length");
    }
    decode_symbols(trimmed.as_bytes(), false, |_| true).ok_or("invalid character")
}

/// Decode Base64 (either alphabet) skipping line breaks (`\r`, `\n`, as wrapped base64 has them) and
/// `=`, stopping with `None` at the first decoded byte `accept` refuses or at any other byte: a caller
/// that wants text rejects binary at its first bytes instead of decoding all of it (a PNG's seventh
/// byte, 0x1a, is no text). Lengths are the caller's to check.
pub fn base64_decode_accepting(input: &[u8], accept: impl Fn(u8) -> bool) -> Option<Vec<u8>> {
    decode_symbols(input, true, accept)
}

/// The symbols of `input` decoded; with `wrapped`, line breaks and `=` are skipped, else they are errors.
fn decode_symbols(input: &[u8], wrapped: bool, accept: impl Fn(u8) -> bool) -> Option<Vec<u8>> {
    // Not more up front: a caller refusing binary usually stops within a few bytes of a large input.
    let mut out = Vec::with_capacity((input.len() * 3 / 4).min(4096));
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &b in input {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'\r' | b'\n' | b'=' if wrapped => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            let byte = ((acc >> bits) & 0xff) as u8;
            if !accept(byte) {
                return None;
            }
            out.push(byte);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn decodes_both_alphabets_with_and_without_padding() {
        assert_eq!(base64_decode("SGVsbG8=").unwrap(), b"Hello");
        assert_eq!(base64_decode("SGVsbG8").unwrap(), b"Hello");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("-_8").unwrap(), vec![0xfb, 0xff]);
        assert_eq!(base64_decode("+/8=").unwrap(), vec![0xfb, 0xff]);
        assert_eq!(String::from_utf8(base64_decode("w6lsw6h2ZQ==").unwrap()).unwrap(), "\u{e9}l\u{e8}ve");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn decoding_wrapped_base64_and_stopping_at_refused_bytes() {
        assert_eq!(base64_decode_accepting(b"amFuZUBl\r\neGFtcGxl\nLmNvbQ==", |_| true).unwrap(), b"jane@example.com");
        assert_eq!(base64_decode_accepting(b"SGVsbG8=", |b| b != b'l'), None);
        assert_eq!(base64_decode_accepting(b"SGV*bG8=", |_| true), None);
        // The strict decoder still refuses line breaks and inner padding.
        assert!(base64_decode("amFuZUBl\neGFt").is_err());
        assert!(base64_decode("SG=VsbG8").is_err());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn encodes_the_rfc_4648_vectors() {
        let vectors =
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")];
        for (plain, b64) in vectors.into_iter().chain([("foobar", "Zm9vYmFy")]) {
            assert_eq!(base64_encode(plain.as_bytes()), b64, "{plain}");
        }
        assert_eq!(base64_encode(&[0xfb, 0xff]), "+/8=");
        assert_eq!(base64_encode("\u{e9}l\u{e8}ve".as_bytes()), "w6lsw6h2ZQ==");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn encode_then_decode_round_trips_every_length_and_byte() {
        let all: Vec<u8> = (0..=255u8).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        let mut x = 0x9e37_79b9u32;
        for len in 0..200 {
            let bytes = crate::testing::pseudo_random_bytes(&mut x, len);
            let b64 = base64_encode(&bytes);
            assert_eq!(b64.len() % 4, 0);
            assert_eq!(base64_decode(&b64).unwrap(), bytes, "len {len}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn rejects_garbage() {
        assert!(base64_decode("a").is_err());
        assert!(base64_decode("ab c").is_err());
        assert!(base64_decode("ab===").is_err());
        assert!(base64_decode("é").is_err());
    }
}
