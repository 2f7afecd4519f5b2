//! An OpenAI- and Anthropic-compatible mock LLM upstream, served over real HTTP.
//!
//! Endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/embeddings`,
//! `/v1/messages` (Anthropic), JSON or SSE (`"stream": true`), with realistic `usage`. Any other POST path
//! is answered by its body's shape. Per-request behaviour is set with headers, so one mock serves every
//! test:
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-prompt-tokens: N` | reported input tokens (default: the shared estimator over the prompt) |
//! | `x-mock-completion-tokens: N` | output tokens: the answer is N words, one per stream chunk |
//! | `x-mock-answer: text` | the answer text (its word count is the output tokens unless set above) |
//! | `x-mock-echo: 1` | echo mode: the answer is the prompt's texts joined with `\n` |
//! | `x-mock-latency-ms: N` | wait before answering |
//! | `x-mock-chunk-delay-ms: N` | wait between stream chunks |
//! | `x-mock-status: N` | answer with this HTTP status and a provider-shaped error body |
//! | `x-mock-no-usage: 1` | leave `usage` out (JSON and streams) |
//! | `x-mock-cached-tokens: N` | N of the input tokens served from the prompt cache: OpenAI `prompt_tokens_details.cached_tokens` / Responses `input_tokens_details.cached_tokens` (input still counts them), Anthropic `cache_read_input_tokens` (`input_tokens` then the other N fewer) |
//! | `x-mock-abort-after-chunks: N` | stream N chunks, then reset the connection |
//! | `x-mock-abort-after-bytes: N` | JSON answers: announce the whole `content-length`, send N bytes, then reset |
//! | `x-mock-stream: 1` | answer as a stream even when the body does not say `"stream": true` (any JSON body) |
//! | `x-mock-sse-garbage: 1` | streams: after the first event, insert lines no parser should choke on (a line without a colon, a `data:` line that is not JSON, a comment, an unknown field, invalid UTF-8, blank lines) |
//! | `x-mock-response-id: id` | Responses: the response's `id` (JSON, `response.created`, `response.completed`; default `resp_mock`); Gemini `POST .../cachedContents`: the cache is `cachedContents/<id>` |
//! | (path `.../cachedContents`) | Gemini context caching: `{"name": "cachedContents/<id>", "usageMetadata": {"totalTokenCount": <prompt tokens>}}` |
//! | `x-mock-image-result-bytes: N` | Responses streams: `response.completed` also carries an `image_generation_call` item whose base64 `result` is N characters (before the usage, as OpenAI orders it) |
//! | `x-mock-sse-no-done: 1` | streams: leave out the terminator (`data: [DONE]`, Anthropic `message_stop`) |
//! | (path `/model/<id>/converse-stream`) | Bedrock ConverseStream: the AWS binary event stream (`application/vnd.amazon.eventstream`), usage in the last `metadata` event |
//! | (paths `/v2/models/{m}/generate`, `generate_stream`) | Triton's generate extension: `text_output`, no counts; the stream one event per token, no terminator |
//! | (paths `/generate`, `/generate_stream`) | Hugging Face TGI's native API (body with `inputs`; counts in `x-prompt-tokens` / `x-generated-tokens`, stream `details` with `parameters.details: true`) or SGLang's (body with `text`; `meta_info` counts) |
//! | (path `/v1/audio/speech`) | text to speech: `audio/mpeg` bytes, no usage; `x-mock-audio-bytes: N` sets the size (default 65536) |
//! | (`/v1/responses` with `"background": true`, not streamed) | the response `queued` at once, `usage: null`, as OpenAI answers a background request |
//! | (path `/v1/images/generations`) | image generation: JSON with one base64 image (`data[0].b64_json`, `x-mock-image-bytes: N` of it, default 1.5 MB) and no usage, as dall-e-3 answers; `x-mock-image-usage: 1` adds gpt-image-1's `usage` (`input_tokens` 12, `output_tokens` 4160); with `"stream": true`, gpt-image-1's stream: `partial_images` `image_generation.partial_image` events and `image_generation.completed` with the usage (4160 + 100 output tokens per partial image), each event carrying the image |
//! | (paths `/api/chat`, `/api/generate`) | Ollama's native API: NDJSON stream unless `"stream": false`, counts in the last line |
//! | `x-mock-gzip: 1` | JSON answers: gzip the body when the request's `accept-encoding` allows gzip, as OpenAI's API does; `always`: gzip whatever the request accepts |
//! | `x-mock-response-header: name: value` | add this header to the answer (repeatable), e.g. to forge a header only a filter may set |
//! | `x-mock-response-header-latin1: name` | add this header to the answer with a value that is not UTF-8 ([`LATIN1_CAFE`], `café` in Latin-1) |
//!
//! Every answer carries `x-mock-served-by: ip:port`, and `GET /metrics` serves the requests in flight in
//! vLLM's metric names, so several mocks can form a pool behind inference-router (`make run`).
//!
//! Every request received (method, path, headers, body) is recorded: `GET /mock/requests` returns them
//! as JSON, `DELETE /mock/requests` clears them, and tests read them directly with [`MockLlm::requests`].

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use meshwarden_shared::llm::{estimate_request_tokens, extract_request_texts, Api};
use serde::Serialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// One request as it reached the upstream, i.e. as it left the gateway.
#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }
}

#[derive(Debug, Clone, Default)]
pub struct MockOptions {
    /// Default latency before answering, for every request.
    pub latency_ms: u64,
    /// Keep at most this many recorded requests (0 = 10,000), so long runs stay bounded.
    pub max_recorded: usize,
}

#[derive(Clone)]
struct AppState {
    recorded: Arc<Mutex<Vec<Recorded>>>,
    options: MockOptions,
    /// Requests being answered now (streams until their last chunk): served on `/metrics` in vLLM's
    /// names, so the mock can stand in for a model server behind inference-router.
    in_flight: Arc<std::sync::atomic::AtomicU64>,
    /// `ip:port` this mock listens on, sent back as `x-mock-served-by`.
    served_by: String,
}

/// Decrements the in-flight count when the answer is complete.
struct InFlight(Arc<std::sync::atomic::AtomicU64>);

impl InFlight {
    fn start(counter: &Arc<std::sync::atomic::AtomicU64>) -> InFlight {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    let running = state.in_flight.load(std::sync::atomic::Ordering::Relaxed);
    let text = format!(
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"mock-model\"}} {running}\n\
         # TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"mock-model\"}} 0\n\
         # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{model_name=\"mock-model\"}} {}\n",
        (running as f64 / 64.0).min(1.0)
    );
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

/// A running mock; stops when dropped.
pub struct MockLlm {
    pub addr: SocketAddr,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl MockLlm {
    /// Start on `127.0.0.1:0` (a free port).
    pub async fn start() -> anyhow::Result<MockLlm> {
        Self::start_on("127.0.0.1:0".parse()?, MockOptions::default()).await
    }

    pub async fn start_on(addr: SocketAddr, options: MockOptions) -> anyhow::Result<MockLlm> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let state = AppState {
            recorded: recorded.clone(),
            options,
            in_flight: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            served_by: addr.to_string(),
        };
        let app = Router::new()
            .route("/mock/requests", any(recorded_handler))
            .route("/metrics", axum::routing::get(metrics_handler))
            .fallback(any(handle))
            .with_state(state);
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(MockLlm { addr, recorded, shutdown: Some(tx) })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.recorded.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn last_request(&self) -> Option<Recorded> {
        self.requests().pop()
    }

    pub fn clear(&self) {
        if let Ok(mut r) = self.recorded.lock() {
            r.clear();
        }
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn recorded_handler(State(state): State<AppState>, method: Method) -> Response {
    let Ok(mut rec) = state.recorded.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    if method == Method::DELETE {
        rec.clear();
        return StatusCode::NO_CONTENT.into_response();
    }
    axum::Json(rec.clone()).into_response()
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn header_flag(headers: &HeaderMap, name: &str) -> bool {
    headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

const WORDS: [&str; 12] =
    ["The", "mock", "model", "answers", "with", "plain", "words", "so", "tests", "can", "count", "tokens."];

struct Plan {
    api: Api,
    model: String,
    stream: bool,
    include_usage: bool,
    prompt_tokens: u64,
    /// Of the prompt tokens, how many the usage reports as read from the prompt cache.
    cached_tokens: u64,
    /// One entry per output token; each is one stream chunk.
    pieces: Vec<String>,
    usage: bool,
    chunk_delay: Duration,
    abort_after: Option<u64>,
    /// JSON answers: send this many bytes of the body, then reset.
    abort_after_bytes: Option<u64>,
    sse_garbage: bool,
    sse_no_done: bool,
    /// Responses streams: an `image_generation_call` output item with a base64 `result` of this many characters.
    image_result: Option<usize>,
    /// Responses: the response's `id` (default `resp_mock`).
    response_id: String,
    /// JSON answers: gzip the body.
    gzip: bool,
    /// Responses: `"background": true` in the request (streams say so in `response.created`).
    background: bool,
}

impl Plan {
    fn completion_tokens(&self) -> u64 {
        self.pieces.len() as u64
    }

    fn answer(&self) -> String {
        self.pieces.concat()
    }
}

fn split_pieces(text: &str) -> Vec<String> {
    // Keep the whitespace with the word before it, so concatenating the pieces gives the text back.
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut in_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            in_space = true;
            cur.push(c);
        } else {
            if in_space && !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            in_space = false;
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `café` in Latin-1: a header value that is not UTF-8 (RFC 9110 obs-text), as old clients and
/// upstreams send.
pub const LATIN1_CAFE: &[u8] = b"caf\xe9";

async fn handle(State(state): State<AppState>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let guard = InFlight::start(&state.in_flight);
    let served_by = state.served_by.clone();
    let extra: Vec<(String, String)> = headers
        .get_all("x-mock-response-header")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    // A response header whose value is not UTF-8 (obs-text, e.g. Latin-1), as old upstreams send.
    let latin1: Vec<String> = headers
        .get_all("x-mock-response-header-latin1")
        .iter()
        .filter_map(|v| v.to_str().ok().map(|s| s.trim().to_string()))
        .collect();
    let mut resp = answer(state, method, uri, headers, body, guard).await;
    for name in latin1 {
        if let (Ok(k), Ok(v)) =
            (axum::http::HeaderName::from_bytes(name.as_bytes()), axum::http::HeaderValue::from_bytes(LATIN1_CAFE))
        {
            resp.headers_mut().append(k, v);
        }
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(&served_by) {
        resp.headers_mut().insert("x-mock-served-by", v);
    }
    for (k, v) in extra {
        if let (Ok(k), Ok(v)) =
            (axum::http::HeaderName::from_bytes(k.as_bytes()), axum::http::HeaderValue::from_str(&v))
        {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

async fn answer(
    state: AppState,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    guard: InFlight,
) -> Response {
    let body_text = String::from_utf8_lossy(&body).to_string();
    if let Ok(mut rec) = state.recorded.lock() {
        let max = if state.options.max_recorded == 0 { 10_000 } else { state.options.max_recorded };
        if rec.len() >= max {
            rec.remove(0);
        }
        rec.push(Recorded {
            method: method.to_string(),
            path: uri.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).to_string()))
                .collect(),
            body: body_text.clone(),
        });
    }

    let latency = header_u64(&headers, "x-mock-latency-ms").unwrap_or(state.options.latency_ms);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }

    if method == Method::GET && uri.path() == "/healthz" {
        return (StatusCode::OK, "ok").into_response();
    }

    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => {
            return error_response(Api::from_path(uri.path()), 400, "mock: request body is not JSON");
        }
    };
    let api = match Api::detect(uri.path(), &parsed) {
        Api::Unknown => Api::OpenAiChat,
        a => a,
    };
    if let Some(status) = header_u64(&headers, "x-mock-status") {
        return error_response(api, u16::try_from(status).unwrap_or(500), "mock: error requested by x-mock-status");
    }

    let spans = extract_request_texts(api, &parsed);
    let answer = if header_flag(&headers, "x-mock-echo") {
        spans.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join("\n")
    } else if let Some(a) = headers.get("x-mock-answer").and_then(|v| v.to_str().ok()) {
        a.to_string()
    } else {
        String::new()
    };
    let pieces = match header_u64(&headers, "x-mock-completion-tokens") {
        Some(n) if answer.is_empty() => (0..n)
            .map(|i| {
                let w = WORDS.get(i as usize % WORDS.len()).copied().unwrap_or("x");
                if i == 0 {
                    w.to_string()
                } else {
                    format!(" {w}")
                }
            })
            .collect(),
        Some(n) => {
            // Spread the given answer over exactly n chunks.
            let mut p = split_pieces(&answer);
            while (p.len() as u64) < n {
                p.push(String::new());
            }
            p
        }
        None if answer.is_empty() => split_pieces(&WORDS.join(" ")),
        None => split_pieces(&answer),
    };
    let plan = Plan {
        api,
        model: parsed.get("model").and_then(Value::as_str).unwrap_or("mock-model").to_string(),
        stream: parsed.get("stream").and_then(Value::as_bool).unwrap_or(false),
        background: parsed.get("background").and_then(Value::as_bool).unwrap_or(false),
        include_usage: parsed.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false),
        prompt_tokens: header_u64(&headers, "x-mock-prompt-tokens").unwrap_or_else(|| estimate_request_tokens(&spans)),
        cached_tokens: header_u64(&headers, "x-mock-cached-tokens").unwrap_or(0),
        pieces,
        usage: !header_flag(&headers, "x-mock-no-usage"),
        chunk_delay: Duration::from_millis(header_u64(&headers, "x-mock-chunk-delay-ms").unwrap_or(0)),
        abort_after: header_u64(&headers, "x-mock-abort-after-chunks"),
        abort_after_bytes: header_u64(&headers, "x-mock-abort-after-bytes"),
        sse_garbage: header_flag(&headers, "x-mock-sse-garbage"),
        sse_no_done: header_flag(&headers, "x-mock-sse-no-done"),
        image_result: header_u64(&headers, "x-mock-image-result-bytes").and_then(|n| usize::try_from(n).ok()),
        response_id: headers.get("x-mock-response-id").and_then(|v| v.to_str().ok()).unwrap_or("resp_mock").to_string(),
        gzip: match headers.get("x-mock-gzip").and_then(|v| v.to_str().ok()).map(str::trim) {
            Some("always") => true,
            Some("1") => headers.get_all("accept-encoding").iter().filter_map(|v| v.to_str().ok()).any(|v| {
                v.split(',').any(|e| e.split(';').next().is_some_and(|e| e.trim().eq_ignore_ascii_case("gzip")))
            }),
            _ => false,
        },
    };
    if uri.path().ends_with("/converse-stream") {
        return bedrock_stream_response(&plan, guard);
    }
    if uri.path().starts_with("/v2/models/")
        && (uri.path().ends_with("/generate") || uri.path().ends_with("/generate_stream"))
    {
        return triton_generate_response(&plan, uri.path().ends_with("/generate_stream"), guard);
    }
    if uri.path() == "/generate" || uri.path() == "/generate_stream" {
        return native_generate_response(&plan, &parsed, uri.path() == "/generate_stream", guard);
    }
    if uri.path().ends_with("/api/chat") || uri.path().ends_with("/api/generate") {
        // Ollama streams unless the body says `"stream": false`.
        let stream = parsed.get("stream").and_then(Value::as_bool).unwrap_or(true);
        return ollama_response(&plan, uri.path().ends_with("/api/chat"), stream, guard);
    }
    if uri.path().ends_with("/cachedContents") {
        // Gemini context caching: the cache created, its size in `usageMetadata.totalTokenCount` (the
        // prompt tokens), named after `x-mock-response-id`.
        let name = format!("cachedContents/{}", plan.response_id);
        let answer = json!({"name": name, "model": format!("models/{}", plan.model),
            "createTime": "2026-12-07T00:00:00Z", "expireTime": "2026-12-07T01:00:00Z",
            "usageMetadata": {"totalTokenCount": plan.prompt_tokens}});
        return (StatusCode::OK, [("content-type", "application/json")], answer.to_string()).into_response();
    }
    if uri.path().ends_with("/audio/speech") {
        // Text to speech: binary audio, no usage (as OpenAI's `tts-1` answers).
        let n = usize::try_from(header_u64(&headers, "x-mock-audio-bytes").unwrap_or(65_536)).unwrap_or(65_536);
        let audio: Vec<u8> = (0..n).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        return (StatusCode::OK, [("content-type", "audio/mpeg")], audio).into_response();
    }
    if uri.path().ends_with("/images/generations") {
        // An image as base64 text inside JSON (dall-e-3 with `response_format: "b64_json"`: no usage).
        let n = usize::try_from(header_u64(&headers, "x-mock-image-bytes").unwrap_or(1_500_000)).unwrap_or(1_500_000);
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let image: String = (0..n).map(|i| char::from(B64[(i.wrapping_mul(2_654_435_761) >> 7) % 64])).collect();
        if plan.stream {
            return image_stream_response(&plan, &parsed, &image, guard);
        }
        let mut answer =
            json!({"created": 1_700_000_000, "data": [{"b64_json": image, "revised_prompt": "a red fox in the snow"}]});
        if header_flag(&headers, "x-mock-image-usage") {
            answer["usage"] = json!({"input_tokens": 12, "output_tokens": 4160, "total_tokens": 4172,
                                     "input_tokens_details": {"text_tokens": 12, "image_tokens": 0}});
        }
        return (StatusCode::OK, [("content-type", "application/json")], answer.to_string()).into_response();
    }
    if api == Api::OpenAiResponses && !plan.stream && parsed.get("background").and_then(Value::as_bool) == Some(true) {
        // A background response: answered at once, queued, without usage (the model runs afterwards and
        // `GET /v1/responses/{id}` serves its output), as OpenAI answers it.
        let model = parsed.get("model").cloned().unwrap_or(Value::Null);
        let answer = json!({"id": "resp_mock_background", "object": "response", "created_at": 1_700_000_000,
            "status": "queued", "background": true, "error": null, "incomplete_details": null, "instructions": null,
            "max_output_tokens": parsed.get("max_output_tokens").cloned().unwrap_or(Value::Null), "model": model,
            "output": [], "parallel_tool_calls": true, "previous_response_id": null, "store": true,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "truncation": "disabled",
            "usage": null, "user": null, "metadata": {}});
        return (StatusCode::OK, [("content-type", "application/json")], answer.to_string()).into_response();
    }
    if (plan.stream || header_flag(&headers, "x-mock-stream")) && api != Api::OpenAiEmbeddings {
        stream_response(plan, guard)
    } else {
        json_response(&plan)
    }
}

fn error_response(api: Api, status: u16, message: &str) -> Response {
    let body = if api.is_anthropic() {
        json!({"type":"error","error":{"type":"api_error","message":message}})
    } else {
        json!({"error":{"message":message,"type":"server_error","param":null,"code":null}})
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

/// Report `cached_tokens` of the prompt as read from the cache, in the usage shape of the plan's API.
fn add_cached_tokens(plan: &Plan, usage: &mut Value) {
    let k = plan.cached_tokens;
    if k == 0 || !usage.is_object() {
        return;
    }
    match plan.api {
        Api::AnthropicMessages => {
            usage["input_tokens"] = json!(plan.prompt_tokens.saturating_sub(k));
            usage["cache_read_input_tokens"] = json!(k);
        }
        Api::OpenAiResponses => usage["input_tokens_details"] = json!({"cached_tokens": k}),
        _ => usage["prompt_tokens_details"] = json!({"cached_tokens": k}),
    }
}

fn json_response(plan: &Plan) -> Response {
    let p = plan.prompt_tokens;
    let c = plan.completion_tokens();
    let mut body = match plan.api {
        Api::AnthropicMessages => json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": plan.model,
            "content": [{"type": "text", "text": plan.answer()}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": p, "output_tokens": c}
        }),
        Api::OpenAiResponses => json!({
            "id": plan.response_id, "object": "response", "status": "completed", "model": plan.model,
            "output": [{"type": "message", "id": "msg_mock", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": plan.answer(), "annotations": []}]}],
            "usage": {"input_tokens": p, "output_tokens": c, "total_tokens": p + c}
        }),
        Api::OpenAiEmbeddings => json!({
            "object": "list", "model": plan.model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3, 0.4]}],
            "usage": {"prompt_tokens": p, "total_tokens": p}
        }),
        Api::OpenAiCompletions => json!({
            "id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000u64, "model": plan.model,
            "choices": [{"index": 0, "text": plan.answer(), "finish_reason": "stop", "logprobs": null}],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        }),
        _ => json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000u64, "model": plan.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": plan.answer()}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        }),
    };
    add_cached_tokens(plan, &mut body["usage"]);
    if !plan.usage {
        if let Some(o) = body.as_object_mut() {
            o.remove("usage");
        }
    }
    let text = body.to_string();
    if let Some(n) = plan.abort_after_bytes {
        return truncated_response(text.into_bytes(), usize::try_from(n).unwrap_or(usize::MAX));
    }
    if plan.gzip {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        if enc.write_all(text.as_bytes()).is_ok() {
            if let Ok(gz) = enc.finish() {
                return (StatusCode::OK, [("content-type", "application/json"), ("content-encoding", "gzip")], gz)
                    .into_response();
            }
        }
    }
    (StatusCode::OK, [("content-type", "application/json")], text).into_response()
}

/// Announce the whole body in `content-length`, send `n` bytes of it (flushed, so the headers are on
/// the wire), then fail the stream: the connection is reset mid-body.
fn truncated_response(body: Vec<u8>, n: usize) -> Response {
    let len = body.len();
    let head = Bytes::from(body).slice(..n.min(len));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::spawn(async move {
        if tx.send(Ok(head)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ =
                tx.send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "mock: abort requested"))).await;
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("content-length", len.to_string())
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// What `x-mock-sse-garbage` inserts after the first event.
const SSE_GARBAGE: &[u8] =
    b"a line without a colon\n\ndata: {not json\n\n: a comment\n\nunknown-field: x\ndata: {\"partial\":\n\ndata: \xff\xfe\xfd\n\n\n\n";

fn sse(event: Option<&str>, data: &Value) -> String {
    match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

/// The wire events of a streamed answer, in order.
fn stream_events(plan: &Plan) -> Vec<String> {
    let p = plan.prompt_tokens;
    let c = plan.completion_tokens();
    let model = &plan.model;
    let mut ev = Vec::new();
    match plan.api {
        Api::AnthropicMessages => {
            let mut start_usage = if plan.usage { json!({"input_tokens": p, "output_tokens": 1}) } else { json!({}) };
            if plan.usage {
                add_cached_tokens(plan, &mut start_usage);
            }
            ev.push(sse(Some("message_start"), &json!({"type":"message_start","message":{"id":"msg_mock","type":"message","role":"assistant","model":model,"content":[],"stop_reason":null,"stop_sequence":null,"usage":start_usage}})));
            ev.push(sse(
                Some("content_block_start"),
                &json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
            ));
            ev.push(sse(Some("ping"), &json!({"type":"ping"})));
            for piece in &plan.pieces {
                ev.push(sse(
                    Some("content_block_delta"),
                    &json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":piece}}),
                ));
            }
            ev.push(sse(Some("content_block_stop"), &json!({"type":"content_block_stop","index":0})));
            let mut delta = json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null}});
            if plan.usage {
                delta["usage"] = json!({"output_tokens": c});
            }
            ev.push(sse(Some("message_delta"), &delta));
            ev.push(sse(Some("message_stop"), &json!({"type":"message_stop"})));
        }
        Api::OpenAiResponses => {
            ev.push(sse(Some("response.created"), &json!({"type":"response.created","response":{"id":plan.response_id,"object":"response","status":"in_progress","background":plan.background,"model":model,"output":[]}})));
            for piece in &plan.pieces {
                ev.push(sse(Some("response.output_text.delta"), &json!({"type":"response.output_text.delta","item_id":"msg_mock","output_index":0,"content_index":0,"delta":piece})));
            }
            let mut resp = json!({"id":plan.response_id,"object":"response","status":"completed","model":model,
                "output":[{"type":"message","id":"msg_mock","role":"assistant","status":"completed","content":[{"type":"output_text","text":plan.answer(),"annotations":[]}]}]});
            if let (Some(n), Some(output)) = (plan.image_result, resp["output"].as_array_mut()) {
                // The image generation tool's result: the whole image as base64, before the usage.
                output.push(json!({"type": "image_generation_call", "id": "ig_mock", "status": "completed",
                    "result": "QUJD".repeat(n / 4)}));
            }
            if plan.usage {
                resp["usage"] = json!({"input_tokens": p, "output_tokens": c, "total_tokens": p + c});
                add_cached_tokens(plan, &mut resp["usage"]);
            }
            ev.push(sse(Some("response.completed"), &json!({"type":"response.completed","response":resp})));
        }
        Api::OpenAiCompletions => {
            for piece in &plan.pieces {
                ev.push(sse(None, &json!({"id":"cmpl-mock","object":"text_completion","created":1_700_000_000u64,"model":model,"choices":[{"index":0,"text":piece,"finish_reason":null}]})));
            }
            ev.push(sse(None, &json!({"id":"cmpl-mock","object":"text_completion","created":1_700_000_000u64,"model":model,"choices":[{"index":0,"text":"","finish_reason":"stop"}]})));
            if plan.usage && plan.include_usage {
                ev.push(sse(None, &json!({"id":"cmpl-mock","object":"text_completion","created":1_700_000_000u64,"model":model,"choices":[],"usage":{"prompt_tokens":p,"completion_tokens":c,"total_tokens":p+c}})));
            }
            ev.push("data: [DONE]\n\n".to_string());
        }
        _ => {
            let chunk = |delta: Value, finish: Value| json!({"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1_700_000_000u64,"model":model,"choices":[{"index":0,"delta":delta,"finish_reason":finish}]});
            ev.push(sse(None, &chunk(json!({"role":"assistant","content":""}), Value::Null)));
            for piece in &plan.pieces {
                ev.push(sse(None, &chunk(json!({"content":piece}), Value::Null)));
            }
            ev.push(sse(None, &chunk(json!({}), json!("stop"))));
            if plan.usage && plan.include_usage {
                let mut usage = json!({"prompt_tokens":p,"completion_tokens":c,"total_tokens":p+c});
                add_cached_tokens(plan, &mut usage);
                ev.push(sse(None, &json!({"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1_700_000_000u64,"model":model,"choices":[],"usage":usage})));
            }
            ev.push("data: [DONE]\n\n".to_string());
        }
    }
    ev
}

fn stream_response(plan: Plan, guard: InFlight) -> Response {
    let mut events: Vec<Bytes> = stream_events(&plan).into_iter().map(Bytes::from).collect();
    if plan.sse_no_done {
        if let Some(last) = events.last() {
            if last.starts_with(b"data: [DONE]") || last.starts_with(b"event: message_stop") {
                events.pop();
            }
        }
    }
    if plan.sse_garbage && !events.is_empty() {
        events.insert(1, Bytes::from_static(SSE_GARBAGE));
    }
    send_events(events, "text/event-stream", &plan, guard)
}

/// Bedrock `ConverseStream` (`POST /model/<id>/converse-stream`): the AWS binary event stream, one
/// `contentBlockDelta` per output token, then `messageStop` and `metadata` with the usage.
fn bedrock_stream_response(plan: &Plan, guard: InFlight) -> Response {
    let event = |kind: &str, payload: Value| {
        Bytes::from(meshwarden_shared::eventstream::encode(
            &[(":event-type", kind), (":content-type", "application/json"), (":message-type", "event")],
            payload.to_string().as_bytes(),
        ))
    };
    let mut events = vec![event("messageStart", json!({"role": "assistant"}))];
    for piece in &plan.pieces {
        events.push(event("contentBlockDelta", json!({"contentBlockIndex": 0, "delta": {"text": piece}})));
    }
    events.push(event("contentBlockStop", json!({"contentBlockIndex": 0})));
    events.push(event("messageStop", json!({"stopReason": "end_turn"})));
    if plan.usage {
        let (i, o) = (plan.prompt_tokens, plan.completion_tokens());
        events.push(event(
            "metadata",
            json!({"usage": {"inputTokens": i, "outputTokens": o, "totalTokens": i + o}, "metrics": {"latencyMs": 1}}),
        ));
    }
    send_events(events, "application/vnd.amazon.eventstream", plan, guard)
}

/// Ollama's native API (`/api/chat`, `/api/generate`): newline-delimited JSON when streaming, one
/// line per output token, the counts (`prompt_eval_count`, `eval_count`) in the last (`"done": true`).
fn ollama_response(plan: &Plan, chat: bool, stream: bool, guard: InFlight) -> Response {
    let line = |text: &str, done: bool| {
        let mut v = if chat {
            json!({"model": plan.model, "created_at": "2026-12-05T08:00:00Z", "message": {"role": "assistant", "content": text}, "done": done})
        } else {
            json!({"model": plan.model, "created_at": "2026-12-05T08:00:00Z", "response": text, "done": done})
        };
        if done && plan.usage {
            v["prompt_eval_count"] = json!(plan.prompt_tokens);
            v["eval_count"] = json!(plan.completion_tokens());
        }
        v
    };
    if !stream {
        return (StatusCode::OK, [("content-type", "application/json")], line(&plan.answer(), true).to_string())
            .into_response();
    }
    let mut lines: Vec<Bytes> = plan.pieces.iter().map(|p| Bytes::from(format!("{}\n", line(p, false)))).collect();
    lines.push(Bytes::from(format!("{}\n", line("", true))));
    send_events(lines, "application/x-ndjson", plan, guard)
}

/// The native `/generate` APIs of Hugging Face TGI (`{"inputs": .., "parameters": {..}}`; `/generate_stream`
/// streams) and SGLang (`{"text": .., "sampling_params": {..}, "stream": ..}`), told apart by the body.
/// TGI: JSON `{"generated_text", "details"?}` with the counts in `x-prompt-tokens` / `x-generated-tokens`;
/// its stream is one event per token, the last with `generated_text` and, with `parameters.details: true`,
/// `details` (`generated_tokens`, `input_length`); no terminator. SGLang: `meta_info` with
/// `prompt_tokens` / `completion_tokens`, cumulative in every stream event, then `data: [DONE]`.
fn native_generate_response(plan: &Plan, body: &Value, tgi_stream: bool, guard: InFlight) -> Response {
    let (input, output) = (plan.prompt_tokens, plan.completion_tokens());
    if body.get("inputs").is_some() {
        let details = body.pointer("/parameters/details").and_then(Value::as_bool) == Some(true);
        if !tgi_stream {
            let mut answer = json!({"generated_text": plan.answer()});
            if details {
                answer["details"] = json!({"finish_reason": "length", "generated_tokens": output, "seed": null,
                                           "prefill": [], "tokens": []});
            }
            let mut resp = (StatusCode::OK, [("content-type", "application/json")], answer.to_string()).into_response();
            if plan.usage {
                resp.headers_mut().insert("x-prompt-tokens", input.into());
                resp.headers_mut().insert("x-generated-tokens", output.into());
            }
            return resp;
        }
        let n = plan.pieces.len();
        let events = plan
            .pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                let last = i + 1 == n;
                let details = (last && details && plan.usage).then(|| {
                    json!({"finish_reason": "length", "generated_tokens": output, "seed": null, "input_length": input})
                });
                let ev = json!({"index": i + 1, "token": {"id": 1000 + i, "text": piece, "logprob": -0.25, "special": false},
                                "generated_text": if last { Value::String(plan.answer()) } else { Value::Null },
                                "details": details, "top_tokens": null});
                Bytes::from(format!("data:{ev}\n\n"))
            })
            .collect();
        return send_events(events, "text/event-stream", plan, guard);
    }
    let meta = |done: u64| {
        json!({"id": "sglang-mock", "finish_reason": null, "prompt_tokens": input, "completion_tokens": done,
               "cached_tokens": 0})
    };
    if !plan.stream {
        let answer = if plan.usage {
            json!({"text": plan.answer(), "meta_info": meta(output)})
        } else {
            json!({"text": plan.answer()})
        };
        return (StatusCode::OK, [("content-type", "application/json")], answer.to_string()).into_response();
    }
    let mut text = String::new();
    let mut events: Vec<Bytes> = Vec::new();
    for (i, piece) in plan.pieces.iter().enumerate() {
        text.push_str(piece);
        let ev =
            if plan.usage { json!({"text": text, "meta_info": meta(i as u64 + 1)}) } else { json!({"text": text}) };
        events.push(Bytes::from(format!("data: {ev}\n\n")));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    send_events(events, "text/event-stream", plan, guard)
}

/// Triton's generate extension (KServe v2 protocol, `/v2/models/{model}/generate` and `generate_stream`):
/// `{"model_name", "model_version", "text_output"}`, no token counts; the stream sends one such object per
/// token as SSE, without a terminator.
fn triton_generate_response(plan: &Plan, stream: bool, guard: InFlight) -> Response {
    let object = |text: &str| json!({"model_name": plan.model, "model_version": "1", "text_output": text});
    if !stream {
        return (StatusCode::OK, [("content-type", "application/json")], object(&plan.answer()).to_string())
            .into_response();
    }
    let events = plan.pieces.iter().map(|p| Bytes::from(format!("data: {}\n\n", object(p)))).collect();
    send_events(events, "text/event-stream", plan, guard)
}

/// gpt-image-1 with `"stream": true`: `partial_images` (0..3, from the body) `image_generation.partial_image`
/// events, then `image_generation.completed` with the final image and the usage (`input_tokens` 12,
/// `output_tokens` 4160 + 100 per partial image, as OpenAI bills partial images; none with
/// `x-mock-no-usage`). Every event carries `image` as `b64_json`.
fn image_stream_response(plan: &Plan, body: &Value, image: &str, guard: InFlight) -> Response {
    let partials = body.get("partial_images").and_then(Value::as_u64).unwrap_or(0).min(3);
    let event = |kind: &str, mut v: Value| {
        v["type"] = json!(kind);
        v["b64_json"] = json!(image);
        v["created_at"] = json!(1_700_000_000);
        v["size"] = json!("1024x1024");
        v["quality"] = json!("high");
        v["background"] = json!("opaque");
        v["output_format"] = json!("png");
        Bytes::from(format!("event: {kind}\ndata: {v}\n\n"))
    };
    let mut events: Vec<Bytes> =
        (0..partials).map(|i| event("image_generation.partial_image", json!({"partial_image_index": i}))).collect();
    let mut completed = json!({});
    if plan.usage {
        let output = 4160 + 100 * partials;
        completed["usage"] = json!({"total_tokens": 12 + output, "input_tokens": 12, "output_tokens": output,
                                    "input_tokens_details": {"text_tokens": 12, "image_tokens": 0}});
    }
    events.push(event("image_generation.completed", completed));
    send_events(events, "text/event-stream", plan, guard)
}

/// Stream `events` one write each, honouring the plan's chunk delay and abort.
fn send_events(events: Vec<Bytes>, content_type: &'static str, plan: &Plan, guard: InFlight) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let delay = plan.chunk_delay;
    let abort_after = plan.abort_after;
    tokio::spawn(async move {
        let _in_flight = guard; // until the last chunk
        for (i, e) in events.into_iter().enumerate() {
            if abort_after.is_some_and(|n| i as u64 >= n) {
                let _ = tx
                    .send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "mock: abort requested")))
                    .await;
                return;
            }
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(Ok(e)).await.is_err() {
                return; // client went away
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_concatenate_back() {
        let t = "hello  world\nbye";
        assert_eq!(split_pieces(t).concat(), t);
        assert_eq!(split_pieces(t).len(), 3);
    }
}
