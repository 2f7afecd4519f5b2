//! Properties: however a WebSocket byte stream is cut into chunks, the frame decoder yields the same
//! messages, control frames, frame boundaries and error, and keeps at most its bound of a message;
//! prompt-guard's and pii-redactor's Realtime sessions never panic on it and what they pass on is valid
//! framing; a metered Realtime session never panics on it, and once it is ending, what it passes in the client
//! direction is still valid framing, our close frame (when placed) at a frame boundary and last.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshwarden_shared::websocket::{close_payload, frame, FrameDecoder, CLOSE_POLICY_VIOLATION, OP_CLOSE};
use token_limiter::realtime::{Ending, Pass, Session};

thread_local! {
    static PII: pii_redactor::engine::Engine = pii_redactor::engine::Engine::new(&pii_redactor::config::Config::default());
}

/// Feed `body` in chunks of `step` to a holding session (`f` = the session's step for the bytes held so
/// far), as the adapters do (held bytes accumulate until they pass); returns what passed on, or `None` when
/// the framing broke.
fn held_run(body: &[u8], step: usize, mut f: impl FnMut(&[u8]) -> Option<Option<Vec<u8>>>) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut held = Vec::new();
    for c in body.chunks(step) {
        held.extend_from_slice(c);
        match f(&held)? {
            // Hold: nothing passes yet.
            None => continue,
            Some(pass) => {
                out.extend(pass);
                held.clear();
            }
        }
    }
    Some(out)
}

fn valid_framing(bytes: &[u8]) {
    let mut d = FrameDecoder::new(0);
    assert!(d.feed(bytes, false).is_ok(), "what passed is not WebSocket framing");
}

fn decode(
    body: &[u8],
    step: usize,
    max: usize,
) -> (Vec<(u8, Vec<u8>, u64)>, Vec<(u8, Vec<u8>)>, Vec<usize>, Option<String>) {
    let mut d = FrameDecoder::new(max);
    let (mut msgs, mut controls, mut ends) = (Vec::new(), Vec::new(), Vec::new());
    let mut base = 0;
    for c in body.chunks(step) {
        match d.feed(c, true) {
            Ok(out) => {
                for m in out.messages {
                    assert!(m.data.len() <= max);
                    msgs.push((m.opcode, m.data, m.len));
                }
                controls.extend(out.controls);
                ends.extend(out.frame_ends.iter().map(|e| e + base));
            }
            Err(e) => return (msgs, controls, ends, Some(format!("{e:?}"))),
        }
        base += c.len();
    }
    (msgs, controls, ends, None)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (head, body) = data.split_at(3);
    let step = usize::from(head[0] % 31) + 1;
    let max = usize::from(head[1]) * 4;
    let (whole, split) = (decode(body, body.len().max(1), max), decode(body, step, max));
    // Broken framing is the same error however the stream is cut (what came before it is dropped
    // with the connection, so it is not compared); otherwise everything is the same.
    if whole.3.is_some() || split.3.is_some() {
        assert_eq!(whole.3, split.3);
    } else {
        assert_eq!(whole, split);
    }

    // prompt-guard: the stream as client frames; a message containing "ignore" is blocked.
    let mut pg = prompt_guard::realtime::Session::new([5, 6, 7, 8]);
    let passed = held_run(body, step, |held| {
        match pg.client(held, 4096, |t| t.iter().any(|x| x.text.contains("ignore")).then(String::new)).0 {
            prompt_guard::realtime::ClientStep::Hold => Some(None),
            prompt_guard::realtime::ClientStep::Pass => Some(Some(held.to_vec())),
            prompt_guard::realtime::ClientStep::Rewrite(out) => Some(Some(out)),
            prompt_guard::realtime::ClientStep::Reset(_) => None,
        }
    });
    if let Some(p) = passed {
        valid_framing(&p);
    }
    let _ = pg.server(body, |t| t.iter().any(|x| x.text.contains("ignore")).then(String::new));

    // pii-redactor: the stream as client frames (masked and encoded again), then as server frames.
    PII.with(|engine| {
        let mut s = pii_redactor::realtime::Session::new(true, [1, 1, 2, 2]);
        use pii_redactor::realtime::Step;
        let run = |s: &mut pii_redactor::realtime::Session, client: bool| {
            held_run(body, step, |held| {
                let st = if client { s.client(engine, held, 4096) } else { s.server(held, 4096) };
                match st {
                    Step::Hold => Some(None),
                    Step::Pass => Some(Some(held.to_vec())),
                    Step::Rewrite(out) => Some(Some(out)),
                    Step::Reset(_) => None,
                }
            })
        };
        if let Some(p) = run(&mut s, true) {
            valid_framing(&p);
        }
        if let Some(p) = run(&mut s, false) {
            valid_framing(&p);
        }
    });

    // A session reading the stream as server frames, ending at a point chosen by the input.
    let end_at = usize::from(head[2]) * body.len() / 256;
    let mut s = Session::new([1, 2, 3, 4]);
    s.upgraded = true;
    let mut client_out = Vec::new();
    let mut broken = false;
    for (i, c) in body.chunks(step).enumerate() {
        if i * step >= end_at && s.ending.is_none() {
            s.ending = Some(Ending::Exhausted { error: b"{}".to_vec() });
        }
        if let Ok((_, ends, mid)) = s.read_server(c) {
            let _ = s.server_pass(c, &ends, mid, None);
        }
        match s.client_pass(c) {
            Pass::AsIs => client_out.extend_from_slice(c),
            Pass::Rewrite(out) => client_out.extend(out),
            Pass::Reset(_) => broken = true,
        }
        if broken {
            break;
        }
    }
    if !broken {
        // What passed is valid framing (the session read the same bytes); when our close frame was
        // placed, it comes last and at a frame boundary.
        let reason = if matches!(s.ending, Some(Ending::Unreadable { .. })) {
            "session cannot be metered"
        } else {
            "token budget exhausted"
        };
        let ours = frame(OP_CLOSE, &close_payload(CLOSE_POLICY_VIOLATION, reason), Some([1, 2, 3, 4]));
        let mut d = FrameDecoder::new(0);
        let out = d.feed(&client_out, false);
        assert!(out.is_ok(), "{out:?}");
        if s.client_closed() {
            assert!(client_out.ends_with(&ours));
            assert!(!d.mid_frame());
            let before = client_out.len() - ours.len();
            let mut d = FrameDecoder::new(0);
            let _ = d.feed(&client_out[..before], false);
            assert!(!d.mid_frame(), "our close frame starts at a frame boundary");
        }
    }
});
