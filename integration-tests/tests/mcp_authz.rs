//! mcp-authz through real Envoy (jwt_authn + our wasm) in front of real servers: the official MCP Python
//! SDK (MCPServer, Streamable HTTP, SSE and JSON answers), its official client, and an `a2a-sdk` agent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use meshwarden_integration_tests::envoy::{json_string, Envoy, EnvoyBuilder};
use meshwarden_integration_tests::python::{self, PyServer};
use serde_json::{json, Value};

const JWT_KEY: &str = "meshwarden-test-key-0123456789abcdef";

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn b64url(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &x)| acc | (u32::from(x) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn jwks() -> String {
    json!({"keys": [{"kty": "oct", "alg": "HS256", "kid": "k1", "k": b64url(JWT_KEY.as_bytes())}]}).to_string()
}

/// A token signed by the test key (verified by Envoy's jwt_authn).
async fn signed_token(claims: Value) -> String {
    let mut c = claims;
    c["iss"] = json!("meshwarden-test");
    c["exp"] = json!(4_102_444_800u64); // 2100-01-01
    let out = python::run("jwt_hs256.py", &[JWT_KEY.to_string(), c.to_string()]).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// An unsigned token (signature garbage): only the development switch reads it.
fn unverified_token(claims: Value) -> String {
    format!("{}.{}.not-a-signature", b64url(br#"{"alg":"none"}"#), b64url(claims.to_string().as_bytes()))
}

fn policy() -> Value {
    json!({
        "deny_answer": "hide",
        "rules": [
            {"name": "everyone-reads", "effect": "allow", "methods": ["tools/call"], "targets": ["search", "get_weather"]},
            {"name": "finance-ledger", "effect": "allow", "methods": ["tools/call"], "targets": ["ledger_read", "transfer"],
             "identity": [{"claim": "groups", "contains": "finance"}]},
            {"name": "ops-delete", "effect": "allow", "methods": ["tools/call"], "targets": ["delete_file"],
             "identity": [{"claim": "groups", "contains": "ops"}]},
            {"name": "no-prod-delete", "effect": "deny", "answer": "forbid", "targets": ["delete_file"],
             "arguments": [{"path": "env", "equals": "prod"}]},
            {"name": "transfer-limit", "effect": "deny", "targets": ["transfer"], "arguments": [{"path": "amount", "min": 1000}]},
            {"name": "search-limit", "effect": "deny", "answer": "forbid", "targets": ["search"],
             "arguments": [{"path": "limit", "min": 51}]},
            {"name": "prompts", "effect": "allow", "methods": ["prompts/get"], "targets": ["greet"]},
            {"name": "public-resources", "effect": "allow", "methods": ["resources/read"], "targets": ["file:///public/*"]},
            {"name": "admins", "effect": "allow", "identity": [{"claim": "groups", "contains": "admin"}]},
            {"name": "a2a-users", "effect": "allow", "protocol": "a2a",
             "methods": ["SendMessage", "SendStreamingMessage", "GetTask", "GetExtendedAgentCard"], "identity": [{"claim": "sub", "present": true}]},
            {"name": "a2a-skills", "effect": "allow", "protocol": "a2a", "methods": ["agent/skill"],
             "targets": ["sql", "web-search"], "identity": [{"claim": "sub", "present": true}]},
            {"name": "a2a-payments", "effect": "allow", "protocol": "a2a", "methods": ["agent/skill"],
             "targets": ["payments"], "identity": [{"claim": "groups", "contains": "finance"}]},
            {"name": "a2a-push-admin", "effect": "allow", "protocol": "a2a",
             "methods": ["tasks/pushNotificationConfig/*"], "identity": [{"claim": "groups", "contains": "ops"}]}
        ]
    })
}

fn config(dev_bearer: bool) -> Value {
    json!({
        "mcp_paths": ["/mcp", "/json/mcp"],
        "a2a_paths": ["/a2a"],
        "max_body_bytes": 65536,
        "identity": {
            "jwt_authn": {"payload_key": "jwt_payload"},
            "unverified_bearer_dev_only": dev_bearer,
            "trusted_headers": [
                {"header": "x-test-user", "claim": "sub"},
                {"header": "x-test-groups", "claim": "groups", "list": true}
            ]
        },
        "policy": policy()
    })
}

struct Setup {
    envoy: Envoy,
    _sse: PyServer,
    _json: PyServer,
    _a2a: PyServer,
}

async fn setup(cfg: Value) -> Setup {
    let (sse, json_srv, a2a) = tokio::join!(
        PyServer::start("mcp_server.py", &[]),
        PyServer::start("mcp_server.py", &["--json"]),
        PyServer::start("a2a_server.py", &[])
    );
    let (sse, json_srv, a2a) = (sse.unwrap(), json_srv.unwrap(), a2a.unwrap());
    let envoy = EnvoyBuilder::new("mcp-authz-servers.yaml")
        .var("MCP_SSE_PORT", sse.port.to_string())
        .var("MCP_JSON_PORT", json_srv.port.to_string())
        .var("A2A_PORT", a2a.port.to_string())
        .var("JWKS", json_string(&jwks()))
        .filter_config("mcp-authz", &cfg)
        .start()
        .await
        .unwrap();
    Setup { envoy, _sse: sse, _json: json_srv, _a2a: a2a }
}

/// Parse a JSON or SSE answer into its JSON-RPC messages.
async fn messages(resp: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Vec<Value>) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let is_sse = headers.get("content-type").is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
    let msgs = if is_sse {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str(d.trim()).ok())
            .collect()
    } else if text.is_empty() {
        vec![]
    } else {
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(a)) => a,
            Ok(v) => vec![v],
            Err(_) => panic!("not JSON ({status}): {text}"),
        }
    };
    (status, headers, msgs)
}

/// A legacy (2025-11-25) session on an MCP endpoint, raw HTTP.
struct Session {
    url: String,
    id: String,
    headers: Vec<(String, String)>,
}

impl Session {
    async fn open(url: String, headers: &[(&str, &str)]) -> Session {
        let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut req = client()
            .post(&url)
            .header("accept", "application/json, text/event-stream")
            .json(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}));
        for (k, v) in &headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["mcp-session-id"].to_str().unwrap().to_string();
        let s = Session { url, id, headers };
        let (status, _, _) = s.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
        assert_eq!(status, 202, "a notification passes through");
        s
    }

    /// A POST of `body` in this session, as this caller.
    fn request(&self, body: String) -> reqwest::RequestBuilder {
        let mut req = client()
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", &self.id)
            .header("mcp-protocol-version", "2025-11-25")
            .body(body);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        req
    }

    async fn post_raw(&self, body: String, extra: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, Vec<Value>) {
        let mut req = self.request(body);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        messages(req.send().await.unwrap()).await
    }

    async fn post(&self, body: &Value) -> (u16, reqwest::header::HeaderMap, Vec<Value>) {
        self.post_raw(body.to_string(), &[]).await
    }

    async fn call(&self, id: Value, tool: &str, args: Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let (s, h, m) = self
            .post(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}}))
            .await;
        let last = m.into_iter().last().unwrap_or(Value::Null);
        (s, h, last)
    }

    async fn list(&self, method: &str, key: &str, name: &str) -> Vec<String> {
        let (s, h, m) = self.post(&json!({"jsonrpc": "2.0", "id": "list", "method": method})).await;
        assert_eq!(s, 200);
        // The SSE server's lists are filtered as SSE, the JSON server's as JSON (not just any shape).
        let ct = h.get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let want = if self.url.ends_with("/json/mcp") { "application/json" } else { "text/event-stream" };
        assert!(ct.starts_with(want), "{method} on {}: content-type {ct:?}", self.url);
        let answer = m.into_iter().find(|m| m["id"] == "list").unwrap();
        answer["result"][key].as_array().unwrap().iter().map(|t| t[name].as_str().unwrap().to_string()).collect()
    }
}

