//! The chunked transfer coding (RFC 9112 §7.1): one decoder, strict, with hyper's bounds. It finds where a
//! chunked body ends (the lane forwards the bytes as they came) and, when asked, hands out the data (the
//! simulator's client reads it).
//!
//! Strict: sizes in hex of at most 16 digits, CRLF line ends (a bare LF is refused), chunk extensions of at
//! most [`MAX_EXTENSIONS`] bytes in a body and trailer fields of at most [`MAX_TRAILERS`] bytes, both read
//! over and dropped, as hyper does.

/// Most bytes of chunk extensions in one body (hyper's limit).
pub const MAX_EXTENSIONS: usize = 16 * 1024;
/// Most bytes of trailer fields in one body (hyper's limit).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked body")]
pub struct Invalid;

/// A chunked body's progress: feed it the bytes as they arrive.
#[derive(Default)]
pub struct Chunks {
    state: State,
    size: u64,
    digits: u8,
    extensions: usize,
    trailers: usize,
    done: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Debug)]
enum State {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
}

impl Chunks {
    /// Reads `data` on; `Ok(Some(n))` when the body ends after its first `n` bytes (the rest is not the
    /// body's), `Ok(None)` when all of it belongs to the body and more is to come.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, Invalid> {
        self.feed_into(data, None)
    }

    /// [`Self::feed`], appending the body's data (without sizes, extensions or trailers) to `out`.
    pub fn decode(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, Invalid> {
        self.feed_into(data, Some(out))
    }

    /// Whether the body's end was read.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Data bytes of the current chunk still to come (0 between chunks): a reader with a body cap can refuse
    /// a chunk that announces more than it takes before reading it.
    pub fn announced(&self) -> u64 {
        if self.state == State::Data {
            self.size
        } else {
            0
        }
    }

    fn feed_into(
        &mut self,
        data: &[u8],
        mut out: Option<&mut Vec<u8>>,
    ) -> Result<Option<usize>, Invalid> {
        use State::*;
        let mut at = 0;
        while at < data.len() {
            if self.state == Data {
                let take = (data.len() - at).min(self.size as usize);
                if let Some(out) = out.as_deref_mut() {
                    out.extend_from_slice(&data[at..at + take]);
                }
                self.size -= take as u64;
                at += take;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let byte = data[at];
            at += 1;
            self.state = match (self.state, byte) {
                (Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    if self.digits == 16 {
                        return Err(Invalid);
                    }
                    self.digits += 1;
                    let digit = (byte as char).to_digit(16).ok_or(Invalid)?;
                    self.size = self.size << 4 | u64::from(digit);
                    Size
                }
                (Size, b';' | b' ' | b'\t') if self.digits > 0 => Extension,
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err(Invalid),
                (Extension, _) => {
                    self.extensions += 1;
                    if self.extensions > MAX_EXTENSIONS {
                        return Err(Invalid);
                    }
                    Extension
                }
                (SizeLf, b'\n') if self.size == 0 => TrailerStart,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.digits = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (Trailer, b'\r') => TrailerLf,
                (TrailerStart | Trailer, b'\n') => return Err(Invalid),
                (TrailerStart | Trailer, _) => {
                    self.trailers += 1;
                    if self.trailers > MAX_TRAILERS {
                        return Err(Invalid);
                    }
                    Trailer
                }
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => {
                    self.done = true;
                    return Ok(Some(at));
                }
                _ => return Err(Invalid),
            };
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";

    /// Every split point: the end is found at the same byte, and the data decodes the same.
    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_end_however_it_is_split() {
        let mut wire = BODY.to_vec();
        wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n"); // what follows is not the body's
        for split in 0..=BODY.len() {
            let mut chunks = Chunks::default();
            let mut data = Vec::new();
            let (a, b) = wire.split_at(split);
            let end = match chunks.decode(a, &mut data).unwrap() {
                Some(end) => end,
                None => {
                    a.len()
                        + chunks
                            .decode(b, &mut data)
                            .unwrap()
                            .expect("the body ends in the second part")
                }
            };
            assert_eq!(end, BODY.len(), "split at {split}");
            assert_eq!(data, b"hello world", "split at {split}");
            assert_eq!(chunks.announced(), 0);
            assert!(chunks.done());
        }
        let mut byte_by_byte = Chunks::default();
        let ends: Vec<usize> = (0..BODY.len())
            .filter(|&i| byte_by_byte.feed(&BODY[i..=i]).unwrap() == Some(1))
            .collect();
        assert_eq!(ends, vec![BODY.len() - 1]);
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        let long_extension = format!("1;{}\r\n", "e".repeat(MAX_EXTENSIONS + 1));
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "t".repeat(MAX_TRAILERS));
        for bad in [
            &b"\r\nhello"[..],          // no size
            b"g\r\n",                   // not hex
            b"5\nhello\r\n",            // bare LF after the size
            b"5\r\nhelloX\r\n",         // no CRLF after the data
            b"11111111111111111\r\n",   // 17 hex digits
            b"0\r\nX-Trailer: 1\n\r\n", // bare LF in the trailers
            b"5;ext\n",                 // bare LF after an extension
            long_extension.as_bytes(),  // extensions beyond hyper's bound
            long_trailer.as_bytes(),    // trailers beyond hyper's bound
        ] {
            assert!(
                Chunks::default().feed(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(&bad[..bad.len().min(40)])
            );
        }
        assert_eq!(Chunks::default().feed(b"0\r\n\r\n").unwrap(), Some(5));
    }

    #[test]
    fn a_chunk_announces_its_size_before_its_data() {
        let mut chunks = Chunks::default();
        assert_eq!(chunks.feed(b"1000001\r\n").unwrap(), None);
        assert_eq!(chunks.announced(), 0x100_0001);
        assert_eq!(chunks.feed(b"ab").unwrap(), None);
        assert_eq!(chunks.announced(), 0x100_0001 - 2);
    }
}
