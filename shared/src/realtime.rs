//! OpenAI's Realtime API over WebSocket (`/v1/realtime?model=...`; Azure OpenAI's
//! `/openai/realtime?deployment=...`; the same events from OpenAI-compatible servers): the session's
//! model, the usage each response reports, and the `error` event a gateway sends.
//!
//! A session is a sequence of responses. Each one ends with a server event `response.done` whose
//! `response.usage` gives its `input_tokens` (the whole conversation the model read for it, cached part
//! in `input_token_details.cached_tokens`) and `output_tokens` (text and audio): what the response is
//! billed. `response.created` opens a response. The client's events carry the texts the model reads
//! (instructions, conversation items): [`client_texts`].

use crate::llm::Role;
use serde_json::Value;

/// Whether a WebSocket upgrade's path is a Realtime API endpoint (`/v1/realtime`, Azure's
/// `/openai/realtime`, any path ending in `/realtime`), the only sessions whose events are read.
pub fn is_realtime_path(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or_default().trim_end_matches('/');
    path.rsplit('/').next().is_some_and(|last| last.eq_ignore_ascii_case("realtime"))
}

/// The model a Realtime session asks for: the `model` query parameter (OpenAI), or `deployment`
/// (Azure OpenAI), percent-decoded.
pub fn model_from_path(path: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or_default();
    let mut deployment = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = String::from_utf8(crate::mcp::percent_decode(v.replace('+', " ").as_bytes())).ok();
        match k {
            "model" => return v.filter(|m| !m.is_empty()),
            "deployment" => deployment = v.filter(|m| !m.is_empty()),
            _ => {}
        }
    }
    deployment
}

/// What one response was billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RealtimeUsage {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

/// A server event, as far as metering cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// `response.created`: a response is being generated.
    ResponseCreated,
    /// `response.done`, with its usage when the event carries one.
    ResponseDone(Option<RealtimeUsage>),
    /// Any other event (deltas, transcripts, session updates, errors).
    Other,
}

/// Read one server message. Most messages are audio or text deltas: they are told apart by a substring
/// search before any JSON is parsed.
pub fn server_event(msg: &[u8]) -> ServerEvent {
    let done = memchr::memmem::find(msg, b"response.done").is_some();
    let created = !done && memchr::memmem::find(msg, b"response.created").is_some();
    if !done && !created {
        return ServerEvent::Other;
    }
    let Ok(v) = serde_json::from_slice::<Value>(msg) else {
        return ServerEvent::Other;
    };
    match v.get("type").and_then(Value::as_str) {
        Some("response.created") => ServerEvent::ResponseCreated,
        Some("response.done") => ServerEvent::ResponseDone(usage(v.pointer("/response/usage"))),
        _ => ServerEvent::Other,
    }
}

fn usage(u: Option<&Value>) -> Option<RealtimeUsage> {
    let u = u?;
    let n = |p: &str| u.pointer(p).and_then(Value::as_u64);
    let input = n("/input_tokens");
    let output = n("/output_tokens");
    if input.is_none() && output.is_none() {
        return None;
    }
    Some(RealtimeUsage {
        input: input.unwrap_or(0),
        cached_input: n("/input_token_details/cached_tokens").unwrap_or(0),
        output: output.unwrap_or(0),
    })
}

/// A text a client event gives the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientText {
    pub role: Role,
    pub text: String,
}

/// Whether a client message is audio (`input_audio_buffer.append`), told from its opening without
/// parsing its (large, base64) body.
pub fn is_audio_append(msg: &[u8]) -> bool {
    let head = msg.get(..msg.len().min(96)).unwrap_or_default();
    memchr::memmem::find(head, b"input_audio_buffer.append").is_some()
}

/// Where the texts a client event gives the model are, with their roles: `session.update`'s
/// `session.instructions` (system), `conversation.item.create`'s item, `response.create`'s
/// `response.instructions` (system) and its `response.input` items. An item is a `message` (its
/// `input_text` / `text` / `output_text` parts and the `transcript` of audio parts, in the item's role)
/// or a `function_call_output` (its `output`, a tool text). Only string values are named.
pub fn client_text_pointers(v: &Value) -> Vec<(Role, String)> {
    let mut out = Vec::new();
    let mut push = |role: Role, pointer: String| {
        if crate::json::pointer(v, &pointer).is_some_and(Value::is_string) {
            out.push((role, pointer));
        }
    };
    let mut items: Vec<(String, &Value)> = Vec::new();
    match v.get("type").and_then(Value::as_str) {
        Some("session.update") => push(Role::System, "/session/instructions".to_string()),
        Some("conversation.item.create") => items.extend(v.get("item").map(|i| ("/item".to_string(), i))),
        Some("response.create") => {
            push(Role::System, "/response/instructions".to_string());
            if let Some(input) = crate::json::pointer(v, "/response/input").and_then(Value::as_array) {
                items.extend(input.iter().enumerate().map(|(k, i)| (format!("/response/input/{k}"), i)));
            }
        }
        _ => {}
    }
    for (at, item) in items {
        match item.get("type").and_then(Value::as_str) {
            Some("function_call_output") => push(Role::Tool, format!("{at}/output")),
            // `message`, or an item without a type (the API's default is a message).
            Some("message") | None => {
                let role = Role::parse(item.get("role").and_then(Value::as_str).unwrap_or("user"));
                let n = item.get("content").and_then(Value::as_array).map_or(0, Vec::len);
                for k in 0..n {
                    push(role, format!("{at}/content/{k}/text"));
                    push(role, format!("{at}/content/{k}/transcript"));
                }
            }
            _ => {}
        }
    }
    out
}

