//! Small decoders every protocol module needs: Base64 (standard and URL-safe alphabets, padding
//! optional), used for JWT segments and MCP 2026-07-28 `=?base64?...?=` header values.

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
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for b in trimmed.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return Err("invalid character"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Ok(out)
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
    fn rejects_garbage() {
        assert!(base64_decode("a").is_err());
        assert!(base64_decode("ab c").is_err());
        assert!(base64_decode("ab===").is_err());
        assert!(base64_decode("é").is_err());
    }
}
