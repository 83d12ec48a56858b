//! echo-wire: the echo protocol's wire format, shared by echo-server and echo-client:
//! newline-delimited frames of arbitrary bytes (not necessarily UTF-8), so `nc 127.0.0.1
//! 9527` works by hand. A frame longer than the limit is an error, never an unbounded buffer.
//!
//! ```
//! use bytes::BytesMut;
//! use echo_wire::EchoCodec;
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let mut codec = EchoCodec::new(16);
//! let mut wire = BytesMut::new();
//! codec.encode(&b"hello"[..], &mut wire).unwrap();
//! assert_eq!(&wire[..], b"hello\n");
//! assert_eq!(codec.decode(&mut wire).unwrap().as_deref(), Some(&b"hello"[..]));
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The default largest frame: 64 KiB.
pub const DEFAULT_MAX_FRAME: usize = 64 << 10;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer sent more than `max` bytes without a newline.
    #[error("frame longer than {max} bytes")]
    FrameTooLong {
        /// The limit, in bytes (the newline not counted).
        max: usize,
    },
    /// A frame to send contains a newline, which would split it in two.
    #[error("a frame cannot contain a newline byte")]
    NewlineInFrame,
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Newline-delimited frames of raw bytes, at most `max_frame` bytes each (the newline not
/// counted). Decoded frames exclude the newline; encoding appends it.
///
/// The decoder finds newlines with `memchr` and never scans a byte twice (it remembers how
/// far it looked), so a 64 KiB frame costs one vectorised pass. After a frame too long, it
/// drops bytes up to the next newline and goes on, if the caller chooses to.
#[derive(Debug, Clone)]
pub struct EchoCodec {
    max_frame: usize,
    /// How far `src` has been searched for a newline without finding one.
    searched: usize,
    /// Dropping the rest of a frame that was too long.
    discarding: bool,
}

impl EchoCodec {
    /// A codec accepting frames of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        EchoCodec {
            max_frame,
            searched: 0,
            discarding: false,
        }
    }

    /// The largest frame accepted.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl Default for EchoCodec {
    fn default() -> Self {
        EchoCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder for EchoCodec {
    type Item = Bytes;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        loop {
            let from = self.searched.min(src.len());
            match memchr::memchr(b'\n', &src[from..]) {
                Some(offset) => {
                    let end = from + offset;
                    self.searched = 0;
                    if self.discarding {
                        src.advance(end + 1);
                        self.discarding = false;
                        continue;
                    }
                    if end > self.max_frame {
                        src.advance(end + 1);
                        return Err(CodecError::FrameTooLong {
                            max: self.max_frame,
                        });
                    }
                    let mut frame = src.split_to(end + 1);
                    frame.truncate(end);
                    return Ok(Some(frame.freeze()));
                }
                None if self.discarding => {
                    src.clear();
                    self.searched = 0;
                    return Ok(None);
                }
                None if src.len() > self.max_frame => {
                    // Already too long, whatever comes next: refuse it now, drop the rest.
                    src.clear();
                    self.searched = 0;
                    self.discarding = true;
                    return Err(CodecError::FrameTooLong {
                        max: self.max_frame,
                    });
                }
                None => {
                    self.searched = src.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            // The peer closed after an unterminated last frame: hand it over as it is.
            None if !src.is_empty() && !self.discarding => {
                self.searched = 0;
                Ok(Some(src.split().freeze()))
            }
            None => Ok(None),
        }
    }
}

impl<T: AsRef<[u8]>> Encoder<T> for EchoCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: T, dst: &mut BytesMut) -> Result<(), CodecError> {
        let frame = frame.as_ref();
        if frame.contains(&b'\n') {
            return Err(CodecError::NewlineInFrame);
        }
        if frame.len() > self.max_frame {
            return Err(CodecError::FrameTooLong {
                max: self.max_frame,
            });
        }
        dst.reserve(frame.len() + 1);
        dst.put_slice(frame);
        dst.put_u8(b'\n');
        Ok(())
    }
}

/// How buffered bytes split into frames, for a server that echoes every complete frame it
/// holds at once, byte-exact and newlines included, instead of decoding them one by one: the
/// frames to echo are then one slice of its read buffer, written with one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Length of the prefix made of complete frames, each within the limit (newlines
    /// included): the bytes to echo as they are.
    pub complete: usize,
    /// The frame right after that prefix is over the limit, whether its newline has arrived
    /// or not: the peer gets the error line after the prefix's echo.
    pub too_long: bool,
}

