//! A2A (Agent2Agent) facts a gateway needs: v0.3 and v1.0 JSON-RPC method names (the same operation
//! under either name), agent card paths, and per-caller filtering of an agent card's `skills[]`.

use serde_json::Value;

/// Well-known agent card paths (current first, then the pre-0.3 name).
pub const AGENT_CARD_PATHS: &[&str] = &["/.well-known/agent-card.json", "/.well-known/agent.json"];

/// (v0.3 name, v1.0 name) for every JSON-RPC method.
pub const METHODS: &[(&str, &str)] = &[
    ("message/send", "SendMessage"),
    ("message/stream", "SendStreamingMessage"),
    ("tasks/get", "GetTask"),
    ("tasks/list", "ListTasks"),
    ("tasks/cancel", "CancelTask"),
    ("tasks/resubscribe", "SubscribeToTask"),
    ("tasks/pushNotificationConfig/set", "CreateTaskPushNotificationConfig"),
    ("tasks/pushNotificationConfig/get", "GetTaskPushNotificationConfig"),
    ("tasks/pushNotificationConfig/list", "ListTaskPushNotificationConfig"),
    ("tasks/pushNotificationConfig/delete", "DeleteTaskPushNotificationConfig"),
    ("agent/getAuthenticatedExtendedCard", "GetExtendedAgentCard"),
];

/// The other version's name for a method, if it is an A2A method.
pub fn alias(method: &str) -> Option<&'static str> {
    METHODS.iter().find_map(|(old, new)| {
        if *old == method {
            Some(*new)
        } else if *new == method {
            Some(*old)
        } else {
            None
        }
    })
}

pub fn is_method(method: &str) -> bool {
    alias(method).is_some()
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
        assert_eq!(alias("message/send"), Some("SendMessage"));
        assert_eq!(alias("SendMessage"), Some("message/send"));
        assert_eq!(alias("tools/call"), None);
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
