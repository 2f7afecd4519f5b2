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

/// JSON-RPC error code of A2A's `TaskNotFoundError`.
pub const TASK_NOT_FOUND: i64 = -32001;

/// Whether an answer to `method` may create a task (its `result`, or each SSE event's, names one).
pub fn creates_tasks(method: &str) -> bool {
    matches!(names(method).first(), Some(&("message/send" | "message/stream")))
}

/// Whether `method` lists tasks (`ListTasks`, v1.0).
pub fn lists_tasks(method: &str) -> bool {
    names(method).first() == Some(&"ListTasks")
}

/// A member of `obj` under any spelling an A2A server reads as `name` (`name` given in lowercase
/// without `_`): the JSON name (`taskId`), the proto name (`task_id`); letter case is ignored too, so
/// that no spelling a lenient parser reads is missed.
fn member<'a>(obj: &'a Value, name: &str) -> Option<&'a Value> {
    obj.as_object()?.iter().find_map(|(k, v)| {
        let folded: String = k.chars().filter(|c| *c != '_').flat_map(char::to_lowercase).collect();
        (folded == name).then_some(v)
    })
}

/// The ids of existing tasks an A2A request names (`params.id` of `tasks/get`, `tasks/cancel`,
/// `tasks/resubscribe`; the task of a push-notification-config method, `taskId` in v1.0 and in v0.3's
/// `set`, `id` in v0.3's `get` / `list` / `delete`, both read for every spelling; a message's `taskId`
/// and `referenceTaskIds`). Empty for other methods (`ListTasks`, the extended card).
pub fn task_refs<'a>(method: &str, params: Option<&'a Value>) -> Vec<&'a str> {
    let Some(params) = params else { return Vec::new() };
    let op = names(method).first().copied().unwrap_or("");
    let mut out = Vec::new();
    let mut push = |v: Option<&'a Value>| {
        if let Some(s) = v.and_then(Value::as_str) {
            out.push(s);
        }
    };
    match op {
        "tasks/get" | "tasks/cancel" | "tasks/resubscribe" => push(member(params, "id")),
        "message/send" | "message/stream" => {
            if let Some(message) = member(params, "message") {
                push(member(message, "taskid"));
                if let Some(refs) = member(message, "referencetaskids").and_then(Value::as_array) {
                    for r in refs {
                        push(Some(r));
                    }
                }
            }
        }
        op if op.starts_with("tasks/pushNotificationConfig/") => {
            push(member(params, "taskid"));
            push(member(params, "id"));
        }
        _ => {}
    }
    out
}

/// The task an A2A answer (one JSON-RPC response, or one SSE event's) names, if any: v1.0
/// `result.task.id`, `result.statusUpdate.taskId`, `result.artifactUpdate.taskId`, `result.message.taskId`;
/// v0.3 `result.id` of a `"kind": "task"` result, else `result.taskId`.
pub fn answer_task_id(response: &Value) -> Option<&str> {
    let result = response.get("result")?;
    if let Some(id) = member(result, "task").and_then(|t| member(t, "id")).and_then(Value::as_str) {
        return Some(id);
    }
    if result.get("kind").and_then(Value::as_str) == Some("task") {
        return result.get("id").and_then(Value::as_str);
    }
    if let Some(id) = member(result, "taskid").and_then(Value::as_str) {
        return Some(id);
    }
    ["statusupdate", "artifactupdate", "message"]
        .iter()
        .find_map(|k| member(result, k).and_then(|e| member(e, "taskid")).and_then(Value::as_str))
}

/// The context a message continues (`params.message.contextId` of `message/send` / `message/stream`, any
/// spelling), if it names one. An agent keeps a conversation's state (its history, a memory, the tasks it
/// looks up through `RequestContext.related_tasks`) under the context id, whoever continues it.
pub fn context_ref<'a>(method: &str, params: Option<&'a Value>) -> Option<&'a str> {
    match names(method).first().copied() {
        Some("message/send" | "message/stream") => {
            member(member(params?, "message")?, "contextid").and_then(Value::as_str).filter(|c| !c.is_empty())
        }
        _ => None,
    }
}

