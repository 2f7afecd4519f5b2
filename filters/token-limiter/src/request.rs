//! The request side: what the body says (model, prompt estimate, output reservation) and the body
//! rewrites the limiter makes (`stream_options.include_usage`, `model` after a fallback).

use crate::config::Config;
use crate::context_memory::{referenced, ContextRef};
use meshwarden_shared::attachments::extract_encoded_texts;
use meshwarden_shared::json::{parse_strict, JsonBodyError};
use meshwarden_shared::llm::{
    ambiguous_request_key, ensure_stream_usage, estimate_request_tokens, extract_request_texts, model_from_path,
    request_info, stream_usage_change, Api,
};
use meshwarden_shared::media::{estimate_media, gemini_inline_images};
use meshwarden_shared::splice::{splice, Edit};
use serde_json::Value;

/// Why a body could not be read; the request is then limited on a size-based estimate, except for
/// `DuplicateKey` and `NotUtf8`, which are refused (400, [`BadBody::refused`]): a key given twice
/// (`"model"` twice) may be read one way here and the other way by the upstream, and UTF-16/32 JSON is
/// read by Python servers but not here, so no estimate or model match could be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadBody {
    NotJson,
    Encoded,
    TooLarge,
    NoModel,
    DuplicateKey,
    NotUtf8,
}

impl BadBody {
    pub fn as_str(self) -> &'static str {
        match self {
            BadBody::NotJson => "not_json",
            BadBody::Encoded => "encoded",
            BadBody::TooLarge => "too_large",
            BadBody::NoModel => "no_model",
            BadBody::DuplicateKey => "duplicate_key",
            BadBody::NotUtf8 => "not_utf8",
        }
    }

    /// Answered 400 instead of being limited on an estimate.
    pub fn refused(self) -> bool {
        matches!(self, BadBody::DuplicateKey | BadBody::NotUtf8)
    }
}

#[derive(Debug, Clone)]
pub struct Parsed {
    pub api: Api,
    pub json: Option<Value>,
    /// The model the upstream serves: the one the path names (see `model_from_path`: Azure deployments,
    /// Bedrock, Gemini, which serve that model whatever the body says), else the body's `model`.
    pub model: Option<String>,
    /// `model` came from the path (rewriting the body's `model` would not change what is served) or from
    /// a key spelled in another case (`"Model"`): no fallback rewrites it.
    pub model_from_path: bool,
    /// The body's `model` when the path names another one: rules for it apply too, so neither name
    /// can take the request out of a model budget (an upstream that routes on the body still sees it).
    pub other_model: Option<String>,
    pub stream: bool,
    pub input_estimate: u64,
    pub output_reservation: u64,
    pub bad: Option<BadBody>,
    /// Why a refused body is refused (names the key or the encoding), for the 400.
    pub problem: Option<JsonBodyError>,
    /// Stored context the request names (OpenAI Responses `previous_response_id`, `conversation`): see
    /// [`crate::context_memory`].
    pub contexts: Vec<ContextRef>,
}

/// Size-based estimate for bodies that cannot be read: a token per 4 bytes.
pub fn size_estimate(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

/// The boundary of a `multipart/form-data` content type (`multipart/form-data; boundary=X`, quoted or
/// not); `None` for any other type.
pub fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    if !params.next()?.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .filter(|b| !b.is_empty() && b.len() <= 70)
}