impl Batch {
    /// Split `buf`, the bytes after the last frame echoed, into frames of at most
    /// `max_frame` bytes (the newline not counted). Its first `searched` bytes are known to
    /// hold no newline (what a previous call left unfinished: `buf.len() - complete` then),
    /// so no byte is searched twice while a large frame arrives. Same limits as
    /// [`EchoCodec`]: a frame is too long once more than `max_frame` bytes of it are there.
    ///
    /// Cost: one backward search for the last newline; each newline is looked at only when
    /// the complete frames together exceed `max_frame`, so small frames cost nothing each.
    ///
    /// ```
    /// use echo_wire::Batch;
    /// let b = Batch::scan(b"ab\ncd\nef", 0, 4);
    /// assert_eq!(b, Batch { complete: 6, too_long: false });
    /// let b = Batch::scan(b"ab\ntoolong\ncd\n", 0, 4);
    /// assert_eq!(b, Batch { complete: 3, too_long: true });
    /// ```
    pub fn scan(buf: &[u8], searched: usize, max_frame: usize) -> Batch {
        let from = searched.min(buf.len());
        let Some(last) = memchr::memrchr(b'\n', &buf[from..]).map(|i| from + i) else {
            return Batch {
                complete: 0,
                too_long: buf.len() > max_frame,
            };
        };
        // The first frame starts at 0; every frame in `..=last` is at most `last` long.
        if last > max_frame {
            let mut start = 0;
            for newline in memchr::memchr_iter(b'\n', &buf[from..=last]).map(|i| from + i) {
                if newline - start > max_frame {
                    return Batch {
                        complete: start,
                        too_long: true,
                    };
                }
                start = newline + 1;
            }
        }
        let complete = last + 1;
        Batch {
            complete,
            too_long: buf.len() - complete > max_frame,
        }
    }
}

/// [`EchoCodec`] for the client's side: a connection closed in the middle of a frame is an
/// error, not a reply (`EchoCodec` at the end of input yields the partial bytes, as a server
/// echoing the last line of `nc` should).
#[derive(Debug, Clone)]
pub struct ReplyCodec(EchoCodec);

impl ReplyCodec {
    /// Replies of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        ReplyCodec(EchoCodec::new(max_frame))
    }
}

impl Decoder for ReplyCodec {
    type Item = Bytes;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        self.0.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        match self.0.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("connection closed after {} bytes of a reply", src.len()),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_cut_mid_frame_is_an_error_not_a_reply() {
        let mut codec = ReplyCodec::new(16);
        let mut src = BytesMut::from(&b"whole\npart"[..]);
        assert_eq!(
            codec.decode_eof(&mut src).unwrap().as_deref(),
            Some(&b"whole"[..])
        );
        let err = codec.decode_eof(&mut src).unwrap_err();
        assert!(
            err.to_string().contains("after 4 bytes of a reply"),
            "{err}"
        );
        let mut server = EchoCodec::new(16);
        let mut src = BytesMut::from(&b"part"[..]);
        assert_eq!(
            server.decode_eof(&mut src).unwrap().as_deref(),
            Some(&b"part"[..]),
            "the server's codec echoes a last line without newline"
        );
        assert_eq!(
            codec.decode_eof(&mut BytesMut::new()).unwrap(),
            None,
            "a clean end"
        );
    }

