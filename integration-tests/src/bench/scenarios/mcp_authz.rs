//! mcp-authz benchmark scenarios: a 1 KB `tools/call` decided by a 50-rule policy, and a 200-tool
//! `tools/list` answer filtered per caller. Both Envoys (plain and filtered) answer from the same canned
//! upstream (an Envoy internal listener), so the difference is the filter.

use crate::bench::Scenario;
use crate::envoy::json_string;
use serde_json::{json, Value};

/// 50 rules: 46 allow rules for other teams' tools, 3 argument deny rules, and the caller's rule last.
pub fn fifty_rule_policy() -> Value {
    let mut rules = Vec::new();
    for i in 0..46 {
        rules.push(json!({"name": format!("team-{i}"), "effect": "allow", "methods": ["tools/call"],
            "targets": [format!("team{i}_*")], "identity": [{"claim": "groups", "contains": format!("team-{i}")}]}));
    }
    rules.push(json!({"name": "no-prod", "effect": "deny", "targets": ["*"], "arguments": [{"path": "env", "equals": "prod"}]}));
    rules.push(json!({"name": "max-limit", "effect": "deny", "targets": ["search*"], "arguments": [{"path": "options.limit", "min": 1001}]}));
    rules.push(json!({"name": "no-etc", "effect": "deny", "targets": ["read_*"], "arguments": [{"path": "path", "regex": "^/etc/"}]}));
    rules.push(
        json!({"name": "readers", "effect": "allow", "methods": ["tools/call"], "targets": ["search*", "tool_0*"],
        "identity": [{"claim": "scope", "contains": "tools:read"}]}),
    );
    json!({
        "identity": {"trusted_headers": [{"header": "x-user", "claim": "sub"}, {"header": "x-scope", "claim": "scope"}]},
        "audit_log": false,
        "policy": {"rules": rules}
    })
}

/// A `tools/call` body of about `bytes` bytes.
pub fn tools_call_body(bytes: usize) -> Value {
    let base = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "search_docs", "arguments": {"query": "", "options": {"limit": 20}, "env": "dev"}}});
    let overhead = base.to_string().len();
    let mut v = base;
    v["params"]["arguments"]["query"] = json!("q".repeat(bytes.saturating_sub(overhead)));
    v
}

/// A `tools/list` answer with `n` tools (id 1), each with a description and an input schema.
pub fn tool_list_answer(n: usize) -> Value {
    let tools: Vec<Value> = (0..n)
        .map(|i| {
            json!({"name": format!("tool_{i:03}"), "description": format!("Generated tool {i} with a description long enough to look like a real one."),
                "inputSchema": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}})
        })
        .collect();
    json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": tools}})
}

pub fn scenarios() -> Vec<Scenario> {
    let call_answer =
        json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "ok"}], "isError": false}});
    // A 1 KB `tools/call` by a caller the readers rule allows.
    let call_scenario = |name: &str| {
        Scenario::post_json(name, "mcp-authz-bench.yaml", "/mcp", &tools_call_body(1024))
            .plain("mcp-authz-bench-plain.yaml")
            .var("BENCH_ANSWER", &json_string(&call_answer.to_string()))
            .config("mcp-authz", fifty_rule_policy())
            .header("accept", "application/json, text/event-stream")
            .header("x-user", "bench")
            .header("x-scope", "tools:read")
    };
    let call = call_scenario("mcp-authz-tools-call-1kb-50-rules");
    // The same call inside a session (what MCP clients send after `initialize`): the filter looks the
    // session's binding up (`bind_sessions`, on by default); the id is unknown to this Envoy, as for a
    // session created through another replica, so the call is decided as above and forwarded.
    let session = call_scenario("mcp-authz-tools-call-1kb-50-rules-session")
        .header("mcp-session-id", "2f9d4c1e8b7a4f0e9c3d5b6a7e8f9012");
    let list = Scenario::post_json(
        "mcp-authz-tools-list-200-filtered",
        "mcp-authz-bench.yaml",
        "/mcp",
        &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .plain("mcp-authz-bench-plain.yaml")
    .var("BENCH_ANSWER", &json_string(&tool_list_answer(200).to_string()))
    .config("mcp-authz", fifty_rule_policy())
    .header("accept", "application/json, text/event-stream")
    .header("x-user", "bench")
    .header("x-scope", "tools:read");
    // The same call on a path the filter does not handle: the fixed cost of having the filter at all.
    let mut passthrough_cfg = fifty_rule_policy();
    passthrough_cfg["mcp_paths"] = json!(["/elsewhere"]);
    passthrough_cfg["detect_by_headers"] = json!(false);
    let pass =
        Scenario::post_json("mcp-authz-tools-passthrough-1kb", "mcp-authz-bench.yaml", "/mcp", &tools_call_body(1024))
            .plain("mcp-authz-bench-plain.yaml")
            .var("BENCH_ANSWER", &json_string(&call_answer.to_string()))
            .config("mcp-authz", passthrough_cfg)
            .header("accept", "application/json, text/event-stream");
    vec![call, session, list, pass]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(tools_call_body(1024).to_string().len(), 1024);
        assert_eq!(fifty_rule_policy()["policy"]["rules"].as_array().map(Vec::len), Some(50));
        assert_eq!(tool_list_answer(200)["result"]["tools"].as_array().map(Vec::len), Some(200));
    }
}
