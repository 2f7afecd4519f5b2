//! WebSocket framing (RFC 6455) read chunk by chunk, as Envoy hands an upgraded connection's bytes to
//! an HTTP filter: request body data are the client's (masked) frames, response body data the server's.
//!
//! A filter that meters or ends a session needs two things from the byte stream: the messages (to read
//! events such as OpenAI Realtime's `response.done`) and where frames begin and end (a frame of its own
//! can only be inserted at a boundary; anything else corrupts the peer's framing). [`FrameDecoder`]
//! gives both for chunks cut at any byte, with bounded memory: a message longer than its limit is kept
//! only up to it and marked truncated. [`frame`] and [`close_payload`] build the frames a filter sends.

/// Continuation frame.
pub const OP_CONTINUATION: u8 = 0x0;
/// Text frame (UTF-8 payload).
pub const OP_TEXT: u8 = 0x1;
/// Binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Close frame (optional 2-byte status code, then a UTF-8 reason).
pub const OP_CLOSE: u8 = 0x8;
/// Ping frame.
pub const OP_PING: u8 = 0x9;
/// Pong frame.
pub const OP_PONG: u8 = 0xA;

/// Close status 1008: "policy violation", what a gateway sends when a session breaks its policy.
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;
/// Close status 1011: the endpoint met a condition it cannot handle.
pub const CLOSE_INTERNAL_ERROR: u16 = 1011;

/// A byte stream that is not WebSocket framing: nothing after it can be read (or cut) reliably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadFrame {
    /// Opcode 3-7 or 11-15.
    ReservedOpcode,
    /// A control frame longer than 125 bytes or fragmented, or a payload length with its top bit set.
    BadLength,
    /// A continuation frame with no message open.
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is still open.
    MissingContinuation,
    /// RSV2 or RSV3 set (no extension defines them), or RSV1 on a control or continuation frame.
    ReservedBits,
}

impl BadFrame {
    /// Stable name for stats and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BadFrame::ReservedOpcode => "reserved_opcode",
            BadFrame::BadLength => "bad_length",
            BadFrame::UnexpectedContinuation => "unexpected_continuation",
            BadFrame::MissingContinuation => "missing_continuation",
            BadFrame::ReservedBits => "reserved_bits",
        }
    }
}

/// A whole text or binary message (its frames joined and unmasked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// [`OP_TEXT`] or [`OP_BINARY`].
    pub opcode: u8,
    /// The payload, at most the decoder's `max_message` bytes of it.
    pub data: Vec<u8>,
    /// The message's full length (may exceed `data.len()`).
    pub len: u64,
    /// RSV1 was set on its first frame: compressed with permessage-deflate (unreadable here).
    pub compressed: bool,
    /// Where its final frame ended in the chunk that completed it (a frame boundary there).
    pub end: usize,
}

impl Message {
    /// Only part of the payload was kept.
    pub fn truncated(&self) -> bool {
        self.len > self.data.len() as u64
    }
}

/// What one chunk held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Messages completed in this chunk, in order (only when collecting).
    pub messages: Vec<Message>,
    /// Control frames completed in this chunk: opcode and payload (unmasked).
    pub controls: Vec<(u8, Vec<u8>)>,
    /// Offsets in the chunk where a frame ends (exclusive), in order. A chunk can be cut at any of
    /// these, and at 0 when the decoder was between frames before it.
    pub frame_ends: Vec<usize>,
    /// The order in which `messages` (`false`) and `controls` (`true`) completed.
    pub order: Vec<bool>,
}

/// A complete message or control frame, in stream order (see [`parts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Message(Message),
    Control(u8, Vec<u8>),
}

/// The messages and control frames of `held`, bytes that begin at a frame boundary, in order; `None`
/// when they end inside a frame or a fragmented message (hold them until they do not), or when a
/// message is longer than `max` (it could not be rewritten whole).
pub fn parts(held: &[u8], max: usize) -> Result<Option<Vec<Part>>, BadFrame> {
    let mut d = FrameDecoder::new(max);
    let out = d.feed(held, true)?;
    if d.mid_frame() || d.in_message() || out.messages.iter().any(Message::truncated) {
        return Ok(None);
    }
    let (mut msgs, mut ctrls) = (out.messages.into_iter(), out.controls.into_iter());
    Ok(Some(
        out.order
            .iter()
            .filter_map(|&control| {
                if control {
                    ctrls.next().map(|(op, p)| Part::Control(op, p))
                } else {
                    msgs.next().map(Part::Message)
                }
            })
            .collect(),
    ))
}

