//! Metering an OpenAI Realtime session (`on_upgrade: meter`): the WebSocket frames of both directions,
//! which responses are open, and how the session is ended when its budget is spent. Plain Rust; the
//! adapter in `filter.rs` does the reservations, settlements and body writes.
//!
//! A session is admitted like a request (429 before the `101` when the budget is spent), reserving
//! `realtime_input_reservation` + `realtime_output_reservation` for its first response. Each
//! `response.done` is charged its reported usage against that reservation, and the next response's
//! reservation is taken at once. When it is refused, the session is ended: the client gets an `error`
//! event (`rate_limit_exceeded`, with the wait) and a close frame 1008, the server a close frame 1008,
//! each at the next frame boundary in its direction, and nothing else passes after them.

use meshwarden_shared::realtime::{server_event, RealtimeUsage, ServerEvent};
use meshwarden_shared::websocket::{self, BadFrame, CutAt, Cutter, Message, CLOSE_POLICY_VIOLATION, OP_CLOSE};

/// The part of a server message kept to read it (a `response.done` carries the whole response's
/// output, text and transcripts, not its audio); longer messages are read from this much of them.
pub const MAX_SERVER_MESSAGE: usize = 1 << 20;

/// Why a session is being ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The next response's reservation was refused. `error` is the client's `error` event.
    Exhausted { error: Vec<u8> },
    /// The server's frames cannot be read (broken framing, or compressed messages): the session
    /// cannot be metered, so it is not let on.
    Unreadable { what: &'static str, error: Vec<u8> },
}

impl Ending {
    fn error_event(&self) -> &[u8] {
        match self {
            Ending::Exhausted { error } | Ending::Unreadable { error, .. } => error,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Ending::Exhausted { .. } => "token budget exhausted",
            Ending::Unreadable { .. } => "session cannot be metered",
        }
    }
}

/// What the server said in one chunk, for the adapter to charge.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServerChunk {
    /// One entry per `response.done`, in order: its usage (`None` when it reported none, or was too
    /// long to read: charged the reservation) and where it ends in the chunk.
    pub done: Vec<(Option<RealtimeUsage>, usize)>,
    /// The session became unreadable in this chunk: where the message that did it ends.
    pub unreadable_at: Option<usize>,
}

/// A metered Realtime session.
#[derive(Debug)]
pub struct Session {
    /// The upstream answered `101`: the bodies are frames. Otherwise (it refused the upgrade) they
    /// are an HTTP answer, passed unread, and nothing was generated.
    pub upgraded: bool,
    /// The upstream answered (`101` or a refusal). Client bytes before that are followed as frames too
    /// (a client must wait for the `101`; one that does not is still read from its first byte).
    pub answered: bool,
    server: Cutter,
    client: Cutter,
    /// Responses created and not done yet.
    pub open_responses: u64,
    /// Responses charged so far.
    pub responses: u64,
    pub ending: Option<Ending>,
    /// A frame the client sent after the ending began was dropped (it never reached the server).
    pub dropped_client_frames: bool,
    /// Mask of the close frame sent to the server (client frames must be masked).
    mask: [u8; 4],
}

/// What to do with a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Pass {
    /// Unchanged.
    AsIs,
    /// Replaced by these bytes.
    Rewrite(Vec<u8>),
    /// The framing is broken: the connection must be reset (no frame can be placed safely).
    Reset(BadFrame),
}

impl Session {
    pub fn new(mask: [u8; 4]) -> Self {
        Self {
            upgraded: false,
            answered: false,
            server: Cutter::new(MAX_SERVER_MESSAGE),
            // Client frames are only followed for their boundaries: nothing of them is kept.
            client: Cutter::new(0),
            open_responses: 0,
            responses: 0,
            ending: None,
            dropped_client_frames: false,
            mask,
        }
    }

