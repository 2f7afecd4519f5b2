//! Detection and false-positive rates of the default configuration on the evaluation set in `eval/`.
//!
//! Every injection and every benign prompt is scanned as written and after each of the evasion transforms
//! below (the classes listed in detection.md). Detection = share of (injection, transform) pairs that
//! the default packs reject; false positives = share of (benign, transform) pairs that any pack rejects.
//! Targets from the issue: detection >= 95 %, false positives <= 1 %. Run with `--nocapture` to see the
//! per-pack and per-evasion table.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_shared::config::parse_config;
use meshwarden_shared::llm::Role;
use prompt_guard::config::Config;
use prompt_guard::engine::{Dir, Engine, Policy, Spans};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::rc::Rc;

fn words_map(text: &str, f: impl Fn(&str) -> String, sep: &str) -> String {
    text.split(' ').map(f).collect::<Vec<_>>().join(sep)
}

fn chars_map(text: &str, f: impl Fn(char) -> String) -> String {
    text.chars().map(f).collect()
}

fn interleave(word: &str, sep: &str) -> String {
    word.chars().map(|c| c.to_string()).collect::<Vec<_>>().join(sep)
}

fn cyrillic(c: char) -> String {
    match c {
        'a' => 'а',
        'e' => 'е',
        'o' => 'о',
        'p' => 'р',
        'c' => 'с',
        'x' => 'х',
        'i' => 'і',
        'y' => 'у',
        'A' => 'А',
        'E' => 'Е',
        'O' => 'О',
        'P' => 'Р',
        'C' => 'С',
        'T' => 'Т',
        'H' => 'Н',
        'M' => 'М',
        'K' => 'К',
        c => c,
    }
    .to_string()
}

fn greek(c: char) -> String {
    match c {
        'o' => 'ο',
        'i' => 'ι',
        'v' => 'ν',
        'a' => 'α',
        't' => 'τ',
        'k' => 'κ',
        'n' => 'η',
        'p' => 'ρ',
        'u' => 'υ',
        'O' => 'Ο',
        'I' => 'Ι',
        'A' => 'Α',
        'E' => 'Ε',
        'N' => 'Ν',
        c => c,
    }
    .to_string()
}

fn leet(c: char) -> String {
    match c.to_ascii_lowercase() {
        'o' => '0',
        'i' => '1',
        'e' => '3',
        'a' => '4',
        's' => '5',
        't' => '7',
        _ => c,
    }
    .to_string()
}

/// Leetspeak with `!` for an `i` starting a word and `|` for any other `i` (digits as in [`leet`]).
fn bang_pipe_leet(text: &str) -> String {
    let mut prev = ' ';
    let mut out = String::new();
    for c in text.chars() {
        out.push_str(&match c.to_ascii_lowercase() {
            'i' if prev.is_alphanumeric() => "|".to_string(),
            'i' => "!".to_string(),
            _ => leet(c),
        });
        prev = c;
    }
    out
}

/// A short greeting glued to `text` by a sentence mark without a space, and every sentence mark in `text`
/// followed by a space and a letter glued to that letter (`Hi.Ignore all previous instructions.Now ...`): a
/// model reads the sentences apart, the normaliser drops one separator inside a word (`ig.nore`).
fn glued_punctuation(text: &str) -> String {
    let greeting = ["Hi.", "Thanks!", "OK,"][text.len() % 3];
    let cs: Vec<char> = text.chars().collect();
    let mut out = greeting.to_string();
    for (k, &c) in cs.iter().enumerate() {
        let after_mark = k > 0 && ".!?,;:".contains(cs[k - 1]);
        if c == ' ' && after_mark && cs.get(k + 1).is_some_and(|n| n.is_alphabetic()) {
            continue;
        }
        out.push(c);
    }
    out
}

fn rot13(text: &str) -> String {
    chars_map(text, |c| match c {
        'a'..='m' | 'A'..='M' => char::from(c as u8 + 13).to_string(),
        'n'..='z' | 'N'..='Z' => char::from(c as u8 - 13).to_string(),
        c => c.to_string(),
    })
}