/// `parts` as frames (one per message; RSV1 kept for a compressed one), masked with `mask` when given
/// (a client's frames).
pub fn encode_parts(parts: &[Part], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        match p {
            Part::Message(m) => {
                let start = out.len();
                out.extend(frame(m.opcode, &m.data, mask));
                if m.compressed {
                    if let Some(b) = out.get_mut(start) {
                        *b |= 0x40;
                    }
                }
            }
            Part::Control(op, payload) => out.extend(frame(*op, payload, mask)),
        }
    }
    out
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    opcode: u8,
    fin: bool,
    left: u64,
    mask: Option<[u8; 4]>,
    mask_pos: usize,
}

/// Incremental decoder of one direction of a WebSocket connection.
#[derive(Debug)]
pub struct FrameDecoder {
    header: [u8; 14],
    header_len: usize,
    frame: Option<Frame>,
    /// A text or binary message whose final frame has not come yet (or is being read).
    message: Option<Message>,
    control: Vec<u8>,
    max_message: usize,
    failed: Option<BadFrame>,
}

/// Header length implied by its first two bytes (2, 4 or 10, plus 4 when masked).
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

impl FrameDecoder {
    /// A decoder keeping at most `max_message` bytes of each message.
    pub fn new(max_message: usize) -> Self {
        Self {
            header: [0; 14],
            header_len: 0,
            frame: None,
            message: None,
            control: Vec::new(),
            max_message,
            failed: None,
        }
    }

    /// Inside a frame (its header or payload partly read): the stream cannot be cut here.
    pub fn mid_frame(&self) -> bool {
        self.header_len > 0 || self.frame.is_some()
    }

    /// A fragmented text or binary message is open (its final frame has not come).
    pub fn in_message(&self) -> bool {
        self.message.is_some()
    }

    /// The error that stopped decoding, if any (every later `feed` returns it).
    pub fn failed(&self) -> Option<BadFrame> {
        self.failed
    }