async fn wait_for_log(envoy: &Envoy, needle: &str) {
    for _ in 0..300 {
        if envoy.log().contains(needle) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{needle:?} not in the Envoy log:\n{}", envoy.log());
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_mcp_client_sees_filtered_tools_and_clean_denials() {
    let s = setup(config(false)).await;
    for path in ["/mcp", "/json/mcp"] {
        for mode in ["auto", "legacy"] {
            let run = |hdrs: Vec<&str>, calls: Vec<(&str, Value)>| {
                let mut args = vec![s.envoy.url(path), "--mode".into(), mode.into()];
                for h in hdrs {
                    args.push("--header".into());
                    args.push(h.into());
                }
                for (t, a) in calls {
                    args.extend(["--call".into(), t.into(), a.to_string()]);
                }
                async move {
                    let out = python::run("mcp_client.py", &args).await.unwrap();
                    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
                    serde_json::from_slice::<Value>(&out.stdout).unwrap()
                }
            };
            // bob: no groups
            let bob = run(
                vec!["x-test-user=bob"],
                vec![("search", json!({"query": "q"})), ("delete_file", json!({"path": "/x"}))],
            )
            .await;
            let expected_protocol = if mode == "auto" { "2026-07-28" } else { "2025-11-25" };
            assert_eq!(bob["protocol"], expected_protocol, "{path} {mode}: {bob}");
            assert_eq!(bob["tools"], json!(["search", "get_weather"]), "{path} {mode}");
            assert_eq!(bob["prompts"], json!(["greet"]), "{path} {mode}");
            assert_eq!(bob["calls"][0]["ok"], true, "{bob}");
            assert_eq!(bob["calls"][0]["text"], "results for q (limit 10)");
            let denied = &bob["calls"][1];
            assert_eq!(denied["ok"], false, "{bob}");
            assert_eq!(denied["code"], -32602, "{bob}");
            assert!(denied["error"].as_str().unwrap().contains("Unknown tool: delete_file"), "{bob}");
            // alice: finance and ops
            let alice = run(
                vec!["x-test-user=alice", "x-test-groups=finance,ops"],
                vec![
                    ("transfer", json!({"amount": 10})),
                    ("transfer", json!({"amount": 5000})),
                    ("delete_file", json!({"path": "/x", "env": "dev"})),
                    // The server reads numeric strings as numbers (Pydantic lax mode), so must the policy.
                    ("transfer", json!({"amount": "20"})),
                    ("transfer", json!({"amount": "5000"})),
                    ("transfer", json!({"amount": " 5_000 "})),
                ],
            )
            .await;
            assert_eq!(
                alice["tools"],
                json!(["search", "get_weather", "delete_file", "ledger_read", "transfer"]),
                "{path} {mode}"
            );
            assert_eq!(alice["calls"][0]["text"], "transferred 10.0 EUR", "{alice}");
            assert_eq!(alice["calls"][1]["code"], -32602, "argument rule hides the call: {alice}");
            assert_eq!(alice["calls"][2]["text"], "deleted /x in dev", "{alice}");
            assert_eq!(alice["calls"][3]["text"], "transferred 20.0 EUR", "the server coerces strings: {alice}");
            assert_eq!(alice["calls"][4]["code"], -32602, "a numeric string is still over the limit: {alice}");
            assert_eq!(alice["calls"][5]["code"], -32602, "{alice}");
        }
    }
    let st = s.envoy.stats("mcp_authz").await.unwrap();
    assert!(st["meshwarden.mcp_authz.method.tools_call.deny"] >= 8, "{st:?}");
    assert!(st["meshwarden.mcp_authz.method.tools_call.allow"] >= 8, "{st:?}");
    assert!(st["meshwarden.mcp_authz.list_items_hidden"] >= 8, "{st:?}");
    // The totals are the per-method decisions summed.
    for decision in ["allow", "deny"] {
        let per_method: u64 = st
            .iter()
            .filter(|(k, _)| k.starts_with("meshwarden.mcp_authz.method.") && k.ends_with(&format!(".{decision}")))
            .map(|(_, v)| *v)
            .sum();
        assert_eq!(st[&format!("meshwarden.mcp_authz.decision.{decision}")], per_method, "{st:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_json_rpc_decisions_lists_and_bad_input() {
    let s = setup(config(false)).await;
    for path in ["/json/mcp", "/mcp"] {
        let bob = Session::open(s.envoy.url(path), &[("x-test-user", "bob")]).await;
        let admin = Session::open(s.envoy.url(path), &[("x-test-user", "root"), ("x-test-groups", "admin")]).await;

        // lists, JSON and SSE answers
        assert_eq!(bob.list("tools/list", "tools", "name").await, names(&["search", "get_weather"]), "{path}");
        assert_eq!(bob.list("prompts/list", "prompts", "name").await, names(&["greet"]));
        assert_eq!(bob.list("resources/list", "resources", "uri").await, names(&["file:///public/readme"]));
        assert_eq!(
            bob.list("resources/templates/list", "resourceTemplates", "uriTemplate").await,
            names(&["file:///public/{name}"])
        );
        assert_eq!(admin.list("tools/list", "tools", "name").await.len(), 5);
        assert_eq!(admin.list("resources/list", "resources", "uri").await.len(), 2);

        // allowed call reaches the server; hidden call answers "Unknown tool" with the id echoed
        let (st, _, m) = bob.call(json!(11), "get_weather", json!({"city": "Oslo"})).await;
        assert_eq!(
            (st, m["id"].clone(), m["result"]["content"][0]["text"].clone()),
            (200, json!(11), json!("sunny in Oslo"))
        );
        let (st, _, m) = bob.call(json!("req-12"), "ledger_read", json!({"account": "a"})).await;
        assert_eq!(st, 200);
        assert_eq!(
            m,
            json!({"jsonrpc": "2.0", "id": "req-12", "error": {"code": -32602, "message": "Unknown tool: ledger_read"}})
        );

        // forbid answer: 403, JSON-RPC body, WWW-Authenticate
        let (st, h, m) = bob.call(json!(13), "search", json!({"query": "q", "limit": 500})).await;
        assert_eq!(st, 403, "{m}");
        assert_eq!(h["www-authenticate"], "Bearer error=\"insufficient_scope\"");
        assert_eq!((m["id"].clone(), m["error"]["code"].clone()), (json!(13), json!(-32000)));
        for limit in [json!("500"), json!("5e2"), json!("many")] {
            let (st, _, m) = bob.call(json!(13), "search", json!({"query": "q", "limit": limit})).await;
            assert_eq!(st, 403, "limit {limit} must not slip past the deny rule: {m}");
        }
        let (st, _, m) = bob.call(json!(13), "search", json!({"query": "q", "limit": "7"})).await;
        assert_eq!((st, m["result"]["content"][0]["text"].clone()), (200, json!("results for q (limit 7)")));
        let (st, _, m) = admin.call(json!(14), "delete_file", json!({"path": "/a", "env": "prod"})).await;
        assert_eq!(st, 403, "deny beats the admin allow: {m}");
        let (st, _, m) = admin.call(json!(15), "delete_file", json!({"path": "/a", "env": "dev"})).await;
        assert_eq!((st, m["result"]["content"][0]["text"].clone()), (200, json!("deleted /a in dev")));

        // resources and prompts
        let (_, _, m) = bob.post(&json!({"jsonrpc": "2.0", "id": 16, "method": "resources/read", "params": {"uri": "file:///private/keys"}})).await;
        assert_eq!(m[0]["error"]["code"], -32002);
        let (_, _, m) = bob.post(&json!({"jsonrpc": "2.0", "id": 17, "method": "resources/read", "params": {"uri": "file:///public/readme"}})).await;
        assert_eq!(m.last().unwrap()["result"]["contents"][0]["text"], "public readme");
        let (_, _, m) = bob
            .post(&json!({"jsonrpc": "2.0", "id": 18, "method": "prompts/get", "params": {"name": "admin_prompt"}}))
            .await;
        assert_eq!(m[0]["error"]["message"], "Unknown prompt: admin_prompt");

        // unknown methods: the policy decides (default deny, hidden as "Method not found")
        let (st, _, m) =
            bob.post(&json!({"jsonrpc": "2.0", "id": 30, "method": "vendor/secretOp", "params": {}})).await;
        assert_eq!((st, m[0]["error"]["code"].clone(), m[0]["id"].clone()), (200, json!(-32601), json!(30)));

        // client responses to server requests pass through (the server answers 202)
        let (st, _, _) = bob.post(&json!({"jsonrpc": "2.0", "id": "srv-1", "result": {}})).await;
        assert_eq!(st, 202);

        // header / body mismatch (2026-07-28 headers), also base64-encoded
        let body = json!({"jsonrpc": "2.0", "id": 19, "method": "tools/call", "params": {"name": "search", "arguments": {"query": "q"}}}).to_string();
        let (st, _, m) = bob.post_raw(body.clone(), &[("mcp-method", "tools/call"), ("mcp-name", "delete_file")]).await;
        assert_eq!((st, m[0]["error"]["code"].clone(), m[0]["id"].clone()), (400, json!(-32020), json!(19)));
        let (st, _, m) = bob.post_raw(body.clone(), &[("mcp-method", "tools/list")]).await;
        assert_eq!((st, m[0]["error"]["code"].clone()), (400, json!(-32020)));
        let (st, _, m) =
            bob.post_raw(body.clone(), &[("mcp-method", "tools/call"), ("mcp-name", "=?base64?c2VhcmNo?=")]).await;
        assert_eq!(st, 200, "base64 'search' matches: {m:?}");
        let (st, _, _) =
            bob.post_raw(body.clone(), &[("mcp-method", "tools/call"), ("mcp-name", "=?base64?!!!?=")]).await;
        assert_eq!(st, 400);

        // bad input
        let (st, _, m) = bob.post_raw("{not json".into(), &[]).await;
        assert_eq!((st, m[0]["error"]["code"].clone(), m[0]["id"].clone()), (400, json!(-32700), Value::Null));
        let (st, _, m) = bob.post_raw(r#"{"jsonrpc":"2.0","id":20,"method":7}"#.into(), &[]).await;
        assert_eq!((st, m[0]["error"]["code"].clone(), m[0]["id"].clone()), (400, json!(-32600), json!(20)));
        let (st, _, _) = bob.post_raw(format!(r#"{{"jsonrpc":"2.0","id":21,"method":"tools/call","params":{{"name":"search","arguments":{{"q":"{}"}}}}}}"#, "x".repeat(70_000)), &[]).await;
        assert_eq!(st, 413);
        let (st, _, m) = bob.post_raw(r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#.into(), &[]).await;
        assert_eq!((st, m[0]["error"]["code"].clone()), (400, json!(-32600)), "no batches in 2025-11-25");

        // session requests: DELETE ends the session (builtin allowed; by its owner, see
        // `mcp_sessions_are_bound_to_their_creator`), then the server forgets it
        let resp = client()
            .delete(s.envoy.url(path))
            .header("mcp-session-id", &bob.id)
            .header("x-test-user", "bob")
            .header("mcp-protocol-version", "2025-11-25")
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        let resp = client().put(s.envoy.url(path)).body("x").send().await.unwrap();
        assert_eq!(resp.status(), 405);
    }
    // the access log shows the filter's decision (filter state); Envoy flushes it every few seconds
    wait_for_log(&s.envoy, "subject=bob method=tools/call target=ledger_read decision=deny rule=default").await;
    wait_for_log(&s.envoy, "subject=root method=tools/call target=delete_file decision=deny rule=no-prod-delete").await;
    let log = s.envoy.log();
    // and one audit line per decision
    assert!(log.contains(r#""decision":"deny","id":"req-12","identity_source":"none","mcp_authz":"decision","method":"tools/call","protocol":"mcp","rule":"default","subject":"bob","target":"ledger_read""#), "{log}");
    let st = s.envoy.stats("mcp_authz").await.unwrap();
    for k in [
        "header_mismatch",
        "invalid_json",
        "invalid_request",
        "body_too_large",
        "client_response",
        "method_not_allowed",
    ] {
        assert!(st.get(&format!("meshwarden.mcp_authz.{k}")).copied().unwrap_or(0) >= 2, "{k}: {st:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modern_requests_and_batches() {
    let s = setup(config(false)).await;
    let post = |body: Value, hdrs: Vec<(&'static str, String)>| {
        let mut req = client()
            .post(s.envoy.url("/json/mcp"))
            .header("accept", "application/json, text/event-stream")
            .header("x-test-user", "bob")
            .json(&body);
        for (k, v) in hdrs {
            req = req.header(k, v);
        }
        async move { messages(req.send().await.unwrap()).await }
    };
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}});
    let call = |name: &str, id: u64| json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": {"query": "q", "city": "c"}, "_meta": meta.clone()}});
    let v = ("mcp-protocol-version", "2026-07-28".to_string());
    let (st, _, m) =
        post(call("search", 1), vec![v.clone(), ("mcp-method", "tools/call".into()), ("mcp-name", "search".into())])
            .await;
    assert_eq!((st, m[0]["result"]["content"][0]["text"].clone()), (200, json!("results for q (limit 10)")));
    let (st, _, m) = post(call("search", 2), vec![v.clone(), ("mcp-method", "tools/call".into())]).await;
    assert_eq!((st, m[0]["error"]["code"].clone()), (400, json!(-32020)), "Mcp-Name required in 2026-07-28");
    let (st, _, m) = post(
        call("get_weather", 3),
        vec![v.clone(), ("mcp-method", "tools/call".into()), ("mcp-name", "search".into())],
    )
    .await;
    assert_eq!((st, m[0]["error"]["code"].clone()), (400, json!(-32020)));
    let (st, _, m) = post(
        call("ledger_read", 4),
        vec![v.clone(), ("mcp-method", "tools/call".into()), ("mcp-name", "ledger_read".into())],
    )
    .await;
    assert_eq!((st, m[0]["error"]["message"].clone()), (200, json!("Unknown tool: ledger_read")));
    // A repeated mirrored header is refused: a router or the server may read the other copy.
    let (st, _, m) = post(
        call("search", 41),
        vec![
            v.clone(),
            ("mcp-method", "tools/call".into()),
            ("mcp-method", "tools/list".into()),
            ("mcp-name", "search".into()),
        ],
    )
    .await;
    assert_eq!((st, m[0]["error"]["code"].clone()), (400, json!(-32020)), "{m:?}");
    let (st, _, m) = post(
        call("search", 42),
        vec![
            v.clone(),
            ("mcp-method", "tools/call".into()),
            ("mcp-name", "search".into()),
            ("mcp-name", "ledger_read".into()),
        ],
    )
    .await;
    assert_eq!((st, m[0]["error"]["code"].clone()), (400, json!(-32020)), "{m:?}");
    // resources/read: Mcp-Name must be the URI the server reads, not a `name` riding along.
    let read = |n: &str| {
        let body = json!({"jsonrpc": "2.0", "id": 43, "method": "resources/read",
            "params": {"uri": "file:///public/readme", "name": "readme", "_meta": meta.clone()}});
        post(body, vec![v.clone(), ("mcp-method", "resources/read".into()), ("mcp-name", n.to_string())])
    };
    let (st, _, m) = read("readme").await;
    assert_eq!((st, m[0]["error"]["code"].clone()), (400, json!(-32020)), "{m:?}");
    let (st, _, m) = read("file:///public/readme").await;
    assert_eq!((st, m[0]["result"]["contents"][0]["text"].clone()), (200, json!("public readme")), "{m:?}");

    // 2025-03-26 batches: every element is authorized; one denied element refuses the whole batch
    let old = ("mcp-protocol-version", "2025-03-26".to_string());
    let batch =
        json!([call("search", 5), {"jsonrpc": "2.0", "method": "notifications/initialized"}, call("ledger_read", 6)]);
    let (st, _, m) = post(batch, vec![old.clone()]).await;
    assert_eq!(st, 200);
    assert_eq!(m.len(), 2, "{m:?}");
    assert_eq!((m[0]["id"].clone(), m[0]["error"]["code"].clone()), (json!(5), json!(-32000)));
    assert_eq!(m[1]["error"]["message"], "Unknown tool: ledger_read");
    // a `forbid` denial in a batch: 403 with WWW-Authenticate, every request answered, none executed
    let over = json!({"jsonrpc": "2.0", "id": 31, "method": "tools/call", "params": {"name": "search", "arguments": {"query": "q", "limit": "500"}}});
    let (st, h, m) = post(json!([over, call("get_weather", 32)]), vec![old.clone()]).await;
    assert_eq!(st, 403, "{m:?}");
    assert_eq!(h["www-authenticate"], "Bearer error=\"insufficient_scope\"");
    let ids: Vec<Value> = m.iter().map(|x| x["id"].clone()).collect();
    assert_eq!(ids, [json!(31), json!(32)], "{m:?}");
    assert!(m.iter().all(|x| x["error"]["code"] == -32000), "{m:?}");
    // a batch holding one call is logged as that call; one of several calls as `batch` with the rule of
    // its first denied element
    let (st, _, m) = post(json!([over]), vec![old.clone()]).await;
    assert_eq!((st, m[0]["error"]["code"].clone()), (403, json!(-32000)), "{m:?}");
    wait_for_log(&s.envoy, "subject=bob method=tools/call target=search decision=deny rule=search-limit").await;
    wait_for_log(&s.envoy, "subject=bob method=batch target= decision=deny rule=default").await;
    // a client's response to a server request rides in a batch untouched by the policy
    let response = json!({"jsonrpc": "2.0", "id": "srv-1", "result": {"roots": []}});
    let (st, _, m) = post(json!([response, call("search", 33)]), vec![old.clone()]).await;
    assert_eq!(st, 400, "forwarded: the server's own batch refusal, not ours: {m:?}");
    assert!(m[0]["error"]["message"].as_str().unwrap().contains("Validation error"), "{m:?}");
    // an allowed batch is forwarded (this SDK server itself rejects batches with its own validation error)
    let batch = json!([call("search", 7), call("get_weather", 8)]);
    let (st, _, m) = post(batch, vec![old.clone()]).await;
    assert_eq!(st, 400);
    assert!(m[0]["error"]["message"].as_str().unwrap().contains("Validation error"), "the server's answer: {m:?}");
    // an MCP request on a path missing from `mcp_paths` is recognised by its headers and still authorized
    let resp = client()
        .post(s.envoy.url("/unlisted/mcp"))
        .header("x-test-user", "bob")
        .header("mcp-protocol-version", "2025-11-25")
        .json(&json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "ledger_read", "arguments": {}}}))
        .send()
        .await
        .unwrap();
    let (st, _, m) = messages(resp).await;
    assert_eq!((st, m[0]["error"]["message"].clone()), (200, json!("Unknown tool: ledger_read")));
    let st = s.envoy.stats("mcp_authz").await.unwrap();
    assert_eq!(st["meshwarden.mcp_authz.header_mismatch"], 5, "2 disagreeing, 2 repeated, 1 resources/read name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_from_jwt_authn_and_the_dev_bearer_switch() {
    let s = setup(config(false)).await;
    let finance = signed_token(json!({"sub": "carol", "groups": ["finance"]})).await;
    let sess = Session::open(s.envoy.url("/json/mcp"), &[("authorization", &format!("Bearer {finance}"))]).await;
    assert_eq!(
        sess.list("tools/list", "tools", "name").await,
        names(&["search", "get_weather", "ledger_read", "transfer"])
    );
    let (_, _, m) = sess.call(json!(1), "ledger_read", json!({"account": "x"})).await;
    assert_eq!(m["result"]["content"][0]["text"], "balance of x: 42");
    assert!(s.envoy.log().contains(r#""identity_source":"jwt_authn""#));
    // a forged token (bad signature) gives no claims: jwt_authn writes no metadata, the caller is anonymous
    let forged = unverified_token(json!({"sub": "mallory", "groups": ["admin"]}));
    let anon = Session::open(s.envoy.url("/json/mcp"), &[("authorization", &format!("Bearer {forged}"))]).await;
    assert_eq!(anon.list("tools/list", "tools", "name").await, names(&["search", "get_weather"]));
    let (_, _, m) = anon.call(json!(2), "ledger_read", json!({"account": "x"})).await;
    assert_eq!(m["error"]["code"], -32602);
    assert!(s.envoy.log().contains(r#""subject":"anonymous""#));
    drop(s);

    // the development switch reads the unverified payload (and says so in the log)
    let s = setup(config(true)).await;
    let dev = Session::open(s.envoy.url("/mcp"), &[("authorization", &format!("Bearer {forged}"))]).await;
    assert_eq!(dev.list("tools/list", "tools", "name").await.len(), 5);
    let log = s.envoy.log();
    assert!(log.contains("unverified_bearer_dev_only is ON"), "{log}");
    assert!(log.contains(r#""identity_source":"unverified_bearer""#), "{log}");
    // a verified token still wins over the unverified path
    let sess = Session::open(s.envoy.url("/mcp"), &[("authorization", &format!("Bearer {finance}"))]).await;
    assert_eq!(sess.list("tools/list", "tools", "name").await.len(), 4);
}

/// With `payload_key: null` (the default) the claims are the first object `jwt_authn` wrote. Its
/// `header_in_metadata: jwt_header` sorts before `jwt_payload`: the token's header (`alg`, `typ`) was taken
/// for the claims, so identity-keyed rules saw no `groups` (deny rules on them never applied). The header
/// is now skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_claims_without_payload_key_are_the_payload_not_the_header() {
    let mut cfg = config(false);
    cfg["identity"]["jwt_authn"] = json!({"payload_key": null});
    let s = setup(cfg).await;
    let finance = signed_token(json!({"sub": "carol", "groups": ["finance"]})).await;
    let sess = Session::open(s.envoy.url("/json/mcp"), &[("authorization", &format!("Bearer {finance}"))]).await;
    assert_eq!(
        sess.list("tools/list", "tools", "name").await,
        names(&["search", "get_weather", "ledger_read", "transfer"])
    );
    wait_for_log(&s.envoy, r#""subject":"carol""#).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2a_methods_and_agent_card_per_caller() {
    let s = setup(config(false)).await;
    let card = |user: Option<(&'static str, &'static str)>| {
        let mut req = client().get(s.envoy.url("/.well-known/agent-card.json"));
        if let Some((u, g)) = user {
            req = req.header("x-test-user", u).header("x-test-groups", g);
        }
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["name"], "meshwarden-test-agent");
            v["skills"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
        }
    };
    assert_eq!(card(None).await, Vec::<String>::new());
    assert_eq!(card(Some(("bob", ""))).await, names(&["sql", "web-search"]));
    assert_eq!(card(Some(("alice", "finance"))).await, names(&["sql", "web-search", "payments"]));
    // The pre-0.3 card path is filtered the same way.
    let legacy =
        client().get(s.envoy.url("/.well-known/agent.json")).header("x-test-user", "bob").send().await.unwrap();
    let v: Value = legacy.json().await.unwrap();
    let ids: Vec<&str> = v["skills"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["sql", "web-search"], "{v}");

    let rpc = |user: Option<&'static str>, body: Value| {
        // v1.0 requests say so in `A2A-Version`; v0.3 requests carry no version header
        let v1 = body["method"].as_str().unwrap().chars().next().unwrap().is_uppercase();
        let mut req = client().post(s.envoy.url("/a2a")).header("content-type", "application/json").json(&body);
        if v1 {
            req = req.header("a2a-version", "1.0");
        }
        if let Some(u) = user {
            req = req.header("x-test-user", u);
        }
        async move { messages(req.send().await.unwrap()).await }
    };
    let v1 = json!({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}]}}});
    let v03 = json!({"jsonrpc": "2.0", "id": "b", "method": "message/send", "params": {"message": {"messageId": "m2", "role": "user", "parts": [{"kind": "text", "text": "hi03"}]}}});
    let (st, _, m) = rpc(Some("bob"), v1.clone()).await;
    assert_eq!((st, m[0]["result"]["message"]["parts"][0]["text"].clone()), (200, json!("echo: hi")), "{m:?}");
    let (st, _, m) = rpc(Some("bob"), v03.clone()).await;
    assert_eq!(
        (st, m[0]["result"]["parts"][0]["text"].clone()),
        (200, json!("echo: hi03")),
        "v0.3 name matches the v1.0 rule: {m:?}"
    );
    let (st, _, m) = rpc(None, v1).await;
    assert_eq!((st, m[0]["error"]["code"].clone(), m[0]["id"].clone()), (200, json!(-32601), json!(1)));
    let (_, _, m) = rpc(None, v03).await;
    assert_eq!(m[0]["error"]["code"], -32601);
    let (_, _, m) =
        rpc(Some("bob"), json!({"jsonrpc": "2.0", "id": 3, "method": "tasks/cancel", "params": {"id": "t1"}})).await;
    assert_eq!(m[0]["error"]["message"], "Method not found: tasks/cancel");
    // The a2a-sdk's v1.0 spelling (plural) and an older v1.0 one both fall under the v0.3 glob.
    for method in ["ListTaskPushNotificationConfigs", "ListTaskPushNotificationConfig"] {
        let body = json!({"jsonrpc": "2.0", "id": 4, "method": method, "params": {"taskId": "t1"}});
        let (_, _, m) = rpc(Some("bob"), body.clone()).await;
        assert_eq!(m[0]["error"]["message"], format!("Method not found: {method}"), "{m:?}");
        let mut req = client().post(s.envoy.url("/a2a")).header("a2a-version", "1.0").json(&body);
        req = req.header("x-test-user", "carol").header("x-test-groups", "ops");
        let (_, _, m) = messages(req.send().await.unwrap()).await;
        assert_ne!(m[0]["error"]["message"], format!("Method not found: {method}"), "reaches the agent: {m:?}");
        wait_for_log(&s.envoy, &format!(r#""method":"{method}","protocol":"a2a","rule":"a2a-push-admin""#)).await;
    }
    // The extended card (a JSON-RPC answer) is filtered per caller too: its extra skill has no allow rule.
    let ext = json!({"jsonrpc": "2.0", "id": 5, "method": "GetExtendedAgentCard", "params": {}});
    for (user, groups, want) in
        [("bob", "", vec!["sql", "web-search"]), ("alice", "finance", vec!["sql", "web-search", "payments"])]
    {
        let req = client().post(s.envoy.url("/a2a")).header("a2a-version", "1.0").json(&ext);
        let (st, _, m) =
            messages(req.header("x-test-user", user).header("x-test-groups", groups).send().await.unwrap()).await;
        assert_eq!(st, 200, "{m:?}");
        let skills = m[0]["result"]["skills"].as_array().unwrap_or_else(|| panic!("{m:?}"));
        let ids: Vec<&str> = skills.iter().map(|s| s["id"].as_str().unwrap()).collect();
        assert_eq!(ids, want, "{user}: {m:?}");
    }
    let resp = client().get(s.envoy.url("/a2a")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    let log = s.envoy.log();
    assert!(log.contains(r#""method":"message/send","protocol":"a2a","rule":"a2a-users","subject":"bob""#), "{log}");
}

/// An agent card is filtered per caller, while the a2a-sdk's `ETag` and `Cache-Control` describe the
/// whole card. Before the fix a cache revalidating the card it stored for a finance caller got a 304 when
/// another caller asked (the copy with `payments` served to them), and the filtered view went out marked
/// `public, max-age=3600` for any shared cache to store and serve to others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_cards_are_not_cacheable_across_callers() {
    let s = setup(config(false)).await;
    for path in ["/.well-known/agent-card.json", "/.well-known/agent.json"] {
        let get = |user: &'static str, groups: &'static str| {
            client().get(s.envoy.url(path)).header("x-test-user", user).header("x-test-groups", groups)
        };
        let alice = get("alice", "finance").send().await.unwrap();
        assert_eq!(alice.status(), 200);
        let headers = alice.headers().clone();
        assert_eq!(headers.get("cache-control").map(|v| v.to_str().unwrap()), Some("private, no-store"), "{path}");
        assert!(headers.get("etag").is_none(), "{path}: the whole card's ETag on one caller's view: {headers:?}");
        // A cache holding alice's copy revalidates it for bob (any validator matches `*`).
        let bob = get("bob", "").header("if-none-match", "*").send().await.unwrap();
        assert_eq!(bob.status(), 200, "{path}: a 304 would vouch for alice's copy");
        let v: Value = bob.json().await.unwrap();
        let ids: Vec<&str> = v["skills"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["sql", "web-search"], "{path}: {v}");
    }
}

/// A card served as a file honours `Range`: a range holding one skill's object is valid JSON without a
/// `skills` list, and passed unfiltered (bob read the `payments` skill). The card is now asked for whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_card_byte_ranges_are_not_served() {
    let mut cfg = config(false);
    cfg["agent_card_paths"] = json!(["/.well-known/agent-card.json", "/static/agent-card.json"]);
    let s = setup(cfg).await;
    let full = client().get(s.envoy.url("/static/agent-card.json")).header("x-test-user", "alice");
    let full = full.header("x-test-groups", "finance").send().await.unwrap().text().await.unwrap();
    let start = full.find(r#"{"id": "payments""#).or_else(|| full.find(r#"{"id":"payments""#)).expect(&full);
    let end = start + full[start..].find('}').unwrap();
    let range = format!("bytes={start}-{end}");
    let resp = client().get(s.envoy.url("/static/agent-card.json")).header("x-test-user", "bob");
    let resp = resp.header("range", &range).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert!(!text.contains("payments"), "{range}: {status} {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<&str> = v["skills"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!((status, ids), (200, vec!["sql", "web-search"]), "{text}");
}

/// The MCP Python SDK routes an answer to the stream of the POST that registered its request id last
/// (`_request_streams[str(id)]`, the TypeScript SDK likewise): a `ping` with id n sent while a
/// `tools/list` with id n is in flight in the same session receives the `tools/list` answer. The filter
/// read only the answers of POSTs that asked for a list, so bob got every tool on his `ping`'s stream
/// (SSE and JSON servers alike). Every MCP answer is now read for list-shaped responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_answers_delivered_on_another_requests_stream_are_filtered() {
    let s = setup(config(false)).await;
    for path in ["/mcp", "/json/mcp"] {
        let bob = std::sync::Arc::new(Session::open(s.envoy.url(path), &[("x-test-user", "bob")]).await);
        let mut crossed = 0;
        for n in 1..=80u64 {
            let list = {
                let bob = bob.clone();
                tokio::spawn(async move { bob.post(&json!({"jsonrpc": "2.0", "id": n, "method": "tools/list"})).await })
            };
            // The window is the server's handling of the list: a JSON server's is shorter.
            tokio::time::sleep(std::time::Duration::from_micros(500 * (n % 4))).await;
            let ping = json!({"jsonrpc": "2.0", "id": n, "method": "ping"});
            let answers = tokio::time::timeout(std::time::Duration::from_secs(3), bob.post(&ping)).await;
            list.abort();
            let Ok((_, _, msgs)) = answers else { continue };
            for m in msgs.iter().filter(|m| m["result"]["tools"].is_array()) {
                let tools: Vec<&str> =
                    m["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
                assert_eq!(tools, ["search", "get_weather"], "{path}: the list answer on the ping's stream: {m}");
                crossed += 1;
            }
            if crossed >= 3 {
                break;
            }
        }
        assert!(crossed > 0, "{path}: no tools/list answer reached a ping's stream: the test proved nothing");
    }
}

/// MCP 2026-07-28 results carry cache hints: `cacheScope: "public"` lets a shared cache serve a result
/// to any caller (the Python SDK client's `share_public` serves such entries across authorization
/// contexts). The filter passed the server's `"public"` on a tool list filtered for bob and on a resource
/// read the policy allowed him: shared, one caller's view reached the others. Every answer is now
/// `"private"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hints_of_filtered_answers_are_private() {
    let (sse, json_srv, a2a) = tokio::join!(
        PyServer::start("mcp_server.py", &["--public-cache"]),
        PyServer::start("mcp_server.py", &["--json", "--public-cache"]),
        PyServer::start("a2a_server.py", &[])
    );
    let (sse, json_srv, a2a) = (sse.unwrap(), json_srv.unwrap(), a2a.unwrap());
    let envoy = EnvoyBuilder::new("mcp-authz-servers.yaml")
        .var("MCP_SSE_PORT", sse.port.to_string())
        .var("MCP_JSON_PORT", json_srv.port.to_string())
        .var("A2A_PORT", a2a.port.to_string())
        .var("JWKS", json_string(&jwks()))
        .filter_config("mcp-authz", &config(false))
        .start()
        .await
        .unwrap();
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}});
    for path in ["/mcp", "/json/mcp"] {
        let post = |method: &'static str, name: Option<&'static str>, params: Value| {
            let mut req = client()
                .post(envoy.url(path))
                .header("accept", "application/json, text/event-stream")
                .header("x-test-user", "bob")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", method)
                .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}));
            if let Some(n) = name {
                req = req.header("mcp-name", n);
            }
            async move { messages(req.send().await.unwrap()).await }
        };
        let (st, _, m) = post("tools/list", None, json!({"_meta": meta.clone()})).await;
        let answer = m.iter().find(|m| m["id"] == 1).unwrap_or_else(|| panic!("{path}: {m:?}"));
        let tools: Vec<&str> =
            answer["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!((st, tools), (200, vec!["search", "get_weather"]), "{path}: {answer}");
        assert_eq!(answer["result"]["cacheScope"], "private", "{path}: {answer}");
        let uri = "file:///public/readme";
        let (st, _, m) = post("resources/read", Some(uri), json!({"uri": uri, "_meta": meta.clone()})).await;
        let answer = m.iter().find(|m| m["id"] == 1).unwrap_or_else(|| panic!("{path}: {m:?}"));
        assert_eq!((st, answer["result"]["contents"][0]["text"].clone()), (200, json!("public readme")), "{path}");
        assert_eq!(answer["result"]["cacheScope"], "private", "{path}: {answer}");
        assert_eq!(answer["result"]["ttlMs"], 60_000, "{path}: the rest of the hint is the server's");
    }
}

/// Answers to calls are read for list answers of other requests (see the test above), but not at the
/// price of large answers: a JSON answer without `Content-Length` is not buffered (Envoy resets an answer
/// whose buffered body crosses its limit before the filter sees the chunk). A 3 MB tool answer passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunked_answers_to_calls_pass() {
    for size in [300_000usize, 3_000_000] {
        let srv = PyServer::start("big_answer_server.py", &[&size.to_string()]).await.unwrap();
        let envoy = EnvoyBuilder::new("mcp-authz-servers.yaml")
            .var("MCP_SSE_PORT", srv.port.to_string())
            .var("MCP_JSON_PORT", srv.port.to_string())
            .var("A2A_PORT", srv.port.to_string())
            .var("JWKS", json_string(&jwks()))
            .filter_config("mcp-authz", &config(false))
            .start()
            .await
            .unwrap();
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search", "arguments": {"query": "q"}}});
        let resp = client().post(envoy.url("/json/mcp")).header("x-test-user", "bob").json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap_or_else(|e| panic!("{size}: answer cut: {e}"));
        assert_eq!(v["result"]["content"][0]["text"].as_str().map(str::len), Some(size));
    }
}

/// The a2a-sdk client sends `A2A-Version` on every request of every binding. With `detect_by_headers`
/// (the default) the filter took any such request to an unlisted path for A2A JSON-RPC: the HTTP+JSON
/// binding's `GET /tasks/{id}` was answered 405 "use POST", its `POST /message:send` 400 (not a JSON-RPC
/// message) and a body-less `POST /tasks/{id}:cancel` 400 (parse error), so an agent on that binding could
/// not be used through the gateway at all, though only the JSON-RPC binding is inspected. A JSON-RPC call
/// on an unlisted path is still decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2a_http_json_binding_requests_are_not_taken_for_json_rpc() {
    let s = setup(config(false)).await;
    let rest = |req: reqwest::RequestBuilder| req.header("a2a-version", "1.0").header("x-test-user", "bob").send();
    let send = json!({"message": {"messageId": "r1", "role": "ROLE_USER", "parts": [{"text": "hi rest"}]}});
    let resp = rest(client().post(s.envoy.url("/rest/message:send")).json(&send)).await.unwrap();
    let (status, text) = (resp.status().as_u16(), resp.text().await.unwrap());
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("echo: hi rest"), "{text}");
    let resp = rest(client().get(s.envoy.url("/rest/tasks/no-such-task"))).await.unwrap();
    let (status, text) = (resp.status().as_u16(), resp.text().await.unwrap());
    assert!(status != 405 && !text.contains("use POST"), "{status} {text}");
    assert!(text.to_ascii_lowercase().contains("task"), "the agent's answer: {status} {text}");
    let resp = rest(client().post(s.envoy.url("/rest/tasks/no-such-task:cancel"))).await.unwrap();
    let (status, text) = (resp.status().as_u16(), resp.text().await.unwrap());
    assert!(!text.contains("Parse error") && !text.contains("Invalid Request"), "{status} {text}");
    assert!(text.to_ascii_lowercase().contains("task"), "the agent's answer: {status} {text}");
    // A JSON-RPC call with the header on an unlisted path is still authorized (anonymous: denied).
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "SendMessage", "params": send});
    let resp = client().post(s.envoy.url("/agent-x")).header("a2a-version", "1.0").json(&call).send().await.unwrap();
    let (status, _, m) = messages(resp).await;
    assert_eq!((status, m[0]["error"]["code"].clone()), (200, json!(-32601)), "{m:?}");
}

/// A2A has no notifications: the a2a-sdk executes and answers a message without an `id` like any call
/// (`"id": null` in the answer). Before the fix the filter decided it as a notification and did not read
/// the answer: bob's `GetExtendedAgentCard` without an id got every skill of the extended card
/// (`payments`, `ops-console`), and a denied `SendMessage` without an id an empty 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2a_calls_without_an_id_are_filtered_and_answered() {
    let s = setup(config(false)).await;
    let post = |user: Option<&'static str>, body: Value| {
        let mut req = client().post(s.envoy.url("/a2a")).header("a2a-version", "1.0").json(&body);
        if let Some(u) = user {
            req = req.header("x-test-user", u);
        }
        async move { messages(req.send().await.unwrap()).await }
    };
    let (st, _, m) = post(Some("bob"), json!({"jsonrpc": "2.0", "method": "GetExtendedAgentCard", "params": {}})).await;
    assert_eq!(st, 200, "{m:?}");
    let skills = m[0]["result"]["skills"].as_array().unwrap_or_else(|| panic!("{m:?}"));
    let ids: Vec<&str> = skills.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["sql", "web-search"], "{m:?}");
    let send = json!({"jsonrpc": "2.0", "method": "SendMessage",
                      "params": {"message": {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}]}}});
    let (st, _, m) = post(None, send.clone()).await;
    assert_eq!((st, m.len()), (200, 1), "{m:?}");
    assert_eq!((m[0]["id"].clone(), m[0]["error"]["code"].clone()), (Value::Null, json!(-32601)), "{m:?}");
    // Allowed, it reaches the agent as the call it is.
    let (st, _, m) = post(Some("bob"), send).await;
    assert_eq!((st, m[0]["result"]["message"]["parts"][0]["text"].clone()), (200, json!("echo: hi")), "{m:?}");
}

