//! Helpers for the tests of every crate (here because tests of other crates cannot share `cfg(test)`
//! code). Not for filter code.

/// Deterministic pseudo-random bytes (xorshift32), for tests that feed arbitrary input; `state` moves
/// on, so successive calls give different bytes.
pub fn pseudo_random_bytes(state: &mut u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            let mut x = *state;
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *state = x;
            x as u8
        })
        .collect()
}

/// A real greyscale PNG of `width` x `height` (signature, `IHDR`, an `IDAT` holding a stored zlib stream of
/// blank rows, `IEND`; CRCs and Adler-32 computed), for tests of image sizes. Rows are kept for images up
/// to 64 x 64; larger ones carry one row (a valid header, a short image).
pub fn png(width: u32, height: u32) -> Vec<u8> {
    fn crc(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc(&body).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit greyscale
    chunk(&mut out, b"IHDR", &ihdr);
    let rows = if width <= 64 && height <= 64 { height } else { 1 };
    let raw = vec![0u8; (1 + width.min(64) as usize) * rows as usize];
    let mut z = vec![0x78, 0x01, 1];
    z.extend_from_slice(&(raw.len() as u16).to_le_bytes());
    z.extend_from_slice(&(!(raw.len() as u16)).to_le_bytes());
    z.extend_from_slice(&raw);
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", b"");
    out
}
