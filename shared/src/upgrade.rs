//! Connection upgrades (WebSocket: OpenAI's Realtime API, Gemini Live) and CONNECT tunnels.
//!
//! With upgrades enabled on the connection manager (Istio's sidecars and gateways enable WebSocket on
//! every listener), Envoy hands an upgraded connection's bytes to the HTTP filters as request and response
//! body data that never ends. A filter that holds the request body until its end (to read the prompt)
//! would hold the first WebSocket frame for ever: the session hangs after its `101`. And the frames are
//! not a prompt or an answer a filter can read (client frames are masked), so a filter that meters or
//! scans must refuse such a connection or let it through unread, never wait for its end.

/// Whether a request asks to leave HTTP: an `upgrade` header (HTTP/1.1 `Upgrade: websocket`, which Envoy
/// also presents for HTTP/2 and HTTP/3 extended CONNECT) or a `CONNECT` method (a tunnel).
pub fn is_upgrade_request(upgrade: Option<&str>, method: Option<&str>) -> bool {
    upgrade.is_some_and(|u| !u.trim().is_empty()) || method.is_some_and(|m| m.eq_ignore_ascii_case("CONNECT"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn upgrades_and_tunnels_are_recognised() {
        assert!(is_upgrade_request(Some("websocket"), Some("GET")));
        assert!(is_upgrade_request(None, Some("CONNECT")));
        assert!(!is_upgrade_request(None, Some("POST")));
        assert!(!is_upgrade_request(Some(" "), Some("GET")));
        assert!(!is_upgrade_request(None, None));
    }
}
