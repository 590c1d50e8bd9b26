//! The trace hash: a running 64-bit hash of every event of a run. Same seed and flags,
//! same hash; it is the cheapest way to see that a run is deterministic.

#[derive(Clone, Copy, Debug)]
pub struct TraceHash {
    state: u64,
    pub events: u64,
}

const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

impl Default for TraceHash {
    fn default() -> Self {
        TraceHash::new()
    }
}

impl TraceHash {
    pub fn new() -> TraceHash {
        TraceHash {
            state: 0xcbf2_9ce4_8422_2325,
            events: 0,
        }
    }

    #[inline]
    pub fn word(&mut self, value: u64) {
        self.state = (self.state.rotate_left(5) ^ value).wrapping_mul(MULTIPLIER);
    }

    pub fn bytes(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.word(u64::from_le_bytes(word));
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.word(u64::from_le_bytes(tail) ^ (bytes.len() as u64) << 56);
    }

    /// One event: a kind tag and a few fields.
    pub fn event(&mut self, kind: u64, fields: &[u64]) {
        self.events += 1;
        self.word(kind);
        for &field in fields {
            self.word(field);
        }
    }

    pub fn finish(&self) -> u64 {
        let mut x = self.state ^ self.events;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }
}
