//! Masking an OpenAI Realtime session (`on_upgrade: mask`): the texts of the client's events are masked
//! before they reach the server, and the placeholders the model echoes are restored in the server's
//! events, also when a placeholder is cut across two transcript or text deltas. Plain Rust; the adapter
//! in `filter.rs` holds and writes the bytes.
//!
//! Each direction's bytes are held until they end at a message boundary (a message is rewritten whole;
//! a frame already passed cannot be changed), usually at once: each event comes whole in a chunk. A
//! rewritten buffer is encoded again, one frame per message, in order with the control frames (client
//! frames masked again). The placeholders stay the same for a value for the whole session, and the
//! restore map lives as long as the session.

use crate::engine::{Engine, MaskState};
use crate::restore::Restorer;
use meshwarden_shared::realtime::{client_text_pointers, is_audio_append};
use meshwarden_shared::stream_rewrite::DeltaChannels;
use meshwarden_shared::websocket::{
    close_payload, encode_parts, frame, parts, BadFrame, FrameDecoder, Message, Part, CLOSE_POLICY_VIOLATION, OP_CLOSE,
    OP_TEXT,
};
use serde_json::Value;
use std::collections::HashMap;

/// The close reason both sides are given when a session is ended.
pub const CLOSE_REASON: &str = "sensitive data refused";

/// What to do with a direction's held bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// They end inside a message: hold them.
    Hold,
    /// Pass them as they are.
    Pass,
    /// Replace them with these bytes.
    Rewrite(Vec<u8>),
    /// Not WebSocket framing: reset the connection.
    Reset(BadFrame),
}

/// Why a session was ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A detector whose action is `reject` found a value (its name).
    Rejected(String),
    /// A message that cannot be scanned: compressed, or held past the bound.
    Unscannable(&'static str),
}

/// A masked session.
pub struct Session {
    /// Placeholders handed out so far (and the restore map), for the whole session.
    pub mask: MaskState,
    restore: bool,
    restorer: Restorer,
    /// Placeholders the restorer knows (rebuilt when the client was given new ones).
    known: usize,
    channels: DeltaChannels<()>,
    pub ending: Option<Ending>,
    client_closed: bool,
    server_closed: bool,
    /// The server's frame boundaries while its bytes pass unheld (nothing to restore yet): holding may
    /// only begin at a boundary.
    server_track: FrameDecoder,
    client_mask: [u8; 4],
    /// Client text messages scanned, server messages restored.
    pub scanned: u64,
    pub restored_messages: u64,
}

impl Session {
    pub fn new(restore: bool, client_mask: [u8; 4]) -> Self {
        Self {
            mask: MaskState::default(),
            restore,
            restorer: Restorer::new(HashMap::new(), None),
            known: 0,
            channels: DeltaChannels::default(),
            ending: None,
            client_closed: false,
            server_closed: false,
            server_track: FrameDecoder::new(0),
            client_mask,
            scanned: 0,
            restored_messages: 0,
        }
    }

    /// Placeholders restored in the answers so far.
    pub fn restored(&self) -> u64 {
        self.restorer.restored
    }

    /// The client's held bytes (they start at a frame boundary).
    pub fn client(&mut self, engine: &Engine, held: &[u8], max: usize) -> Step {
        if self.client_closed {
            return Step::Rewrite(Vec::new());
        }
        let mut list = match parts(held, max) {
            Err(e) => return Step::Reset(e),
            Ok(None) if held.len() <= max => return Step::Hold,
            Ok(None) => return self.end_client(Ending::Unscannable("too_large")),
            Ok(Some(p)) => p,
        };
        let mut changed = false;
        for part in &mut list {
            let Part::Message(m) = part else { continue };
            if m.compressed {
                return self.end_client(Ending::Unscannable("compressed"));
            }
            if m.opcode != OP_TEXT || is_audio_append(&m.data) {
                continue;
            }
            // Not JSON: the API refuses it, so nothing of it reaches a model; passed as it is.
            let Ok(mut v) = serde_json::from_slice::<Value>(&m.data) else { continue };
            self.scanned += 1;
            if self.mask_event(engine, &mut v) {
                if let Ok(bytes) = serde_json::to_vec(&v) {
                    m.data = bytes;
                    changed = true;
                }
            }
            if let Some(name) = self.mask.rejected.first() {
                return self.end_client(Ending::Rejected(name.clone()));
            }
        }
        if changed {
            Step::Rewrite(encode_parts(&list, Some(self.client_mask)))
        } else {
            Step::Pass
        }
    }

