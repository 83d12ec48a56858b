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
}