    #[test]
    fn round_trips_non_utf8_bytes() {
        let mut codec = EchoCodec::new(16);
        let mut buf = BytesMut::new();
        let frame: &[u8] = &[0xff, 0x00, 0xfe, b'a', b'\r'];
        codec.encode(frame, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0xff, 0x00, 0xfe, b'a', b'\r', b'\n']);
        assert_eq!(codec.decode(&mut buf).unwrap().as_deref(), Some(frame));
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut codec = EchoCodec::new(16);
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"lo\nwor");
        assert_eq!(
            codec.decode(&mut buf).unwrap().as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert_eq!(
            codec.decode_eof(&mut buf).unwrap().as_deref(),
            Some(&b"wor"[..])
        );
    }

    #[test]
    fn oversized_frames_are_errors() {
        let mut codec = EchoCodec::new(4);
        let mut buf = BytesMut::from(&b"12345"[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::FrameTooLong { max: 4 })
        ));
        let mut out = BytesMut::new();
        assert!(matches!(
            codec.encode(&b"12345"[..], &mut out),
            Err(CodecError::FrameTooLong { max: 4 })
        ));
        assert!(matches!(
            codec.encode(&b"a\nb"[..], &mut out),
            Err(CodecError::NewlineInFrame)
        ));
        let exactly = EchoCodec::new(4).encode(&b"1234"[..], &mut out);
        assert!(exactly.is_ok());
    }

    #[test]
    fn after_a_frame_too_long_the_rest_of_it_is_dropped() {
        let mut codec = EchoCodec::new(4);
        let mut buf = BytesMut::from(&b"123456"[..]);
        assert!(codec.decode(&mut buf).is_err());
        buf.extend_from_slice(b"789\nok\n");
        assert_eq!(codec.decode(&mut buf).unwrap().as_deref(), Some(&b"ok"[..]));
        // A long frame whose newline is already there is refused whole.
        let mut buf = BytesMut::from(&b"toolong\nfine\n"[..]);
        assert!(codec.decode(&mut buf).is_err());
        assert_eq!(
            codec.decode(&mut buf).unwrap().as_deref(),
            Some(&b"fine"[..])
        );
    }

    #[test]
    fn exactly_the_limit_passes_and_empty_frames_too() {
        let mut codec = EchoCodec::new(4);
        let mut buf = BytesMut::from(&b"1234\n\n"[..]);
        assert_eq!(
            codec.decode(&mut buf).unwrap().as_deref(),
            Some(&b"1234"[..])
        );
        assert_eq!(codec.decode(&mut buf).unwrap().as_deref(), Some(&b""[..]));
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn a_frame_arriving_byte_by_byte_is_searched_once() {
        let mut codec = EchoCodec::new(1 << 20);
        let mut buf = BytesMut::new();
        for _ in 0..1000 {
            buf.extend_from_slice(b"x");
            assert_eq!(codec.decode(&mut buf).unwrap(), None);
            assert_eq!(codec.searched, buf.len());
        }
        buf.extend_from_slice(b"\n");
        assert_eq!(codec.decode(&mut buf).unwrap().map(|f| f.len()), Some(1000));
    }

    #[test]
    fn a_batch_is_every_complete_frame_within_the_limit() {
        let none = Batch::scan(b"partial", 0, 16);
        assert_eq!(
            none,
            Batch {
                complete: 0,
                too_long: false
            }
        );
        assert_eq!(
            Batch::scan(b"a\n\nbc\nde", 0, 16),
            Batch {
                complete: 6,
                too_long: false
            },
            "empty frames count, the partial one waits"
        );
        assert_eq!(
            Batch::scan(b"", 0, 16),
            Batch {
                complete: 0,
                too_long: false
            }
        );
        // Exactly the limit passes, one more does not, wherever it is in the batch.
        assert_eq!(
            Batch::scan(b"1234\n12\n", 0, 4),
            Batch {
                complete: 8,
                too_long: false
            }
        );
        assert_eq!(
            Batch::scan(b"12\n12345\n12\n", 0, 4),
            Batch {
                complete: 3,
                too_long: true
            }
        );
        assert_eq!(
            Batch::scan(b"12345\n12\n", 0, 4),
            Batch {
                complete: 0,
                too_long: true
            }
        );
        assert_eq!(
            Batch::scan(b"12\n12345", 0, 4),
            Batch {
                complete: 3,
                too_long: true
            },
            "an unfinished frame already over the limit"
        );
        assert_eq!(
            Batch::scan(b"12\n1234", 0, 4),
            Batch {
                complete: 3,
                too_long: false
            }
        );
    }

    #[test]
    fn a_batch_agrees_with_the_codec_frame_by_frame() {
        // Random frames, some over the limit, split at random points: the prefix a batch
        // echoes is exactly the frames the codec decodes before its first error.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let max = 1 + (next() % 40) as usize;
            let mut wire = Vec::new();
            for _ in 0..(next() % 12) {
                let len = (next() % (max as u64 + 3)) as usize;
                wire.extend(std::iter::repeat_n(b'x', len));
                wire.push(b'\n');
            }
            wire.extend(std::iter::repeat_n(
                b'y',
                (next() % (max as u64 + 2)) as usize,
            ));
            // The codec's answer: frames until the first error.
            let mut codec = EchoCodec::new(max);
            let mut src = BytesMut::from(&wire[..]);
            let mut expected = 0;
            let mut error = false;
            loop {
                match codec.decode(&mut src) {
                    Ok(Some(frame)) => expected += frame.len() + 1,
                    Ok(None) => break,
                    Err(_) => {
                        error = true;
                        break;
                    }
                }
            }
            // The batch's, fed in random pieces as reads would deliver them.
            let mut buf: Vec<u8> = Vec::new();
            let (mut echoed, mut searched, mut at) = (0, 0, 0);
            let mut too_long = false;
            while at < wire.len() && !too_long {
                let take = 1 + (next() % 20) as usize;
                let end = (at + take).min(wire.len());
                buf.extend_from_slice(&wire[at..end]);
                at = end;
                let b = Batch::scan(&buf, searched, max);
                echoed += b.complete;
                buf.drain(..b.complete);
                searched = buf.len();
                too_long = b.too_long;
            }
            assert_eq!(
                echoed,
                expected,
                "max {max}, wire {:?}",
                String::from_utf8_lossy(&wire)
            );
            assert_eq!(
                too_long,
                error,
                "max {max}, wire {:?}",
                String::from_utf8_lossy(&wire)
            );
        }
    }
}
