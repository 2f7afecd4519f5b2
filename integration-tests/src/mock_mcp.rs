//! A small MCP server (Streamable HTTP, JSON answers) for `make run` and `make demo`: three tools
//! (`search`, `get_weather`, `delete_file`), one prompt, one resource. Tests of mcp-authz use the official
//! Python SDK's server for ordinary traffic; this one also plays the server behaviours those tests need
//! to script, chosen per request by the `x-mock-sse` header on a POST (absent: plain JSON answers):
//!
//! | `x-mock-sse` | answer |
//! |---|---|
//! | `events` | SSE, each message an event with an `id:`; the events are stored (an event store) |
//! | `poll` | 2025-11-25 polling: SSE with only a priming event (`id:`, empty data) and `retry:`, then the stream ends; the answer is stored as the next event, for a GET with `Last-Event-ID` |
//! | `replay` | SSE: every stored event first (an earlier request's answer), then this request's answer |
//! | `surrogate` | SSE whose message carries an extra key `"\udc80"` (a lone surrogate escape: Python's `json` reads it, serde_json does not) |
//!
//! With `x-mock-gzip: 1` a JSON answer is gzipped when the request's `accept-encoding` allows gzip (as a
//! compression middleware in front of a server does).
//!
//! `GET /mcp` with `Last-Event-ID: X` replays the stored events after `X` (as the MCP Python SDK's
//! `_replay_events` does) and ends the stream; a GET without it is answered 405.
//!
//! Tasks: a `tools/call` whose `_meta` client capabilities declare the Tasks extension
//! (`io.modelcontextprotocol/tasks`, 2026-07-28) is answered with a `CreateTaskResult` (`resultType:
//! "task"`, `taskId`), one with `params.task` (2025-11-25) with `{"task": {"taskId": …}}`; the tool's
//! result is kept, `tasks/get` returns it to whoever names the task (as a server without its own
//! authentication does), `tasks/result` (2025-11-25) too; `tasks/update` and `tasks/cancel` acknowledge,
//! `tasks/list` (2025-11-25) lists every task; an unknown task id is -32602.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use meshwarden_shared::jsonrpc::{
    error_response, parse, result_response, Message, Payload, INVALID_PARAMS, METHOD_NOT_FOUND,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Stored SSE events: (event id, data).
type EventStore = Arc<Mutex<Vec<(String, String)>>>;
/// Tasks: (task id, the tool's result).
type TaskStore = Arc<Mutex<Vec<(String, Value)>>>;

#[derive(Clone, Default)]
struct Stores {
    events: EventStore,
    tasks: TaskStore,
}