    /// Mask the texts of one client event in place; true if one changed.
    fn mask_event(&mut self, engine: &Engine, v: &mut Value) -> bool {
        let pointers = client_text_pointers(v);
        // Look-alikes the client sent itself are never handed out (nor restored into someone's data).
        for (_, p) in &pointers {
            if let Some(t) = meshwarden_shared::json::pointer(v, p).and_then(Value::as_str) {
                self.mask.reserve_lookalikes(t.as_bytes());
            }
        }
        let mut changed = false;
        for (_, p) in pointers {
            let Some(Value::String(t)) = meshwarden_shared::json::pointer_mut(v, &p) else { continue };
            if let Some(masked) = self.mask.mask(engine, t.as_bytes()) {
                *t = String::from_utf8_lossy(&masked).into_owned();
                changed = true;
            }
        }
        changed
    }

    fn end_client(&mut self, why: Ending) -> Step {
        self.client_closed = true;
        self.ending.get_or_insert(why);
        Step::Rewrite(frame(OP_CLOSE, &close_payload(CLOSE_POLICY_VIOLATION, CLOSE_REASON), Some(self.client_mask)))
    }

    /// The server's held bytes: placeholders restored (with `restore`), or, once the session is ending,
    /// the client's `error` event and close frame at the first frame boundary, and nothing after them.
    pub fn server(&mut self, held: &[u8], max: usize) -> Step {
        if self.server_closed {
            return Step::Rewrite(Vec::new());
        }
        let at_boundary = !self.server_track.mid_frame();
        if let Some(why) = self.ending.clone() {
            let cut = if at_boundary {
                0
            } else {
                match self.server_track.feed(held, false) {
                    Err(e) => return Step::Reset(e),
                    Ok(d) => match d.frame_ends.first() {
                        Some(&end) => end,
                        None => return Step::Pass, // still inside a frame begun before the ending
                    },
                }
            };
            self.server_closed = true;
            let mut out = held.get(..cut).unwrap_or_default().to_vec();
            out.extend(ending_frames(&why));
            return Step::Rewrite(out);
        }
        let nothing_to_restore = !self.restore || (self.mask.restore.is_empty() && self.channels.is_empty());
        if nothing_to_restore || !at_boundary {
            // Passed unheld (followed for its boundaries); restoring begins at a boundary.
            return match self.server_track.feed(held, false) {
                Ok(_) => Step::Pass,
                Err(e) => Step::Reset(e),
            };
        }
        let mut list = match parts(held, max) {
            Err(e) => return Step::Reset(e),
            Ok(None) if held.len() <= max => return Step::Hold,
            // A message too long to hold passes as it is (its placeholders are not restored).
            Ok(None) => {
                return match self.server_track.feed(held, false) {
                    Ok(_) => Step::Pass,
                    Err(e) => Step::Reset(e),
                }
            }
            Ok(Some(p)) => p,
        };
        if self.known != self.mask.restore.len() {
            let restored = self.restorer.restored;
            self.restorer = Restorer::new(self.mask.restore.clone(), None);
            self.restorer.restored = restored;
            self.known = self.mask.restore.len();
        }
        let mut out: Vec<Part> = Vec::with_capacity(list.len());
        let mut changed = false;
        for part in list.drain(..) {
            let Part::Message(m) = part else {
                out.push(part);
                continue;
            };
            match self.restore_message(&m) {
                Some(events) => {
                    changed = true;
                    self.restored_messages += 1;
                    out.extend(events.into_iter().map(|data| Part::Message(Message { data, len: 0, ..m.clone() })));
                }
                None => out.push(Part::Message(m)),
            }
        }
        if changed {
            Step::Rewrite(encode_parts(&out, None))
        } else {
            Step::Pass
        }
    }

    /// One server message with its placeholders restored: the events to send (held text flushed before
    /// it, then the event), or `None` when it is unchanged.
    fn restore_message(&mut self, m: &Message) -> Option<Vec<Vec<u8>>> {
        if m.opcode != OP_TEXT || m.compressed {
            return None;
        }
        // Audio and most deltas cannot hold a placeholder: no `<` (nor its JSON escape) and nothing held.
        let may = memchr::memchr(b'<', &m.data).is_some() || memchr::memmem::find(&m.data, b"\\u003c").is_some();
        if !may && self.channels.is_empty() {
            return None;
        }
        let mut v: Value = serde_json::from_slice(&m.data).ok()?;
        let mut before: Vec<((), Value)> = Vec::new();
        let changed = self.channels.on_event(&mut v, &(), m.data.len(), &mut self.restorer, &mut before);
        if !changed && before.is_empty() {
            return None;
        }
        let mut events: Vec<Vec<u8>> = before.into_iter().filter_map(|(_, e)| serde_json::to_vec(&e).ok()).collect();
        events.push(serde_json::to_vec(&v).ok()?);
        Some(events)
    }
}