/// The texts of [`client_text_pointers`] (empty ones left out); `None` for a message that is not a
/// JSON object (the API refuses it).
pub fn client_texts(msg: &[u8]) -> Option<Vec<ClientText>> {
    let v: Value = serde_json::from_slice(msg).ok()?;
    v.as_object()?;
    Some(
        client_text_pointers(&v)
            .into_iter()
            .filter_map(|(role, p)| {
                let text = crate::json::pointer(&v, &p).and_then(Value::as_str).filter(|t| !t.is_empty())?;
                Some(ClientText { role, text: text.to_string() })
            })
            .collect(),
    )
}

/// A server `error` event, as the Realtime API sends one (`type`, `code`, `message`; `param` and
/// `event_id` null), so SDKs surface it as they surface the API's own errors.
pub fn error_event(error_type: &str, code: &str, message: &str) -> Vec<u8> {
    let v = serde_json::json!({
        "type": "error",
        "event_id": "event_meshwarden",
        "error": {"type": error_type, "code": code, "message": message, "param": null, "event_id": null},
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn realtime_paths_are_recognised() {
        assert!(is_realtime_path("/v1/realtime?model=gpt-realtime"));
        assert!(is_realtime_path("/openai/realtime?deployment=x"));
        assert!(is_realtime_path("/v1/Realtime/"));
        assert!(!is_realtime_path("/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"));
        assert!(!is_realtime_path("/v1/realtime/calls"));
        assert!(!is_realtime_path("/notrealtime"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn the_model_comes_from_the_query() {
        assert_eq!(model_from_path("/v1/realtime?model=gpt-realtime").as_deref(), Some("gpt-realtime"));
        assert_eq!(
            model_from_path("/v1/realtime?x=1&model=gpt%2Drealtime%20mini").as_deref(),
            Some("gpt-realtime mini")
        );
        assert_eq!(
            model_from_path("/openai/realtime?api-version=2025-04-01-preview&deployment=my-rt").as_deref(),
            Some("my-rt")
        );
        assert_eq!(model_from_path("/v1/realtime?deployment=a&model=b").as_deref(), Some("b"));
        assert_eq!(model_from_path("/v1/realtime"), None);
        assert_eq!(model_from_path("/v1/realtime?model="), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn usage_is_read_from_response_done() {
        let done = br#"{"event_id":"e1","type":"response.done","response":{"status":"completed","usage":
            {"total_tokens":450,"input_tokens":150,"output_tokens":300,"input_token_details":{"cached_tokens":64}}}}"#;
        assert_eq!(
            server_event(done),
            ServerEvent::ResponseDone(Some(RealtimeUsage { input: 150, cached_input: 64, output: 300 }))
        );
        let no_usage = br#"{"type":"response.done","response":{"status":"failed","usage":null}}"#;
        assert_eq!(server_event(no_usage), ServerEvent::ResponseDone(None));
        assert_eq!(server_event(br#"{"type":"response.created","response":{}}"#), ServerEvent::ResponseCreated);
        // Named in a delta's text, not the event's type.
        assert_eq!(
            server_event(br#"{"type":"response.output_text.delta","delta":"response.done"}"#),
            ServerEvent::Other
        );
        assert_eq!(server_event(br#"{"type":"response.output_audio.delta","delta":"AAAA"}"#), ServerEvent::Other);
        assert_eq!(server_event(b"response.done {not json"), ServerEvent::Other);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn client_texts_are_what_the_model_reads() {
        let t = |m: &str| client_texts(m.as_bytes()).unwrap();
        assert_eq!(
            t(r#"{"type":"session.update","session":{"type":"realtime","instructions":"Be brief."}}"#),
            vec![ClientText { role: Role::System, text: "Be brief.".into() }]
        );
        let item = r#"{"type":"conversation.item.create","item":{"type":"message","role":"user","content":
            [{"type":"input_text","text":"hello"},{"type":"input_audio","audio":"AAAA","transcript":"spoken"}]}}"#;
        assert_eq!(
            t(item),
            vec![
                ClientText { role: Role::User, text: "hello".into() },
                ClientText { role: Role::User, text: "spoken".into() }
            ]
        );
        let tool =
            r#"{"type":"conversation.item.create","item":{"type":"function_call_output","call_id":"c","output":"42"}}"#;
        assert_eq!(t(tool), vec![ClientText { role: Role::Tool, text: "42".into() }]);
        let resp = r#"{"type":"response.create","response":{"instructions":"sys","input":[{"role":"user","content":[{"type":"input_text","text":"in"}]}]}}"#;
        assert_eq!(
            t(resp),
            vec![
                ClientText { role: Role::System, text: "sys".into() },
                ClientText { role: Role::User, text: "in".into() }
            ]
        );
        assert_eq!(t(r#"{"type":"input_audio_buffer.commit"}"#), vec![]);
        assert_eq!(client_texts(b"not json"), None);
        assert!(is_audio_append(br#"{"type":"input_audio_buffer.append","audio":"AAAA"}"#));
        assert!(!is_audio_append(br#"{"type":"conversation.item.create"}"#));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn error_events_are_shaped_like_the_apis() {
        let v: Value =
            serde_json::from_slice(&error_event("rate_limit_error", "rate_limit_exceeded", "spent")).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["message"], "spent");
    }
}