    /// Read `chunk`. With `collect`, payloads are unmasked and returned as [`Message`]s; without, only
    /// frame boundaries (and control frames) are tracked and no payload is copied.
    pub fn feed(&mut self, chunk: &[u8], collect: bool) -> Result<Decoded, BadFrame> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let mut out = Decoded::default();
        let mut at = 0;
        while at < chunk.len() {
            if let Some(mut f) = self.frame {
                let rest = chunk.len() - at;
                let take = usize::try_from(f.left).map_or(rest, |l| l.min(rest));
                let piece = chunk.get(at..at + take).unwrap_or_default();
                self.payload(&mut f, piece, collect);
                at += take;
                f.left -= take as u64;
                if f.left == 0 {
                    self.frame = None;
                    self.end_frame(f, collect, at, &mut out);
                    out.frame_ends.push(at);
                } else {
                    self.frame = Some(f);
                }
                continue;
            }
            // Header: the first two bytes say how long it is.
            let byte = chunk.get(at).copied().unwrap_or_default();
            if let Some(slot) = self.header.get_mut(self.header_len) {
                *slot = byte;
            }
            self.header_len += 1;
            at += 1;
            if self.header_len < 2 || self.header_len < header_len(self.header[1]) {
                continue;
            }
            let f = match self.start_frame() {
                Ok(f) => f,
                Err(e) => {
                    self.failed = Some(e);
                    return Err(e);
                }
            };
            self.header_len = 0;
            if f.left == 0 {
                self.end_frame(f, collect, at, &mut out);
                out.frame_ends.push(at);
            } else {
                self.frame = Some(f);
            }
        }
        Ok(out)
    }

    fn start_frame(&mut self) -> Result<Frame, BadFrame> {
        let [b0, b1, ..] = self.header;
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        let opcode = b0 & 0x0F;
        if b0 & 0x30 != 0 {
            return Err(BadFrame::ReservedBits);
        }
        let (len, mut pos) = match b1 & 0x7F {
            126 => (u64::from(u16::from_be_bytes([self.header[2], self.header[3]])), 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(self.header.get(2..10).unwrap_or(&[0; 8]));
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        if len >> 63 != 0 {
            return Err(BadFrame::BadLength);
        }
        let mask = if b1 & 0x80 != 0 {
            let mut m = [0u8; 4];
            m.copy_from_slice(self.header.get(pos..pos + 4).unwrap_or(&[0; 4]));
            pos += 4;
            Some(m)
        } else {
            None
        };
        let _ = pos;
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin || len > 125 {
                    return Err(BadFrame::BadLength);
                }
                if rsv1 {
                    return Err(BadFrame::ReservedBits);
                }
                self.control.clear();
            }
            OP_TEXT | OP_BINARY => {
                if self.message.is_some() {
                    return Err(BadFrame::MissingContinuation);
                }
                self.message = Some(Message { opcode, data: Vec::new(), len: 0, compressed: rsv1, end: 0 });
            }
            OP_CONTINUATION => {
                if self.message.is_none() {
                    return Err(BadFrame::UnexpectedContinuation);
                }
                if rsv1 {
                    return Err(BadFrame::ReservedBits);
                }
            }
            _ => return Err(BadFrame::ReservedOpcode),
        }
        Ok(Frame { opcode, fin, left: len, mask, mask_pos: 0 })
    }

    fn payload(&mut self, f: &mut Frame, piece: &[u8], collect: bool) {
        let control = f.opcode >= OP_CLOSE;
        if !control {
            if let Some(m) = self.message.as_mut() {
                m.len = m.len.saturating_add(piece.len() as u64);
            }
        }
        if !collect && !control {
            return;
        }
        let room = if control {
            piece.len()
        } else {
            let kept = self.message.as_ref().map_or(0, |m| m.data.len());
            self.max_message.saturating_sub(kept).min(piece.len())
        };
        let start = if control { self.control.len() } else { self.message.as_ref().map_or(0, |m| m.data.len()) };
        let dst = if control {
            &mut self.control
        } else if let Some(m) = self.message.as_mut() {
            &mut m.data
        } else {
            return;
        };
        dst.extend_from_slice(piece.get(..room).unwrap_or_default());
        if let Some(mask) = f.mask {
            for (b, m) in dst.iter_mut().skip(start).zip(mask.iter().cycle().skip(f.mask_pos)) {
                *b ^= m;
            }
        }
        // The mask runs over the whole payload, kept or not.
        f.mask_pos = (f.mask_pos + piece.len()) % 4;
    }

    fn end_frame(&mut self, f: Frame, collect: bool, at: usize, out: &mut Decoded) {
        if f.opcode >= OP_CLOSE {
            out.controls.push((f.opcode, std::mem::take(&mut self.control)));
            out.order.push(true);
            return;
        }
        if f.fin {
            if let Some(mut m) = self.message.take() {
                if collect {
                    m.end = at;
                    out.messages.push(m);
                    out.order.push(false);
                }
            }
        }
    }
}

/// Where a direction being closed is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutAt {
    /// At the first frame boundary: nothing more of the peer's passes than the frame already begun.
    First,
    /// At the last frame boundary of the chunk (the frames that completed in it pass whole).
    Last,
    /// At this offset of the chunk, a frame boundary (a message's `end`): what follows is dropped.
    At(usize),
}

/// One direction of a connection that a filter may end with frames of its own: its decoder, and
/// whether those frames were written (after them nothing passes).
#[derive(Debug)]
pub struct Cutter {
    pub decoder: FrameDecoder,
    closed: bool,
}

impl Cutter {
    /// A direction whose messages are kept up to `max_message` bytes (0: boundaries only).
    pub fn new(max_message: usize) -> Self {
        Self { decoder: FrameDecoder::new(max_message), closed: false }
    }

