//! Lowercase hexadecimal, for secrets and digests.

/// `bytes` as lowercase hexadecimal.
pub fn encode(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// 64 hexadecimal digits (either case, around spaces trimmed) as 32 bytes.
pub fn decode32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim().as_bytes();
    // from_str_radix alone would take a sign (`+f`).
    if text.len() != 64 || !text.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(text.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 9) as u8);
        let text = encode(&bytes);
        assert_eq!(text.len(), 64);
        assert_eq!(decode32(&text), Some(bytes));
        assert_eq!(decode32(&text.to_uppercase()), Some(bytes));
        assert_eq!(decode32(&text[1..]), None);
        assert_eq!(decode32(&"zz".repeat(32)), None);
        assert_eq!(decode32("+f".repeat(32).as_str()), None);
    }
}
