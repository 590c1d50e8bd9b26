//! Messages built on the stack and written with one system call: usable inside a
//! signal handler and inside malloc (no allocation, no formatting machinery).

use crate::sys;

pub const MESSAGE_BYTES: usize = 512;

pub struct Message {
    bytes: [u8; MESSAGE_BYTES],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message::new()
    }
}

impl Message {
    pub const fn new() -> Message {
        Message {
            bytes: [0u8; MESSAGE_BYTES],
            len: 0,
        }
    }

    /// Appends as much of `text` as fits (the rest is cut, never overflowed).
    pub fn text(&mut self, text: &[u8]) -> &mut Message {
        let room = MESSAGE_BYTES - 1 - self.len;
        let take = text.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&text[..take]);
        self.len += take;
        self
    }

    pub fn str(&mut self, text: &str) -> &mut Message {
        self.text(text.as_bytes())
    }

    pub fn hex(&mut self, value: u64) -> &mut Message {
        let mut digits = [0u8; 18];
        digits[0] = b'0';
        digits[1] = b'x';
        let mut len = 2;
        let mut started = false;
        for shift in (0..16).rev() {
            let nibble = ((value >> (shift * 4)) & 0xf) as u8;
            if nibble != 0 || started || shift == 0 {
                started = true;
                digits[len] = if nibble < 10 {
                    b'0' + nibble
                } else {
                    b'a' + nibble - 10
                };
                len += 1;
            }
        }
        self.text(&digits[..len])
    }

    pub fn dec(&mut self, value: i64) -> &mut Message {
        let mut digits = [0u8; 21];
        let mut len = 0;
        let negative = value < 0;
        let mut rest = value.unsigned_abs();
        loop {
            digits[20 - len] = b'0' + (rest % 10) as u8;
            len += 1;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if negative {
            digits[20 - len] = b'-';
            len += 1;
        }
        self.text(&digits[21 - len..])
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The message as a C string (always NUL-terminated: one byte is kept for it).
    pub fn as_c_ptr(&self) -> *const core::ffi::c_char {
        self.bytes.as_ptr().cast()
    }

    pub fn clear(&mut self) {
        self.bytes = [0u8; MESSAGE_BYTES];
        self.len = 0;
    }

    /// Writes the message and a newline to standard error.
    pub fn emit(&mut self) {
        let len = self.len;
        self.bytes[len] = b'\n';
        sys::write_stderr(&self.bytes[..len + 1]);
        self.bytes[len] = 0;
    }
}