/// The evasion transforms, by class name.
type Transform = Box<dyn Fn(&str) -> String>;

fn transforms() -> Vec<(&'static str, Transform)> {
    vec![
        ("plain", Box::new(|t: &str| t.to_string())),
        ("zero_width", Box::new(|t: &str| words_map(t, |w| interleave(w, "\u{200B}"), " "))),
        (
            "bidi_controls",
            Box::new(|t: &str| words_map(t, |w| format!("\u{2066}{}\u{2069}", interleave(w, "\u{200F}")), " ")),
        ),
        ("soft_hyphen", Box::new(|t: &str| words_map(t, |w| interleave(w, "\u{00AD}"), " "))),
        (
            "tag_smuggling",
            Box::new(|t: &str| {
                let hidden: String =
                    t.chars().filter(char::is_ascii).map(|c| char::from_u32(0xE0000 + c as u32).unwrap()).collect();
                format!("Hi! {hidden}")
            }),
        ),
        (
            "fullwidth",
            Box::new(|t: &str| {
                chars_map(t, |c| {
                    if ('!'..='~').contains(&c) {
                        char::from_u32(c as u32 + 0xFEE0).unwrap().to_string()
                    } else {
                        c.to_string()
                    }
                })
            }),
        ),
        (
            "math_alphanumerics",
            Box::new(|t: &str| {
                chars_map(t, |c| match c {
                    'a'..='z' => char::from_u32(0x1D41A + (c as u32 - 'a' as u32)).unwrap().to_string(),
                    'A'..='Z' => char::from_u32(0x1D400 + (c as u32 - 'A' as u32)).unwrap().to_string(),
                    '0'..='9' => char::from_u32(0x1D7CE + (c as u32 - '0' as u32)).unwrap().to_string(),
                    c => c.to_string(),
                })
            }),
        ),
        (
            "combining_marks",
            Box::new(|t: &str| {
                chars_map(t, |c| if "aeiouAEIOU".contains(c) { format!("{c}\u{0301}") } else { c.to_string() })
            }),
        ),
        ("cyrillic_homoglyphs", Box::new(|t: &str| chars_map(t, cyrillic))),
        ("greek_homoglyphs", Box::new(|t: &str| chars_map(t, greek))),
        ("leetspeak", Box::new(|t: &str| chars_map(t, leet))),
        ("split_letters", Box::new(|t: &str| words_map(t, |w| interleave(w, " "), "   "))),
        ("dash_split", Box::new(|t: &str| words_map(t, |w| interleave(w, "-"), " "))),
        (
            "dotted_words",
            Box::new(|t: &str| {
                words_map(
                    t,
                    |w| {
                        let cs: Vec<char> = w.chars().collect();
                        if cs.len() < 4 {
                            return w.to_string();
                        }
                        let mid = cs.len() / 2;
                        format!("{}.{}", cs[..mid].iter().collect::<String>(), cs[mid..].iter().collect::<String>())
                    },
                    " ",
                )
            }),
        ),
        ("line_breaks", Box::new(|t: &str| words_map(t, str::to_string, "\n"))),
        ("markdown_emphasis", Box::new(|t: &str| words_map(t, |w| format!("**{w}**"), " "))),
        (
            "case_games",
            Box::new(|t: &str| {
                t.chars()
                    .enumerate()
                    .map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
                    .collect()
            }),
        ),
        (
            "json_escapes",
            Box::new(|t: &str| {
                // the second character of every word as `\u00XX`, as JSON or JavaScript spell it
                words_map(
                    t,
                    |w| {
                        let cs: Vec<char> = w.chars().collect();
                        match cs.get(1) {
                            Some(c) if c.is_ascii_alphabetic() && cs.len() >= 3 => {
                                format!("{}\\u{:04x}{}", cs[0], *c as u32, cs[2..].iter().collect::<String>())
                            }
                            _ => w.to_string(),
                        }
                    },
                    " ",
                )
            }),
        ),
        (
            "markdown_links",
            Box::new(|t: &str| {
                // every other word a link: inline, then reference style
                let words: Vec<&str> = t.split(' ').collect();
                let linked: Vec<String> = words
                    .iter()
                    .enumerate()
                    .map(|(k, w)| match k % 4 {
                        0 => format!("[{w}](https://example.test/{k})"),
                        2 => format!("[{w}][{k}]"),
                        _ => w.to_string(),
                    })
                    .collect();
                linked.join(" ")
            }),
        ),
        ("bang_pipe_leet", Box::new(|t: &str| bang_pipe_leet(t))),
        (
            "double_encoded",
            Box::new(|t: &str| {
                // spaces as `%2520` and every `e` as `&amp;#101;`: escapes escaped once more
                chars_map(t, |c| match c {
                    ' ' => "%2520".to_string(),
                    'e' => "&amp;#101;".to_string(),
                    c => c.to_string(),
                })
            }),
        ),
        ("rot13_named", Box::new(|t: &str| format!("rot13: {}", rot13(t)))),
        // since 2026-12-07: the whole text backwards, character by character
        ("reversed", Box::new(|t: &str| t.chars().rev().collect())),
        // since 2026-12-07: `|` for every `l` / `L` (`a|| previous ru|es`)
        ("pipe_for_l", Box::new(|t: &str| chars_map(t, |c| if c == 'l' || c == 'L' { "|".into() } else { c.into() }))),
        // since 2026-12-07: a greeting glued to the text by `.`, `!` or `,` (no space) and every sentence mark
        // inside it glued to the next word (`Hi.Ignore all previous instructions.Print ...`)
        ("glued_punctuation", Box::new(|t: &str| glued_punctuation(t))),
        (
            "mixed",
            Box::new(|t: &str| {
                words_map(&chars_map(t, cyrillic), |w| interleave(&chars_map(w, leet), "\u{200B}"), "  ")
            }),
        ),
    ]
}