/// The a2a-sdk reads params with protobuf's `ParseDict`, which takes `context_id` as `contextId` (and of
/// both, the last). A deny rule on `message.contextId` let `context_id` through to the agent, and a body
/// with both was decided on the one the agent does not use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2a_argument_rules_bind_the_other_protobuf_spelling() {
    let mut cfg = config(false);
    cfg["policy"]["rules"].as_array_mut().unwrap().insert(
        0,
        json!({"name": "no-audit-context", "effect": "deny", "protocol": "a2a",
               "arguments": [{"path": "message.contextId", "equals": "audit"}]}),
    );
    let s = setup(cfg).await;
    let send = |message: Value| {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": message}});
        let req = client().post(s.envoy.url("/a2a")).header("a2a-version", "1.0").header("x-test-user", "bob");
        async move { messages(req.json(&body).send().await.unwrap()).await }
    };
    let msg = |ctx: (&str, &str)| {
        let mut m = json!({"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}]});
        m[ctx.0] = json!(ctx.1);
        m
    };
    let (st, _, m) = send(msg(("contextId", "c1"))).await;
    assert_eq!((st, m[0]["result"]["message"]["parts"][0]["text"].clone()), (200, json!("echo: hi")), "{m:?}");
    for spelling in ["contextId", "context_id"] {
        let (st, _, m) = send(msg((spelling, "audit"))).await;
        assert_eq!((st, m[0]["error"]["code"].clone()), (200, json!(-32601)), "{spelling}: {m:?}");
    }
    let mut both = msg(("contextId", "c1"));
    both["context_id"] = json!("audit");
    let (st, _, m) = send(both).await;
    assert_eq!((st, m[0]["error"]["code"].clone()), (400, json!(-32600)), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_settings_and_invalid_config() {
    // GET/DELETE session requests go through the policy: without the builtin allowance they are refused
    let mut cfg = config(false);
    cfg["policy"]["builtin_allow"] = json!(["initialize", "notifications/*", "tools/list"]);
    cfg["other_paths"] = json!("deny");
    cfg["max_response_bytes"] = json!(1024);
    let s = setup(cfg).await;
    // a list answer too large to filter is withheld (fail closed), never passed through unfiltered
    let admin = Session::open(s.envoy.url("/json/mcp"), &[("x-test-user", "root"), ("x-test-groups", "admin")]).await;
    let (st, _, m) = admin.post(&json!({"jsonrpc": "2.0", "id": "big", "method": "tools/list"})).await;
    assert_eq!(st, 200);
    assert_eq!((m[0]["id"].clone(), m[0]["error"]["code"].clone()), (json!("big"), json!(-32603)), "{m:?}");
    assert!(m[0]["error"]["message"].as_str().unwrap().contains("could not filter"), "{m:?}");
    assert!(m[0].get("result").is_none());
    let (_, _, m) = admin.call(json!(1), "get_weather", json!({"city": "Rome"})).await;
    assert_eq!(
        m["result"]["content"][0]["text"], "sunny in Rome",
        "other answers are not filtered, whatever their size"
    );
    let resp = client()
        .get(s.envoy.url("/mcp"))
        .header("accept", "text/event-stream")
        .header("mcp-session-id", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer error=\"insufficient_scope\"");
    let resp = client().delete(s.envoy.url("/mcp")).header("mcp-session-id", "x").send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let resp = client().get(s.envoy.url("/somewhere/else")).send().await.unwrap();
    assert_eq!(resp.status(), 403, "other_paths: deny");
    let resp = client()
        .post(s.envoy.url("/mcp"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(vec![0x1f, 0x8b, 0, 0])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    drop(s);

    let log = EnvoyBuilder::new("mcp-authz.yaml")
        .upstream_port(9)
        .filter_config("mcp-authz", &json!({"policy": {"rules": [{"name": "r", "effect": "allow", "arguments": [{"path": "a", "regex": "("}]}]}}))
        .start_expect_failure()
        .await
        .unwrap();
    assert!(log.contains("$.policy.rules[0].arguments[0].regex"), "{log}");
}

/// A path spelled so that Envoy's route (prefix `/`) and the filter see something else than `/mcp`, but a
/// normalizing server (uvicorn decodes `%6D`; `..`, `//` and case are normalized by many stacks) routes
/// to its MCP endpoint: authorized as MCP, never passed as "other path". No MCP headers are sent, so
/// header detection cannot be what catches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_spellings_of_the_mcp_endpoint_are_authorized() {
    let mock = meshwarden_integration_tests::mock_llm::MockLlm::start().await.unwrap();
    let policy = json!({"policy": {"rules": [
        {"name": "search", "effect": "allow", "methods": ["tools/call"], "targets": ["search"]}]}});
    let envoy = authz_envoy(mock.port(), &policy).await;
    let call = |tool: &str| json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": tool, "arguments": {}}});
    for path in ["/%6Dcp", "/%6dcp", "//mcp", "/x/../mcp", "/MCP", "/m%63p?session=1"] {
        let resp = client().post(envoy.url(path)).json(&call("delete_all")).send().await.unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        assert_eq!((status, v["error"]["code"].as_i64()), (200, Some(-32602)), "{path}: {v}");
        assert!(mock.requests().is_empty(), "{path}: a denied call reached the upstream");
    }
    // The allowed call still goes through under such a spelling, and ordinary other paths still pass.
    let resp = client().post(envoy.url("/%6Dcp")).json(&call("search")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.requests().len(), 1);
    let resp = client().post(envoy.url("/v1/chat/completions")).json(&call("delete_all")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.requests().len(), 2, "a non-MCP path is not MCP");
}

/// The policy of the scripted-server tests: anonymous callers may use `search` and `get_weather` (so
/// `delete_file` must never show in a list they get), every prompt, and public resources.
fn scripted_policy() -> Value {
    json!({"policy": {"rules": [
        {"name": "reads", "effect": "allow", "methods": ["tools/call"], "targets": ["search", "get_weather"]},
        {"name": "prompts", "effect": "allow", "methods": ["prompts/get"]},
        {"name": "public", "effect": "allow", "methods": ["resources/read", "resources/subscribe"],
         "targets": ["file:///public/*"]}
    ]}})
}

/// Envoy with mcp-authz (`cfg`) in front of the upstream on `upstream_port`.
async fn authz_envoy(upstream_port: u16, cfg: &Value) -> Envoy {
    EnvoyBuilder::new("mcp-authz.yaml")
        .upstream_port(upstream_port)
        .filter_config("mcp-authz", cfg)
        .start()
        .await
        .unwrap()
}

/// Envoy + mcp-authz in front of the scripted Rust MCP server (`mock_mcp`: SSE answers with event ids,
/// an event store, GET replay after `Last-Event-ID`, chosen per request by `x-mock-sse`).
async fn scripted() -> (Envoy, meshwarden_integration_tests::mock_mcp::MockMcp) {
    let mock = meshwarden_integration_tests::mock_mcp::MockMcp::start().await.unwrap();
    let envoy = authz_envoy(mock.port(), &scripted_policy()).await;
    (envoy, mock)
}

/// POST `body` to `path`; (status, content-type, raw answer text).
async fn post_text(envoy: &Envoy, path: &str, body: String, hdrs: &[(&str, &str)]) -> (u16, String, String) {
    let mut req = client()
        .post(envoy.url(path))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", "s-1")
        .body(body);
    for (k, v) in hdrs {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, ct, resp.text().await.unwrap())
}

/// The JSON-RPC messages of an SSE answer's `data:` lines (empty data skipped).
fn sse_messages(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("unreadable event {d:?}: {e}")))
        .collect()
}

fn tool_names(m: &Value) -> Vec<String> {
    m["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_string()).collect()
}

/// A `tools/list` answer stored by the server's event store comes back on the GET stream after
/// `Last-Event-ID` (2025-11-25 polling: the POST stream ended after its priming event), or in another
/// POST's stream: it is filtered for the caller there too. Before the fix the GET stream had an empty
/// plan and passed `delete_file` through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_list_answers_are_filtered_on_get_streams_and_other_posts() {
    let (envoy, _mock) = scripted().await;
    let list = |id: &str| json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"}).to_string();
    // An SSE answer with event ids, filtered as planned.
    let (st, ct, text) = post_text(&envoy, "/mcp", list("t1"), &[("x-mock-sse", "events")]).await;
    assert_eq!((st, ct.as_str()), (200, "text/event-stream"), "{text}");
    // Event ids leave tagged for the caller (see `stream_resumption_is_bound_to_the_caller`).
    assert!(text.contains("id: ev-0~"), "{text}");
    let ev0 = event_ids(&text).first().cloned().unwrap();
    assert_eq!(tool_names(&sse_messages(&text)[0]), names(&["search", "get_weather"]));
    // Polling: the POST stream carries only the priming event (its id survives the filter).
    let (st, _, text) = post_text(&envoy, "/mcp", list("t2"), &[("x-mock-sse", "poll")]).await;
    assert_eq!(st, 200);
    assert!(text.contains("id: ev-1~") && sse_messages(&text).is_empty(), "{text}");
    let ev1 = event_ids(&text).first().cloned().unwrap();
    // The client resumes with GET + Last-Event-ID: the stored answer is replayed there, filtered.
    for last in [ev1, ev0] {
        let resp = client()
            .get(envoy.url("/mcp"))
            .header("accept", "text/event-stream")
            .header("mcp-session-id", "s-1")
            .header("mcp-protocol-version", "2025-11-25")
            .header("last-event-id", &last)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert!(!text.contains("delete_file"), "Last-Event-ID {last}: replay passed unfiltered: {text}");
        let msgs = sse_messages(&text);
        assert!(!msgs.is_empty(), "{text}");
        for m in &msgs {
            assert_eq!(tool_names(m), names(&["search", "get_weather"]), "{text}");
        }
        assert!(text.contains("id: ev-2~"), "event ids are kept for further resumption: {text}");
    }
    // Another POST's stream carrying the stored answers (ids this POST did not plan): filtered by shape.
    let prompts = json!({"jsonrpc": "2.0", "id": "p1", "method": "prompts/list"}).to_string();
    let (st, _, text) = post_text(&envoy, "/mcp", prompts, &[("x-mock-sse", "replay")]).await;
    assert_eq!(st, 200);
    assert!(!text.contains("delete_file"), "{text}");
    let msgs = sse_messages(&text);
    assert_eq!(msgs.len(), 3, "{text}");
    assert_eq!(msgs[2]["result"]["prompts"][0]["name"], "greet");
    let st = envoy.stats("mcp_authz").await.unwrap();
    assert!(st["meshwarden.mcp_authz.list_items_hidden"] >= 5, "{st:?}");
}

/// Servers route answers by request id across a session's POSTs (MCP Python SDK
/// `_request_streams[str(id)]`): a `prompts/list` with the id of an in-flight `tools/list` may receive
/// the `tools/list` answer on its stream. Under the id this POST planned as a `prompts/list`, the whole
/// tool list passed, `delete_file` included; it is filtered by shape like any other list answer now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_lists_answer_under_this_posts_id_is_filtered() {
    let (envoy, _mock) = scripted().await;
    let tools = json!({"jsonrpc": "2.0", "id": "same", "method": "tools/list"}).to_string();
    let (st, _, text) = post_text(&envoy, "/mcp", tools, &[("x-mock-sse", "events")]).await;
    assert_eq!(st, 200);
    assert!(!text.contains("delete_file"), "{text}");
    // The server's stream for the prompts/list with the same id carries the stored tools/list answer.
    let prompts = json!({"jsonrpc": "2.0", "id": "same", "method": "prompts/list"}).to_string();
    let (st, _, text) = post_text(&envoy, "/mcp", prompts, &[("x-mock-sse", "replay")]).await;
    assert_eq!(st, 200);
    let msgs = sse_messages(&text);
    assert_eq!(msgs.len(), 2, "{text}");
    assert_eq!(tool_names(&msgs[0]), names(&["search", "get_weather"]), "{text}");
    assert_eq!(msgs[1]["result"]["prompts"][0]["name"], "greet", "{text}");
    assert!(!text.contains("delete_file"), "{text}");
}

/// A client that accepts gzip (most HTTP clients say so) in front of a server that compresses when
/// allowed: the filter strips `accept-encoding`, so the list comes back readable and filtered. Were the
/// header forwarded, the answer would be gzip, unreadable to the filter, and withheld (fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_filtered_for_clients_that_accept_gzip() {
    let (envoy, mock) = scripted().await;
    let list = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"}).to_string();
    let gzip = [("accept-encoding", "gzip, deflate"), ("x-mock-gzip", "1")];
    let (st, ct, text) = post_text(&envoy, "/mcp", list.clone(), &gzip).await;
    assert_eq!((st, ct.as_str()), (200, "application/json"), "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not plain JSON ({e}): {text:?}"));
    assert_eq!(tool_names(&answer), names(&["search", "get_weather"]));
    // The mock does compress when asked directly: the case above is the filter's doing.
    let direct = client()
        .post(format!("http://127.0.0.1:{}/mcp", mock.port()))
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip")
        .header("x-mock-gzip", "1")
        .body(list)
        .send()
        .await
        .unwrap();
    assert_eq!(direct.headers().get("content-encoding").map(|v| v.to_str().unwrap()), Some("gzip"));
}

