//! The chunked transfer coding's decoder (RFC 9112 §7.1) for `h1client`: it is fed the bytes
//! read so far and gives a body's data and trailers frames, refusing what the RFC does not
//! allow (a size line without a hex digit, a bare LF, a chunk without its CRLF).

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::Frame;

use super::guard::MAX_HEAD_BYTES;
use super::h1client::{H1Error, MAX_HEADERS, invalid};

/// A chunked body's decoder (RFC 9112 §7.1), fed the bytes read so far; chunk extensions
/// are ignored, trailers become a trailers frame.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    state: ChunkState,
}

#[derive(Debug, Default, PartialEq)]
enum ChunkState {
    /// At a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data: this many bytes to come.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section up to the empty line.
    Trailers,
    Done,
}

impl ChunkDecoder {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// The next frame that `buf` holds all of (taking its bytes), or None when more must be
    /// read first (or the body is done).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame<Bytes>>, H1Error> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(None),
                ChunkState::Size => match httparse::parse_chunk_size(buf) {
                    // httparse takes a line with no digits as size 0, and a bare LF inside
                    // an extension; RFC 9112 §7.1 wants 1*HEXDIG and CRLF.
                    Ok(httparse::Status::Complete((len, _)))
                        if !buf[0].is_ascii_hexdigit() || buf[..len - 1].contains(&b'\n') =>
                    {
                        return Err(invalid("a chunk size is not valid"));
                    }
                    Ok(httparse::Status::Complete((len, 0))) => {
                        buf.advance(len);
                        self.state = ChunkState::Trailers;
                    }
                    Ok(httparse::Status::Complete((len, size))) => {
                        buf.advance(len);
                        self.state = ChunkState::Data(size);
                    }
                    Ok(httparse::Status::Partial) if buf.len() > 1024 => {
                        return Err(invalid("a chunk-size line is longer than 1024 bytes"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(_) => return Err(invalid("a chunk size is not valid")),
                },
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Some(Frame::data(buf.split_to(take).freeze())));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(invalid("a chunk does not end with CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                        return Ok(None);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    return match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for f in fields.iter() {
                                let name =
                                    HeaderName::from_bytes(f.name.as_bytes()).map_err(invalid)?;
                                let value = HeaderValue::from_bytes(f.value).map_err(invalid)?;
                                trailers.append(name, value);
                            }
                            buf.advance(len);
                            self.state = ChunkState::Done;
                            Ok(Some(Frame::trailers(trailers)))
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                            Err(invalid(format!(
                                "its trailers are larger than {MAX_HEAD_BYTES} bytes"
                            )))
                        }
                        Ok(httparse::Status::Partial) => Ok(None),
                        Err(e) => Err(invalid(format!("its trailers: {e}"))),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fed a byte at a time, the decoder gives the same body and trailers.
    #[test]
    fn the_chunk_decoder_takes_its_input_in_any_pieces() {
        let wire = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\nx-u: 2\r\n\r\n";
        let mut decoder = ChunkDecoder::default();
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        for b in wire {
            buf.extend_from_slice(&[*b]);
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                }
            }
        }
        assert!(decoder.is_done() && buf.is_empty());
        assert_eq!(data, b"hello world");
        let trailers = trailers.unwrap();
        assert_eq!(
            (trailers["x-t"].as_bytes(), trailers["x-u"].as_bytes()),
            (&b"1"[..], &b"2"[..])
        );

        // Without trailers, and with a chunk size line that never ends.
        let mut decoder = ChunkDecoder::default();
        let mut buf = BytesMut::from(&b"0\r\n\r\nnext"[..]);
        assert!(decoder.decode(&mut buf).unwrap().is_none());
        assert!(decoder.is_done());
        assert_eq!(&buf[..], b"next");
        let mut buf = BytesMut::from(&[b'1'; 2000][..]);
        assert!(ChunkDecoder::default().decode(&mut buf).is_err());
    }
}
