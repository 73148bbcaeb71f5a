//! Deterministic byte streams: both ends of a connection compute the same bytes from a seed, so
//! gigabytes are compared byte-exact without being stored.
//!
//! Byte `i` of stream `seed` is byte `i % 8` of `splitmix64(seed, i / 8)`: any chunking on either
//! side gives the same stream, and a mismatch is reported with its offset.

/// How far from a mismatch [`Pattern::locate`] looks for where the bytes came from.
pub const LOCATE_WINDOW: u64 = 32 << 20;

/// One stream of bytes, addressed by offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    seed: u64,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            seed: splitmix64(seed),
        }
    }

    fn word(&self, index: u64) -> [u8; 8] {
        splitmix64(self.seed ^ index.wrapping_mul(0xd6e8_feb8_6659_fd93)).to_le_bytes()
    }

    /// Writes bytes `offset..offset + buf.len()` of the stream into `buf`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = 0;
        let mut off = offset;
        // Unaligned head.
        let head = ((8 - off % 8) % 8) as usize;
        if head > 0 {
            let w = self.word(off / 8);
            let n = head.min(buf.len());
            let within = (off % 8) as usize;
            buf[..n].copy_from_slice(&w[within..within + n]);
            pos = n;
            off += n as u64;
        }
        // Aligned body.
        let mut chunks = buf[pos..].chunks_exact_mut(8);
        let mut index = off / 8;
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.word(index));
            index += 1;
        }
        // Tail.
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let n = tail.len();
            tail.copy_from_slice(&self.word(index)[..n]);
        }
    }

    /// Where in the stream, within [`LOCATE_WINDOW`] of offset `near`, the bytes `got` come from
    /// (at least 32 of them must match): tells a duplicate (an offset before `near`) from bytes
    /// left out (after it) when a relay garbles a stream. None if they are from nowhere near.
    pub fn locate(&self, near: u64, got: &[u8]) -> Option<u64> {
        const NEED: usize = 32;
        if got.len() < NEED + 8 {
            return None;
        }
        let first = near.saturating_sub(LOCATE_WINDOW) / 8;
        let last = (near + LOCATE_WINDOW) / 8;
        // `got[0]` is at some unknown offset x; for each of the 8 values of x % 8, the first
        // whole word of `got` is looked for among the window's words.
        for skip in 0..8 {
            let word = u64::from_le_bytes(got[skip..skip + 8].try_into().expect("8 bytes"));
            for index in first..=last {
                if u64::from_le_bytes(self.word(index)) != word {
                    continue;
                }
                let Some(x) = (index * 8).checked_sub(skip as u64) else {
                    continue;
                };
                if self.bytes(x, NEED) == got[..NEED] {
                    return Some(x);
                }
            }
        }
        None
    }

    /// `len` bytes from `offset`, for small payloads.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(offset, &mut v);
        v
    }
}

/// Checks a received stream chunk by chunk.
#[derive(Debug)]
pub struct Verifier {
    pattern: Pattern,
    offset: u64,
    expected: Vec<u8>,
}

impl Verifier {
    pub fn new(seed: u64) -> Verifier {
        Verifier::for_pattern(Pattern::new(seed))
    }

    pub fn for_pattern(pattern: Pattern) -> Verifier {
        Verifier {
            pattern,
            offset: 0,
            expected: Vec::new(),
        }
    }

    /// Bytes accepted so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Checks `data` as the next bytes of the stream; on mismatch names the first bad offset.
    pub fn check(&mut self, data: &[u8]) -> Result<(), String> {
        self.expected.resize(data.len(), 0);
        self.pattern.fill(self.offset, &mut self.expected);
        if self.expected[..] != *data {
            let i = data
                .iter()
                .zip(&self.expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let at = self.offset + i as u64;
            let found = match self.pattern.locate(at, &data[i..]) {
                Some(from) if from < at => format!(
                    "; the bytes received from there are the stream's from offset {from}: \
                     {} bytes sent again",
                    at - from
                ),
                Some(from) => format!(
                    "; the bytes received from there are the stream's from offset {from}: \
                     {} bytes left out",
                    from - at
                ),
                None => String::new(),
            };
            return Err(format!(
                "byte mismatch at offset {at}: got {:#04x}, expected {:#04x}{found}",
                data[i], self.expected[i]
            ));
        }
        self.offset += data.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_names_bytes_sent_again_or_left_out() {
        let p = Pattern::new(3);
        let mut v = Verifier::new(3);
        v.check(&p.bytes(0, 100_000)).unwrap();
        // 4 099 bytes sent again, then the stream goes on from there.
        let e = v.check(&p.bytes(100_000 - 4_099, 4_096)).unwrap_err();
        assert!(e.contains("offset 95901: 4099 bytes sent again"), "{e}");
        let mut v = Verifier::new(3);
        v.check(&p.bytes(0, 1_000)).unwrap();
        let e = v.check(&p.bytes(1_013, 64)).unwrap_err();
        assert!(e.contains("offset 1013: 13 bytes left out"), "{e}");
        // Bytes from no nearby place of the stream: only the mismatch.
        let e = Verifier::new(3).check(&[0xaa; 64]).unwrap_err();
        assert!(!e.contains("; the bytes"), "{e}");
    }

    #[test]
    fn any_chunking_gives_the_same_stream() {
        let p = Pattern::new(7);
        let whole = p.bytes(0, 1000);
        for split in [1, 3, 7, 8, 9, 500, 999] {
            let mut v = p.bytes(0, split);
            v.extend(p.bytes(split as u64, 1000 - split));
            assert_eq!(v, whole, "split at {split}");
        }
        for start in 0..17u64 {
            assert_eq!(
                p.bytes(start, 33),
                whole[start as usize..start as usize + 33]
            );
        }
    }

    #[test]
    fn seeds_differ_and_verifier_names_the_offset() {
        assert_ne!(Pattern::new(1).bytes(0, 64), Pattern::new(2).bytes(0, 64));
        let mut data = Pattern::new(5).bytes(0, 100);
        let mut v = Verifier::new(5);
        v.check(&data[..40]).unwrap();
        data[77] ^= 1;
        let err = v.check(&data[40..]).unwrap_err();
        assert!(err.contains("offset 77"), "{err}");
    }
}