/// The client's `error` event and close frame for an ending.
fn ending_frames(why: &Ending) -> Vec<u8> {
    let (code, message) = match why {
        Ending::Rejected(name) => (
            "sensitive_data_rejected",
            format!(
                "The Realtime session sent sensitive data ({name}) that this gateway refuses; the session was ended."
            ),
        ),
        Ending::Unscannable(_) => (
            "unscannable_message",
            "The Realtime session sent a message that cannot be scanned for sensitive data; the session was ended."
                .to_string(),
        ),
    };
    let mut out =
        frame(OP_TEXT, &meshwarden_shared::realtime::error_event("invalid_request_error", code, &message), None);
    out.extend(frame(OP_CLOSE, &close_payload(CLOSE_POLICY_VIOLATION, CLOSE_REASON), None));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use meshwarden_shared::websocket::close_code;

    const MASK: Option<[u8; 4]> = Some([7, 7, 1, 2]);

    fn engine() -> Engine {
        Engine::new(&Config::default())
    }

    fn client_event(v: Value) -> Vec<u8> {
        frame(OP_TEXT, v.to_string().as_bytes(), MASK)
    }

    fn server_event(v: Value) -> Vec<u8> {
        frame(OP_TEXT, v.to_string().as_bytes(), None)
    }

    fn messages(bytes: &[u8]) -> Vec<Value> {
        let out = FrameDecoder::new(1 << 20).feed(bytes, true).unwrap();
        out.messages.iter().map(|m| serde_json::from_slice(&m.data).unwrap()).collect()
    }

    #[test]
    fn client_texts_are_masked_and_the_answer_restored_across_deltas() {
        let e = engine();
        let mut s = Session::new(true, [1, 2, 3, 4]);
        let item = client_event(serde_json::json!({"type": "conversation.item.create", "item": {"type": "message",
            "role": "user", "content": [{"type": "input_text", "text": "Mail jane.doe@example.com about it"}]}}));
        let mut held = item.clone();
        held.extend(frame(OP_TEXT, br#"{"type":"input_audio_buffer.append","audio":"AAAA"}"#, MASK));
        let Step::Rewrite(out) = s.client(&e, &held, 1 << 20) else { panic!("not masked") };
        let sent = messages(&out);
        assert_eq!(sent[0]["item"]["content"][0]["text"], "Mail <EMAIL_1> about it");
        assert_eq!(sent[1]["type"], "input_audio_buffer.append", "other messages pass in order");
        // The model echoes the placeholder cut across two transcript deltas, an audio delta between.
        let d = |delta: &str| {
            server_event(serde_json::json!({"type": "response.output_audio_transcript.delta",
                "output_index": 0, "content_index": 0, "delta": delta}))
        };
        let mut answer = Vec::new();
        for part in [
            d("I will write to <EMA"),
            server_event(serde_json::json!({"type":"response.output_audio.delta","delta":"AAAA"})),
            d("IL_1> today."),
        ] {
            let Step::Rewrite(out) = s.server(&part, 1 << 20) else {
                answer.extend(messages(&part));
                continue;
            };
            answer.extend(messages(&out));
        }
        let text: String = answer.iter().filter_map(|v| v["delta"].as_str()).filter(|t| *t != "AAAA").collect();
        assert_eq!(text, "I will write to jane.doe@example.com today.");
        assert_eq!(s.restored(), 1);
        // Whole texts (`response.done`) are restored too.
        let done = server_event(serde_json::json!({"type": "response.done", "response": {"output": [{"content":
            [{"type": "output_audio", "transcript": "Sent to <EMAIL_1>."}]}]}}));
        let Step::Rewrite(out) = s.server(&done, 1 << 20) else { panic!("not restored") };
        assert_eq!(
            messages(&out)[0]["response"]["output"][0]["content"][0]["transcript"],
            "Sent to jane.doe@example.com."
        );
    }

    #[test]
    fn a_look_alike_the_client_sent_is_not_restored() {
        let e = engine();
        let mut s = Session::new(true, [0; 4]);
        let item = client_event(serde_json::json!({"type": "conversation.item.create", "item": {"type": "message",
            "role": "user", "content": [{"type": "input_text", "text": "<EMAIL_1> is mine, a@b.example is his"}]}}));
        let Step::Rewrite(out) = s.client(&e, &item, 1 << 20) else { panic!("not masked") };
        assert_eq!(messages(&out)[0]["item"]["content"][0]["text"], "<EMAIL_1> is mine, <EMAIL_2> is his");
        let echo =
            server_event(serde_json::json!({"type": "response.output_text.done", "text": "<EMAIL_1> and <EMAIL_2>"}));
        let Step::Rewrite(out) = s.server(&echo, 1 << 20) else { panic!("not restored") };
        assert_eq!(messages(&out)[0]["text"], "<EMAIL_1> and a@b.example");
    }

    #[test]
    fn held_until_whole_and_unscannable_ends_the_session() {
        let e = engine();
        let mut s = Session::new(true, [0; 4]);
        let item = client_event(
            serde_json::json!({"type": "session.update", "session": {"instructions": "call +1 415 555 2671"}}),
        );
        for cut in 1..item.len() {
            assert_eq!(s.client(&e, &item[..cut], 1 << 20), Step::Hold);
        }
        let mut compressed = frame(OP_TEXT, b"\x01", MASK);
        compressed[0] |= 0x40;
        let Step::Rewrite(out) = s.client(&e, &compressed, 1 << 20) else { panic!("not ended") };
        let got = FrameDecoder::new(64).feed(&out, true).unwrap();
        assert_eq!(close_code(&got.controls[0].1), Some(1008));
        assert_eq!(s.ending, Some(Ending::Unscannable("compressed")));
        let Step::Rewrite(out) = s.server(&server_event(serde_json::json!({"type": "x"})), 1 << 20) else { panic!() };
        let got = FrameDecoder::new(4096).feed(&out, true).unwrap();
        let ev: Value = serde_json::from_slice(&got.messages[0].data).unwrap();
        assert_eq!(ev["error"]["code"], "unscannable_message");
        assert_eq!(close_code(&got.controls[0].1), Some(1008));
        assert_eq!(s.server(b"\x81\x00", 1 << 20), Step::Rewrite(Vec::new()));
        assert_eq!(s.client(&e, b"\x81\x80abcd", 1 << 20), Step::Rewrite(Vec::new()));
    }

    #[test]
    fn restoring_begins_at_a_frame_boundary() {
        let e = engine();
        let mut s = Session::new(true, [0; 4]);
        // A server frame begun before any placeholder existed, its rest after one was handed out.
        let first = server_event(serde_json::json!({"type": "session.created", "pad": "x".repeat(300)}));
        let (a, b) = first.split_at(100);
        assert_eq!(s.server(a, 1 << 20), Step::Pass);
        let item = client_event(serde_json::json!({"type": "conversation.item.create", "item": {"role": "user",
            "content": [{"type": "input_text", "text": "x@y.example"}]}}));
        assert!(matches!(s.client(&e, &item, 1 << 20), Step::Rewrite(_)));
        assert_eq!(s.server(b, 1 << 20), Step::Pass, "the rest of that frame passes as it is");
        let echo = server_event(serde_json::json!({"type": "response.output_text.done", "text": "<EMAIL_1>"}));
        let Step::Rewrite(out) = s.server(&echo, 1 << 20) else { panic!("not restored") };
        assert_eq!(messages(&out)[0]["text"], "x@y.example");
    }

    #[test]
    fn nothing_to_restore_passes_the_server_bytes_unread() {
        let mut s = Session::new(true, [0; 4]);
        assert_eq!(s.server(b"\x81\x05he", 1 << 20), Step::Pass, "no placeholder handed out yet");
        let mut s = Session::new(false, [0; 4]);
        let e = engine();
        let item = client_event(serde_json::json!({"type": "conversation.item.create", "item": {"role": "user",
            "content": [{"type": "input_text", "text": "x@y.example"}]}}));
        assert!(matches!(s.client(&e, &item, 1 << 20), Step::Rewrite(_)));
        assert_eq!(
            s.server(&server_event(serde_json::json!({"text": "<EMAIL_1>"})), 1 << 20),
            Step::Pass,
            "restore off"
        );
    }
}