/// Two requests of one batch with the same id (also `1` and `1.0`, which servers echo alike) would share
/// one plan entry: the `tools/list` answer was filtered as the `prompts/list` one, i.e. not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_requests_sharing_an_id_are_refused() {
    let (envoy, _mock) = scripted().await;
    for second_id in ["1", "1.0"] {
        let batch = format!(
            r#"[{{"jsonrpc":"2.0","id":1,"method":"tools/list"}},{{"jsonrpc":"2.0","id":{second_id},"method":"prompts/list"}}]"#
        );
        let (st, _, text) = post_text(&envoy, "/mcp", batch, &[]).await;
        assert!(!text.contains("delete_file"), "{second_id}: {text}");
        assert_eq!(st, 400, "{second_id}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v[1]["error"]["code"], -32600, "{text}");
        assert!(v[1]["error"]["message"].as_str().unwrap().contains("id already used"), "{text}");
    }
    // Distinct ids: forwarded, each answer filtered as its own list.
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"prompts/list"}]"#;
    let (st, _, text) = post_text(&envoy, "/mcp", batch.into(), &[]).await;
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(tool_names(&v[0]), names(&["search", "get_weather"]));
    assert_eq!(v[1]["result"]["prompts"][0]["name"], "greet");
}

/// `;` path parameters (`/mcp;x=1`, `/x/..;/mcp`) are ignored by Tomcat / Spring routing: such a path
/// is the MCP endpoint and is authorized, not passed as another path (`other_paths: pass`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_parameters_do_not_hide_the_mcp_endpoint() {
    let mock = meshwarden_integration_tests::mock_llm::MockLlm::start().await.unwrap();
    let envoy = authz_envoy(mock.port(), &scripted_policy()).await;
    let call =
        json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "delete_file", "arguments": {}}});
    for path in ["/mcp;x=1", "/mcp;jsessionid=0123", "/x/..;/mcp", "/MCP;a=b"] {
        let resp = client().post(envoy.url(path)).json(&call).send().await.unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        assert_eq!((status, v["error"]["code"].as_i64()), (200, Some(-32602)), "{path}: {v}");
        assert!(mock.requests().is_empty(), "{path}: a denied call reached the upstream");
    }
}

/// A trailing slash is the endpoint (Express, by default, routes `/a2a/` as `/a2a`: the A2A JS SDK): the
/// call is decided, not passed as another path. A path that is one endpoint as sent and another once
/// normalized (`/mcp/..;/.well-known/agent-card.json`: Tomcat / Spring serve the card for it, which
/// passed unfiltered as an MCP GET) is refused, nothing forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailing_slashes_and_paths_naming_two_endpoints() {
    let mock = meshwarden_integration_tests::mock_llm::MockLlm::start().await.unwrap();
    let mut cfg = scripted_policy();
    cfg["a2a_paths"] = json!(["/a2a"]);
    let envoy = authz_envoy(mock.port(), &cfg).await;
    let send = json!({"jsonrpc": "2.0", "id": 1, "method": "message/send",
                      "params": {"message": {"role": "user", "parts": []}}});
    let resp = client().post(envoy.url("/a2a/")).json(&send).send().await.unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!((status, v["error"]["code"].as_i64()), (200, Some(-32601)), "{v}");
    assert!(mock.requests().is_empty(), "an A2A call to /a2a/ reached the upstream undecided");
    for path in ["/mcp/..;/.well-known/agent-card.json", "/mcp/..;/a2a"] {
        let resp = client().get(envoy.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        assert_eq!((status, v["error"]["code"].as_i64()), (400, Some(-32600)), "{path}: {v}");
        assert!(mock.requests().is_empty(), "{path}: reached the upstream");
    }
}

/// A URI glob matches text: `file:///public/*` matches `file:///public/../private/keys` (and its
/// `%2e%2e` / `%252e%252e` spellings) while the server reads /private/keys. Refused, whoever asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_uris_with_dot_segments_are_refused() {
    let (envoy, _mock) = scripted().await;
    let read = |method: &str, uri: &str| {
        json!({"jsonrpc": "2.0", "id": 4, "method": method, "params": {"uri": uri}}).to_string()
    };
    let (st, _, text) = post_text(&envoy, "/mcp", read("resources/read", "file:///public/readme.md"), &[]).await;
    assert_eq!(st, 200);
    assert!(text.contains("contents of file:///public/readme.md"), "{text}");
    for uri in [
        "file:///public/../private/keys",
        "file:///public/%2e%2e/private/keys",
        "file:///public/%2E%2E/private/keys",
        "file:///public/%252e%252e/private/keys",
    ] {
        for method in ["resources/read", "resources/subscribe"] {
            let (st, _, text) = post_text(&envoy, "/mcp", read(method, uri), &[]).await;
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!((st, v["error"]["code"].as_i64()), (200, Some(-32002)), "{method} {uri}: {text}");
            assert_eq!(v["error"]["message"], format!("Resource not found: {uri}"));
        }
    }
    wait_for_log(&envoy, r#""rule":"uri-dot-segments""#).await;
}