/// The context an A2A answer (one JSON-RPC response, or one SSE event's) names, if any: v1.0
/// `result.task.contextId`, `result.message.contextId`, `result.statusUpdate.contextId`,
/// `result.artifactUpdate.contextId`; v0.3 `result.contextId` (a task, a message or an update event).
pub fn answer_context_id(response: &Value) -> Option<&str> {
    let result = response.get("result")?;
    ["task", "message", "statusupdate", "artifactupdate"]
        .iter()
        .find_map(|k| member(result, k).and_then(|e| member(e, "contextid")).and_then(Value::as_str))
        .or_else(|| member(result, "contextid").and_then(Value::as_str))
        .filter(|c| !c.is_empty())
}

/// The tasks of a `ListTasks` answer (`result.tasks`), mutable, for per-caller filtering.
pub fn listed_tasks_mut(response: &mut Value) -> Option<&mut Vec<Value>> {
    response.get_mut("result")?.get_mut("tasks")?.as_array_mut()
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

    #[wasm_bindgen_test(unsupported = test)]
    fn contexts_of_requests_and_answers() {
        let v1 = json!({"message": {"messageId": "m", "contextId": "c1", "parts": []}});
        assert_eq!(context_ref("SendMessage", Some(&v1)), Some("c1"));
        let v03 = json!({"message": {"context_id": "c2", "kind": "message"}});
        assert_eq!(context_ref("message/stream", Some(&v03)), Some("c2"));
        assert_eq!(context_ref("GetTask", Some(&v1)), None);
        assert_eq!(context_ref("SendMessage", Some(&json!({"message": {"contextId": ""}}))), None);
        for answer in [
            json!({"result": {"task": {"id": "t", "contextId": "c"}}}),
            json!({"result": {"message": {"messageId": "m", "contextId": "c"}}}),
            json!({"result": {"statusUpdate": {"taskId": "t", "contextId": "c"}}}),
            json!({"result": {"kind": "task", "id": "t", "contextId": "c"}}),
            json!({"result": {"kind": "message", "context_id": "c"}}),
        ] {
            assert_eq!(answer_context_id(&answer), Some("c"), "{answer}");
        }
        assert_eq!(answer_context_id(&json!({"error": {"code": 1}})), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn task_references_of_requests() {
        let p = json!({"id": "t1", "historyLength": 2});
        assert_eq!(task_refs("GetTask", Some(&p)), ["t1"]);
        assert_eq!(task_refs("tasks/cancel", Some(&p)), ["t1"]);
        assert_eq!(task_refs("SubscribeToTask", Some(&p)), ["t1"]);
        let push = json!({"task_id": "t2", "id": "cfg"});
        assert_eq!(task_refs("GetTaskPushNotificationConfig", Some(&push)), ["t2", "cfg"]);
        assert_eq!(task_refs("tasks/pushNotificationConfig/list", Some(&json!({"id": "t3"}))), ["t3"]);
        let msg = json!({"message": {"taskId": "t4", "reference_task_ids": ["t5", 7]}});
        assert_eq!(task_refs("message/send", Some(&msg)), ["t4", "t5"]);
        assert_eq!(task_refs("SendStreamingMessage", Some(&msg)), ["t4", "t5"]);
        assert!(task_refs("ListTasks", Some(&p)).is_empty());
        assert!(task_refs("GetTask", None).is_empty());
        assert!(lists_tasks("ListTasks") && !lists_tasks("tasks/list"));
        assert!(creates_tasks("SendMessage") && creates_tasks("message/stream") && !creates_tasks("GetTask"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn task_ids_of_answers() {
        let v1 = json!({"result": {"task": {"id": "a", "contextId": "c"}}});
        assert_eq!(answer_task_id(&v1), Some("a"));
        assert_eq!(answer_task_id(&json!({"result": {"statusUpdate": {"taskId": "b"}}})), Some("b"));
        assert_eq!(answer_task_id(&json!({"result": {"artifactUpdate": {"taskId": "c"}}})), Some("c"));
        assert_eq!(answer_task_id(&json!({"result": {"kind": "task", "id": "d"}})), Some("d"));
        assert_eq!(answer_task_id(&json!({"result": {"kind": "status-update", "taskId": "e"}})), Some("e"));
        assert_eq!(answer_task_id(&json!({"result": {"message": {"messageId": "m"}}})), None);
        assert_eq!(answer_task_id(&json!({"error": {"code": 1}})), None);
    }
}
