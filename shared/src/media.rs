//! What images and files in a request cost the model, before it has counted: the providers' billing rules
//! for image input (OpenAI tiles and patches, Anthropic pixel area), image dimensions read from the first
//! bytes of a base64 image (PNG, JPEG, GIF, WebP headers; never the whole image), and the page count of a
//! base64 PDF.
//!
//! Rules (OpenAI "Images and vision" guide, "Calculating costs"; Anthropic "Vision", "Evaluate image size"):
//! - OpenAI tile models: `detail: "low"`: the base tokens. `high` / `auto`: the image is scaled to fit in
//!   2048 x 2048, then so that its shortest side is 768 px (neither step enlarges it), and costs the base
//!   plus a price per 512-px tile. Base / tile: gpt-4o, gpt-4.1, gpt-4.5 and unknown models 85 / 170;
//!   gpt-5 70 / 140; o1, o3 75 / 150; computer-use-preview 65 / 129; gpt-4o-mini 2833 / 5667.
//! - OpenAI patch models (gpt-4.1-mini, gpt-4.1-nano, gpt-5-mini, gpt-5-nano, o4-mini): 32 x 32-px patches,
//!   at most 1536 (a larger image is scaled down to fit), times 1.62 (the minis), 2.46 (the nanos), 1.72
//!   (o4-mini).
//! - Anthropic (also Claude on Bedrock and Vertex AI): `width * height / 750`, after scaling an image whose
//!   long edge is over 1568 px or that would cost over ~1,600 tokens (1.2 megapixels) down to fit.

use crate::encoding::base64_decode;
use crate::llm::Api;
use serde_json::Value;

/// How a model bills image input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ImageBilling {
    /// OpenAI: `base + tile * 512-px tiles` (`detail: "low"`: `base`).
    Tiles { base: u64, tile: u64 },
    /// OpenAI: 32-px patches (at most 1536) times a multiplier, in thousandths.
    Patches { per_mille: u64 },
    /// Anthropic: pixels / 750 after its resize.
    Area,
}

impl ImageBilling {
    /// The rule of `model` (any case; a provider prefix such as `openai/` is ignored). Claude models bill by
    /// area whatever the API; other models by OpenAI's rules (unknown ones as gpt-4o).
    pub fn for_model(model: Option<&str>) -> ImageBilling {
        let m = model.unwrap_or("").to_ascii_lowercase();
        let m = m.rsplit('/').next().unwrap_or("");
        let has = |s: &str| m.contains(s);
        if has("claude") {
            ImageBilling::Area
        } else if has("gpt-4.1-mini") || has("gpt-5-mini") {
            ImageBilling::Patches { per_mille: 1620 }
        } else if has("gpt-4.1-nano") || has("gpt-5-nano") {
            ImageBilling::Patches { per_mille: 2460 }
        } else if has("o4-mini") {
            ImageBilling::Patches { per_mille: 1720 }
        } else if has("gpt-4o-mini") {
            ImageBilling::Tiles { base: 2833, tile: 5667 }
        } else if m.starts_with("gpt-5") {
            ImageBilling::Tiles { base: 70, tile: 140 }
        } else if m.starts_with("o1") || m.starts_with("o3") {
            ImageBilling::Tiles { base: 75, tile: 150 }
        } else if has("computer-use") {
            ImageBilling::Tiles { base: 65, tile: 129 }
        } else {
            ImageBilling::Tiles { base: 85, tile: 170 }
        }
    }

    /// Tokens for an image of `width` x `height` px (`None`: size unknown, then `unknown` tokens, but never
    /// less than the rule's smallest image) at `detail` (`"low"`, `"high"`, `"auto"`, or none).
    pub fn tokens(self, size: Option<(u32, u32)>, low_detail: bool, unknown: u64) -> u64 {
        if let ImageBilling::Tiles { base, .. } = self {
            if low_detail {
                return base;
            }
        }
        match size {
            Some((w, h)) if w > 0 && h > 0 => self.sized(f64::from(w), f64::from(h)),
            _ => unknown.max(self.sized(1.0, 1.0)),
        }
    }