/// A WHATWG URL parser (JavaScript's `URL`, which the TypeScript MCP SDK reads `resources/read` URIs
/// with) removes tabs and newlines anywhere and trims C0 controls and spaces at the ends:
/// `file:///public/\t../private/keys` matches `file:///public/*` as text and is `file:///private/keys`
/// to such a server. Before the fix these reached the server (here the scripted one answered them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_uris_that_url_parsers_read_with_dot_segments_are_refused() {
    let (envoy, _mock) = scripted().await;
    for uri in [
        "file:///public/\t../private/keys",
        "file:///public/.\n./private/keys",
        "file:///public/\r\n..\t/private/keys",
        "file:///public/x/.. ",
    ] {
        let body = json!({"jsonrpc": "2.0", "id": 9, "method": "resources/read", "params": {"uri": uri}});
        let (st, _, text) = post_text(&envoy, "/mcp", body.to_string(), &[]).await;
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{uri:?}: {e}: {text}"));
        assert_eq!((st, v["error"]["code"].as_i64()), (200, Some(-32002)), "{uri:?}: {text}");
        assert!(!text.contains("contents of"), "{uri:?} reached the server: {text}");
    }
    wait_for_log(&envoy, r#""rule":"uri-dot-segments""#).await;
}

/// The TypeScript SDK looks resources up by `new URL(uri)`: `FILE:///private/keys`,
/// `file://localhost/private/keys` or ` file:///private/keys` is `file:///private/keys` to it. A deny rule
/// on `file:///private/*` compared text only and let them through (here the scripted server answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_deny_rules_bind_every_spelling_a_url_parser_reads() {
    let mock = meshwarden_integration_tests::mock_mcp::MockMcp::start().await.unwrap();
    let cfg = json!({"policy": {"default": "allow", "rules": [
        {"name": "no-private", "effect": "deny", "methods": ["resources/read"], "targets": ["file:///private/*"]}
    ]}});
    let envoy = authz_envoy(mock.port(), &cfg).await;
    let read = |uri: &str| json!({"jsonrpc": "2.0", "id": 5, "method": "resources/read", "params": {"uri": uri}});
    let (_, _, text) = post_text(&envoy, "/mcp", read("file:///public/readme.md").to_string(), &[]).await;
    assert!(text.contains("contents of file:///public/readme.md"), "{text}");
    for uri in ["FILE:///private/keys", "file://localhost/private/keys", " file:///private/keys", "file:/private/keys"]
    {
        let (st, _, text) = post_text(&envoy, "/mcp", read(uri).to_string(), &[]).await;
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{uri:?}: {e}: {text}"));
        assert_eq!((st, v["error"]["code"].as_i64()), (200, Some(-32002)), "{uri:?}: {text}");
    }
    wait_for_log(&envoy, r#""rule":"no-private""#).await;
}

/// 2026-07-28 replaced `resources/subscribe` by `subscriptions/listen`, whose
/// `notifications.resourceSubscriptions` lists the URIs to hear about. A rule allowing the method used to
/// let any URI through (updates about `file:///private/keys` for a caller allowed only public ones); each
/// URI is now authorized as its `resources/subscribe` would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_subscriptions_are_authorized_per_resource() {
    let mock = meshwarden_integration_tests::mock_mcp::MockMcp::start().await.unwrap();
    let mut cfg = scripted_policy();
    cfg["policy"]["rules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "listen", "effect": "allow", "methods": ["subscriptions/listen"]}));
    let envoy = authz_envoy(mock.port(), &cfg).await;
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {}});
    let listen = |id: u64, notifications: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "subscriptions/listen",
               "params": {"notifications": notifications, "_meta": meta}})
        .to_string()
    };
    let modern = [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "subscriptions/listen")];
    for (id, uris) in [
        (1, json!({"resourceSubscriptions": ["file:///public/readme.md", "file:///private/keys"]})),
        (2, json!({"resource_subscriptions": ["file:///private/keys"]})),
        (3, json!({"resourceSubscriptions": ["file:///public/../private/keys"]})),
    ] {
        let (st, _, text) = post_text(&envoy, "/mcp", listen(id, uris.clone()), &modern).await;
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{uris}: {e}: {text}"));
        // The filter's hide answer names the method; the scripted server's own -32601 does not.
        assert_eq!(
            (st, v["error"]["message"].as_str()),
            (200, Some("Method not found: subscriptions/listen")),
            "{uris}: {text}"
        );
    }
    wait_for_log(&envoy, r#""method":"subscriptions/listen","protocol":"mcp","rule":"default""#).await;
    // Public resources only: the listen reaches the server (which does not implement it).
    let body = listen(4, json!({"resourceSubscriptions": ["file:///public/readme.md"], "toolsListChanged": true}));
    let (st, _, text) = post_text(&envoy, "/mcp", body, &modern).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((st, v["error"]["message"].as_str()), (200, Some("Method not found")), "forwarded: {text}");
}

/// An SSE event carrying the planned answer whose JSON serde_json cannot read (a lone surrogate escape in
/// a key, which Python's `json` accepts) is replaced by -32603 for the planned id, as a JSON answer is;
/// before the fix it passed unfiltered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_sse_events_are_withheld() {
    let (envoy, _mock) = scripted().await;
    let list = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}).to_string();
    let (st, _, text) = post_text(&envoy, "/mcp", list, &[("x-mock-sse", "surrogate")]).await;
    assert_eq!(st, 200);
    assert!(!text.contains("delete_file"), "{text}");
    let msgs = sse_messages(&text);
    assert_eq!(msgs.len(), 1, "{text}");
    assert_eq!((msgs[0]["id"].clone(), msgs[0]["error"]["code"].clone()), (json!(5), json!(-32603)), "{text}");
    let st = envoy.stats("mcp_authz").await.unwrap();
    assert_eq!(st["meshwarden.mcp_authz.answer_filter_failed"], 1, "{st:?}");
}

/// The mTLS peer's SPIFFE ID as claims (`spiffe.namespace`, `spiffe.id`), through Envoy's TLS listener
/// with client certificates as Istio issues them: a rule on the namespace decides, with or without a
/// `sub` from a trusted header; and without a `sub` the audit subject is the SPIFFE ID, also when no rule
/// reads the `spiffe` claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_identity_under_mtls() {
    let mock = meshwarden_integration_tests::mock_mcp::MockMcp::start().await.unwrap();
    let tls = tempfile::tempdir().unwrap();
    meshwarden_integration_tests::pki::spiffe_pki(
        tls.path(),
        &[("a1", "spiffe://cluster.local/ns/team-a/sa/bot"), ("b1", "spiffe://cluster.local/ns/team-b/sa/bot")],
    )
    .unwrap();
    let start = |policy: Value| {
        EnvoyBuilder::new("mcp-authz-mtls.yaml")
            .upstream_port(mock.port())
            .var("TLS_DIR", tls.path().display().to_string())
            .filter_config(
                "mcp-authz",
                &json!({"identity": {"trusted_headers": [{"header": "x-user", "claim": "sub"}]}, "policy": policy}),
            )
            .start()
    };
    // (HTTP status, JSON-RPC answer) of a `tools/call search` sent with client certificate `client` and
    // extra headers.
    let call_with = |port: u16, client: &str, headers: &[String]| {
        let d = tls.path();
        let body = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                          "params": {"name": "search", "arguments": {"q": "x"}}})
        .to_string();
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "-w", "\n%{http_code}", "--noproxy", "*", "--cacert"])
            .arg(d.join("ca.crt"))
            .arg("--cert")
            .arg(d.join(format!("{client}.crt")))
            .arg("--key")
            .arg(d.join(format!("{client}.key")))
            .args(["-H", "content-type: application/json", "-H", "accept: application/json, text/event-stream"])
            .args(["-d", &body]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        let out = cmd.arg(format!("https://127.0.0.1:{port}/mcp")).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (answer, status) = text.rsplit_once('\n').unwrap_or_else(|| panic!("curl: {text:?}"));
        let v: Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
        (status.to_string(), v)
    };
    let call = |port: u16, client: &str, user: Option<&str>| {
        call_with(port, client, &user.map(|u| vec![format!("x-user: {u}")]).unwrap_or_default())
    };
    let allowed = |v: &Value| v.get("result").is_some() && v.get("error").is_none();

    let by_namespace = start(json!({"rules": [{"name": "team-a", "effect": "allow", "methods": ["tools/call"],
        "targets": ["search"], "identity": [{"claim": "spiffe.namespace", "equals": "team-a"}]}]}))
    .await
    .unwrap();
    let port = by_namespace.port;
    let (st, v) = call(port, "a1", None);
    assert!(st == "200" && allowed(&v), "team-a may search: {st} {v}");
    let (st, v) = call(port, "b1", None);
    assert_eq!((st.as_str(), v["error"]["code"].clone()), ("200", json!(-32602)), "team-b is denied (hide): {v}");
    // A `sub` from a trusted header changes the subject, not what the namespace rule decides.
    let (st, v) = call(port, "a1", Some("alice"));
    assert!(st == "200" && allowed(&v), "{st} {v}");
    let (_, v) = call(port, "b1", Some("alice"));
    assert_eq!(v["error"]["code"], json!(-32602), "{v}");
    wait_for_log(&by_namespace, r#""rule":"team-a","subject":"spiffe://cluster.local/ns/team-a/sa/bot""#).await;
    wait_for_log(&by_namespace, r#""rule":"team-a","subject":"alice""#).await;
    drop(by_namespace);

    // No rule reads `spiffe`: the audit subject still falls back to the SPIFFE ID when there is no `sub`.
    let anyone =
        start(json!({"rules": [{"name": "anyone", "effect": "allow", "methods": ["tools/call"]}]})).await.unwrap();
    let (st, v) = call(anyone.port, "b1", None);
    assert!(st == "200" && allowed(&v), "{st} {v}");
    let (st, v) = call(anyone.port, "a1", Some("alice"));
    assert!(st == "200" && allowed(&v), "{st} {v}");
    wait_for_log(&anyone, r#""rule":"anyone","subject":"spiffe://cluster.local/ns/team-b/sa/bot""#).await;
    wait_for_log(&anyone, r#""rule":"anyone","subject":"alice""#).await;
    drop(anyone);

    // A token claim named by a path inside `spiffe` (`"spiffe.namespace": "team-a"`) was read before the
    // certificate's namespace: team-b's workload passed team-a's rule. The token here is unsigned (the
    // development switch reads it), the claims are what an identity provider could issue.
    let dev = EnvoyBuilder::new("mcp-authz-mtls.yaml")
        .upstream_port(mock.port())
        .var("TLS_DIR", tls.path().display().to_string())
        .filter_config(
            "mcp-authz",
            &json!({"identity": {"unverified_bearer_dev_only": true}, "policy": {"rules": [{"name": "team-a",
                "effect": "allow", "methods": ["tools/call"], "targets": ["search"],
                "identity": [{"claim": "spiffe.namespace", "equals": "team-a"}]}]}}),
        )
        .start()
        .await
        .unwrap();
    let token = unverified_token(json!({"sub": "mallory", "spiffe.namespace": "team-a"}));
    let bearer = vec![format!("authorization: Bearer {token}")];
    let (st, v) = call_with(dev.port, "a1", &bearer);
    assert!(st == "200" && allowed(&v), "team-a's certificate: {st} {v}");
    let (st, v) = call_with(dev.port, "b1", &bearer);
    assert_eq!((st.as_str(), v["error"]["code"].clone()), ("200", json!(-32602)), "team-b's certificate: {v}");
}

/// An argument sent as a JSON string is parsed by the MCP Python SDK with `json.loads`
/// (`pre_parse_json`), which reads `NaN`, `Infinity`, `1e400` and lone surrogate escapes that serde_json
/// refuses. Such a string was a missing argument to the filter: `{"limit": 5000, "x": NaN}` passed a deny
/// rule on `options.limit`, and the tool ran with limit 5000 (its model drops the unknown `x`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_string_arguments_only_python_reads_are_not_missing() {
    let server = PyServer::start("mcp_server.py", &["--json", "--model-tool"]).await.unwrap();
    let envoy = EnvoyBuilder::new("mcp-authz.yaml")
        .upstream_port(server.port)
        .filter_config(
            "mcp-authz",
            &json!({"policy": {"rules": [
                {"name": "reports", "effect": "allow", "methods": ["tools/call"], "targets": ["report"]},
                {"name": "report-limit", "effect": "deny", "targets": ["report"],
                 "arguments": [{"path": "options.limit", "min": 101}]}
            ]}}),
        )
        .start()
        .await
        .unwrap();
    let s = Session::open(envoy.url("/mcp"), &[]).await;
    let text = |m: &Value| m["result"]["content"][0]["text"].as_str().map(str::to_string);
    let (_, _, m) = s.call(json!(1), "report", json!({"options": {"limit": 5}})).await;
    assert_eq!(text(&m).as_deref(), Some("report (limit 5)"), "{m}");
    let (_, _, m) = s.call(json!(2), "report", json!({"options": "{\"limit\": 50}"})).await;
    assert_eq!(text(&m).as_deref(), Some("report (limit 50)"), "the server reads a JSON string argument: {m}");
    for (id, options) in [
        (3, json!({"limit": 5000})),
        (4, json!("{\"limit\": 5000}")),
        (5, json!("{\"limit\": 5000, \"x\": NaN}")),
        (6, json!("{\"limit\": 5000, \"x\": Infinity}")),
        (7, json!("{\"limit\": 5000, \"x\": 1e400}")),
    ] {
        let (_, _, m) = s.call(json!(id), "report", json!({ "options": options })).await;
        assert_eq!(m["error"]["message"], "Unknown tool: report", "options {options}: {m}");
    }
}

/// The matchers of the reference, through Envoy against the real MCP server: `one_of`, `regex` and `max`
/// on arguments, a method glob, an identity `glob` on a list claim, `present`, and `forbid_scope` in the
/// 403's `WWW-Authenticate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_and_identity_matchers_through_envoy() {
    let mut cfg = config(false);
    cfg["policy"] = json!({
        "forbid_scope": "tools:admin",
        "rules": [
            {"name": "weather-cities", "effect": "allow", "methods": ["tools/*"], "targets": ["get_weather"],
             "arguments": [{"path": "city", "one_of": ["Oslo", "Paris"]}]},
            {"name": "search-safe", "effect": "allow", "targets": ["search"],
             "arguments": [{"path": "query", "regex": "^[a-z ]+$"}, {"path": "limit", "max": 20}]},
            {"name": "finance-transfers", "effect": "allow", "targets": ["transfer"],
             "identity": [{"claim": "groups", "glob": "fin*"}], "arguments": [{"path": "currency", "present": true}]},
            {"name": "no-delete", "effect": "deny", "answer": "forbid", "targets": ["delete_*"]},
            {"name": "quiet-bob", "effect": "deny", "methods": ["notifications/cancelled"],
             "identity": [{"claim": "sub", "equals": "bob"}]}
        ]
    });
    let s = setup(cfg).await;
    let bob = Session::open(s.envoy.url("/json/mcp"), &[("x-test-user", "bob")]).await;
    let carol =
        Session::open(s.envoy.url("/json/mcp"), &[("x-test-user", "carol"), ("x-test-groups", "finance-eu")]).await;
    let text = |m: &Value| m["result"]["content"][0]["text"].as_str().map(str::to_string);
    let hidden = |m: &Value, tool: &str| m["error"]["message"] == format!("Unknown tool: {tool}");

    let (_, _, m) = bob.call(json!(1), "get_weather", json!({"city": "Oslo"})).await;
    assert_eq!(text(&m).as_deref(), Some("sunny in Oslo"), "{m}");
    let (_, _, m) = bob.call(json!(2), "get_weather", json!({"city": "Berlin"})).await;
    assert!(hidden(&m, "get_weather"), "one_of: {m}");

    let (_, _, m) = bob.call(json!(3), "search", json!({"query": "red shoes", "limit": 5})).await;
    assert_eq!(text(&m).as_deref(), Some("results for red shoes (limit 5)"), "{m}");
    let (_, _, m) = bob.call(json!(4), "search", json!({"query": "x'; DROP TABLE", "limit": 5})).await;
    assert!(hidden(&m, "search"), "regex: {m}");
    let (_, _, m) = bob.call(json!(5), "search", json!({"query": "red shoes", "limit": "50"})).await;
    assert!(hidden(&m, "search"), "max, numeric string: {m}");
    let (_, _, m) = bob.call(json!(6), "search", json!({"query": "red shoes"})).await;
    assert!(hidden(&m, "search"), "a missing argument never satisfies max: {m}");

    let (_, _, m) = carol.call(json!(7), "transfer", json!({"amount": 10, "currency": "EUR"})).await;
    assert_eq!(text(&m).as_deref(), Some("transferred 10.0 EUR"), "{m}");
    let (_, _, m) = carol.call(json!(8), "transfer", json!({"amount": 10})).await;
    assert!(hidden(&m, "transfer"), "present: {m}");
    let (_, _, m) = bob.call(json!(9), "transfer", json!({"amount": 10, "currency": "EUR"})).await;
    assert!(hidden(&m, "transfer"), "identity glob: {m}");

    let (st, h, m) = carol.call(json!(10), "delete_file", json!({"path": "/a", "env": "dev"})).await;
    assert_eq!(st, 403, "{m}");
    assert_eq!(h["www-authenticate"], "Bearer error=\"insufficient_scope\", scope=\"tools:admin\"");
    assert_eq!(
        bob.list("tools/list", "tools", "name").await,
        names(&["search", "get_weather"]),
        "listed if some call may pass"
    );

    // A denied notification (hide) is answered 202 with no body, as if delivered, and audited.
    let note = json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}});
    let (st, _, m) = bob.post(&note).await;
    assert_eq!((st, m.len()), (202, 0));
    wait_for_log(&s.envoy, r#""rule":"quiet-bob""#).await;
    let (st, _, _) = carol.post(&note).await;
    assert_eq!(st, 202, "carol's reaches the server");
}

