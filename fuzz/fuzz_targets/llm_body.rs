//! Text extraction and rewrite on arbitrary JSON bodies: never panics; every extracted pointer can be
//! rewritten, and re-extracting gives the new texts at the same pointers (the body stays valid JSON).
//! Splicing the new texts into the client's bytes gives the same document as that rewrite.
//! The strict request-body parser agrees with serde_json: the same `Value` where serde_json parses,
//! an error where it does not (but for a skipped UTF-8 byte order mark), and a duplicate-key error only
//! where serde_json (last copy wins) parses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshwarden_shared::json::{parse_strict, JsonBodyError};
use meshwarden_shared::llm::{
    ensure_stream_usage, estimate_request_tokens, extract_request_texts, extract_response_texts,
    extract_stream_delta_texts, replace_texts, request_info, stream_usage_change, usage_from_json, Api,
};

const APIS: [Api; 6] = [
    Api::OpenAiChat,
    Api::OpenAiCompletions,
    Api::OpenAiResponses,
    Api::OpenAiEmbeddings,
    Api::AnthropicMessages,
    Api::Unknown,
];

fuzz_target!(|data: &[u8]| {
    let strict = parse_strict(data);
    let Ok(mut body) = serde_json::from_slice::<serde_json::Value>(data) else {
        // Only a UTF-8 byte order mark, which the strict parser skips, may separate them.
        if let Ok(v) = &strict {
            let rest = data.strip_prefix(b"\xef\xbb\xbf").expect("strict parse accepted what serde_json refuses");
            assert_eq!(serde_json::from_slice::<serde_json::Value>(rest).ok().as_ref(), Some(v));
        }
        return;
    };
    // serde_json's own visitor gives one magic key a meaning (feature raw_value): skip such inputs.
    let magic = data.windows(13).any(|w| w == b"$serde_json::");
    if !magic {
        match &strict {
            Ok(v) => assert_eq!(v, &body, "strict parse built another value"),
            Err(JsonBodyError::DuplicateKey(_)) => {}
            Err(JsonBodyError::Syntax(m)) => panic!("strict parse refused valid JSON: {m}"),
            Err(JsonBodyError::NotUtf8(e)) => panic!("serde_json parsed what the strict parser calls {e}"),
        }
    }
    let _ =
        (request_info(&body), usage_from_json(&body), extract_response_texts(&body), extract_stream_delta_texts(&body));
    for api in APIS {
        let spans = extract_request_texts(api, &body);
        let _ = estimate_request_tokens(&spans);
        let replacements: Vec<(String, String)> =
            spans.iter().map(|s| (s.pointer.clone(), format!("<{}>", s.text.len()))).collect();
        let mut copy = body.clone();
        assert_eq!(replace_texts(&mut copy, &replacements), 0, "every extracted pointer is rewritable");
        let again = extract_request_texts(api, &copy);
        assert_eq!(again.len(), spans.len());
        for (a, (p, t)) in again.iter().zip(&replacements) {
            assert_eq!(&a.pointer, p);
            assert_eq!(&a.text, t);
        }
        assert!(serde_json::to_vec(&copy).is_ok());
        // The splice of the client's bytes gives the same document as the `Value` rewrite, and finds
        // every extracted string of a body the strict parser accepts.
        match meshwarden_shared::splice::splice_strings(data, &replacements) {
            Some(out) => {
                let spliced: serde_json::Value = serde_json::from_slice(&out).expect("the splice broke the JSON");
                assert_eq!(spliced, copy, "the splice and the Value rewrite disagree");
            }
            None => assert!(strict.is_err() || magic, "the splice missed an extracted string"),
        }
    }
    let change = stream_usage_change(Api::OpenAiChat, &body);
    assert_eq!(ensure_stream_usage(Api::OpenAiChat, &mut body), change.is_some());
    if let Some(c) = change {
        match meshwarden_shared::splice::splice(data, &[c.edit()]) {
            Some(out) => {
                let spliced: serde_json::Value = serde_json::from_slice(&out).expect("the splice broke the JSON");
                assert_eq!(spliced, body, "the include_usage splice and the Value rewrite disagree");
            }
            None => assert!(strict.is_err() || magic, "the include_usage splice failed"),
        }
    }
});