    fn sized(self, w: f64, h: f64) -> u64 {
        match self {
            ImageBilling::Tiles { base, tile } => {
                let (mut w, mut h) = (w, h);
                let fit = (2048.0 / w.max(h)).min(1.0);
                w = (w * fit).floor().max(1.0);
                h = (h * fit).floor().max(1.0);
                let short = (768.0 / w.min(h)).min(1.0);
                w = (w * short).floor().max(1.0);
                h = (h * short).floor().max(1.0);
                let tiles = (w / 512.0).ceil() * (h / 512.0).ceil();
                base.saturating_add(tile.saturating_mul(tiles as u64))
            }
            ImageBilling::Patches { per_mille } => {
                let patches = |w: f64, h: f64| (w / 32.0).ceil() * (h / 32.0).ceil();
                let mut n = patches(w, h);
                if n > 1536.0 {
                    let mut r = (32.0 * 32.0 * 1536.0 / (w * h)).sqrt();
                    let (sw, sh) = (w * r / 32.0, h * r / 32.0);
                    r *= (sw.floor() / sw).min(sh.floor() / sh);
                    n = patches((w * r).floor().max(1.0), (h * r).floor().max(1.0)).min(1536.0);
                }
                ((n as u64).saturating_mul(per_mille)).div_ceil(1000)
            }
            ImageBilling::Area => {
                let mut scale = (1568.0 / w.max(h)).min(1.0);
                let area = w * scale * h * scale;
                if area > 1_200_000.0 {
                    scale *= (1_200_000.0 / area).sqrt();
                }
                let (w, h) = ((w * scale).floor().max(1.0), (h * scale).floor().max(1.0));
                ((w * h) as u64).div_ceil(750)
            }
        }
    }
}

/// Random access to the bytes a base64 string encodes, decoding only the 4-character groups asked for.
pub struct Base64Bytes<'a> {
    text: &'a [u8],
}

impl<'a> Base64Bytes<'a> {
    pub fn new(b64: &'a str) -> Self {
        Base64Bytes { text: b64.trim_end_matches('=').as_bytes() }
    }

    /// Decoded bytes `[at, at + len)`, fewer at the end of the data; `None` from the end on, or on a
    /// character outside the alphabets.
    pub fn get(&self, at: usize, len: usize) -> Option<Vec<u8>> {
        let first = at / 3;
        let last = at.checked_add(len)?.div_ceil(3);
        let chars = self.text.get(first * 4..last.checked_mul(4)?.min(self.text.len()))?;
        let decoded = base64_decode(std::str::from_utf8(chars).ok()?).ok()?;
        let from = at - first * 3;
        let got = decoded.get(from..(from + len).min(decoded.len()))?;
        (!got.is_empty()).then(|| got.to_vec())
    }
}

/// Width and height from an image's header: PNG `IHDR`, GIF screen descriptor, WebP (`VP8 `, `VP8L`,
/// `VP8X`), JPEG start-of-frame (walking the segments before it: EXIF and ICC blocks are skipped by their
/// length, at most 64 segments). `read(at, len)` gives up to `len` bytes of the image from `at` (fewer at
/// its end, `None` past it).
pub fn image_size_with(read: impl Fn(usize, usize) -> Option<Vec<u8>>) -> Option<(u32, u32)> {
    let be16 = |b: &[u8], i: usize| Some(u32::from(*b.get(i)?) << 8 | u32::from(*b.get(i + 1)?));
    let le16 = |b: &[u8], i: usize| Some(u32::from(*b.get(i)?) | u32::from(*b.get(i + 1)?) << 8);
    let head = read(0, 30)?;
    if head.starts_with(b"\x89PNG\r\n\x1a\n") && head.get(12..16) == Some(b"IHDR") {
        let be32 = |i: usize| Some(be16(&head, i)? << 16 | be16(&head, i + 2)?);
        return Some((be32(16)?, be32(20)?));
    }
    if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        return Some((le16(&head, 6)?, le16(&head, 8)?));
    }
    if head.starts_with(b"RIFF") && head.get(8..12) == Some(b"WEBP") {
        let le24 = |i: usize| Some(le16(&head, i)? | u32::from(*head.get(i + 2)?) << 16);
        return match head.get(12..16)? {
            b"VP8 " => Some((le16(&head, 26)? & 0x3fff, le16(&head, 28)? & 0x3fff)),
            b"VP8L" => {
                let bits = le16(&head, 21)? | le16(&head, 23)? << 16;
                Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
            }
            b"VP8X" => Some((le24(24)? + 1, le24(27)? + 1)),
            _ => None,
        };
    }
    if head.starts_with(b"\xff\xd8") {
        let mut at = 2usize;
        for _ in 0..64 {
            let seg = read(at, 9)?;
            if seg.first() != Some(&0xff) {
                return None;
            }
            let marker = *seg.get(1)?;
            if marker == 0xff {
                at += 1; // fill byte
                continue;
            }
            let is_sof = matches!(marker, 0xc0..=0xcf) && !matches!(marker, 0xc4 | 0xc8 | 0xcc);
            if is_sof {
                return Some((be16(&seg, 7)?, be16(&seg, 5)?));
            }
            if matches!(marker, 0xd0..=0xd9 | 0x01) {
                at += 2;
                continue;
            }
            at = at.checked_add(2 + be16(&seg, 2)? as usize)?;
        }
    }
    None
}