/// Argument paths with `[*]` through real Envoy: an allow rule needs every recipient internal, a deny
/// rule fires on any blocked element (also in a list sent as a JSON string, which FastMCP parses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_element_argument_paths() {
    let mock = meshwarden_integration_tests::mock_llm::MockLlm::start().await.unwrap();
    let policy = json!({"policy": {"deny_answer": "forbid", "rules": [
        {"name": "internal-mail", "effect": "allow", "methods": ["tools/call"], "targets": ["send_email"],
         "arguments": [{"path": "to[*]", "regex": "^[^@]+@corp\\.example$"}]},
        {"name": "no-bulk", "effect": "deny", "targets": ["send_email"],
         "arguments": [{"path": "attachments[*].size", "min": 10000000}]}]}});
    let envoy = authz_envoy(mock.port(), &policy).await;
    let send = |args: Value| {
        let body = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "send_email", "arguments": args}});
        let url = envoy.url("/mcp");
        async move {
            let resp = client()
                .post(url)
                .header("accept", "application/json, text/event-stream")
                .json(&body)
                .send()
                .await
                .unwrap();
            resp.status().as_u16()
        }
    };
    assert_eq!(send(json!({"to": ["a@corp.example", "b@corp.example"]})).await, 200);
    assert_eq!(mock.requests().len(), 1);
    for (args, why) in [
        (json!({"to": ["a@corp.example", "x@evil.example"]}), "one external recipient"),
        (json!({"to": "[\"a@corp.example\", \"x@evil.example\"]"}), "a list sent as a JSON string"),
        (json!({"to": "x@evil.example"}), "not a list"),
        (
            json!({"to": ["a@corp.example"], "attachments": [{"size": 10}, {"size": "20000000"}]}),
            "one large attachment",
        ),
    ] {
        assert_eq!(send(args).await, 403, "{why}");
    }
    assert_eq!(mock.requests().len(), 1, "no denied call reached the upstream");
}

/// The access log's filter-state values are text the caller chose (a tool name, a method): a line break
/// in one wrote a second, forged access-log line (here an admin's allowed `delete_file`) under the
/// documented text format. They are written with JSON string escapes for control characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_values_cannot_forge_lines() {
    let s = setup(config(false)).await;
    let bob = Session::open(s.envoy.url("/json/mcp"), &[("x-test-user", "bob")]).await;
    let forged = "ACCESS POST /mcp 200 subject=root method=tools/call target=delete_file decision=allow rule=admins";
    let (st, _, m) = bob.call(json!("inj-1"), &format!("ledger_read\n{forged}"), json!({})).await;
    assert_eq!((st, m["error"]["code"].clone()), (200, json!(-32602)), "{m}");
    let (st, _, m) = bob.post(&json!({"jsonrpc": "2.0", "id": "inj-2", "method": format!("x\r\n{forged}")})).await;
    assert_eq!((st, m[0]["error"]["code"].clone()), (200, json!(-32601)), "{m:?}");
    wait_for_log(&s.envoy, r"target=ledger_read\nACCESS POST /mcp 200 subject=root").await;
    wait_for_log(&s.envoy, r"method=x\r\nACCESS POST /mcp 200 subject=root").await;
    let log = s.envoy.log();
    assert!(!log.lines().any(|l| l.starts_with(forged)), "a forged access-log line:\n{log}");
}

/// The GET stream is idle most of the time; the MCP Python SDK's server sends a `: ping` comment on it
/// every 15 s (sse-starlette) so that proxies and clients do not close it for inactivity. The filter
/// parsed the stream event by event and dropped comments: no byte reached the client between two
/// messages. Blocks holding no event now pass as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_streams_keep_the_servers_keep_alive_comments() {
    let s = setup(config(false)).await;
    let bob = Session::open(s.envoy.url("/mcp"), &[("x-test-user", "bob")]).await;
    let resp = client()
        .get(s.envoy.url("/mcp"))
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &bob.id)
        .header("mcp-protocol-version", "2025-11-25")
        .header("x-test-user", "bob")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(25);
    while !String::from_utf8_lossy(&seen).contains(": ping") {
        match tokio::time::timeout_at(deadline, tokio_stream::StreamExt::next(&mut stream)).await {
            Ok(Some(Ok(chunk))) => seen.extend_from_slice(&chunk),
            other => panic!(
                "no keep-alive comment within 25 s ({:?}): {:?}",
                other.map(|_| ()),
                String::from_utf8_lossy(&seen)
            ),
        }
    }
}

/// A server may announce `notifications/resources/updated` on the GET stream for resources the session
/// never subscribed to (here a tool announcing any URI to its caller with the MCP Python SDK's
/// `send_resource_updated`): an update about a resource the caller may not `resources/subscribe` to is
/// withheld, only its `id:` passes. Before, the GET stream passed every notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_updates_the_caller_may_not_subscribe_to_are_withheld() {
    let server = PyServer::start("mcp_server.py", &["--touch-tool"]).await.unwrap();
    let envoy = EnvoyBuilder::new("mcp-authz.yaml")
        .upstream_port(server.port)
        .filter_config(
            "mcp-authz",
            &json!({"policy": {"rules": [
                {"name": "touch", "effect": "allow", "methods": ["tools/call"], "targets": ["touch"]},
                {"name": "public", "effect": "allow", "methods": ["resources/read", "resources/subscribe"],
                 "targets": ["file:///public/*"]}
            ]}}),
        )
        .start()
        .await
        .unwrap();
    let s = Session::open(envoy.url("/mcp"), &[]).await;
    let resp = client()
        .get(envoy.url("/mcp"))
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &s.id)
        .header("mcp-protocol-version", "2025-11-25")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for (id, uri) in [(1, "file:///private/keys"), (2, "FILE:///private/keys"), (3, "file:///public/readme")] {
        let (_, _, m) = s.call(json!(id), "touch", json!({ "uri": uri })).await;
        assert_eq!(m["result"]["content"][0]["text"], "touched", "{m}");
    }
    let mut stream = resp.bytes_stream();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains("file:///public/readme") {
        match tokio::time::timeout_at(deadline, tokio_stream::StreamExt::next(&mut stream)).await {
            Ok(Some(Ok(chunk))) => seen.extend_from_slice(&chunk),
            other => panic!("no update within 10 s ({:?}): {:?}", other.map(|_| ()), String::from_utf8_lossy(&seen)),
        }
    }
    let seen = String::from_utf8_lossy(&seen);
    assert!(!seen.to_lowercase().contains("private"), "an update about a resource the caller may not see: {seen}");
    let st = envoy.stats("mcp_authz").await.unwrap();
    assert_eq!(st.get("meshwarden.mcp_authz.resource_updates_hidden"), Some(&2), "{st:?}");
}

/// The MCP Python SDK trusts any request carrying a valid `Mcp-Session-Id`: without binding, a caller
/// who learned another caller's session id used that session (as far as the policy allowed the method).
/// The gateway binds each session to the caller whose initialize created it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_sessions_are_bound_to_their_creator() {
    let s = setup(config(false)).await;
    for path in ["/mcp", "/json/mcp"] {
        let alice = Session::open(s.envoy.url(path), &[("x-test-user", "alice")]).await;
        let bob = Session {
            url: alice.url.clone(),
            id: alice.id.clone(),
            headers: vec![("x-test-user".into(), "bob".into())],
        };
        let (st, _, m) = bob
            .post(&json!({"jsonrpc": "2.0", "id": "b1", "method": "tools/call",
            "params": {"name": "search", "arguments": {"query": "x"}}}))
            .await;
        assert_eq!(
            (st, m[0]["id"].clone(), m[0]["error"]["code"].clone()),
            (404, json!("b1"), json!(-32001)),
            "{path}: {m:?}"
        );
        assert_eq!(m[0]["error"]["message"], "Session not found");
        let (st, _, _) = bob.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
        assert_eq!(st, 404, "{path}: notifications too");
        let get = client().get(&alice.url).header("accept", "text/event-stream").header("mcp-session-id", &alice.id);
        assert_eq!(get.header("x-test-user", "bob").send().await.unwrap().status(), 404, "{path}: GET stream");
        let del = client().delete(&alice.url).header("mcp-session-id", &alice.id).header("x-test-user", "bob");
        assert_eq!(del.send().await.unwrap().status(), 404, "{path}: DELETE by another caller");
        let anon = client().delete(&alice.url).header("mcp-session-id", &alice.id);
        assert_eq!(anon.send().await.unwrap().status(), 404, "{path}: anonymous caller");
        // The owner's session still works (bob's DELETE never reached the server).
        let (st, _, m) = alice.call(json!(1), "search", json!({"query": "q"})).await;
        assert_eq!((st, m["result"]["content"][0]["text"].clone()), (200, json!("results for q (limit 10)")), "{m:?}");
        // The owner ends the session: the binding is cleared, the id is unknown again.
        let del = client().delete(&alice.url).header("mcp-session-id", &alice.id).header("x-test-user", "alice");
        assert!(del.send().await.unwrap().status().is_success(), "{path}");
        let (st, _, m) = bob
            .post(&json!({"jsonrpc": "2.0", "id": "b2", "method": "tools/call",
            "params": {"name": "search", "arguments": {"query": "x"}}}))
            .await;
        assert_eq!(st, 404, "{path}: the server no longer knows the session: {m:?}");
    }
    // A caller whose `sub` is "anonymous" is not the anonymous callers (one audit subject, two owners).
    let named = Session::open(s.envoy.url("/mcp"), &[("x-test-user", "anonymous")]).await;
    let anon = Session { url: named.url.clone(), id: named.id.clone(), headers: vec![] };
    let (st, _, m) = anon.call(json!(3), "search", json!({"query": "x"})).await;
    assert_eq!((st, m["error"]["code"].clone()), (404, json!(-32001)), "{m:?}");
    let (st, _, _) = named.call(json!(4), "search", json!({"query": "x"})).await;
    assert_eq!(st, 200);
    wait_for_log(&s.envoy, r#""method":"tools/call","protocol":"mcp","rule":"session-binding","subject":"bob""#).await;
    wait_for_log(&s.envoy, r#""method":"session/delete","protocol":"mcp","rule":"session-binding","subject":"bob""#)
        .await;
    // After the owner's DELETE, bob's call was decided by the policy and answered by the server.
    wait_for_log(&s.envoy, r#""rule":"everyone-reads","subject":"bob","target":"search""#).await;
    let stats = s.envoy.stats("mcp_authz").await.unwrap();
    assert_eq!(stats.get("meshwarden.mcp_authz.session_binding_denied"), Some(&11), "{stats:?}");
    assert_eq!(stats.get("meshwarden.mcp_authz.sessions_unbound"), Some(&2), "{stats:?}");
    assert!(stats.get("meshwarden.mcp_authz.sessions_bound").is_some_and(|n| *n >= 2), "{stats:?}");
}

/// `unknown_sessions: deny` refuses session ids this Envoy never bound, and a binding ends after
/// `binding_ttl_secs` (the session is unknown then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_expired_sessions() {
    let mut cfg = config(false);
    cfg["unknown_sessions"] = json!("deny");
    cfg["binding_ttl_secs"] = json!(2);
    let s = setup(cfg).await;
    let url = s.envoy.url("/mcp");
    let stranger =
        Session { url: url.clone(), id: "made-up".into(), headers: vec![("x-test-user".into(), "alice".into())] };
    let (st, _, m) = stranger.post(&json!({"jsonrpc": "2.0", "id": 5, "method": "ping"})).await;
    assert_eq!((st, m[0]["id"].clone(), m[0]["error"]["code"].clone()), (404, json!(5), json!(-32001)), "{m:?}");
    wait_for_log(&s.envoy, r#""rule":"unknown-session","subject":"alice""#).await;
    let alice = Session::open(url.clone(), &[("x-test-user", "alice")]).await;
    let (st, _, _) = alice.call(json!(1), "search", json!({"query": "q"})).await;
    assert_eq!(st, 200);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (st, _, m) = alice.call(json!(2), "search", json!({"query": "q"})).await;
    assert_eq!((st, m["error"]["code"].clone()), (404, json!(-32001)), "expired: unknown, refused: {m:?}");
    assert_eq!(s.envoy.stat("meshwarden.mcp_authz.session_unknown_denied").await.unwrap(), 2);
    drop(s);

    // Without binding, a session id is not checked.
    let mut cfg = config(false);
    cfg["bind_sessions"] = json!(false);
    cfg["unknown_sessions"] = json!("deny");
    let s = setup(cfg).await;
    let alice = Session::open(s.envoy.url("/mcp"), &[("x-test-user", "alice")]).await;
    let bob =
        Session { url: alice.url.clone(), id: alice.id.clone(), headers: vec![("x-test-user".into(), "bob".into())] };
    let (st, _, m) = bob.call(json!(1), "search", json!({"query": "q"})).await;
    assert_eq!((st, m["result"]["content"][0]["text"].clone()), (200, json!("results for q (limit 10)")), "{m:?}");
    drop(s);

    for (field, value) in
        [("binding_ttl_secs", json!(0)), ("max_bindings", json!(0)), ("unknown_sessions", json!("maybe"))]
    {
        let log = EnvoyBuilder::new("mcp-authz.yaml")
            .upstream_port(9)
            .filter_config("mcp-authz", &json!({ field: value }))
            .start_expect_failure()
            .await
            .unwrap();
        assert!(log.contains(field), "{field}: {log}");
    }
}

/// The a2a-sdk serves any task to any caller (without its own authentication every caller is one
/// owner): a caller who learned a task id read, cancelled, continued and subscribed to another caller's
/// task. The gateway binds each task to the caller whose message created it; others get
/// TaskNotFoundError (-32001), as for a task that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2a_tasks_are_bound_to_their_creator() {
    let mut cfg = config(false);
    cfg["policy"]["rules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "a2a-tasks", "effect": "allow", "protocol": "a2a",
        "methods": ["CancelTask", "SubscribeToTask", "ListTasks"], "identity": [{"claim": "sub", "present": true}]}));
    let s = setup(cfg).await;
    let rpc = |user: &'static str, groups: &'static str, body: Value| {
        let v1 = body["method"].as_str().unwrap().chars().next().unwrap().is_uppercase();
        let mut req = client().post(s.envoy.url("/a2a")).header("content-type", "application/json").json(&body);
        if v1 {
            req = req.header("a2a-version", "1.0");
        }
        req = req.header("x-test-user", user).header("x-test-groups", groups);
        async move { messages(req.send().await.unwrap()).await }
    };
    let send = |method: &str, text: &str, task: Option<&str>| {
        let v1 = method.chars().next().unwrap().is_uppercase();
        let mut message = if v1 {
            json!({"messageId": format!("m-{text}"), "role": "ROLE_USER", "parts": [{"text": text}]})
        } else {
            json!({"messageId": format!("m-{text}"), "role": "user", "kind": "message", "parts": [{"kind": "text", "text": text}]})
        };
        if let Some(t) = task {
            message["taskId"] = json!(t);
        }
        json!({"jsonrpc": "2.0", "id": "send", "method": method, "params": {"message": message}})
    };
    // v1.0, JSON answer: a task waiting for input.
    let (st, _, m) = rpc("alice", "", send("SendMessage", "task-wait one", None)).await;
    assert_eq!(st, 200, "{m:?}");
    let t1 = m[0]["result"]["task"]["id"].as_str().unwrap_or_else(|| panic!("{m:?}")).to_string();
    let not_found = |m: &[Value], what: &str| {
        assert_eq!(
            (m[0]["error"]["code"].clone(), m[0]["error"]["message"].clone()),
            (json!(-32001), json!("Task not found")),
            "{what}: {m:?}"
        );
    };
    let get = |method: &str, t: &str| json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": {"id": t}});
    for (method, groups) in [
        ("GetTask", ""),
        ("tasks/get", ""),
        ("CancelTask", ""),
        ("SubscribeToTask", ""),
        ("tasks/pushNotificationConfig/list", "ops"),
    ] {
        let (st, _, m) = rpc("bob", groups, get(method, &t1)).await;
        assert_eq!((st, m[0]["id"].clone()), (200, json!(7)), "{method}: {m:?}");
        not_found(&m, method);
    }
    let push =
        json!({"jsonrpc": "2.0", "id": 7, "method": "ListTaskPushNotificationConfigs", "params": {"taskId": t1}});
    not_found(&rpc("bob", "ops", push).await.2, "ListTaskPushNotificationConfigs");
    // Continuing the task, or naming it as a reference, is using it too.
    not_found(&rpc("bob", "", send("SendMessage", "more", Some(&t1))).await.2, "SendMessage with its taskId");
    let mut refs = send("SendMessage", "see", None);
    refs["params"]["message"]["referenceTaskIds"] = json!([t1]);
    not_found(&rpc("bob", "", refs).await.2, "referenceTaskIds");
    // The owner still reads and continues it.
    let (_, _, m) = rpc("alice", "", get("GetTask", &t1)).await;
    assert_eq!(m[0]["result"]["id"], json!(t1), "{m:?}");
    let (_, _, m) = rpc("alice", "", send("SendMessage", "task more", Some(&t1))).await;
    assert_eq!(m[0]["result"]["task"]["id"], json!(t1), "{m:?}");
    // Streams (v0.3 and v1.0): the task named in the SSE events is bound too.
    for method in ["message/stream", "SendStreamingMessage"] {
        let (st, h, m) = rpc("alice", "", send(method, &format!("task {method}"), None)).await;
        assert!(h["content-type"].to_str().unwrap().starts_with("text/event-stream"), "{method}");
        assert_eq!(st, 200);
        let t = m[0]["result"]["task"]["id"]
            .as_str()
            .or(m[0]["result"]["id"].as_str())
            .unwrap_or_else(|| panic!("{m:?}"))
            .to_string();
        assert_eq!(m.len(), 3, "every event passes: {m:?}");
        let q = if method == "message/stream" { "tasks/get" } else { "GetTask" };
        not_found(&rpc("bob", "", get(q, &t)).await.2, method);
        let (_, _, m) = rpc("alice", "", get(q, &t)).await;
        assert!(m[0].get("result").is_some(), "{method}: {m:?}");
    }
    // v0.3 JSON answer.
    let (_, _, m) = rpc("alice", "", send("message/send", "task v03", None)).await;
    let t = m[0]["result"]["id"].as_str().unwrap_or_else(|| panic!("{m:?}")).to_string();
    not_found(&rpc("bob", "", get("tasks/get", &t)).await.2, "message/send");
    // ListTasks (v1.0): the agent lists every caller's tasks; each caller sees only their own.
    let list = json!({"jsonrpc": "2.0", "id": 9, "method": "ListTasks", "params": {}});
    let (_, _, m) = rpc("alice", "", list.clone()).await;
    let ids = |m: &[Value]| -> Vec<String> {
        let tasks = m[0]["result"]["tasks"].as_array().unwrap_or_else(|| panic!("{m:?}"));
        tasks.iter().map(|t| t["id"].as_str().unwrap().to_string()).collect()
    };
    let mine = ids(&m);
    assert_eq!(mine.len(), 4, "{m:?}");
    assert!(mine.contains(&t1) && mine.contains(&t), "{mine:?}");
    let (_, _, m) = rpc("bob", "", list).await;
    assert_eq!(ids(&m), Vec::<String>::new(), "{m:?}");
    assert!(m[0]["result"].get("totalSize").is_none(), "no count of other callers' tasks: {m:?}");
    wait_for_log(&s.envoy, r#""method":"GetTask","protocol":"a2a","rule":"task-binding","subject":"bob""#).await;
    let stats = s.envoy.stats("mcp_authz").await.unwrap();
    assert_eq!(stats.get("meshwarden.mcp_authz.task_binding_denied"), Some(&11), "{stats:?}");
    assert_eq!(stats.get("meshwarden.mcp_authz.tasks_bound"), Some(&4), "{stats:?}");
    assert_eq!(stats.get("meshwarden.mcp_authz.tasks_hidden"), Some(&4), "{stats:?}");
}