pub struct MockMcp {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl MockMcp {
    pub async fn start() -> anyhow::Result<MockMcp> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new().route("/mcp", post(handle).get(replay)).with_state(Stores::default());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(MockMcp { addr, shutdown: Some(tx) })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for MockMcp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn tool(name: &str, description: &str) -> Value {
    json!({"name": name, "description": description,
           "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}}})
}

/// A task's state as `tasks/get` and `CreateTaskResult` carry it.
fn task_state(task_id: &str, status: &str) -> Value {
    json!({"taskId": task_id, "status": status, "createdAt": "2026-12-07T00:00:00Z",
           "lastUpdatedAt": "2026-12-07T00:00:00Z", "ttlMs": 60000, "pollIntervalMs": 10})
}

fn answer(id: &Value, method: &str, params: Option<&Value>, tasks: &TaskStore) -> Value {
    match method {
        "initialize" => result_response(
            id,
            json!({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}, "prompts": {}, "resources": {}},
                   "serverInfo": {"name": "meshwarden-mock-mcp", "version": "0.1.0"}}),
        ),
        "ping" => result_response(id, json!({})),
        "tools/list" => result_response(
            id,
            json!({"tools": [tool("search", "Search the web"), tool("get_weather", "Weather for a city"),
                             tool("delete_file", "Delete a file")]}),
        ),
        "tools/call" => {
            let name = params.and_then(|p| p.get("name")).and_then(Value::as_str).unwrap_or("?");
            let args = params.and_then(|p| p.get("arguments")).map(Value::to_string).unwrap_or_default();
            let text = if args.is_empty() {
                format!("mock tool {name} ran")
            } else {
                format!("mock tool {name} ran with {args}")
            };
            let result = json!({"content": [{"type": "text", "text": text}], "isError": false});
            let extension = params
                .and_then(|p| p.pointer("/_meta/io.modelcontextprotocol~1clientCapabilities/extensions"))
                .and_then(|e| e.get("io.modelcontextprotocol/tasks"))
                .is_some();
            let legacy = params.and_then(|p| p.get("task")).is_some_and(Value::is_object);
            if !(extension || legacy) {
                return result_response(id, result);
            }
            let Ok(mut tasks) = tasks.lock() else {
                return error_response(Some(id), meshwarden_shared::jsonrpc::INTERNAL_ERROR, "task store");
            };
            let task_id = format!("task-{}", tasks.len() + 1);
            tasks.push((task_id.clone(), result));
            let task = task_state(&task_id, "working");
            if extension {
                let mut r = task;
                r["resultType"] = json!("task");
                result_response(id, r)
            } else {
                result_response(id, json!({"task": task}))
            }
        }
        "tasks/get" | "tasks/result" | "tasks/update" | "tasks/cancel" => {
            let task_id = params.and_then(|p| p.get("taskId")).and_then(Value::as_str).unwrap_or_default();
            let found = tasks.lock().ok().and_then(|t| t.iter().find(|(t, _)| t == task_id).map(|(_, r)| r.clone()));
            let Some(result) = found else {
                return error_response(Some(id), INVALID_PARAMS, "Failed to retrieve task: Task not found");
            };
            match method {
                "tasks/get" => {
                    let mut r = task_state(task_id, "completed");
                    r["resultType"] = json!("complete");
                    r["result"] = result;
                    result_response(id, r)
                }
                "tasks/result" => result_response(id, result),
                _ => result_response(id, json!({"resultType": "complete"})),
            }
        }
        "tasks/list" => {
            let listed: Vec<Value> =
                tasks.lock().map(|t| t.iter().map(|(t, _)| task_state(t, "completed")).collect()).unwrap_or_default();
            result_response(id, json!({ "tasks": listed }))
        }
        "prompts/list" => result_response(id, json!({"prompts": [{"name": "greet", "description": "Say hello"}]})),
        "resources/list" => {
            result_response(id, json!({"resources": [{"uri": "file:///public/readme.md", "name": "readme"}]}))
        }
        "resources/read" => {
            let uri = params.and_then(|p| p.get("uri")).and_then(Value::as_str).unwrap_or("?");
            result_response(
                id,
                json!({"contents": [{"uri": uri, "mimeType": "text/plain", "text": format!("contents of {uri}")}]}),
            )
        }
        _ => error_response(Some(id), METHOD_NOT_FOUND, "Method not found"),
    }
}

fn sse_reply(body: String) -> Response {
    (StatusCode::OK, [("content-type", "text/event-stream"), ("cache-control", "no-cache")], body).into_response()
}

fn sse_event(id: &str, data: &str) -> String {
    format!("id: {id}\nevent: message\ndata: {data}\n\n")
}

/// A POST answered as SSE (`x-mock-sse`, see the module documentation).
fn sse_answer(mode: &str, store: &EventStore, answer: Value) -> Response {
    let Ok(mut events) = store.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let next = |events: &Vec<(String, String)>| format!("ev-{}", events.len());
    match mode {
        "poll" => {
            let priming = next(&events);
            events.push((priming.clone(), String::new()));
            let id = next(&events);
            events.push((id, answer.to_string()));
            sse_reply(format!("id: {priming}\nretry: 100\ndata: \n\n"))
        }
        "replay" => {
            let mut body: String = events.iter().filter(|(_, d)| !d.is_empty()).map(|(i, d)| sse_event(i, d)).collect();
            body.push_str(&sse_event("now", &answer.to_string()));
            sse_reply(body)
        }
        "surrogate" => {
            let text = answer.to_string();
            let data = match text.strip_suffix('}') {
                Some(open) => format!("{open},\"\\udc80\":1}}"),
                None => text,
            };
            sse_reply(sse_event("s-0", &data))
        }
        _ => {
            let id = next(&events);
            events.push((id.clone(), answer.to_string()));
            sse_reply(sse_event(&id, &answer.to_string()))
        }
    }
}

/// `GET /mcp` with `Last-Event-ID`: the stored events after it, then the stream ends.
async fn replay(State(stores): State<Stores>, headers: HeaderMap) -> Response {
    let store = stores.events;
    let Some(last) = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_string) else {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    let Ok(events) = store.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let body: String = events
        .iter()
        .skip_while(|(id, _)| *id != last)
        .skip(1)
        .filter(|(_, d)| !d.is_empty())
        .map(|(id, d)| sse_event(id, d))
        .collect();
    sse_reply(body)
}

async fn handle(State(stores): State<Stores>, headers: HeaderMap, body: Bytes) -> Response {
    let (store, tasks) = (stores.events, stores.tasks);
    let sse = headers.get("x-mock-sse").and_then(|v| v.to_str().ok()).map(str::to_string);
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let gzip = text("x-mock-gzip") == "1" && text("accept-encoding").contains("gzip");
    let json_reply = |v: Value, session: bool| {
        let mut r = if gzip {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = std::io::Write::write_all(&mut enc, v.to_string().as_bytes());
            let body = enc.finish().unwrap_or_default();
            (StatusCode::OK, [("content-type", "application/json"), ("content-encoding", "gzip")], body).into_response()
        } else {
            (StatusCode::OK, [("content-type", "application/json")], v.to_string()).into_response()
        };
        if session {
            r.headers_mut().insert("mcp-session-id", axum::http::HeaderValue::from_static("mock-session-1"));
        }
        r
    };
    match parse(&body) {
        Ok(Payload::Single(Ok(Message::Request { id, method, params }))) => match sse.as_deref() {
            Some(mode) => sse_answer(mode, &store, answer(&id, &method, params.as_ref(), &tasks)),
            None => json_reply(answer(&id, &method, params.as_ref(), &tasks), method == "initialize"),
        },
        Ok(Payload::Single(Ok(_))) => StatusCode::ACCEPTED.into_response(), // notifications, responses
        Ok(Payload::Batch(items)) => {
            let answers: Vec<Value> = items
                .into_iter()
                .filter_map(|m| match m {
                    Ok(Message::Request { id, method, params }) => Some(answer(&id, &method, params.as_ref(), &tasks)),
                    _ => None,
                })
                .collect();
            json_reply(Value::Array(answers), false)
        }
        _ => json_reply(error_response(None, meshwarden_shared::jsonrpc::INVALID_REQUEST, "Invalid Request"), false),
    }
}