    /// A server chunk: the usage it reports (for the adapter to charge before it calls
    /// [`Session::server_pass`]), or the reason the session cannot be metered.
    pub fn read_server(&mut self, chunk: &[u8]) -> Result<(ServerChunk, Vec<usize>, bool), BadFrame> {
        // Read on after the client's side was closed: a response the server still generates (a
        // `response.create` that passed before the ending) is charged, though the client never sees it.
        let was_mid = self.server.decoder.mid_frame();
        let decoded = self.server.decoder.feed(chunk, true)?;
        let mut out = ServerChunk::default();
        for m in &decoded.messages {
            match read_message(m) {
                Read::Created => self.open_responses += 1,
                Read::Done(u) => {
                    self.open_responses = self.open_responses.saturating_sub(1);
                    self.responses += 1;
                    out.done.push((u, m.end));
                }
                Read::Compressed => {
                    if self.ending.is_none() {
                        self.ending = Some(Ending::Unreadable { what: "compressed", error: unreadable_event() });
                        out.unreadable_at = Some(m.end);
                    }
                }
                Read::Other => {}
            }
        }
        Ok((out, decoded.frame_ends, was_mid))
    }

    /// After the chunk's usage was charged (which may have ended the session): what passes to the
    /// client. `ended_at`: the ending began with this chunk, at the end of this message (the one whose
    /// charge spent the budget): nothing after it passes.
    pub fn server_pass(&mut self, chunk: &[u8], frame_ends: &[usize], was_mid: bool, ended_at: Option<usize>) -> Pass {
        let Some(ending) = self.ending.as_ref() else {
            return Pass::AsIs;
        };
        let mut insert = websocket::frame(websocket::OP_TEXT, ending.error_event(), None);
        insert.extend(websocket::frame(
            OP_CLOSE,
            &websocket::close_payload(CLOSE_POLICY_VIOLATION, ending.reason()),
            None,
        ));
        let at = ended_at.map_or(CutAt::First, CutAt::At);
        match self.server.close(chunk, was_mid, frame_ends, at, &insert) {
            Some(out) => Pass::Rewrite(out),
            None => Pass::AsIs,
        }
    }

    /// The server was sent our close frame: nothing of the client's passes any more.
    pub fn client_closed(&self) -> bool {
        self.client.closed()
    }

    /// A client chunk: passed as it is until the session ends, then cut at its first frame boundary
    /// with a close frame for the server.
    pub fn client_pass(&mut self, chunk: &[u8]) -> Pass {
        if self.client.closed() {
            self.dropped_client_frames |= !chunk.is_empty();
            return Pass::Rewrite(Vec::new());
        }
        let was_mid = self.client.decoder.mid_frame();
        let decoded = match self.client.decoder.feed(chunk, false) {
            Ok(d) => d,
            Err(e) => return Pass::Reset(e),
        };
        let Some(ending) = self.ending.as_ref() else {
            return Pass::AsIs;
        };
        let insert = websocket::frame(
            OP_CLOSE,
            &websocket::close_payload(CLOSE_POLICY_VIOLATION, ending.reason()),
            Some(self.mask),
        );
        match self.client.close(chunk, was_mid, &decoded.frame_ends, CutAt::First, &insert) {
            Some(out) => {
                self.dropped_client_frames |= out.len() < chunk.len() + insert.len();
                Pass::Rewrite(out)
            }
            None => Pass::AsIs,
        }
    }
}

enum Read {
    Created,
    Done(Option<RealtimeUsage>),
    Compressed,
    Other,
}

fn read_message(m: &Message) -> Read {
    if m.compressed {
        return Read::Compressed;
    }
    match server_event(&m.data) {
        ServerEvent::ResponseCreated => Read::Created,
        ServerEvent::ResponseDone(u) => Read::Done(u),
        // Too long to keep whole: a `response.done` is still recognised by its opening, and charged
        // the reservation.
        ServerEvent::Other if m.truncated() && names_response_done(&m.data) => Read::Done(None),
        ServerEvent::Other => Read::Other,
    }
}