/// The MCP Python SDK decodes percent escapes in the values of a resource template
/// (`file:///public/{name}` reads `file:///public/%73ecret` as name "secret"): a deny rule on
/// `file:///public/secret*` let `%73ecret` through to the secret (before 2026-12-07). A resource URI is
/// now decided percent-decoded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_resource_uris_do_not_pass_deny_rules() {
    let mut cfg = config(false);
    cfg["policy"]["rules"].as_array_mut().unwrap().insert(
        0,
        json!({"name": "no-secret", "effect": "deny",
        "methods": ["resources/read"], "targets": ["file:///public/secret*"]}),
    );
    let s = setup(cfg).await;
    let bob = Session::open(s.envoy.url("/mcp"), &[("x-test-user", "bob")]).await;
    let read = |uri: &str| json!({"jsonrpc": "2.0", "id": 5, "method": "resources/read", "params": {"uri": uri}});
    let (_, _, m) = bob.post(&read("file:///public/notes")).await;
    assert_eq!(m[0]["result"]["contents"][0]["text"], "public file notes", "{m:?}");
    for uri in [
        "file:///public/secret",
        "file:///public/%73ecret",
        "file:///public/%2573ecret",
        "FILE:///public/%73ecret-plan",
    ] {
        let (st, _, m) = bob.post(&read(uri)).await;
        assert_eq!((st, m[0]["error"]["code"].clone()), (200, json!(-32002)), "{uri}: {m:?}");
    }
    wait_for_log(&s.envoy, r#""rule":"no-secret","subject":"bob","target":"file:///public/%73ecret""#).await;
}

/// The scripted-server policy with the task methods allowed to every caller (a tool's task is polled by
/// its caller), callers named by `x-test-user`.
fn task_policy() -> Value {
    let mut cfg = scripted_policy();
    cfg["policy"]["rules"].as_array_mut().unwrap().push(json!(
        {"name": "tasks", "effect": "allow", "methods": ["tasks/get", "tasks/result", "tasks/update", "tasks/cancel", "tasks/list"]}
    ));
    cfg["identity"] = json!({"trusted_headers": [{"header": "x-test-user", "claim": "sub"}]});
    cfg
}

/// A 2026-07-28 POST (no session) by `user` (anonymous when empty): `Mcp-Method`, `Mcp-Name` when given,
/// `MCP-Protocol-Version`.
async fn modern_post(envoy: &Envoy, user: &str, body: &Value, name: Option<&str>) -> (u16, Value) {
    let method = body["method"].as_str().unwrap();
    let mut req = client()
        .post(envoy.url("/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method)
        .body(body.to_string());
    if !user.is_empty() {
        req = req.header("x-test-user", user);
    }
    if let Some(n) = name {
        req = req.header("mcp-name", n);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text}: {e}")))
}

/// A 2026-07-28 `tools/call` declaring the Tasks extension: `Mcp-Name` is the tool.
fn task_call(id: u64, tool: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args,
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}}}}})
}

fn task_request(id: u64, method: &str, task: &str) -> Value {
    let mut params = json!({"taskId": task, "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}});
    if method == "tasks/update" {
        params["inputResponses"] = json!({});
    }
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// The Tasks extension (2026-07-28) requires `Mcp-Name: <taskId>` on `tasks/get`, `tasks/update` and
/// `tasks/cancel`; the filter compared it with `params.name` / `params.uri` and refused every compliant
/// task request with 400 -32020 (HeaderMismatch), so a tool's task could never be polled through the
/// gateway. A `Mcp-Name` naming another task is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_requests_carry_the_task_id_in_mcp_name() {
    let mock = meshwarden_integration_tests::mock_mcp::MockMcp::start().await.unwrap();
    let envoy = authz_envoy(mock.port(), &task_policy()).await;
    let (st, created) = modern_post(&envoy, "alice", &task_call(1, "search", json!({"q": "x"})), Some("search")).await;
    assert_eq!((st, created["result"]["resultType"].clone()), (200, json!("task")), "{created}");
    let task = created["result"]["taskId"].as_str().unwrap().to_string();
    let (st, got) = modern_post(&envoy, "alice", &task_request(2, "tasks/get", &task), Some(&task)).await;
    assert_eq!((st, got["result"]["status"].clone()), (200, json!("completed")), "{got}");
    assert_eq!(got["result"]["result"]["content"][0]["text"], r#"mock tool search ran with {"q":"x"}"#);
    for (i, m) in ["tasks/update", "tasks/cancel"].iter().enumerate() {
        let (st, ack) = modern_post(&envoy, "alice", &task_request(3 + i as u64, m, &task), Some(&task)).await;
        assert_eq!((st, ack["result"]["resultType"].clone()), (200, json!("complete")), "{m}: {ack}");
    }
    let (st, e) = modern_post(&envoy, "alice", &task_request(9, "tasks/get", &task), Some("task-999")).await;
    assert_eq!((st, e["error"]["code"].clone()), (400, json!(-32020)), "a header naming another task: {e}");
}

/// MCP tasks (the 2026-07-28 Tasks extension; 2025-11-25 tasks) are bearer capabilities to a server that
/// has no authentication of its own behind the gateway: `tasks/get` returns the tool's result to whoever
/// names the task. Before the fix a caller who learnt another caller's task id read that caller's result
/// (the arguments and output of a tool call), answered its input requests and cancelled it, and
/// subscribed to its status notifications. Each task is bound to the caller whose `tools/call` created it
/// (JSON and SSE answers, both revisions); another caller gets -32602 "Task not found", as for a task that
/// does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_tasks_are_bound_to_their_creator() {
    let mock = meshwarden_integration_tests::mock_mcp::MockMcp::start().await.unwrap();
    let mut cfg = task_policy();
    cfg["policy"]["rules"].as_array_mut().unwrap().push(json!(
        {"name": "listen", "effect": "allow", "methods": ["subscriptions/listen"]}
    ));
    let envoy = authz_envoy(mock.port(), &cfg).await;
    let secret = json!({"q": "alice's secret query"});
    // 2026-07-28: the CreateTaskResult in a JSON answer.
    let (st, created) = modern_post(&envoy, "alice", &task_call(1, "search", secret.clone()), Some("search")).await;
    assert_eq!(st, 200, "{created}");
    let modern = created["result"]["taskId"].as_str().unwrap().to_string();
    // 2025-11-25: `params.task`, the task in an SSE answer.
    let legacy_call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "get_weather", "arguments": {"city": "alice-town"}, "task": {"ttl": 60000}}});
    let (st, _, text) = post_text(
        &envoy,
        "/mcp",
        legacy_call.to_string(),
        &[("x-mock-sse", "events"), ("x-test-user", "alice"), ("mcp-protocol-version", "2025-11-25")],
    )
    .await;
    assert_eq!(st, 200, "{text}");
    let legacy = sse_messages(&text)[0]["result"]["task"]["taskId"].as_str().unwrap().to_string();
    assert_ne!(modern, legacy);
    for task in [&modern, &legacy] {
        for (i, m) in ["tasks/get", "tasks/update", "tasks/cancel", "tasks/result"].iter().enumerate() {
            let id = 10 + i as u64;
            let (st, e) = modern_post(&envoy, "bob", &task_request(id, m, task), Some(task)).await;
            assert_eq!(
                (st, e["id"].clone(), e["error"]["code"].clone(), e["error"]["message"].clone()),
                (200, json!(id), json!(-32602), json!("Failed to retrieve task: Task not found")),
                "{m} {task} by another caller: {e}"
            );
            let (_, e) = modern_post(&envoy, "", &task_request(id, m, task), Some(task)).await;
            assert_eq!(e["error"]["code"], -32602, "{m} {task} by an anonymous caller: {e}");
        }
        let listen = json!({"jsonrpc": "2.0", "id": 20, "method": "subscriptions/listen", "params": {
            "notifications": {"taskIds": [task]}, "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}});
        let (st, e) = modern_post(&envoy, "bob", &listen, None).await;
        assert_eq!((st, e["error"]["code"].clone()), (200, json!(-32602)), "listen to another caller's task: {e}");
    }
    // The owner reads her results.
    let (st, got) = modern_post(&envoy, "alice", &task_request(31, "tasks/get", &modern), Some(&modern)).await;
    assert_eq!(st, 200);
    assert_eq!(
        got["result"]["result"]["content"][0]["text"],
        r#"mock tool search ran with {"q":"alice's secret query"}"#
    );
    let (_, got) = modern_post(&envoy, "alice", &task_request(32, "tasks/get", &legacy), Some(&legacy)).await;
    assert_eq!(got["result"]["status"], "completed", "{got}");
    // A task this Envoy never saw created (another replica, a restart) is the server's to answer.
    let (_, e) = modern_post(&envoy, "bob", &task_request(33, "tasks/get", "task-999"), Some("task-999")).await;
    assert_eq!(e["error"]["message"], "Failed to retrieve task: Task not found", "the server's answer: {e}");
    wait_for_log(&envoy, r#""method":"tasks/get","protocol":"mcp","rule":"task-binding","subject":"bob""#).await;
    let stats = envoy.stats("mcp_authz").await.unwrap();
    assert_eq!(stats.get("meshwarden.mcp_authz.tasks_bound"), Some(&2), "{stats:?}");
    assert_eq!(stats.get("meshwarden.mcp_authz.task_binding_denied"), Some(&18), "{stats:?}");
}

/// The legacy HTTP+SSE transport (2024-11-05; the MCP Python SDK still serves it, `sse_app`): `GET /sse`
/// opens the stream, whose first event, `event: endpoint`, names the URI to POST to; every answer comes on
/// that stream. With its paths in `mcp_paths` the GET stream is filtered, and the `endpoint` event (a URI,
/// not JSON) was replaced by -32603 (before 2026-12-07): a legacy client never learnt where to send its
/// messages, so such a server could not be used through the gateway at all (and without its paths in
/// `mcp_paths` every call passed unchecked). The event passes now; lists on the stream are filtered and
/// calls are decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_sse_transport_works_and_is_governed() {
    let server = PyServer::start("mcp_server.py", &["--legacy-sse"]).await.unwrap();
    let mut cfg = scripted_policy();
    cfg["mcp_paths"] = json!(["/sse", "/messages/*"]);
    let envoy = authz_envoy(server.port, &cfg).await;
    let (mut stream, mut text, endpoint) = open_legacy_stream(&envoy, &[]).await;
    assert!(endpoint.starts_with("/messages/?session_id="), "the endpoint event is the URI to POST to: {text}");
    let post = |body: Value| {
        let req = client().post(envoy.url(&endpoint)).header("content-type", "application/json");
        async move {
            let resp = req.body(body.to_string()).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let (st, _) = post(json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "legacy", "version": "1"}}}))
    .await;
    assert_eq!(st, 202, "the legacy transport answers on the stream");
    read_until(&mut stream, &mut text, |t| t.contains("\"serverInfo\"")).await;
    assert_eq!(post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await.0, 202);
    assert_eq!(post(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})).await.0, 202);
    // The JSON-RPC messages of the stream so far (the endpoint event's data is a URI).
    fn messages_of(text: &str) -> Vec<Value> {
        text.lines().filter_map(|l| serde_json::from_str::<Value>(l.strip_prefix("data:")?.trim()).ok()).collect()
    }
    read_until(&mut stream, &mut text, |t| messages_of(t).iter().any(|m| m["result"]["tools"].is_array())).await;
    let lists: Vec<Value> = messages_of(&text).into_iter().filter(|m| m["result"]["tools"].is_array()).collect();
    assert_eq!(tool_names(&lists[0]), names(&["search", "get_weather"]), "filtered on the stream: {text}");
    // A denied call is decided on its POST (and answered there: see the Limitations).
    let (st, denied) = post(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "delete_file", "arguments": {"path": "/x"}}}))
    .await;
    assert_eq!(st, 200);
    assert_eq!(serde_json::from_str::<Value>(&denied).unwrap()["error"]["code"], -32602, "{denied}");
    assert_eq!(
        post(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "search", "arguments": {"query": "q"}}}))
        .await
        .0,
        202
    );
    read_until(&mut stream, &mut text, |t| t.contains("results for q")).await;
    assert!(!text.contains("deleted /x"), "{text}");
}