/// [`image_size_with`] over bytes in memory.
pub fn image_size(bytes: &[u8]) -> Option<(u32, u32)> {
    image_size_with(|at, len| {
        bytes.get(at..at.checked_add(len)?.min(bytes.len())).filter(|b| !b.is_empty()).map(<[u8]>::to_vec)
    })
}

/// [`image_size_with`] over a base64 string, decoding only the bytes the header walk needs.
pub fn base64_image_size(b64: &str) -> Option<(u32, u32)> {
    let data = Base64Bytes::new(b64);
    image_size_with(|at, len| data.get(at, len))
}

/// Pages of a base64 PDF: its `/Type /Page` objects (not `/Pages`), counted while decoding in chunks (no
/// copy of the document is kept). `None` when none is found: a PDF 1.5 file can keep its page objects in
/// compressed object streams.
pub fn base64_pdf_pages(b64: &str) -> Option<u64> {
    const CHUNK: usize = 4096; // characters, a multiple of 4
    let text = b64.trim_end_matches('=').as_bytes();
    let needle = b"/Type";
    let mut pages = 0u64;
    let mut carry: Vec<u8> = Vec::new();
    for chunk in text.chunks(CHUNK) {
        let decoded = base64_decode(std::str::from_utf8(chunk).ok()?).ok()?;
        carry.extend_from_slice(&decoded);
        let mut i = 0;
        let mut complete = 0;
        while let Some(pos) = carry.get(i..).and_then(|s| s.windows(needle.len()).position(|w| w == needle)) {
            let start = i + pos + needle.len();
            let rest = carry.get(start..).unwrap_or_default();
            let skip = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
            let Some(after) = rest.get(skip..skip + 6) else { break };
            if after.starts_with(b"/Page") && !after.get(5).is_some_and(u8::is_ascii_alphanumeric) {
                pages += 1;
            }
            i = start;
            complete = start;
        }
        // Keep what may hold a marker cut by the chunk boundary.
        let keep_from = complete.max(carry.len().saturating_sub(32));
        carry.drain(..keep_from.min(carry.len()));
    }
    (pages > 0).then_some(pages)
}

/// The admission prices of what is not text: unknown-size images, files, PDF pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaPrices {
    /// An image whose size cannot be read (a URL, a file id, an undecodable header).
    pub image_default_tokens: u64,
    /// A file whose pages cannot be counted (a URL, a file id, a non-PDF binary, a PDF with compressed
    /// page objects).
    pub file_default_tokens: u64,
    /// A page of a PDF whose pages are counted.
    pub pdf_page_tokens: u64,
}

/// Images and files in a request and what they cost at admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaEstimate {
    pub images: u64,
    pub files: u64,
    pub tokens: u64,
}

