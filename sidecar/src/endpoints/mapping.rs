//! Per-server-kind metric names (vLLM, SGLang, TensorRT-LLM) mapped to the signals the picker uses.

use super::prom::samples;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    /// vLLM (`vllm:*`; KV use from `kv_cache_usage_perc`, or the older `gpu_cache_usage_perc`).
    #[default]
    Vllm,
    /// SGLang (`sglang:*`).
    Sglang,
    /// TensorRT-LLM's `trtllm-serve` (`trtllm_*`).
    Trtllm,
    /// Any of the above, by the names present.
    Auto,
}

/// What one scrape says about one server.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServerMetrics {
    pub waiting: f64,
    pub running: f64,
    /// 0..=1; None when the page has no KV metric.
    pub kv: Option<f64>,
    pub max_lora: u32,
    pub lora_running: Vec<String>,
    pub lora_waiting: Vec<String>,
    pub models: Vec<String>,
}

struct Names {
    waiting: &'static str,
    running: &'static str,
    kv: &'static [&'static str],
}

const VLLM: Names = Names {
    waiting: "vllm:num_requests_waiting",
    running: "vllm:num_requests_running",
    kv: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
};
const SGLANG: Names =
    Names { waiting: "sglang:num_queue_reqs", running: "sglang:num_running_reqs", kv: &["sglang:token_usage"] };
const TRTLLM: Names = Names {
    waiting: "trtllm_num_requests_waiting",
    running: "trtllm_num_requests_running",
    kv: &["trtllm_kv_cache_utilization"],
};
const LORA_INFO: &str = "vllm:lora_requests_info";

fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(str::to_string).collect()
}

/// Extract the signals from a `/metrics` page. Several series of one metric (one per model or engine)
/// are summed for counts; the highest KV use wins. Returns None when the page has none of the kind's
/// queue metrics (wrong kind or not a model server): the scrape counts as failed.
pub fn extract(kind: ServerKind, text: &str) -> Option<ServerMetrics> {
    let tables: &[&Names] = match kind {
        ServerKind::Vllm => &[&VLLM],
        ServerKind::Sglang => &[&SGLANG],
        ServerKind::Trtllm => &[&TRTLLM],
        ServerKind::Auto => &[&VLLM, &SGLANG, &TRTLLM],
    };
    let prefixes: [&str; 3] = ["vllm:", "sglang:", "trtllm_"];
    let mut m = ServerMetrics::default();
    let mut seen_queue = false;
    // kv per name index (first name = newest, preferred).
    let mut kv_by_name: [Option<f64>; 2] = [None, None];
    let mut lora_ts = f64::NEG_INFINITY;
    for s in samples(text, |n| prefixes.iter().any(|p| n.starts_with(p))) {
        if !s.value.is_finite() {
            continue;
        }
        for t in tables {
            if s.name == t.waiting || s.name == t.running {
                seen_queue = true;
                if s.name == t.waiting {
                    m.waiting += s.value.max(0.0);
                } else {
                    m.running += s.value.max(0.0);
                }
                if let Some(model) = s.label("model_name") {
                    if !model.is_empty() && !m.models.contains(&model) {
                        m.models.push(model);
                    }
                }
            } else if let Some(i) = t.kv.iter().position(|k| *k == s.name) {
                if let Some(slot) = kv_by_name.get_mut(i) {
                    *slot = Some(slot.map_or(s.value, |v: f64| v.max(s.value)));
                }
            }
        }
        if s.name == LORA_INFO && matches!(kind, ServerKind::Vllm | ServerKind::Auto) && s.value >= lora_ts {
            // One series per state change; the value is its timestamp: the newest describes now.
            lora_ts = s.value;
            m.lora_running = s.label("running_lora_adapters").map(|v| split_list(&v)).unwrap_or_default();
            m.lora_waiting = s.label("waiting_lora_adapters").map(|v| split_list(&v)).unwrap_or_default();
            m.max_lora = s.label("max_lora").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        }
    }
    if !seen_queue {
        return None;
    }
    m.kv = kv_by_name.iter().flatten().next().map(|v| v.clamp(0.0, 1.0));
    Some(m)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn vllm_current_names_and_lora() {
        let page = r#"
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
vllm:num_requests_running{engine="0",model_name="llama"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.42
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b",waiting_lora_adapters="c"} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.6e9
vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="llama"} 5
"#;
        let m = extract(ServerKind::Vllm, page).unwrap();
        assert_eq!((m.waiting, m.running), (4.0, 7.0));
        assert_eq!(m.kv, Some(0.42));
        assert_eq!(m.max_lora, 4);
        assert_eq!(m.lora_running, vec!["a", "b"]);
        assert_eq!(m.lora_waiting, vec!["c"]);
        assert_eq!(m.models, vec!["llama"]);
    }

    #[test]
    fn vllm_older_kv_name() {
        let page = "vllm:num_requests_waiting 1\nvllm:num_requests_running 2\nvllm:gpu_cache_usage_perc 0.9\n";
        assert_eq!(extract(ServerKind::Vllm, page).unwrap().kv, Some(0.9));
        // Both present: the current name wins.
        let both = format!("{page}vllm:kv_cache_usage_perc 0.3\n");
        assert_eq!(extract(ServerKind::Vllm, &both).unwrap().kv, Some(0.3));
    }

    #[test]
    fn sglang_and_trtllm() {
        let sg = "sglang:num_queue_reqs{model_name=\"q\"} 2\nsglang:num_running_reqs{model_name=\"q\"} 3\nsglang:token_usage{model_name=\"q\"} 0.5\n";
        let m = extract(ServerKind::Sglang, sg).unwrap();
        assert_eq!((m.waiting, m.running, m.kv), (2.0, 3.0, Some(0.5)));
        let trt = "trtllm_num_requests_waiting 6\ntrtllm_num_requests_running 1\ntrtllm_kv_cache_utilization 0.25\n";
        let m = extract(ServerKind::Trtllm, trt).unwrap();
        assert_eq!((m.waiting, m.running, m.kv), (6.0, 1.0, Some(0.25)));
        assert_eq!(extract(ServerKind::Auto, trt).unwrap().waiting, 6.0);
        // Wrong kind: no queue metric -> not a usable scrape.
        assert!(extract(ServerKind::Vllm, trt).is_none());
        assert!(extract(ServerKind::Vllm, "<html>not metrics</html>").is_none());
    }

    #[test]
    fn several_series_are_summed() {
        let page = "vllm:num_requests_waiting{engine=\"0\"} 1\nvllm:num_requests_waiting{engine=\"1\"} 2\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc{engine=\"0\"} 0.1\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.7\n";
        let m = extract(ServerKind::Vllm, page).unwrap();
        assert_eq!(m.waiting, 3.0);
        assert_eq!(m.kv, Some(0.7));
    }
}
