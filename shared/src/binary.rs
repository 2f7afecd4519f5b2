//! Bodies a text filter must neither read as text nor rewrite: gRPC and the other length-framed binary
//! formats (protobuf, MessagePack, CBOR, Avro, Thrift), and opaque media in answers (audio, images,
//! files). A string found in them by a byte scan is part of a frame whose length prefix (a gRPC message's
//! 5-byte header, a protobuf field's varint) counts its bytes: replacing `jane@example.com` with
//! `<EMAIL_1>` there leaves every enclosing length wrong, and the peer fails to parse the message. A gRPC
//! client or bidirectional stream also never ends its body while it waits for answers, so a filter that
//! holds the body to its end holds it for ever.

/// `content-type` without parameters, lower case.
fn media_type(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// gRPC, gRPC-Web (binary and base64 text) and Connect's streaming protobuf: framed messages, often streams.
pub fn is_grpc(content_type: &str) -> bool {
    let m = media_type(content_type);
    m.starts_with("application/grpc") || m.starts_with("application/connect+")
}

/// A request or answer body in a length-framed binary format (see the module documentation).
pub fn is_length_framed(content_type: &str) -> bool {
    const FRAMED: &[&str] = &[
        "application/x-protobuf",
        "application/protobuf",
        "application/vnd.google.protobuf",
        "application/x-google-protobuf",
        "application/msgpack",
        "application/x-msgpack",
        "application/vnd.msgpack",
        "application/cbor",
        "application/avro",
        "avro/binary",
        "application/vnd.apache.avro+binary",
        "application/x-thrift",
        "application/vnd.apache.thrift.binary",
        "application/vnd.apache.thrift.compact",
    ];
    is_grpc(content_type) || FRAMED.contains(&media_type(content_type).as_str())
}

/// An answer that holds no text a model wrote for a person to read, only bytes: length-framed formats,
/// audio, images, video, archives, PDFs and unlabelled binary (`application/octet-stream`).
pub fn is_opaque_answer(content_type: &str) -> bool {
    let m = media_type(content_type);
    const OPAQUE: &[&str] = &["application/octet-stream", "application/pdf", "application/zip", "application/gzip"];
    is_length_framed(content_type)
        || m.starts_with("audio/")
        || m.starts_with("image/")
        || m.starts_with("video/")
        || OPAQUE.contains(&m.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn framed_and_opaque_bodies_are_recognised() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC-Web+proto",
            "application/grpc-web-text",
            "application/connect+proto",
            "application/x-protobuf; messageType=x",
            "application/msgpack",
            "application/cbor",
        ] {
            assert!(is_length_framed(ct) && is_opaque_answer(ct), "{ct}");
        }
        assert!(is_grpc("application/grpc; charset=utf-8") && !is_grpc("application/json"));
        for ct in ["audio/mpeg", "image/png", "video/mp4", "application/octet-stream", "application/pdf"] {
            assert!(is_opaque_answer(ct) && !is_length_framed(ct), "{ct}");
        }
        for ct in [
            "application/json",
            "text/event-stream",
            "text/plain",
            "multipart/form-data; boundary=x",
            "application/vnd.amazon.eventstream",
            "application/x-ndjson",
            "",
        ] {
            assert!(!is_length_framed(ct) && !is_opaque_answer(ct), "{ct}");
        }
    }
}