/// The base64 payload of a `data:` URL (`data:image/png;base64,...`), or of a bare base64 string.
fn data_url_payload(s: &str) -> Option<&str> {
    match s.strip_prefix("data:") {
        Some(rest) => {
            let (meta, data) = rest.split_once(',')?;
            meta.ends_with(";base64").then_some(data)
        }
        None => None,
    }
}

/// A `data:` URL of a text file (`data:text/csv;base64,...`): read as text by the caller
/// ([`crate::attachments`]), not priced as a file.
fn is_text_data_url(s: Option<&str>) -> bool {
    s.and_then(|s| s.strip_prefix("data:"))
        .and_then(|rest| rest.split_once(','))
        .and_then(|(meta, _)| meta.strip_suffix(";base64"))
        .is_some_and(crate::attachments::is_text_media_type)
}

struct Walk<'a> {
    api: Api,
    model: Option<&'a str>,
    /// The model's image rule, found at the first image: most requests carry none, and finding it
    /// lower-cases the model name and searches it up to nine times.
    billing: Option<ImageBilling>,
    prices: &'a MediaPrices,
    out: MediaEstimate,
}

impl Walk<'_> {
    /// The image rule of the request's model (see [`ImageBilling`]).
    fn model_billing(&mut self) -> ImageBilling {
        let (api, model) = (self.api, self.model);
        *self.billing.get_or_insert_with(|| {
            if api == Api::AnthropicMessages {
                ImageBilling::Area
            } else {
                ImageBilling::for_model(model)
            }
        })
    }

    fn image(&mut self, billing: ImageBilling, b64: Option<&str>, low_detail: bool) {
        let size = b64.and_then(base64_image_size);
        self.out.images += 1;
        self.out.tokens =
            self.out.tokens.saturating_add(billing.tokens(size, low_detail, self.prices.image_default_tokens));
    }

    /// A file: a base64 PDF by its pages, anything else the default.
    fn file(&mut self, pdf_b64: Option<&str>) {
        self.out.files += 1;
        let cost = match pdf_b64.and_then(base64_pdf_pages) {
            Some(pages) => pages.saturating_mul(self.prices.pdf_page_tokens),
            None => self.prices.file_default_tokens,
        };
        self.out.tokens = self.out.tokens.saturating_add(cost);
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Array(items) => items.iter().for_each(|x| self.value(x)),
            Value::Object(obj) if !self.block(v) => obj.values().for_each(|x| self.value(x)),
            _ => {}
        }
    }

    /// A media block: counted and `true`; anything else `false` (its fields are walked).
    fn block(&mut self, b: &Value) -> bool {
        let s = |p: &str| crate::json::pointer(b, p).and_then(Value::as_str);
        let low = |d: Option<&str>| d.is_some_and(|d| d.eq_ignore_ascii_case("low"));
        match b.get("type").and_then(Value::as_str) {
            // OpenAI chat: `{"type":"image_url","image_url":{"url","detail"}}` (or a bare URL string).
            Some("image_url") => {
                let url = s("/image_url/url").or_else(|| s("/image_url"));
                let billing = self.model_billing();
                self.image(billing, url.and_then(data_url_payload), low(s("/image_url/detail")));
                true
            }
            // OpenAI Responses: `{"type":"input_image","image_url"|"file_id","detail"}`.
            Some("input_image") => {
                let billing = self.model_billing();
                self.image(billing, s("/image_url").and_then(data_url_payload), low(s("/detail")));
                true
            }
            // Anthropic: `{"type":"image","source":{"type":"base64","data"}|{"type":"url"}|{"type":"file"}}`.
            Some("image") if b.get("source").is_some() => {
                let data = (s("/source/type") == Some("base64")).then(|| s("/source/data")).flatten();
                self.image(ImageBilling::Area, data, false);
                true
            }
            // OpenAI chat `{"type":"file","file":{"file_data"|"file_id"}}`; Responses `input_file`.
            Some("file") if b.get("file").is_some() => {
                if !is_text_data_url(s("/file/file_data")) {
                    self.file(s("/file/file_data").and_then(data_url_payload));
                }
                true
            }
            Some("input_file") => {
                if !is_text_data_url(s("/file_data")) {
                    self.file(s("/file_data").and_then(data_url_payload));
                }
                true
            }
            // Anthropic documents: text sources are read as text elsewhere; base64 PDFs, URLs, files here.
            Some("document") => {
                match s("/source/type") {
                    Some("text") | Some("content") | None => return false,
                    // A text file in base64 is read as text by the caller.
                    Some("base64") if s("/source/media_type").is_some_and(crate::attachments::is_text_media_type) => {}
                    Some("base64") => self.file(s("/source/data")),
                    Some(_) => self.file(None),
                }
                true
            }
            Some(_) => false,
            None => {
                // Bedrock Converse: `{"image":{"format","source":{"bytes"}|{"s3Location"}}}` (Claude on
                // Bedrock bills by area), `{"document":{"format","source":{"bytes"}}}` (text formats are
                // estimated as text by the caller).
                if let Some(img) = b.get("image").filter(|i| i.get("source").is_some()) {
                    let bytes = crate::json::pointer(img, "/source/bytes").and_then(Value::as_str);
                    self.image(ImageBilling::Area, bytes, false);
                    return true;
                }
                if let Some(doc) = b.get("document").filter(|d| d.get("source").is_some()) {
                    let format = doc.get("format").and_then(Value::as_str).unwrap_or("");
                    if ["txt", "md", "csv", "html"].iter().any(|t| format.eq_ignore_ascii_case(t))
                        || crate::json::pointer(doc, "/source/text").is_some()
                        || crate::json::pointer(doc, "/source/content").is_some()
                    {
                        return false;
                    }
                    let bytes = crate::json::pointer(doc, "/source/bytes").and_then(Value::as_str);
                    self.file(bytes.filter(|_| format.eq_ignore_ascii_case("pdf")));
                    return true;
                }
                // Ollama: `images` (base64 strings) on a message or on an `/api/generate` body.
                if let Some(Value::Array(images)) = b.get("images") {
                    for img in images.iter().filter_map(Value::as_str) {
                        let billing = self.model_billing();
                        self.image(billing, Some(img), false);
                    }
                }
                false
            }
        }
    }
}