/// Whether the opening of a JSON event gives its type as `response.done`.
fn names_response_done(data: &[u8]) -> bool {
    let head = data.get(..data.len().min(512)).unwrap_or_default();
    let Some(at) = head.windows(6).position(|w| w == b"\"type\"") else {
        return false;
    };
    let rest = head.get(at + 6..).unwrap_or_default();
    let rest = rest.iter().skip_while(|b| b.is_ascii_whitespace() || **b == b':').copied().collect::<Vec<u8>>();
    rest.starts_with(b"\"response.done\"")
}

fn unreadable_event() -> Vec<u8> {
    meshwarden_shared::realtime::error_event(
        "invalid_request_error",
        "unmeterable_session",
        "This gateway meters Realtime sessions in tokens and cannot read compressed WebSocket messages \
         (permessage-deflate); the session was ended.",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwarden_shared::websocket::{close_code, frame, FrameDecoder, OP_CONTINUATION, OP_TEXT};

    fn done(input: u64, output: u64) -> Vec<u8> {
        frame(
            OP_TEXT,
            format!(r#"{{"type":"response.done","response":{{"usage":{{"input_tokens":{input},"output_tokens":{output}}}}}}}"#)
                .as_bytes(),
            None,
        )
    }

    /// Messages, control frames, and whether the stream ends inside a frame.
    type Frames = (Vec<Vec<u8>>, Vec<(u8, Vec<u8>)>, bool);

    fn decode_all(bytes: &[u8]) -> Frames {
        let mut d = FrameDecoder::new(1 << 20);
        let out = d.feed(bytes, true).unwrap();
        (out.messages.into_iter().map(|m| m.data).collect(), out.controls, d.mid_frame())
    }

    #[test]
    fn usage_is_read_from_chunks_cut_anywhere() {
        let mut stream = frame(OP_TEXT, br#"{"type":"response.created","response":{}}"#, None);
        stream.extend(frame(OP_TEXT, br#"{"type":"response.output_audio.delta","delta":"AAAA"}"#, None));
        stream.extend(done(120, 30));
        for cut in 1..stream.len() {
            let mut s = Session::new([1, 2, 3, 4]);
            let mut got = Vec::new();
            for c in stream.chunks(cut) {
                let (chunk, _, _) = s.read_server(c).unwrap();
                got.extend(chunk.done);
            }
            let usage: Vec<_> = got.iter().map(|(u, _)| *u).collect();
            assert_eq!(usage, vec![Some(RealtimeUsage { input: 120, cached_input: 0, output: 30 })], "cut {cut}");
            assert_eq!((s.responses, s.open_responses), (1, 0));
        }
    }

    #[test]
    fn an_ending_reaches_the_client_after_the_frame_that_caused_it() {
        let mut s = Session::new([1, 2, 3, 4]);
        let mut chunk = done(10, 10);
        chunk.extend(frame(OP_TEXT, br#"{"type":"response.created"}"#, None));
        chunk.extend_from_slice(&[0x81, 0x05, b'p']); // a frame begun, not finished
        let (read, ends, mid) = s.read_server(&chunk).unwrap();
        assert_eq!(read.done.len(), 1);
        s.ending = Some(Ending::Exhausted { error: br#"{"type":"error"}"#.to_vec() });
        let Pass::Rewrite(out) = s.server_pass(&chunk, &ends, mid, Some(read.done[0].1)) else {
            panic!("not rewritten")
        };
        let (msgs, controls, mid_after) = decode_all(&out);
        assert_eq!(msgs.len(), 2, "the done that spent the budget, then our error event (not what followed)");
        assert_eq!(msgs[1], br#"{"type":"error"}"#);
        assert_eq!(close_code(&controls[0].1), Some(1008));
        assert!(!mid_after, "the unfinished frame was not passed");
        // Nothing more from the server passes, but what it still generates is charged.
        let mut next = b"qrst".to_vec(); // the rest of the frame begun above
        next.extend(done(1, 1));
        let (read, ends, mid) = s.read_server(&next).unwrap();
        assert_eq!(
            read.done.iter().map(|(u, _)| *u).collect::<Vec<_>>(),
            vec![Some(RealtimeUsage { input: 1, cached_input: 0, output: 1 })]
        );
        assert_eq!(s.server_pass(&next, &ends, mid, None), Pass::Rewrite(Vec::new()));
    }

    #[test]
    fn a_frame_begun_before_the_ending_is_finished_first() {
        let mut s = Session::new([1, 2, 3, 4]);
        let big = frame(OP_TEXT, &[b'a'; 300], None);
        let (a, b) = big.split_at(100);
        let (_, ends, mid) = s.read_server(a).unwrap();
        assert_eq!(s.server_pass(a, &ends, mid, None), Pass::AsIs);
        s.ending = Some(Ending::Exhausted { error: b"{}".to_vec() });
        let (_, ends, mid) = s.read_server(b).unwrap();
        let Pass::Rewrite(out) = s.server_pass(b, &ends, mid, None) else { panic!("not rewritten") };
        let mut whole = a.to_vec();
        whole.extend(out);
        let (msgs, controls, mid_after) = decode_all(&whole);
        assert_eq!(msgs, vec![vec![b'a'; 300], b"{}".to_vec()]);
        assert_eq!(controls.len(), 1);
        assert!(!mid_after);
    }

    #[test]
    fn the_client_direction_gets_a_masked_close_and_nothing_after() {
        let mask = Some([9, 9, 9, 9]);
        let mut s = Session::new([7, 7, 7, 7]);
        let append = frame(OP_TEXT, br#"{"type":"input_audio_buffer.append","audio":"AAAA"}"#, mask);
        assert_eq!(s.client_pass(&append[..10]), Pass::AsIs);
        s.ending = Some(Ending::Exhausted { error: b"{}".to_vec() });
        let mut chunk = append[10..].to_vec();
        chunk.extend(frame(OP_TEXT, br#"{"type":"response.create"}"#, mask));
        let Pass::Rewrite(out) = s.client_pass(&chunk) else { panic!("not rewritten") };
        let mut whole = append[..10].to_vec();
        whole.extend(&out);
        let mut d = FrameDecoder::new(1 << 10);
        let got = d.feed(&whole, true).unwrap();
        assert_eq!(got.messages.len(), 1, "the append finished, the response.create dropped");
        assert_eq!(close_code(&got.controls[0].1), Some(1008));
        assert!(s.dropped_client_frames);
        assert_eq!(s.client_pass(b"\x88\x80abcd"), Pass::Rewrite(Vec::new()));
    }

    #[test]
    fn broken_client_framing_resets() {
        let mut s = Session::new([0; 4]);
        assert_eq!(s.client_pass(&[0x83, 0x80, 0, 0, 0, 0]), Pass::Reset(BadFrame::ReservedOpcode));
    }

    #[test]
    fn compressed_server_messages_end_the_session() {
        let mut s = Session::new([0; 4]);
        let mut f = frame(OP_TEXT, b"\x00\x01", None);
        f[0] |= 0x40;
        let (read, ends, mid) = s.read_server(&f).unwrap();
        assert!(matches!(s.ending, Some(Ending::Unreadable { what: "compressed", .. })));
        assert_eq!(read.unreadable_at, Some(f.len()));
        assert!(matches!(s.server_pass(&f, &ends, mid, read.unreadable_at), Pass::Rewrite(_)));
    }

    #[test]
    fn a_response_done_too_long_to_keep_is_charged_the_reservation() {
        let mut s = Session::new([0; 4]);
        let mut body = br#"{"type": "response.done","response":{"output":[{"text":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', MAX_SERVER_MESSAGE));
        body.extend(br#""}],"usage":{"input_tokens":5,"output_tokens":5}}}"#);
        // Sent in two fragments, the way a server splits a long message.
        let mut first = frame(OP_TEXT, &body[..1000], None);
        first[0] &= 0x7F;
        let mut stream = first;
        stream.extend(frame(OP_CONTINUATION, &body[1000..], None));
        let (read, _, _) = s.read_server(&stream).unwrap();
        assert_eq!(read.done.iter().map(|(u, _)| *u).collect::<Vec<_>>(), vec![None]);
    }
}
