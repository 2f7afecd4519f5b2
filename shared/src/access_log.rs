//! Values for Envoy access logs. Proxy-Wasm cannot write dynamic metadata, so filters publish what an
//! operator logs (decisions, models, token counts) as filter state (`set_property`), which an access log
//! reads as `%FILTER_STATE(wasm.<name>:PLAIN)%`.

use std::borrow::Cow;

/// A caller-chosen value made safe for a text access log: JSON string escapes for `\`, `"` and control
/// characters (`\n`, `\r`, `\t`, else `\u00XX`; also C1 and U+2028/U+2029, which some log readers take for
/// line breaks). The values are text the caller chose (a tool name, a method, a model, a token's `sub`),
/// and a text access log writes them as they are: a tool named `x\n/mcp 200 subject=root … decision=allow`
/// wrote a second, forged access-log line (before 2026-12-07). Values without such characters are
/// unchanged.
pub fn value(s: &str) -> Cow<'_, str> {
    let special = |c: char| c == '\\' || c == '"' || c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    if !s.chars().any(special) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if special(c) => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::value;

    #[test]
    fn line_breaks_and_quotes_are_escaped_plain_text_is_kept() {
        assert_eq!(value("gpt-4o"), "gpt-4o");
        assert!(matches!(value("gpt-4o"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(value("a\nb\r\"c\\"), "a\\nb\\r\\\"c\\\\");
        assert_eq!(value("x\u{2028}y\u{85}z\u{1}"), "x\\u2028y\\u0085z\\u0001");
        assert_eq!(value("tab\there"), "tab\\there");
    }
}