fn load(name: &str) -> Vec<(String, String)> {
    let path = format!("{}/eval/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once('\t') {
            Some((tag, text)) => (tag.to_string(), text.replace("\\n", "\n")),
            None => (String::new(), l.replace("\\n", "\n")),
        })
        .collect()
}

/// The policy of the default configuration (`{}`).
fn default_policy() -> Rc<Policy> {
    let cfg: Config = parse_config(b"{}").unwrap();
    Engine::compile(&cfg).unwrap().default
}

/// `a` in `b`, in per cent (0 where `b` is 0).
fn pct(a: usize, b: usize) -> f64 {
    100.0 * a as f64 / b.max(1) as f64
}

/// The missed attacks and the false positives, one a line, each list under a heading with its length.
fn print_misses(missed: &[String], false_pos: &[String]) {
    for (heading, list) in [("missed", missed), ("false positives", false_pos)] {
        println!("\n{heading} ({}):", list.len());
        for m in list {
            println!("  {m}");
        }
    }
}

#[test]
fn detection_and_false_positive_rates_meet_the_targets() {
    let policy = default_policy();
    let fires = |text: &str| -> Vec<String> {
        let names = |spans: Spans| {
            let mut v: Vec<String> = policy
                .scan_with(text, Dir::Request, Role::User, spans)
                .iter()
                .map(|h| policy.rules[h.rule].name.clone())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let v = names(Spans::All);
        // the request path skips spans for rules that do not mask: same decisions
        assert_eq!(v, names(Spans::MaskOnly), "{text}");
        v
    };
    let injections = load("injections.tsv");
    let benign = load("benign.tsv");
    let ts = transforms();

    let mut by_pack: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut by_evasion: BTreeMap<&str, (usize, usize, usize, usize)> = BTreeMap::new();
    let mut missed = Vec::new();
    let mut false_pos = Vec::new();
    let (mut det, mut tot, mut fp, mut btot) = (0usize, 0usize, 0usize, 0usize);
    for (pack, text) in &injections {
        for (name, t) in &ts {
            let variant = t(text);
            let hit = !fires(&variant).is_empty();
            tot += 1;
            let e = by_evasion.entry(name).or_default();
            e.1 += 1;
            let p = by_pack.entry(pack.clone()).or_default();
            p.1 += 1;
            if hit {
                det += 1;
                e.0 += 1;
                p.0 += 1;
            } else {
                missed.push(format!("[{name}] {text}"));
            }
        }
    }
    for (_, text) in &benign {
        for (name, t) in &ts {
            let variant = t(text);
            let f = fires(&variant);
            btot += 1;
            let e = by_evasion.entry(name).or_default();
            e.3 += 1;
            if !f.is_empty() {
                fp += 1;
                e.2 += 1;
                false_pos.push(format!("[{name}] {text} -> {f:?}"));
            }
        }
    }
    println!("| evasion | detected | false positives |\n|---|---|---|");
    for (name, (d, t, f, b)) in &by_evasion {
        println!("| {name} | {d}/{t} ({:.1}%) | {f}/{b} ({:.2}%) |", pct(*d, *t), pct(*f, *b));
    }
    println!("\n| pack | detected |\n|---|---|");
    for (pack, (d, t)) in &by_pack {
        println!("| {pack} | {d}/{t} ({:.1}%) |", pct(*d, *t));
    }
    println!(
        "\nTOTAL: {} injections x {} transforms: detection {det}/{tot} = {:.2}%; {} benign x {} transforms: false positives {fp}/{btot} = {:.2}%",
        injections.len(),
        ts.len(),
        pct(det, tot),
        benign.len(),
        ts.len(),
        pct(fp, btot)
    );
    print_misses(&missed, &false_pos);
    assert!(injections.len() >= 80 && benign.len() >= 250, "the evaluation set must stay this large");
    assert!(pct(det, tot) >= 95.0, "detection {:.2}% < 95%", pct(det, tot));
    assert!(pct(fp, btot) <= 1.0, "false positives {:.2}% > 1%", pct(fp, btot));
}

/// `text` cut in two at the word boundary nearest its middle (the space between them dropped: the
/// message boundary stands for it); `None` for a text of one word.
fn split_in_the_middle(text: &str) -> Option<(String, String)> {
    let mid = text.len() / 2;
    let at = text.match_indices(' ').map(|(k, _)| k).min_by_key(|&k| k.abs_diff(mid))?;
    Some((text[..at].to_string(), text[at + 1..].to_string()))
}

/// How two user messages are written, by API shape.
type Conversation = Box<dyn Fn(&[(&str, &str)]) -> (&'static str, String)>;

fn conversation_shapes() -> Vec<(&'static str, Conversation)> {
    let openai: fn(Vec<Value>) -> Value = |m| json!({"model": "m", "messages": m});
    let anthropic: fn(Vec<Value>) -> Value = |m| json!({"model": "c", "max_tokens": 9, "messages": m});
    // (shape, path, body around the messages, whether a message's text is a list of one text part)
    [
        ("openai_chat, string content", "/v1/chat/completions", openai, false),
        ("openai_chat, text parts", "/v1/chat/completions", openai, true),
        ("anthropic, string content", "/v1/messages", anthropic, false),
        ("anthropic, content blocks", "/v1/messages", anthropic, true),
    ]
    .into_iter()
    .map(|(shape, path, body, parts)| {
        let build: Conversation = Box::new(move |msgs: &[(&str, &str)]| {
            let m: Vec<_> = msgs
                .iter()
                .map(|(r, t)| {
                    let content = if parts { json!([{"type": "text", "text": t}]) } else { json!(t) };
                    json!({"role": r, "content": content})
                })
                .collect();
            (path, body(m).to_string())
        });
        (shape, build)
    })
    .collect()
}

/// Since 2026-12-07: every attack cut at the word boundary nearest its middle into two consecutive user
/// messages, in each API shape, must still be rejected, and every benign prompt cut the same way must
/// pass (the same targets as the single-text evaluation). Every two consecutive benign prompts of the set,
/// sent as two user messages, measure what joining unrelated messages costs: the pairs that fire only
/// joined (neither prompt fires alone) must stay under 1 %. Attacks cut by an assistant turn between the
/// halves are reported too: they are not joined (by design, see docs/prompt-guard.md).
#[test]
fn phrases_split_across_consecutive_user_messages() {
    use prompt_guard::inspect::{inspect_request, RequestOptions};
    let policy = default_policy();
    let opts = RequestOptions { scan_non_json: true, mask_text: "[X]", moderation_roles: &[], moderation_max_bytes: 0 };
    let rejected = |path: &str, body: &str| {
        inspect_request(&policy, path, Some("application/json"), body.as_bytes(), &opts).unwrap().reject.is_some()
    };
    let injections = load("injections.tsv");
    let benign = load("benign.tsv");
    println!("| shape | attacks split in two user messages | benign split in two | two benign prompts in a row (fire only joined) | attacks split by an assistant turn (not joined) |\n|---|---|---|---|---|");
    let alone = |text: &str| {
        let (path, body) = conversation_shapes()[0].1(&[("user", text)]);
        rejected(path, &body)
    };
    let (mut det, mut tot, mut fp, mut btot) = (0usize, 0usize, 0usize, 0usize);
    let (mut joined_fp, mut pairs) = (0usize, 0usize);
    let mut missed = Vec::new();
    let mut false_pos = Vec::new();
    for (shape, build) in conversation_shapes() {
        let (mut d, mut t, mut f, mut b, mut pf, mut pj, mut pb, mut ad) = (0, 0, 0, 0, 0, 0, 0, 0);
        for (_, text) in &injections {
            let Some((a, z)) = split_in_the_middle(text) else { continue };
            t += 1;
            let (path, body) = build(&[("user", &a), ("user", &z)]);
            if rejected(path, &body) {
                d += 1;
            } else {
                missed.push(format!("[{shape}] {a:?} + {z:?}"));
            }
            let (path, body) = build(&[("user", &a), ("assistant", "OK."), ("user", &z)]);
            ad += usize::from(rejected(path, &body));
        }
        for (_, text) in &benign {
            let Some((a, z)) = split_in_the_middle(text) else { continue };
            b += 1;
            let (path, body) = build(&[("user", &a), ("user", &z)]);
            if rejected(path, &body) {
                f += 1;
                false_pos.push(format!("[{shape}] {a:?} + {z:?}"));
            }
        }
        for pair in benign.windows(2) {
            pb += 1;
            let (path, body) = build(&[("user", &pair[0].1), ("user", &pair[1].1)]);
            if rejected(path, &body) {
                pf += 1;
                let only_joined = !alone(&pair[0].1) && !alone(&pair[1].1);
                pj += usize::from(only_joined);
                let why = if only_joined { "pair, fires only joined" } else { "pair" };
                false_pos.push(format!("[{shape}, {why}] {:?} + {:?}", pair[0].1, pair[1].1));
            }
        }
        println!(
            "| {shape} | {d}/{t} ({:.1}%) | {f}/{b} ({:.2}%) | {pf}/{pb} ({:.2}%; {pj} only joined) | {ad}/{t} ({:.1}%) |",
            pct(d, t),
            pct(f, b),
            pct(pf, pb),
            pct(ad, t)
        );
        det += d;
        tot += t;
        fp += f;
        btot += b;
        joined_fp += pj;
        pairs += pb;
    }
    println!(
        "\nSPLIT TOTAL: detection {det}/{tot} = {:.2}%; false positives {fp}/{btot} = {:.2}%; benign pairs firing only joined {joined_fp}/{pairs} = {:.2}%",
        pct(det, tot),
        pct(fp, btot),
        pct(joined_fp, pairs)
    );
    print_misses(&missed, &false_pos);
    assert!(tot >= 4 * 80, "every attack is split");
    assert!(pct(det, tot) >= 95.0, "split detection {:.2}% < 95%", pct(det, tot));
    assert!(pct(fp, btot) <= 1.0, "split false positives {:.2}% > 1%", pct(fp, btot));
    assert!(pct(joined_fp, pairs) <= 1.0, "pairs firing only joined {:.2}% > 1%", pct(joined_fp, pairs));
}