/// What a `multipart/form-data` body says (OpenAI's audio transcriptions and translations, image edits,
/// file uploads): its `model` field and the estimate of its `prompt` field. File parts are audio, images
/// or documents, not text: estimated by their bytes they would cost a token per 4 bytes of an mp3 (a
/// 30-second clip of 500 KB, 125,000 tokens, was refused as larger than a budget or drained it, since a
/// transcription answer reports no tokens to settle with); they are charged what the answer reports
/// (`gpt-4o-transcribe`, `gpt-image-1` report tokens) or the estimate of its text. `body` may be a prefix
/// of the form (over `max_body_bytes`): the parts complete in it are read. `None` when `body` does not
/// start as a form with this boundary.
pub fn read_multipart(body: &[u8], boundary: &str) -> Option<(Option<String>, u64)> {
    let delimiter = format!("--{boundary}");
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let mut rest = body.strip_prefix(delimiter.as_bytes())?;
    let next_delimiter = format!("\r\n{delimiter}");
    let (mut model, mut prompt) = (None, TokenEstimatorLite::default());
    // After a delimiter: CRLF starts a part (`--` ends the form).
    while let Some(part_start) = rest.strip_prefix(b"\r\n") {
        let Some(end) = find(part_start, next_delimiter.as_bytes()) else { break };
        let part = part_start.get(..end).unwrap_or_default();
        rest = part_start.get(end + next_delimiter.len()..).unwrap_or_default();
        let Some(head_end) = find(part, b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(part.get(..head_end).unwrap_or_default()).to_ascii_lowercase();
        let content = part.get(head_end + 4..).unwrap_or_default();
        let Some(disposition) = head.lines().find(|l| l.starts_with("content-disposition:")) else { continue };
        if disposition.contains("filename=") || disposition.contains("filename*=") {
            continue;
        }
        let name = disposition.split(';').filter_map(|p| p.trim().strip_prefix("name=")).next();
        match name.map(|n| n.trim_matches('"')) {
            Some("model") => model = std::str::from_utf8(content).ok().map(|m| m.trim().to_string()),
            Some("prompt") => prompt.add(&String::from_utf8_lossy(content)),
            _ => {}
        }
    }
    Some((model.filter(|m| !m.is_empty()), prompt.tokens()))
}

/// [`meshwarden_shared::llm::TokenEstimator`] plus the framing tokens of each text, as for a JSON prompt.
#[derive(Default)]
struct TokenEstimatorLite {
    est: meshwarden_shared::llm::TokenEstimator,
    texts: u64,
}

impl TokenEstimatorLite {
    fn add(&mut self, text: &str) {
        self.est.add(text);
        self.texts += 1;
    }
    fn tokens(&self) -> u64 {
        self.est.tokens() + 4 * self.texts
    }
}

/// [`Parsed`] for a `multipart/form-data` body read by [`read_multipart`]: the form's model (not
/// rewritable, so no fallback: `model_from_path`), its prompt estimate, the default output reservation.
pub fn parsed_multipart(cfg: &Config, path: &str, model: Option<String>, estimate: u64, too_large: bool) -> Parsed {
    let path_model = model_from_path(path);
    Parsed {
        api: Api::from_path(path),
        json: None,
        bad: if too_large {
            Some(BadBody::TooLarge)
        } else if model.is_none() && path_model.is_none() {
            Some(BadBody::NoModel)
        } else {
            None
        },
        model: path_model.or(model),
        model_from_path: true,
        other_model: None,
        stream: false,
        input_estimate: estimate,
        output_reservation: cfg.default_output_reservation,
        problem: None,
        contexts: Vec::new(),
    }
}

pub fn parse_request(cfg: &Config, path: &str, body: &[u8], encoded: bool) -> Parsed {
    let fallback = |bad| Parsed {
        api: Api::from_path(path),
        json: None,
        model: model_from_path(path),
        model_from_path: true,
        other_model: None,
        stream: false,
        input_estimate: size_estimate(body.len()),
        output_reservation: cfg.default_output_reservation,
        bad: Some(bad),
        problem: None,
        contexts: Vec::new(),
    };
    if encoded {
        return fallback(BadBody::Encoded);
    }
    if body.len() as u64 > cfg.max_body_bytes {
        return fallback(BadBody::TooLarge);
    }
    let json = match parse_strict(body) {
        Ok(json) => json,
        Err(JsonBodyError::Syntax(_)) => return fallback(BadBody::NotJson),
        Err(e @ JsonBodyError::DuplicateKey(_)) => {
            return Parsed { problem: Some(e), ..fallback(BadBody::DuplicateKey) }
        }
        Err(e @ JsonBodyError::NotUtf8(_)) => return Parsed { problem: Some(e), ..fallback(BadBody::NotUtf8) },
    };
    if !json.is_object() {
        return fallback(BadBody::NotJson);
    }
    if let Some(key) = ambiguous_request_key(&json) {
        let why = format!(
            "duplicate key {key:?} (another key differs from it only in letter case; Go's encoding/json reads both as one)"
        );
        return Parsed { problem: Some(JsonBodyError::DuplicateKey(why)), ..fallback(BadBody::DuplicateKey) };
    }
    let api = Api::detect(path, &json);
    let info = request_info(&json);
    let path_model = model_from_path(path);
    let spans = extract_request_texts(api, &json);
    let media = estimate_media(api, path_model.as_deref().or(info.model.as_deref()), &json, &cfg.media_prices()).tokens;
    // Per answer, times the answers asked for (`n`, `best_of`): each may use the whole cap.
    let output_reservation = info
        .max_output_tokens
        .map_or(cfg.default_output_reservation, |m| m.min(cfg.max_output_reservation))
        .saturating_mul(info.choices);
    let other_model = match (&path_model, &info.model) {
        (Some(p), Some(b)) if p != b => Some(b.clone()),
        _ => None,
    };
    Parsed {
        api,
        // A model read from a key in another case (`"Model"`, read by Go upstreams) is not rewritten either:
        // a new `model` key beside it would leave two copies.
        model_from_path: path_model.is_some() || (info.model.is_some() && json.get("model").is_none()),
        bad: if info.model.is_none() && path_model.is_none() { Some(BadBody::NoModel) } else { None },
        model: path_model.or(info.model),
        other_model,
        stream: info.stream,
        input_estimate: prompt_estimate(cfg, &json, &spans, body.len(), media),
        output_reservation,
        contexts: if matches!(api, Api::OpenAiResponses | Api::Unknown) { referenced(&json) } else { Vec::new() },
        json: Some(json),
        problem: None,
    }
}

/// The prompt estimate: the text the model reads, plus prompts given as token ids (`"prompt": [1, 2]`,
/// `"input": [[1, 2], [3]]`, counted one token per id). A body whose prompt this filter does not know how
/// to read (Gemini's `contents`, a custom shape) is estimated by its size, never as free. `media`: the
/// images and files ([`estimate_media`]), priced the way the provider bills them.
/// Inline images of a Gemini body read by its size are priced as images, their base64 left out of the size.
fn prompt_estimate(
    cfg: &Config,
    json: &Value,
    spans: &[meshwarden_shared::llm::TextSpan],
    body_len: usize,
    media: u64,
) -> u64 {
    let ids: u64 = ["prompt", "input"].iter().filter_map(|k| json.get(k)).map(token_ids).sum();
    let (documents, document_chars) = encoded_text_tokens(json);
    if spans.is_empty() && ids == 0 && media == 0 {
        // Images and text files by their own rules, the rest of the body by its size.
        let (image_bytes, images) = gemini_inline_images(json, &cfg.media_prices());
        let rest = (body_len as u64).saturating_sub(image_bytes).saturating_sub(document_chars);
        return rest.div_ceil(4).saturating_add(images.tokens).saturating_add(documents);
    }
    estimate_request_tokens(spans).saturating_add(ids).saturating_add(documents).saturating_add(media)
}

/// Text files sent base64-encoded (Bedrock Converse text documents, Gemini `inline_data` with a text type,
/// Anthropic base64 documents with a text media type, `data:text/...` file parts; see
/// `meshwarden_shared::attachments`): the model reads the decoded text, estimated like any text. Returns
/// (tokens, the base64 characters they take in the body). Binary formats are priced by [`estimate_media`].
fn encoded_text_tokens(json: &Value) -> (u64, u64) {
    let mut est = meshwarden_shared::llm::TokenEstimator::default();
    let mut b64_chars = 0u64;
    for e in extract_encoded_texts(json) {
        est.add(&e.text);
        b64_chars = b64_chars.saturating_add((e.text.len() as u64).div_ceil(3).saturating_mul(4));
    }
    (est.tokens(), b64_chars)
}

/// Token ids in a prompt: an array of integers, or an array of such arrays (a batch).
fn token_ids(v: &Value) -> u64 {
    match v {
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => items.len() as u64,
        Value::Array(items) => items.iter().filter(|i| i.is_array()).map(token_ids).sum(),
        _ => 0,
    }
}

/// Whether [`rewrite_body`] adds usage reporting the client did not ask for (`stream_options.include_usage`
/// absent or false in an OpenAI stream): the usage chunk that comes back is then not the client's to see.
/// Call before `rewrite_body`, which takes the parsed JSON.
pub fn adds_stream_usage(parsed: &Parsed) -> bool {
    parsed.json.as_ref().is_some_and(|json| stream_usage_change(parsed.api, json).is_some())
}

/// The body to send upstream, if it must change: `include_usage` added to OpenAI streams, and `model`
/// replaced after a fallback. `body` is the client's body (the one `parsed` was read from): the changes are
/// spliced into its bytes, so everything else (key order, numbers, whitespace) reaches the model as sent;
/// where they cannot be (a `model` that is not a top-level string), the parsed JSON is changed and
/// serialised. Takes the parsed JSON out of `parsed` (the body is rewritten at most once, when the request
/// is let through).
pub fn rewrite_body(parsed: &mut Parsed, body: &[u8], new_model: Option<&str>) -> Option<Vec<u8>> {
    let mut json = parsed.json.take()?;
    let usage = stream_usage_change(parsed.api, &json);
    let model = new_model.filter(|m| parsed.model.as_deref() != Some(*m));
    if usage.is_none() && model.is_none() {
        return None;
    }
    let mut edits = Vec::with_capacity(2);
    edits.extend(usage.map(|c| c.edit()));
    edits.extend(model.map(|m| ("/model", Edit::String(m))));
    if let Some(out) = splice(body, &edits) {
        return Some(out);
    }
    ensure_stream_usage(parsed.api, &mut json);
    if let (Some(m), Some(obj)) = (model, json.as_object_mut()) {
        obj.insert("model".to_string(), Value::String(m.to_string()));
    }
    serde_json::to_vec(&json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_forms_are_estimated_by_their_text_not_their_files() {
        assert_eq!(multipart_boundary("multipart/form-data; boundary=\"----abc123\"").as_deref(), Some("----abc123"));
        assert_eq!(multipart_boundary("Multipart/Form-Data;boundary=x").as_deref(), Some("x"));
        assert_eq!(multipart_boundary("application/json"), None);
        assert_eq!(multipart_boundary("multipart/form-data"), None);
        let audio = vec![0xffu8; 40_000];
        let mut form = Vec::new();
        form.extend_from_slice(b"--b1\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n");
        form.extend_from_slice(b"--b1\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n12345678\r\n");
        form.extend_from_slice(
            b"--b1\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\nContent-Type: audio/mpeg\r\n\r\n",
        );
        form.extend_from_slice(&audio);
        form.extend_from_slice(b"\r\n--b1--\r\n");
        assert_eq!(read_multipart(&form, "b1"), Some((Some("whisper-1".to_string()), 2 + 4)));
        // A prefix (the body over max_body_bytes): the complete parts are read.
        assert_eq!(read_multipart(&form[..form.len() / 2], "b1"), Some((Some("whisper-1".to_string()), 6)));
        // File first, cut inside it: nothing to read, nothing estimated.
        let mut file_first =
            b"--b1\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n\r\n".to_vec();
        file_first.extend_from_slice(&audio[..1000]);
        assert_eq!(read_multipart(&file_first, "b1"), Some((None, 0)));
        assert_eq!(read_multipart(b"not a form at all", "b1"), None);
        assert_eq!(read_multipart(&form, "other"), None);
        let p = parsed_multipart(&Config::default(), "/v1/audio/transcriptions", Some("whisper-1".into()), 6, false);
        assert_eq!(
            (p.model.as_deref(), p.model_from_path, p.bad, p.input_estimate),
            (Some("whisper-1"), true, None, 6)
        );
    }

    #[test]
    fn prompts_the_filter_cannot_read_are_not_free() {
        let cfg = Config::default();
        let ids = parse_request(&cfg, "/v1/completions", br#"{"model":"m","prompt":[1,2,3,4,5,6,7,8,9,10]}"#, false);
        assert_eq!(ids.input_estimate, 10);
        let batch = parse_request(&cfg, "/v1/embeddings", br#"{"model":"m","input":[[1,2,3],[4,5]]}"#, false);
        assert_eq!(batch.input_estimate, 5);
        let gemini =
            br#"{"contents":[{"role":"user","parts":[{"text":"a long prompt in Gemini's own request shape"}]}]}"#;
        let g = parse_request(&cfg, "/v1beta/models/gemini-2.0-flash:generateContent", gemini, false);
        assert_eq!(g.input_estimate, size_estimate(gemini.len()));
        let text = parse_request(&cfg, "/v1/completions", br#"{"model":"m","prompt":"12345678"}"#, false);
        assert_eq!(text.input_estimate, 6);
    }

    /// A Bedrock Converse `document` block with a plain-text source (`source.text`, or `source.content`
    /// blocks, the form Converse citations use) is text the model reads: a 40,000-character document
    /// beside a two-word question was admitted on the question's estimate (~6 tokens).
    #[test]
    fn bedrock_text_documents_are_estimated() {
        let cfg = Config::default();
        let doc = "word ".repeat(8_000);
        for source in [serde_json::json!({"text": doc}), serde_json::json!({"content": [{"text": doc}]})] {
            let body = serde_json::json!({"messages": [{"role": "user", "content": [
                {"document": {"format": "txt", "name": "report", "source": source}},
                {"text": "Summarise it"}]}]});
            let bytes = serde_json::to_vec(&body).unwrap();
            let p = parse_request(&cfg, "/model/anthropic.claude-3-5-sonnet/converse", &bytes, false);
            assert!(p.input_estimate >= 10_000, "{} for a 40,000-character document", p.input_estimate);
        }
    }

    /// A Bedrock Converse `document` in a text format (txt, md, csv, html) sent as base64 `bytes` (the form
    /// the AWS SDKs send a file in) is text the model reads: a 30,000-byte text file beside a two-word
    /// question was admitted on the question's estimate. Binary formats (pdf, docx, xlsx) are not read.
    #[test]
    fn bedrock_base64_text_documents_are_estimated() {
        let cfg = Config::default();
        // 30,000 bytes of text are 40,000 base64 characters.
        let b64 = "d29y".repeat(10_000);
        let body = |format: &str| {
            let body = serde_json::json!({"messages": [{"role": "user", "content": [
                {"document": {"format": format, "name": "report", "source": {"bytes": b64}}},
                {"text": "Summarise it"}]}]});
            let bytes = serde_json::to_vec(&body).unwrap();
            parse_request(&cfg, "/model/anthropic.claude-3-5-sonnet/converse", &bytes, false).input_estimate
        };
        assert_eq!(body("txt"), 7 + 7_500, "the question and a token per 4 bytes of the file");
        assert_eq!(body("MD"), 7 + 7_500);
        assert_eq!(body("pdf"), 7 + 3_000, "a binary format is not text: a file whose pages cannot be counted");
    }

    /// Text files in base64 are estimated as the text the model reads, wherever the API puts them: before
    /// 2026-12-07 an OpenAI `data:text/csv` file part of 120,000 characters was priced as an unknown file
    /// (3,000 tokens, a tenth of it), and a Gemini CSV at a token per 4 base64 characters (a third more).
    #[test]
    fn base64_text_files_are_estimated_as_their_text() {
        let cfg = Config::default();
        let csv = "name,email\n".repeat(10_000); // 110,000 ASCII characters: 27,500 tokens
        let b64 = meshwarden_shared::encoding::base64_encode(csv.as_bytes());
        let est = |path: &str, body: serde_json::Value| {
            parse_request(&cfg, path, &serde_json::to_vec(&body).unwrap(), false).input_estimate
        };
        let chat = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Summarise it"},
            {"type": "file", "file": {"filename": "a.csv", "file_data": format!("data:text/csv;base64,{b64}")}}]}]});
        assert_eq!(est("/v1/chat/completions", chat), 7 + 27_500, "the question and the file's text");
        let anthropic = serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": [{"role": "user",
            "content": [{"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": b64}},
                {"type": "text", "text": "Summarise it"}]}]});
        assert_eq!(est("/v1/messages", anthropic), 7 + 27_500);
        let gemini = serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "Summarise it"},
            {"inline_data": {"mime_type": "text/csv", "data": b64}}]}]});
        let g = est("/v1beta/models/gemini-2.5-flash:generateContent", gemini);
        assert!((27_500..27_600).contains(&g), "the file's text and the rest of the body by size: {g}");
        // A PDF in a data: URL is still a file priced by its pages (none found here: the default).
        let pdf = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}}]}]});
        assert_eq!(est("/v1/chat/completions", pdf), 3_000);
    }

    /// Images and files count at admission the way the providers bill them; before, they counted nothing
    /// and a request with 20 high-detail images passed a nearly empty budget.
    #[test]
    fn images_and_files_are_estimated_at_admission() {
        // A 1024 x 1024 PNG header (the rest of the image is never read).
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&1024u32.to_be_bytes());
        png.extend_from_slice(&1024u32.to_be_bytes());
        png.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0, 0]);
        let url = format!("data:image/png;base64,{}", meshwarden_shared::encoding::base64_encode(&png));
        let body = |model: &str, images: usize, detail: &str| {
            let mut content = vec![serde_json::json!({"type": "text", "text": "12345678"})];
            content.extend(
                (0..images)
                    .map(|_| serde_json::json!({"type": "image_url", "image_url": {"url": url, "detail": detail}})),
            );
            let v = serde_json::json!({"model": model, "messages": [{"role": "user", "content": content}]});
            serde_json::to_vec(&v).unwrap()
        };
        let cfg = Config::default();
        let est = |b: &[u8]| parse_request(&cfg, "/v1/chat/completions", b, false).input_estimate;
        let text = est(&body("gpt-4o", 0, "high"));
        assert_eq!(est(&body("gpt-4o", 20, "high")), text + 20 * 765);
        assert_eq!(est(&body("gpt-4o", 20, "low")), text + 20 * 85);
        assert_eq!(est(&body("gpt-4o-mini", 1, "auto")), text + 2833 + 4 * 5667);
        // An image-only message is priced as images, not by the size of its base64.
        let only = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]});
        let cfg2 = Config { image_default_tokens: 999, ..Config::default() };
        let p = parse_request(&cfg2, "/v1/chat/completions", &serde_json::to_vec(&only).unwrap(), false);
        assert_eq!(p.input_estimate, 999);
    }

    /// Azure OpenAI serves the deployment the path names and ignores the body's `model` (Bedrock and
    /// Gemini also take the model from the path): a body naming a cheaper model must not move the request
    /// out of the served model's budget.
    #[test]
    fn a_model_the_path_names_is_the_one_served() {
        let cfg = Config::default();
        let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
        let azure = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
        let p = parse_request(&cfg, azure, body, false);
        assert_eq!(p.model.as_deref(), Some("gpt-4o"), "the deployment is what Azure serves");
        assert!(p.model_from_path, "no fallback: rewriting the body's model would not change what is served");
        let bedrock = parse_request(&cfg, "/model/anthropic.claude-3-opus/invoke", br#"{"model":"cheap"}"#, false);
        assert_eq!(bedrock.model.as_deref(), Some("anthropic.claude-3-opus"));
        let plain = parse_request(&cfg, "/v1/chat/completions", body, false);
        assert_eq!((plain.model.as_deref(), plain.model_from_path), (Some("gpt-4o-mini"), false));
    }

    /// Go upstreams read `"Model"` as `model`: its rules apply, and no fallback rewrites it (a new `model`
    /// beside it would be a second copy).
    #[test]
    fn a_model_key_in_another_case_is_read_and_not_rewritten() {
        let cfg = Config::default();
        let p = parse_request(&cfg, "/v1/chat/completions", br#"{"Model":"gpt-4o","MAX_TOKENS":900}"#, false);
        assert_eq!((p.model.as_deref(), p.model_from_path, p.bad), (Some("gpt-4o"), true, None));
        assert_eq!(p.output_reservation, 900);
        let both = parse_request(&cfg, "/v1/chat/completions", br#"{"model":"a","MODEL":"b"}"#, false);
        assert_eq!(both.bad, Some(BadBody::DuplicateKey));
    }

    #[test]
    fn parse_and_rewrite() {
        let cfg = Config::default();
        let body =
            br#"{"model":"gpt-4o","stream":true,"max_tokens":50000,"messages":[{"role":"user","content":"12345678"}]}"#;
        let mut p = parse_request(&cfg, "/v1/chat/completions", body, false);
        assert_eq!(p.model.as_deref(), Some("gpt-4o"));
        assert_eq!((p.input_estimate, p.output_reservation), (6, 4096));
        let out = rewrite_body(&mut p, body, Some("mini")).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"stream_options":{"include_usage":true},"model":"mini","stream":true,"max_tokens":50000,"messages":[{"role":"user","content":"12345678"}]}"#,
            "the client's bytes but for the two changes"
        );
        // Changes that cannot be located in the bytes given: the parsed JSON is changed instead.
        let odd = br#"{"model":"gpt-4o","stream":true,"messages":[],"model_note":1}"#;
        let mut p = parse_request(&cfg, "/v1/chat/completions", odd, false);
        let out: Value = serde_json::from_slice(&rewrite_body(&mut p, b"{}", Some("mini")).unwrap()).unwrap();
        assert_eq!(
            (out["model"].as_str(), out["stream_options"]["include_usage"].as_bool()),
            (Some("mini"), Some(true))
        );
        let several = parse_request(
            &cfg,
            "/v1/chat/completions",
            br#"{"model":"m","n":3,"max_tokens":100,"messages":[]}"#,
            false,
        );
        assert_eq!(several.output_reservation, 300, "n answers may each use max_tokens");
        let mut plain = parse_request(&cfg, "/v1/chat/completions", br#"{"model":"m","messages":[]}"#, false);
        assert_eq!(plain.output_reservation, 256);
        assert!(rewrite_body(&mut plain, br#"{"model":"m","messages":[]}"#, Some("m")).is_none());
        assert_eq!(parse_request(&cfg, "/x", b"hello world!", false).bad, Some(BadBody::NotJson));
        assert_eq!(parse_request(&cfg, "/x", b"hello world!", false).input_estimate, 3);
        assert_eq!(parse_request(&cfg, "/x", b"{}", true).bad, Some(BadBody::Encoded));
        assert_eq!(parse_request(&cfg, "/x", br#"{"messages":[]}"#, false).bad, Some(BadBody::NoModel));
        assert_eq!(parse_request(&cfg, "/x", b"[1]", false).bad, Some(BadBody::NotJson));
        let twice =
            parse_request(&cfg, "/v1/chat/completions", br#"{"model":"mini","model":"gpt-4o","messages":[]}"#, false);
        assert_eq!((twice.bad, twice.model, twice.json), (Some(BadBody::DuplicateKey), None, None));
        assert!(twice.problem.unwrap().to_string().contains("duplicate key \"model\""));
        let utf16: Vec<u8> = r#"{"model":"gpt-4o","messages":[]}"#.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let p = parse_request(&cfg, "/v1/chat/completions", &utf16, false);
        assert_eq!((p.bad, p.problem), (Some(BadBody::NotUtf8), Some(JsonBodyError::NotUtf8("UTF-16LE"))));
        assert!(BadBody::NotUtf8.refused() && BadBody::DuplicateKey.refused() && !BadBody::NotJson.refused());
    }
}
