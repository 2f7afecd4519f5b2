//! A2A (Agent2Agent) facts a gateway needs: v0.3 and v1.0 JSON-RPC method names (the same operation
//! under either name), agent card paths, and per-caller filtering of an agent card's `skills[]`.

use serde_json::Value;

/// Well-known agent card paths (current first, then the pre-0.3 name).
pub const AGENT_CARD_PATHS: &[&str] = &["/.well-known/agent-card.json", "/.well-known/agent.json"];

/// Every name of each JSON-RPC operation: the v0.3 name first (none for `ListTasks`, new in v1.0), then
/// the v1.0 names. Where v1.0 drafts and SDKs spelled a method two ways, both are listed: the a2a-sdk
/// (Python, 1.x) sends `ListTaskPushNotificationConfigs` and `CreateTaskPushNotificationConfig`, earlier
/// v1.0 implementations (a2a-java) `ListTaskPushNotificationConfig` and `SetTaskPushNotificationConfig`.
pub const METHODS: &[&[&str]] = &[
    &["message/send", "SendMessage"],
    &["message/stream", "SendStreamingMessage"],
    &["tasks/get", "GetTask"],
    &["ListTasks"],
    &["tasks/cancel", "CancelTask"],
    &["tasks/resubscribe", "SubscribeToTask"],
    &["tasks/pushNotificationConfig/set", "CreateTaskPushNotificationConfig", "SetTaskPushNotificationConfig"],
    &["tasks/pushNotificationConfig/get", "GetTaskPushNotificationConfig"],
    &["tasks/pushNotificationConfig/list", "ListTaskPushNotificationConfigs", "ListTaskPushNotificationConfig"],
    &["tasks/pushNotificationConfig/delete", "DeleteTaskPushNotificationConfig"],
    &["agent/getAuthenticatedExtendedCard", "GetExtendedAgentCard"],
];

/// All names of the operation `method` names (itself included), or an empty slice for a method that is
/// not A2A. Policy rules match a call under any of its names.
pub fn names(method: &str) -> &'static [&'static str] {
    METHODS.iter().copied().find(|names| names.contains(&method)).unwrap_or(&[])
}

pub fn is_method(method: &str) -> bool {
    !names(method).is_empty()
}

/// Whether the answer to `method` is an agent card (the extended card).
pub fn returns_card(method: &str) -> bool {
    matches!(method, "agent/getAuthenticatedExtendedCard" | "GetExtendedAgentCard")
}

/// Keep only the skills `keep(id)` allows; returns how many were removed. A skill without a string
/// `id` is removed (it cannot be authorized). A card without `skills` is left as is.
pub fn filter_card_skills(card: &mut Value, mut keep: impl FnMut(&str) -> bool) -> usize {
    let Some(skills) = card.get_mut("skills").and_then(Value::as_array_mut) else {
        return 0;
    };
    let before = skills.len();
    skills.retain(|s| s.get("id").and_then(Value::as_str).is_some_and(&mut keep));
    before - skills.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn aliases_both_ways() {
        assert_eq!(names("message/send"), ["message/send", "SendMessage"]);
        assert_eq!(names("SendMessage"), ["message/send", "SendMessage"]);
        assert!(names("ListTaskPushNotificationConfig").contains(&"ListTaskPushNotificationConfigs"));
        assert!(names("tools/call").is_empty() && !is_method("tasks/list"), "tasks/list is MCP's, not A2A v0.3");
        assert!(is_method("ListTasks"));
        assert!(returns_card("GetExtendedAgentCard"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn card_skills() {
        let mut card = json!({"name": "a", "skills": [{"id": "sql"}, {"id": "web"}, {"name": "no id"}]});
        assert_eq!(filter_card_skills(&mut card, |id| id == "web"), 2);
        assert_eq!(card["skills"], json!([{"id": "web"}]));
        let mut no_skills = json!({"name": "a"});
        assert_eq!(filter_card_skills(&mut no_skills, |_| false), 0);
    }
}