    /// Our frames were written: the rest of this direction is dropped.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// The bytes of `chunk` to pass on while this direction is being closed: up to a frame boundary
    /// (`frame_ends`, from the decoder's `feed` of this chunk; `was_mid_frame`, its state before), then
    /// `insert`. `None` = pass the chunk as it is: it is still inside a frame begun before.
    pub fn close(
        &mut self,
        chunk: &[u8],
        was_mid_frame: bool,
        frame_ends: &[usize],
        at: CutAt,
        insert: &[u8],
    ) -> Option<Vec<u8>> {
        if self.closed {
            return Some(Vec::new());
        }
        let cut = match at {
            CutAt::First if !was_mid_frame => Some(0),
            CutAt::First => frame_ends.first().copied(),
            CutAt::Last => frame_ends.last().copied().or((!was_mid_frame).then_some(0)),
            CutAt::At(at) => Some(at),
        }?;
        self.closed = true;
        let mut out = chunk.get(..cut).unwrap_or_default().to_vec();
        out.extend_from_slice(insert);
        Some(out)
    }
}

/// One unfragmented frame. `mask` must be given for frames a client sends (RFC 6455 5.3).
pub fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | (opcode & 0x0F));
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().zip(k.iter().cycle()).map(|(b, m)| b ^ m));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A close frame's payload: the status code, then `reason` cut to fit 125 bytes at a char boundary.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = code.to_be_bytes().to_vec();
    out.extend_from_slice(reason.get(..end).unwrap_or_default().as_bytes());
    out
}

