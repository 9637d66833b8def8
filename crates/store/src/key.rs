//! Order-preserving key encoding (a small subset of the FoundationDB tuple layer), so range
//! scans follow the logical order: integers big-endian, strings terminated by 0x00 with any
//! 0x00 inside escaped as 0x00 0xFF.
//!
//! Unlike the tuple layer there are no type codes, so [`read_str`] takes a terminator followed
//! by a 0xFF byte for an escaped 0x00: a string must not be followed by a field whose first
//! byte is 0xFF. The ledger's keys never are (ids hold no 0x00, and the numbers after an id,
//! entry versions, stay below 2^56); `tests/tests/decoders.rs` checks the rest round-trips.

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key(Vec<u8>);

impl Key {
    pub fn new() -> Self {
        Self(Vec::with_capacity(48))
    }

    #[must_use]
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }

    #[must_use]
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    #[must_use]
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    #[must_use]
    pub fn str(mut self, s: &str) -> Self {
        let bytes = s.as_bytes();
        if bytes.contains(&0) {
            for &b in bytes {
                self.0.push(b);
                if b == 0 {
                    self.0.push(0xFF);
                }
            }
        } else {
            // The common case (ids cannot hold a 0x00) in one copy: byte by byte, keys were
            // about 1 000 instructions of a one-transfer call (`crates/bench/instructions.sh`).
            self.0.extend_from_slice(bytes);
        }
        self.0.push(0);
        self
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    // An all-0xFF prefix has no successor of the same length; nothing sorts above it.
    vec![0xFF; prefix.len() + 1]
}

/// Reads a big-endian u64 at `at`.
pub fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    bytes
        .get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

/// Reads a terminated string starting at `at`; returns it and the index after the terminator.
pub fn read_str(bytes: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut out = Vec::new();
    loop {
        let b = *bytes.get(at)?;
        at += 1;
        if b == 0 {
            if bytes.get(at) == Some(&0xFF) {
                out.push(0);
                at += 1;
                continue;
            }
            return String::from_utf8(out).ok().map(|s| (s, at));
        }
        out.push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_follows_tuples() {
        let a = Key::new().str("a").u64(2).into_bytes();
        let b = Key::new().str("a").u64(10).into_bytes();
        let c = Key::new().str("ab").u64(0).into_bytes();
        assert!(
            a < b && b < c,
            "strings end before longer strings with the same start"
        );
        assert!(Key::new().str("a\0b").into_bytes() > Key::new().str("a").into_bytes());
    }

    #[test]
    fn round_trip() {
        let k = Key::new().str("x\0y").u64(7).into_bytes();
        let (s, at) = read_str(&k, 0).unwrap();
        assert_eq!(s, "x\0y");
        assert_eq!(read_u64(&k, at), Some(7));
        // The bytes, with and without a 0x00 to escape.
        assert_eq!(Key::new().str("ab").into_bytes(), b"ab\0");
        assert_eq!(Key::new().str("a\0b").into_bytes(), b"a\0\xFFb\0");
        assert_eq!(Key::new().str("").into_bytes(), b"\0");
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(&[1, 2]), vec![1, 3]);
        assert_eq!(prefix_end(&[1, 0xFF]), vec![2]);
    }
}