/// Images and files in a request (in `messages`, `system`, Responses `input`, Ollama `images`, tool results
/// included) and their admission cost for `model` (see [`ImageBilling`]). Text is not counted here
/// (`crate::llm::extract_request_texts`), nor Bedrock's text-format documents.
pub fn estimate_media(api: Api, model: Option<&str>, body: &Value, prices: &MediaPrices) -> MediaEstimate {
    let mut walk = Walk { api, model, billing: None, prices, out: MediaEstimate::default() };
    for key in ["messages", "system", "input"] {
        if let Some(v) = body.get(key) {
            walk.value(v);
        }
    }
    if let Some(Value::Array(images)) = body.get("images") {
        for img in images.iter().filter_map(Value::as_str) {
            let billing = walk.model_billing();
            walk.image(billing, Some(img), false);
        }
    }
    walk.out
}

/// Inline images of a Gemini native request (`contents[].parts[]` and `systemInstruction.parts[]`
/// `inline_data` / `inlineData` with an `image/*` type): how many base64 characters they take in the body
/// and what they cost, at Gemini's rule (both sides up to 384 px: 258 tokens; otherwise 258 per 768 x 768
/// tile; size unknown: `image_default_tokens`). For a body whose prompt is estimated by its size, so that an
/// image is priced as an image and not as a token per 4 characters of its base64.
pub fn gemini_inline_images(body: &Value, prices: &MediaPrices) -> (u64, MediaEstimate) {
    let mut bytes = 0u64;
    let mut out = MediaEstimate::default();
    let contents = body.get("contents").and_then(Value::as_array).into_iter().flatten();
    let system = body.get("systemInstruction").or_else(|| body.get("system_instruction")).into_iter();
    for holder in contents.chain(system) {
        for part in holder.get("parts").and_then(Value::as_array).into_iter().flatten() {
            let Some(inline) = part.get("inline_data").or_else(|| part.get("inlineData")) else { continue };
            let mime = inline.get("mime_type").or_else(|| inline.get("mimeType")).and_then(Value::as_str);
            let Some(data) = inline.get("data").and_then(Value::as_str) else { continue };
            if !mime.is_some_and(|m| m.to_ascii_lowercase().starts_with("image/")) {
                continue;
            }
            bytes = bytes.saturating_add(data.len() as u64);
            out.images += 1;
            let tokens = match base64_image_size(data) {
                Some((w, h)) if w <= 384 && h <= 384 => 258,
                Some((w, h)) => u64::from(w.div_ceil(768)) * u64::from(h.div_ceil(768)) * 258,
                None => prices.image_default_tokens,
            };
            out.tokens = out.tokens.saturating_add(tokens);
        }
    }
    (bytes, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::base64_encode;
    use crate::testing::png;
    use serde_json::json;
    use wasm_bindgen_test::wasm_bindgen_test;

    /// A baseline JPEG's header: SOI, an APP1 (EXIF-sized) segment to skip, DQT, SOF0 with the size, DHT, SOS.
    fn jpeg(w: u16, h: u16) -> Vec<u8> {
        let mut out = vec![0xff, 0xd8];
        let app1 = vec![0u8; 3000];
        out.extend_from_slice(&[0xff, 0xe1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&[0xff, 0xdb, 0, 67, 0]);
        out.extend_from_slice(&[1u8; 64]);
        out.extend_from_slice(&[0xff, 0xff, 0xc0, 0, 11, 8]); // a fill byte before SOF0
        out.extend_from_slice(&h.to_be_bytes());
        out.extend_from_slice(&w.to_be_bytes());
        out.extend_from_slice(&[1, 1, 0x11, 0]);
        out.extend_from_slice(&[0xff, 0xc4, 0, 20, 0]);
        out.extend_from_slice(&[0u8; 17]);
        out.extend_from_slice(&[0xff, 0xda, 0, 8, 1, 1, 0, 0, 63, 0, 0x55, 0xff, 0xd9]);
        out
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn sizes_from_png_jpeg_gif_webp_headers() {
        assert_eq!(image_size(&png(1024, 768)), Some((1024, 768)));
        assert_eq!(image_size(&jpeg(4000, 3000)), Some((4000, 3000)));
        assert_eq!(image_size(b"GIF89a\x40\x01\xf0\x00\x00\x00\x00"), Some((320, 240)));
        let mut vp8x = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0".to_vec();
        vp8x.extend_from_slice(&[0xff, 0x07, 0, 0x37, 0x04, 0]); // 2048 x 1080
        assert_eq!(image_size(&vp8x), Some((2048, 1080)));
        let mut vp8l = b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0\x2f".to_vec();
        let bits: u32 = 99 | (49 << 14); // 100 x 50
        vp8l.extend_from_slice(&bits.to_le_bytes());
        assert_eq!(image_size(&vp8l), Some((100, 50)));
        let mut vp8 = b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0\0\0\0\x9d\x01\x2a".to_vec();
        vp8.extend_from_slice(&640u16.to_le_bytes());
        vp8.extend_from_slice(&480u16.to_le_bytes());
        assert_eq!(image_size(&vp8), Some((640, 480)));
        for bad in [&b""[..], b"not an image at all, really", b"\xff\xd8\xff\xe1\xff\xff", b"\x89PNG\r\n\x1a\n"] {
            assert_eq!(image_size(bad), None, "{bad:?}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn base64_headers_are_read_without_decoding_the_image() {
        let mut img = jpeg(1920, 1080);
        img.extend(std::iter::repeat_n(0x55u8, 100_000));
        let b64 = base64_encode(&img);
        assert_eq!(base64_image_size(&b64), Some((1920, 1080)));
        assert_eq!(base64_image_size(&base64_encode(&png(7, 9))), Some((7, 9)));
        // Random access lands on any byte.
        let data = Base64Bytes::new(&b64);
        for at in [0usize, 1, 2, 3, 3001, 3002, 3003] {
            assert_eq!(data.get(at, 5).as_deref(), img.get(at..at + 5), "at {at}");
        }
        assert_eq!(data.get(img.len() - 1, 2), Some(vec![0x55]), "fewer at the end");
        assert_eq!(data.get(img.len(), 2), None);
        assert_eq!(base64_image_size("!!!!not base64"), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn openai_and_anthropic_rules_match_their_documented_examples() {
        let gpt4o = ImageBilling::for_model(Some("gpt-4o"));
        // OpenAI's examples: 1024 x 1024 high -> 765; 2048 x 4096 high -> 1105; 4096 x 8192 low -> 85.
        assert_eq!(gpt4o.tokens(Some((1024, 1024)), false, 0), 765);
        assert_eq!(gpt4o.tokens(Some((2048, 4096)), false, 0), 1105);
        assert_eq!(gpt4o.tokens(Some((4096, 8192)), true, 0), 85);
        assert_eq!(gpt4o.tokens(Some((100, 100)), false, 0), 255, "not enlarged: one tile");
        let mini = ImageBilling::for_model(Some("gpt-4o-mini-2024-07-18"));
        assert_eq!(mini.tokens(Some((1024, 1024)), false, 0), 2833 + 4 * 5667);
        assert_eq!(ImageBilling::for_model(Some("gpt-5")).tokens(Some((1024, 1024)), false, 0), 70 + 4 * 140);
        assert_eq!(ImageBilling::for_model(Some("o3")).tokens(None, true, 1600), 75);
        // Patches, OpenAI's examples: 1024 x 1024 -> 1024 patches; 1800 x 2400 -> 1452 patches (scaled).
        let p = ImageBilling::Patches { per_mille: 1000 };
        assert_eq!(p.tokens(Some((1024, 1024)), false, 0), 1024);
        assert_eq!(p.tokens(Some((1800, 2400)), false, 0), 1452);
        assert_eq!(ImageBilling::for_model(Some("openai/gpt-4.1-mini")).tokens(Some((1024, 1024)), false, 0), 1659);
        // Anthropic: 200 x 200 -> 54; 1000 x 1000 -> 1334; 1092 x 1092 -> 1590; larger ones are resized.
        let a = ImageBilling::for_model(Some("claude-sonnet-4-5"));
        assert_eq!(a, ImageBilling::Area);
        assert_eq!(a.tokens(Some((200, 200)), false, 0), 54);
        assert_eq!(a.tokens(Some((1000, 1000)), false, 0), 1334);
        assert_eq!(a.tokens(Some((1092, 1092)), false, 0), 1590);
        assert!((1550..=1600).contains(&a.tokens(Some((4000, 3000)), false, 0)));
        assert_eq!(a.tokens(Some((8000, 1000)), false, 0), 410, "long edge to 1568: 1568 x 196");
        // Unknown size: the default, never below the rule's smallest image.
        assert_eq!(gpt4o.tokens(None, false, 1600), 1600);
        assert_eq!(mini.tokens(None, false, 1600), 2833 + 5667);
        assert_eq!(gpt4o.tokens(Some((0, 10)), false, 1600), 1600);
    }

    fn prices() -> MediaPrices {
        MediaPrices { image_default_tokens: 1600, file_default_tokens: 3000, pdf_page_tokens: 1500 }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn every_api_shape_is_found() {
        let png_url = format!("data:image/png;base64,{}", base64_encode(&png(1024, 1024)));
        let jpg_b64 = base64_encode(&jpeg(1000, 1000));
        let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": png_url, "detail": "high"}},
            {"type": "image_url", "image_url": {"url": png_url, "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
            {"type": "file", "file": {"file_id": "file-1"}}]}]});
        let e = estimate_media(Api::OpenAiChat, Some("gpt-4o"), &chat, &prices());
        assert_eq!(e, MediaEstimate { images: 3, files: 1, tokens: 765 + 85 + 1600 + 3000 });
        let responses = json!({"model": "gpt-4o", "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": png_url, "detail": "auto"},
            {"type": "input_image", "file_id": "file-2"}]},
            {"type": "function_call_output", "output": [{"type": "input_image", "image_url": png_url, "detail": "low"}]}]});
        let e = estimate_media(Api::OpenAiResponses, Some("gpt-4o"), &responses, &prices());
        assert_eq!(e, MediaEstimate { images: 3, files: 0, tokens: 765 + 1600 + 85 });
        let anthropic = json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": jpg_b64}},
            {"type": "image", "source": {"type": "url", "url": "https://x/y.jpg"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain"}},
            {"type": "tool_result", "tool_use_id": "t", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": jpg_b64}}]}]}]});
        let e = estimate_media(Api::AnthropicMessages, Some("claude-sonnet-4-5"), &anthropic, &prices());
        assert_eq!(e, MediaEstimate { images: 3, files: 0, tokens: 1334 + 1600 + 1334 });
        let bedrock = json!({"messages": [{"role": "user", "content": [
            {"text": "hi"}, {"image": {"format": "jpeg", "source": {"bytes": jpg_b64}}},
            {"document": {"format": "txt", "name": "t", "source": {"bytes": "aGk="}}},
            {"document": {"format": "docx", "name": "d", "source": {"bytes": "UEsDBA=="}}}]}]});
        let e = estimate_media(Api::Unknown, Some("anthropic.claude-3-5-sonnet-20240620-v1:0"), &bedrock, &prices());
        assert_eq!(e, MediaEstimate { images: 1, files: 1, tokens: 1334 + 3000 });
        let ollama = json!({"model": "llava", "prompt": "describe", "images": [base64_encode(&png(512, 512))]});
        let e = estimate_media(Api::OpenAiCompletions, Some("llava"), &ollama, &prices());
        assert_eq!(e, MediaEstimate { images: 1, files: 0, tokens: 255 });
        // Text-only bodies and tool schemas that say "image" are not media.
        let text = json!({"messages": [{"role": "user", "content": "an image"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                "properties": {"image": {"type": "string"}}}}}]});
        assert_eq!(estimate_media(Api::OpenAiChat, None, &text, &prices()), MediaEstimate::default());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn gemini_inline_images_are_priced_by_its_tiles() {
        let small = base64_encode(&png(300, 200));
        let large = base64_encode(&png(1600, 900));
        let body = json!({"contents": [{"role": "user", "parts": [{"text": "compare"},
            {"inline_data": {"mime_type": "image/png", "data": small}},
            {"inlineData": {"mimeType": "image/png", "data": large}},
            {"inline_data": {"mime_type": "audio/mp3", "data": "AAAA"}}]}],
            "systemInstruction": {"parts": [{"inlineData": {"mimeType": "image/webp", "data": "!!!!"}}]}});
        let (bytes, e) = gemini_inline_images(&body, &prices());
        assert_eq!(bytes, (small.len() + large.len() + 4) as u64, "audio is not an image");
        assert_eq!(e, MediaEstimate { images: 3, files: 0, tokens: 258 + 258 * 3 * 2 + 1600 });
        assert_eq!(gemini_inline_images(&json!({"contents": "x"}), &prices()), (0, MediaEstimate::default()));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn pdf_pages_are_counted_across_chunk_boundaries() {
        let mut pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n".to_vec();
        pdf.extend_from_slice(b"2 0 obj << /Type /Pages /Kids [3 0 R 4 0 R 5 0 R] /Count 3 >> endobj\n");
        for (i, pad) in [10usize, 3070, 5000].iter().enumerate() {
            pdf.extend(std::iter::repeat_n(b'%', *pad));
            pdf.extend_from_slice(format!("{} 0 obj <</Type/Page /Parent 2 0 R>> endobj\n", i + 3).as_bytes());
        }
        let b64 = base64_encode(&pdf);
        assert_eq!(base64_pdf_pages(&b64), Some(3));
        let doc = json!({"messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": b64}},
            {"type": "document", "source": {"type": "url", "url": "https://x/y.pdf"}}]}]});
        let e = estimate_media(Api::AnthropicMessages, None, &doc, &prices());
        assert_eq!(e, MediaEstimate { images: 0, files: 2, tokens: 3 * 1500 + 3000 });
        assert_eq!(base64_pdf_pages(&base64_encode(b"%PDF-1.7 compressed object streams only")), None);
    }
}
