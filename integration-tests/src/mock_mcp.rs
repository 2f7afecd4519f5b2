//! A small MCP server (Streamable HTTP, JSON answers) for `make run` and `make demo`: three tools
//! (`search`, `get_weather`, `delete_file`), one prompt, one resource. Tests of mcp-authz use the official
//! Python SDK's server instead; this one only needs to be a correct peer for the local gateway.

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use meshwarden_shared::jsonrpc::{error_response, parse, result_response, Message, Payload, METHOD_NOT_FOUND};
use serde_json::{json, Value};
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct MockMcp {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl MockMcp {
    pub async fn start() -> anyhow::Result<MockMcp> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new().route("/mcp", post(handle));
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

fn answer(id: &Value, method: &str, params: Option<&Value>) -> Value {
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
            result_response(
                id,
                json!({"content": [{"type": "text", "text": format!("mock tool {name} ran")}], "isError": false}),
            )
        }
        "prompts/list" => result_response(id, json!({"prompts": [{"name": "greet", "description": "Say hello"}]})),
        "resources/list" => {
            result_response(id, json!({"resources": [{"uri": "file:///public/readme.md", "name": "readme"}]}))
        }
        _ => error_response(Some(id), METHOD_NOT_FOUND, "Method not found"),
    }
}

async fn handle(_headers: HeaderMap, body: Bytes) -> Response {
    let json_reply = |v: Value, session: bool| {
        let mut r = (StatusCode::OK, [("content-type", "application/json")], v.to_string()).into_response();
        if session {
            r.headers_mut().insert("mcp-session-id", axum::http::HeaderValue::from_static("mock-session-1"));
        }
        r
    };
    match parse(&body) {
        Ok(Payload::Single(Ok(Message::Request { id, method, params }))) => {
            json_reply(answer(&id, &method, params.as_ref()), method == "initialize")
        }
        Ok(Payload::Single(Ok(_))) => StatusCode::ACCEPTED.into_response(), // notifications, responses
        Ok(Payload::Batch(items)) => {
            let answers: Vec<Value> = items
                .into_iter()
                .filter_map(|m| match m {
                    Ok(Message::Request { id, method, params }) => Some(answer(&id, &method, params.as_ref())),
                    _ => None,
                })
                .collect();
            json_reply(Value::Array(answers), false)
        }
        _ => json_reply(error_response(None, meshwarden_shared::jsonrpc::INVALID_REQUEST, "Invalid Request"), false),
    }
}
