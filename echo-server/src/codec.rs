//! The wire format shared by echo-server and echo-client: newline-delimited frames of
//! arbitrary bytes (not necessarily UTF-8), so `nc 127.0.0.1 9527` works by hand. A frame
//! longer than the limit is an error, never an unbounded buffer.

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Decoder, Encoder};

/// The default largest frame: 64 KiB.
pub const DEFAULT_MAX_FRAME: usize = 64 << 10;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer sent more than `max` bytes without a newline.
    #[error("frame longer than {max} bytes")]
    FrameTooLong { max: usize },
    /// A frame to send contains a newline, which would split it in two.
    #[error("a frame cannot contain a newline byte")]
    NewlineInFrame,
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Newline-delimited frames of raw bytes, at most `max_frame` bytes each (the newline not
/// counted). Decoded frames exclude the newline; encoding appends it.
#[derive(Debug, Clone)]
pub struct EchoCodec {
    inner: AnyDelimiterCodec,
    max_frame: usize,
}

impl EchoCodec {
    /// A codec accepting frames of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        EchoCodec {
            inner: AnyDelimiterCodec::new_with_max_length(
                b"\n".to_vec(),
                b"\n".to_vec(),
                max_frame,
            ),
            max_frame,
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

impl EchoCodec {
    fn map(&self, e: AnyDelimiterCodecError) -> CodecError {
        match e {
            AnyDelimiterCodecError::MaxChunkLengthExceeded => CodecError::FrameTooLong {
                max: self.max_frame,
            },
            AnyDelimiterCodecError::Io(e) => CodecError::Io(e),
        }
    }
}

impl Decoder for EchoCodec {
    type Item = Bytes;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        self.inner.decode(src).map_err(|e| self.map(e))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        self.inner.decode_eof(src).map_err(|e| self.map(e))
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