/// Read an SSE stream until `done` holds for what arrived (10 s at most).
async fn read_until(stream: &mut reqwest::Response, text: &mut String, done: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done(text) {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk()).await;
        let chunk = chunk.unwrap_or_else(|_| panic!("timed out; the stream so far: {text}"));
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap_or_default()));
    }
}

/// `GET /sse` of the legacy HTTP+SSE transport with `headers`: the open stream, what it sent so far, and
/// the URI its `endpoint` event names (where to POST).
async fn open_legacy_stream(envoy: &Envoy, headers: &[(&str, &str)]) -> (reqwest::Response, String, String) {
    let mut req = client().get(envoy.url("/sse")).header("accept", "text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut stream = req.send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let mut text = String::new();
    read_until(&mut stream, &mut text, |t| t.split("session_id=").nth(1).is_some_and(|r| r.contains('\n'))).await;
    let endpoint = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no endpoint data: {text}"))
        .trim()
        .to_string();
    (stream, text, endpoint)
}

/// Envoy + mcp-authz (`cfg`) with every MCP route to one server (`port`), to start.
fn authz_builder_for(port: u16, cfg: &Value) -> EnvoyBuilder {
    EnvoyBuilder::new("mcp-authz-servers.yaml")
        .var("MCP_SSE_PORT", port.to_string())
        .var("MCP_JSON_PORT", port.to_string())
        .var("A2A_PORT", port.to_string())
        .var("JWKS", json_string(&jwks()))
        .filter_config("mcp-authz", cfg)
}

async fn authz_envoy_for(port: u16, cfg: &Value) -> Envoy {
    authz_builder_for(port, cfg).start().await.unwrap()
}

/// POST `body` in `s`; (status, raw answer text).
async fn post_sse_text(s: &Session, body: &Value) -> (u16, String) {
    let resp = s.request(body.to_string()).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// GET the session's stream with `Last-Event-ID: last`; (status, what arrived until `until` appeared or
/// 10 s passed: a resumed stream stays open after its replay).
async fn resume(s: &Session, last: &str, until: &str) -> (u16, String) {
    let mut req = client()
        .get(&s.url)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &s.id)
        .header("mcp-protocol-version", "2025-11-25")
        .header("last-event-id", last);
    for (k, v) in &s.headers {
        req = req.header(k, v);
    }
    let mut resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !text.contains(until) {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(c))) => text.push_str(&String::from_utf8_lossy(&c)),
            _ => break,
        }
    }
    (status, text)
}

/// The values of the `id:` lines of an SSE text.
fn event_ids(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("id:")).map(|v| v.trim_start_matches(' ').to_string()).collect()
}

/// Stream resumption is bound to the caller. The official SDK's server keeps one event store for every
/// session and replays the stream any event id belongs to, so whoever learnt another caller's event id
/// read the rest of that caller's stream, tool results included (shown below with `bind_event_ids:
/// false`, the behaviour before 2026-12-07). Ids now leave tagged for their caller and session, a
/// `Last-Event-ID` is forwarded only with this caller's tag (stripped), and the official MCP client still
/// resumes a polled call (its stream closed by the server before the answer) through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_resumption_is_bound_to_the_caller() {
    let server = PyServer::start("mcp_server.py", &["--event-store"]).await.unwrap();
    let envoy = authz_envoy_for(server.port, &config(false)).await;
    let url = envoy.url("/mcp");
    let who = |user: &'static str| [("x-test-user", user), ("x-test-groups", "admin")];
    let alice = Session::open(url.clone(), &who("alice")).await;
    let bob = Session::open(url.clone(), &who("bob")).await;
    let call = |id: &str, name: &str| json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "long_job", "arguments": {"name": name}}});
    // Polling: the server closes the call's stream after its priming event; the answer waits in the store.
    let (st, text) = post_sse_text(&alice, &call("a", "a1")).await;
    assert_eq!(st, 200, "{text}");
    assert!(!text.contains("job a1 done"), "the answer comes on resumption: {text}");
    let ids = event_ids(&text);
    assert!(!ids.is_empty(), "a priming event: {text}");
    let tagged = |id: &String| {
        id.split_once('~').is_some_and(|(raw, tag)| {
            raw.len() == 32
                && tag.len() == 22
                && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    };
    assert!(ids.iter().all(tagged), "every id leaves tagged: {ids:?}");
    let alices = ids.last().unwrap().clone();
    let raw = alices.split_once('~').unwrap().0.to_string();
    // Bob, in his own session, with alice's id as she got it, and with the server's id under it.
    for last in [alices.as_str(), raw.as_str(), &format!("{raw}~AAAAAAAAAAAAAAAAAAAAAA")] {
        let (st, text) = resume(&bob, last, "\"error\"").await;
        assert_eq!(st, 400, "{last}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], -32600, "{text}");
        assert!(!text.contains("job a1 done"));
    }
    // Alice resumes: the server gets its own id, the answer is replayed, its id tagged again.
    let (st, text) = resume(&alice, &alices, "job a1 done").await;
    assert_eq!(st, 200);
    assert!(text.contains("job a1 done"), "{text}");
    assert!(event_ids(&text).iter().all(tagged), "{text}");
    // Her id in another of her sessions is not this session's either.
    let alice2 = Session::open(url.clone(), &who("alice")).await;
    let (st, _) = resume(&alice2, &alices, "\"error\"").await;
    assert_eq!(st, 400, "an id is bound to its session too");
    wait_for_log(&envoy, r#""method":"session/stream","protocol":"mcp","rule":"event-id-binding","subject":"bob""#)
        .await;
    assert_eq!(envoy.stat("meshwarden.mcp_authz.event_id_denied").await.unwrap(), 4);

    // The official MCP client: its polled call resumes through the gateway with the tagged id.
    let out = python::run(
        "mcp_client.py",
        &[
            url.clone(),
            "--mode".into(),
            "legacy".into(),
            "--header".into(),
            "x-test-user=carol".into(),
            "--header".into(),
            "x-test-groups=admin".into(),
            "--call".into(),
            "long_job".into(),
            json!({"name": "c1"}).to_string(),
        ],
    )
    .await
    .unwrap();
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    let carol: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (carol["calls"][0]["ok"].clone(), carol["calls"][0]["text"].clone()),
        (json!(true), json!("job c1 done")),
        "{carol}"
    );
    drop(envoy);

    // Without the binding (as before 2026-12-07): bob reads alice's tool result with her event id.
    let mut cfg = config(false);
    cfg["bind_event_ids"] = json!(false);
    let envoy = authz_envoy_for(server.port, &cfg).await;
    let url = envoy.url("/mcp");
    let alice = Session::open(url.clone(), &who("alice")).await;
    let bob = Session::open(url.clone(), &who("bob")).await;
    let (_, text) = post_sse_text(&alice, &call("a", "a2")).await;
    let last = event_ids(&text).last().cloned().unwrap();
    assert!(!last.contains('~'), "untagged without the binding: {last}");
    // Once the job is done its answer is in the store (before that a replay has nothing to send).
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let (st, text) = resume(&bob, &last, "job a2 done").await;
    assert_eq!(st, 200);
    assert!(text.contains("job a2 done"), "the leak the binding closes: {text}");
}

/// With `event_id_key_env` every Envoy holding the same secret accepts the event ids another handed out
/// (replicas, restarts); with another secret, or each Envoy's own random key, they are refused. A
/// missing variable refuses the plugin, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_id_keys_are_shared_through_the_vm_environment() {
    let server = PyServer::start("mcp_server.py", &["--event-store"]).await.unwrap();
    let mut cfg = config(false);
    cfg["event_id_key_env"] = json!("MESHWARDEN_MCP_EVENT_ID_KEY");
    let with_secret = |secret: &str| authz_builder_for(server.port, &cfg).env("MESHWARDEN_MCP_EVENT_ID_KEY", secret);
    let (a, b, other) = tokio::join!(
        with_secret("shared-secret-0123456789\n").start(),
        with_secret("shared-secret-0123456789").start(),
        with_secret("another-secret-0123456789").start()
    );
    let (a, b, other) = (a.unwrap(), b.unwrap(), other.unwrap());
    let random = authz_envoy_for(server.port, &config(false)).await;
    let who = [("x-test-user", "alice"), ("x-test-groups", "admin")];
    let alice = Session::open(a.url("/mcp"), &who).await;
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "long_job", "arguments": {"name": "k1"}}});
    let (st, text) = post_sse_text(&alice, &call).await;
    assert_eq!(st, 200, "{text}");
    let last = event_ids(&text).last().cloned().unwrap();
    assert!(last.contains('~'), "{last}");
    // The same session through each Envoy (the session is unknown to b, other and random: forwarded).
    let via = |e: &Envoy| Session { url: e.url("/mcp"), id: alice.id.clone(), headers: alice.headers.clone() };
    for (name, envoy) in [("other secret", &other), ("random key", &random)] {
        let (st, text) = resume(&via(envoy), &last, "\"error\"").await;
        assert_eq!(st, 400, "{name}: {text}");
    }
    let (st, text) = resume(&via(&b), &last, "job k1 done").await;
    assert_eq!(st, 200, "{text}");
    assert!(text.contains("job k1 done"), "the same secret: resumed through another Envoy: {text}");
    drop((a, b, other, random));

    let log = authz_builder_for(server.port, &cfg).start_expect_failure().await.unwrap();
    assert!(log.contains("$.event_id_key_env") && log.contains("MESHWARDEN_MCP_EVENT_ID_KEY is not set"), "{log}");
}

/// A2A contexts are bound to the caller who started them: the agent keeps a conversation's state (its
/// history, its memory) under the `contextId`, whoever continues it. Before 2026-12-07 a caller who
/// learnt another caller's context id continued that conversation and read what the agent remembered
/// of it (shown below with `bind_tasks: false`); now such a message is refused (-32602) and the context's
/// owner goes on. A context the caller chooses itself is bound to it at the agent's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2a_contexts_are_bound_to_their_creator() {
    let a2a = PyServer::start("a2a_server.py", &[]).await.unwrap();
    let run = |cfg: Value| async move {
        let envoy = authz_envoy_for(a2a.port, &cfg).await;
        let say = |user: &'static str, text: &str, context: Option<&str>, method: &str| {
            let v1 = method.chars().next().unwrap().is_uppercase();
            let mut message = if v1 {
                json!({"messageId": format!("m-{user}-{text}"), "role": "ROLE_USER", "parts": [{"text": text}]})
            } else {
                json!({"messageId": format!("m-{user}-{text}"), "role": "user", "kind": "message",
                    "parts": [{"kind": "text", "text": text}]})
            };
            if let Some(c) = context {
                message["contextId"] = json!(c);
            }
            let body = json!({"jsonrpc": "2.0", "id": "say", "method": method, "params": {"message": message}});
            let mut req = client().post(envoy.url("/a2a")).json(&body).header("x-test-user", user);
            if v1 {
                req = req.header("a2a-version", "1.0");
            }
            async move { messages(req.send().await.unwrap()).await.2 }
        };
        let text_of = |m: &[Value]| {
            let msg = m[0]["result"].get("message").unwrap_or(&m[0]["result"]);
            msg["parts"][0]["text"].as_str().map(str::to_string).unwrap_or_else(|| format!("{m:?}"))
        };
        let context_of = |m: &[Value]| {
            let msg = m[0]["result"].get("message").unwrap_or(&m[0]["result"]);
            msg["contextId"].as_str().unwrap_or_else(|| panic!("{m:?}")).to_string()
        };
        // Alice starts a conversation (the agent creates the context) and tells it a secret.
        let m = say("alice", "remember my card is 4111", None, "SendMessage").await;
        let ctx = context_of(&m);
        // Bob continues her context, in v1.0 and v0.3.
        let bob = say("bob", "recall", Some(&ctx), "SendMessage").await;
        let bob03 = say("bob", "recall", Some(&ctx), "message/send").await;
        // Bob's own context, chosen by his client, is his.
        let m = say("bob", "remember bob's note", Some("ctx-chosen-by-bob"), "SendMessage").await;
        assert_eq!(text_of(&m), "noted");
        let alice_on_bobs = say("alice", "recall", Some("ctx-chosen-by-bob"), "SendMessage").await;
        let alice = say("alice", "recall", Some(&ctx), "SendMessage").await;
        (envoy, bob, bob03, alice_on_bobs, text_of(&alice))
    };
    let (envoy, bob, bob03, alice_on_bobs, alice) = run(config(false)).await;
    for m in [&bob, &bob03, &alice_on_bobs] {
        assert_eq!(
            (m[0]["error"]["code"].clone(), m[0]["error"]["message"].clone(), m[0]["id"].clone()),
            (json!(-32602), json!("Invalid params: unknown contextId"), json!("say")),
            "{m:?}"
        );
    }
    assert_eq!(alice, "memory: my card is 4111", "the owner goes on");
    wait_for_log(&envoy, r#""method":"SendMessage","protocol":"a2a","rule":"context-binding","subject":"bob""#).await;
    let stats = envoy.stats("mcp_authz").await.unwrap();
    assert_eq!(stats.get("meshwarden.mcp_authz.context_binding_denied"), Some(&3), "{stats:?}");
    assert_eq!(stats.get("meshwarden.mcp_authz.contexts_bound"), Some(&2), "{stats:?}");
    drop(envoy);

    // Without the binding (as before 2026-12-07): bob reads what the agent remembers of alice's context.
    let mut open = config(false);
    open["bind_tasks"] = json!(false);
    let (_envoy, bob, _, _, _) = run(open).await;
    let leaked = bob[0]["result"]["message"]["parts"][0]["text"].as_str().unwrap_or_default();
    assert_eq!(leaked, "memory: my card is 4111", "the leak the binding closes: {bob:?}");
}

/// Sessions of the legacy HTTP+SSE transport (2024-11-05) are bound too: the `endpoint` event of a caller's
/// `GET /sse` names the session in the POST target's query (`/messages/?session_id=…`), and a POST there from
/// another caller is refused (404), also with the id percent-encoded or given twice. Such servers often
/// check credentials on `GET /sse` only, so a POST naming the session ran tools in the victim's session
/// (before 2026-12-07).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_sse_sessions_are_bound_to_their_creator() {
    let server = PyServer::start("mcp_server.py", &["--legacy-sse"]).await.unwrap();
    let mut cfg = config(false);
    cfg["mcp_paths"] = json!(["/sse", "/messages/*"]);
    let envoy = authz_envoy_for(server.port, &cfg).await;
    let (_stream, _, endpoint) = open_legacy_stream(&envoy, &[("x-test-user", "alice")]).await;
    let session = endpoint.split("session_id=").nth(1).unwrap().to_string();
    let post = |user: &'static str, target: String| {
        let body = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "legacy", "version": "1"}}});
        let req = client().post(envoy.url(&target)).header("x-test-user", user).json(&body);
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    // Bob names alice's session: as sent, percent-encoded (the server decodes the query), given twice.
    let encoded: String = session.bytes().map(|b| format!("%{b:02X}")).collect();
    for target in [
        endpoint.clone(),
        format!("/messages/?session_id={encoded}"),
        format!("/messages/?session_id=other&session_id={session}"),
    ] {
        let (st, body) = post("bob", target.clone()).await;
        assert!(st == 404 || st == 400, "{target}: {st} {body}");
        assert!(!body.is_empty() && !body.contains("serverInfo"), "{target}: {body}");
    }
    // Alice's own POST is served (its answer comes on her stream).
    assert_eq!(post("alice", endpoint.clone()).await.0, 202);
    wait_for_log(&envoy, r#""method":"initialize","protocol":"mcp","rule":"session-binding","subject":"bob""#).await;
    let stats = envoy.stats("mcp_authz").await.unwrap();
    assert_eq!(stats.get("meshwarden.mcp_authz.session_binding_denied"), Some(&2), "{stats:?}");
    assert_eq!(stats.get("meshwarden.mcp_authz.sessions_bound"), Some(&1), "{stats:?}");
}