/// The status code of a close frame's payload, if it has one.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn fragmented(text: &[u8], parts: usize, mask: Option<[u8; 4]>) -> Vec<u8> {
        let size = text.len().div_ceil(parts).max(1);
        let chunks: Vec<&[u8]> = text.chunks(size).collect();
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let mut f = frame(if i == 0 { OP_TEXT } else { OP_CONTINUATION }, c, mask);
            if i + 1 < chunks.len() {
                f[0] &= 0x7F; // not final
            }
            out.extend(f);
        }
        out
    }

    fn stream(mask: Option<[u8; 4]>) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for f in [
            frame(OP_TEXT, br#"{"type":"session.created"}"#, mask),
            frame(OP_PING, b"hi", mask),
            frame(OP_BINARY, &vec![7u8; 70_000], mask),
            fragmented(br#"{"type":"response.done","response":{"usage":{"input_tokens":3}}}"#, 3, mask),
            frame(OP_CLOSE, &close_payload(1000, "bye"), mask),
        ] {
            bytes.extend(f);
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn messages_and_boundaries_survive_any_cut() {
        for mask in [None, Some([0x12, 0x34, 0x56, 0x78])] {
            let (bytes, _) = stream(mask);
            for cut in [1usize, 2, 3, 7, 13, 125, 4096, bytes.len()] {
                let mut d = FrameDecoder::new(1 << 20);
                let mut msgs = Vec::new();
                let mut controls = Vec::new();
                let mut ends = Vec::new();
                let mut base = 0;
                for c in bytes.chunks(cut) {
                    let out = d.feed(c, true).unwrap();
                    msgs.extend(out.messages);
                    controls.extend(out.controls);
                    ends.extend(out.frame_ends.iter().map(|e| e + base));
                    base += c.len();
                }
                assert!(!d.mid_frame());
                assert_eq!(msgs.len(), 3, "cut {cut}");
                assert_eq!(msgs[0].data, br#"{"type":"session.created"}"#);
                assert_eq!(msgs[1].opcode, OP_BINARY);
                assert_eq!(msgs[1].data, vec![7u8; 70_000]);
                assert_eq!(msgs[2].data, br#"{"type":"response.done","response":{"usage":{"input_tokens":3}}}"#);
                assert_eq!(controls, vec![(OP_PING, b"hi".to_vec()), (OP_CLOSE, close_payload(1000, "bye"))]);
                assert_eq!(close_code(&controls[1].1), Some(1000));
                // Every frame end is reported, including each fragment of the split message.
                assert_eq!(ends.len(), 7, "cut {cut}");
                assert_eq!(ends.last(), Some(&bytes.len()));
            }
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn boundaries_without_collecting_copy_nothing() {
        let (bytes, _) = stream(Some([1, 2, 3, 4]));
        let mut d = FrameDecoder::new(16);
        let out = d.feed(&bytes, false).unwrap();
        assert!(out.messages.is_empty());
        assert_eq!(out.frame_ends.len(), 7);
        assert_eq!(out.controls.len(), 2, "control frames are always read");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn long_messages_are_kept_up_to_the_limit() {
        let mut d = FrameDecoder::new(10);
        let out = d.feed(&frame(OP_TEXT, b"0123456789abcdef", Some([9, 8, 7, 6])), true).unwrap();
        let m = &out.messages[0];
        assert_eq!(m.data, b"0123456789");
        assert_eq!(m.len, 16);
        assert!(m.truncated());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn compressed_messages_are_flagged() {
        let mut f = frame(OP_TEXT, b"\x01\x02", None);
        f[0] |= 0x40;
        let out = FrameDecoder::new(64).feed(&f, true).unwrap();
        assert!(out.messages[0].compressed);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn broken_framing_is_an_error_that_sticks() {
        let cases: [(&[u8], BadFrame); 5] = [
            (&[0x83, 0x00], BadFrame::ReservedOpcode),
            (&[0x80, 0x00], BadFrame::UnexpectedContinuation),
            (&[0x88, 0x7E, 0x00, 0x80], BadFrame::BadLength),
            (&[0x09, 0x00], BadFrame::BadLength),
            (&[0xA1, 0x00], BadFrame::ReservedBits),
        ];
        for (bytes, want) in cases {
            let mut d = FrameDecoder::new(64);
            assert_eq!(d.feed(bytes, true), Err(want), "{bytes:?}");
            assert_eq!(d.feed(&frame(OP_TEXT, b"x", None), true), Err(want));
            assert_eq!(d.failed(), Some(want));
        }
        let mut d = FrameDecoder::new(64);
        let open = [0x01, 0x01, b'a']; // text, not final
        assert_eq!(d.feed(&open, true).map(|o| o.frame_ends), Ok(vec![3]));
        assert_eq!(d.feed(&frame(OP_TEXT, b"b", None), true), Err(BadFrame::MissingContinuation));
        let mut huge = vec![0x82, 0x7F];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(FrameDecoder::new(64).feed(&huge, true), Err(BadFrame::BadLength));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn held_bytes_are_decoded_in_order_and_encoded_back() {
        let mask = Some([4, 3, 2, 1]);
        let (bytes, ends) = stream(mask);
        let got = parts(&bytes, 1 << 20).unwrap().unwrap();
        let kinds: Vec<bool> = got.iter().map(|p| matches!(p, Part::Control(..))).collect();
        assert_eq!(kinds, vec![false, true, false, false, true], "text, ping, binary, fragmented text, close");
        // Encoded back (the fragmented message as one frame), it decodes to the same parts.
        let again = encode_parts(&got, mask);
        let content = |ps: &[Part]| -> Vec<(u8, Vec<u8>)> {
            ps.iter()
                .map(|p| match p {
                    Part::Message(m) => (m.opcode, m.data.clone()),
                    Part::Control(op, d) => (*op, d.clone()),
                })
                .collect()
        };
        assert_eq!(content(&parts(&again, 1 << 20).unwrap().unwrap()), content(&got));
        // Ending inside a frame or inside the fragmented message: not yet.
        assert_eq!(parts(&bytes[..ends[2] + 3], 1 << 20), Ok(None));
        assert_eq!(parts(&bytes[..ends[3] - 5], 1 << 20), Ok(None));
        assert_eq!(parts(&bytes, 100), Ok(None), "a message over the bound");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn frames_are_encoded_with_every_length_form() {
        for n in [0usize, 125, 126, 65_535, 65_536] {
            for mask in [None, Some([5, 6, 7, 8])] {
                let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
                let out = FrameDecoder::new(1 << 17).feed(&frame(OP_BINARY, &payload, mask), true).unwrap();
                assert_eq!(out.messages[0].data, payload, "{n} {mask:?}");
            }
        }
        let reason = "é".repeat(100);
        let p = close_payload(CLOSE_POLICY_VIOLATION, &reason);
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert_eq!(close_code(&p), Some(1008));
        assert_eq!(close_code(&[]), None);
    }
}
