//! What palisade's two HTTP/1.1 codecs share: the client side ([`crate::server::h1`],
//! requests from clients) and the backend side ([`crate::upstream::h1`]). Both decode
//! chunked bodies and write bodies with the same rules (RFC 9112), so those rules live
//! once, here.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use http_body::{Body, Frame};
use tokio::io::AsyncWrite;

use crate::proxy::body::{BoxError, ProxyBody};

/// Header lines in one head or trailer section.
pub const MAX_HEADERS: usize = 128;

/// The most one read of a body asks for.
pub const MAX_READ: usize = 64 * 1024;

/// How much to read when a chunk-size line or a trailer section is incomplete.
const LINE_READ: usize = 8 * 1024;

/// The largest trailer section accepted.
const MAX_TRAILERS: usize = 64 * 1024;

/// `bytes` without optional whitespace (SP and HTAB only, RFC 9110 5.6.3: unlike
/// `trim_ascii`, a form feed or CR around a length is an error, not ignored).
pub fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &bytes[start..end.max(start)]
}

/// The items of a comma-separated header value, without optional whitespace; empty items
/// are skipped (RFC 9110 5.6.1).
pub fn items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|item| !item.is_empty())
}

/// A Content-Length value, agreeing with `seen` (the message's earlier one, if any). A list
/// of identical lengths is one length (RFC 9110 8.6); an empty item, anything but digits
/// or a differing length is an error.
pub fn content_length(value: &[u8], seen: Option<u64>) -> Result<u64, &'static str> {
    let mut length = seen;
    for item in value.split(|&b| b == b',') {
        let n = parse_decimal(trim(item)).ok_or("invalid content-length")?;
        if length.is_some_and(|m| m != n) {
            return Err("differing content-lengths");
        }
        length = Some(n);
    }
    length.ok_or("invalid content-length")
}

/// What a Connection header's tokens say.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnectionTokens {
    /// `close`.
    pub close: bool,
    /// `keep-alive` (meaningful for HTTP/1.0).
    pub keep_alive: bool,
    /// `upgrade`.
    pub upgrade: bool,
}

impl ConnectionTokens {
    /// Adds the tokens of one Connection header line; true when it named anything but
    /// `close` and `keep-alive`.
    pub fn see(&mut self, value: &[u8]) -> bool {
        // The usual values, whole, without splitting the list.
        if value.eq_ignore_ascii_case(b"keep-alive") {
            self.keep_alive = true;
            return false;
        }
        if value.eq_ignore_ascii_case(b"close") {
            self.close = true;
            return false;
        }
        let mut others = false;
        for item in items(value) {
            if item.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if item.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else {
                self.upgrade |= item.eq_ignore_ascii_case(b"upgrade");
                others = true;
            }
        }
        others
    }

    /// Whether the connection stays open after the message: HTTP/1.1 unless `close`,
    /// HTTP/1.0 only with `keep-alive` (and no `close`).
    pub fn keep_alive(&self, version: http::Version) -> bool {
        !self.close && (version != http::Version::HTTP_10 || self.keep_alive)
    }
}

/// A strictly decimal number (no sign, no whitespace), as Content-Length is.
pub fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .flatten()
    })
}

/// The hexadecimal size at the start of a chunk-size line (extensions after `;` ignored).
pub fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let size = match memchr::memchr(b';', line) {
        // Whitespace may precede an extension's `;` (RFC 9112 7.1.1, BWS), nowhere else.
        Some(i) => {
            let before = &line[..i];
            let end = before
                .iter()
                .rposition(|b| !matches!(b, b' ' | b'\t'))
                .map_or(0, |i| i + 1);
            &before[..end]
        }
        None => line,
    };
    if size.is_empty() || size.len() > 16 {
        return None;
    }
    size.iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(v))
    })
}

/// Where `piece` (a slice httparse returned) sits in `head`: (offset, length). A piece
/// that is empty or not inside `head` is (0, 0), never an out-of-range offset.
pub fn span(head: &[u8], piece: &[u8]) -> (usize, usize) {
    let base = head.as_ptr() as usize;
    let at = piece.as_ptr() as usize;
    if piece.is_empty() || at < base || at - base + piece.len() > head.len() {
        (0, 0)
    } else {
        (at - base, piece.len())
    }
}

/// Appends `name: value\r\n`.
// Inlined: it runs for every header line of every message (callgrind: -200 instructions).
#[inline]
pub fn header_line(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
}

/// The chunked encoding is malformed.
#[derive(Debug, Clone, Copy)]
pub struct InvalidChunk;

/// One step of chunked decoding.
#[derive(Debug)]
pub enum Decoded {
    /// Some body data.
    Data(Bytes),
    /// The body is over, with these trailers (empty: none).
    End(HeaderMap),
    /// The state moved on; decode again.
    Again,
    /// More bytes needed (about this many).
    NeedMore(usize),
}

/// Decodes the next piece of a chunked body from `buf`, consuming what it decodes.
pub fn decode_chunk(chunk: &mut Chunk, buf: &mut BytesMut) -> Result<Decoded, InvalidChunk> {
    match *chunk {
        Chunk::Size => {
            let Some(nl) = memchr::memchr(b'\n', buf) else {
                // A size line with extensions is short; one this long is an attack.
                if buf.len() > 4096 {
                    return Err(InvalidChunk);
                }
                return Ok(Decoded::NeedMore(LINE_READ));
            };
            let line = buf[..nl].strip_suffix(b"\r").ok_or(InvalidChunk)?;
            let size = parse_chunk_size(line).ok_or(InvalidChunk)?;
            buf.advance(nl + 1);
            *chunk = if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            };
            Ok(Decoded::Again)
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                let want = usize::try_from(left).unwrap_or(MAX_READ).min(MAX_READ);
                return Ok(Decoded::NeedMore(want.saturating_add(2)));
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let data = buf.split_to(n).freeze();
            let left = left - n as u64;
            *chunk = if left == 0 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left)
            };
            Ok(Decoded::Data(data))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Decoded::NeedMore(LINE_READ));
            }
            if &buf[..2] != b"\r\n" {
                return Err(InvalidChunk);
            }
            buf.advance(2);
            *chunk = Chunk::Size;
            Ok(Decoded::Again)
        }
        Chunk::Trailers => {
            // The common case: no trailers, just the final CRLF.
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Decoded::End(HeaderMap::new()));
            }
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut slots) {
                Ok(httparse::Status::Partial) => {
                    if buf.len() >= MAX_TRAILERS {
                        return Err(InvalidChunk);
                    }
                    Ok(Decoded::NeedMore(LINE_READ))
                }
                Err(_) => Err(InvalidChunk),
                Ok(httparse::Status::Complete((len, fields))) => {
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for field in fields {
                        let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(field.name.as_bytes()),
                            HeaderValue::from_bytes(field.value),
                        ) else {
                            return Err(InvalidChunk);
                        };
                        trailers.append(name, value);
                    }
                    buf.advance(len);
                    Ok(Decoded::End(trailers))
                }
            }
        }
    }
}

/// How a body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// Content-Length.
    Length(u64),
    /// Transfer-Encoding: chunked.
    Chunked,
    /// Until the connection closes (a response to an HTTP/1.0 client with no length).
    Close,
}

/// Why writing a body failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The body's length differs from the one its head declared.
    #[error("the body's length differs from its declared length")]
    Length,
    /// Reading the body that is being written failed.
    #[error("{0}")]
    Body(#[source] BoxError),
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// At most this many buffers go to one vectored write.
const MAX_SLICES: usize = 8;

/// Frames up to this size are copied into the head (one buffer instead of two); larger
/// ones are written from where they are.
const COPY_MAX: usize = 4096;

/// [`BodyWriter::prime`] stops taking ready frames past this many bytes.
const MAX_PRIMED: usize = 64 * 1024;

/// Writes a head and a streamed body with the given framing: the head, and the body
/// frames ready at once, in one vectored write; body bytes are never copied except
/// small frames into the head.
pub struct BodyWriter {
    body: ProxyBody,
    framing: Framing,
    /// Trailers are written (chunked framing only); else they are dropped.
    trailers: bool,
    /// The head (and small frames copied after it), and how much of it is written.
    head: Vec<u8>,
    head_written: usize,
    /// Framed body bytes after the head, in order.
    queue: VecDeque<Bytes>,
    /// Body bytes taken from the body so far.
    written: u64,
    /// The body has ended (its last bytes may still be queued).
    ended: bool,
    /// A failure found by [`BodyWriter::prime`], reported by the next write.
    failed: Option<WriteError>,
    /// Bytes taken from the body plus bytes written: changes whenever either side moves.
    moved: u64,
}

impl BodyWriter {
    /// A writer of `body`; with `trailers`, a chunked body's trailers are sent on.
    pub fn new(body: ProxyBody, framing: Framing, trailers: bool) -> Self {
        BodyWriter {
            body,
            framing,
            trailers,
            head: Vec::new(),
            head_written: 0,
            queue: VecDeque::new(),
            written: 0,
            ended: framing == Framing::None,
            failed: None,
            moved: 0,
        }
    }

    /// A writer with nothing to write (the body went out some other way).
    pub fn finished() -> Self {
        BodyWriter::new(ProxyBody::Empty, Framing::None, false)
    }

    /// Writes `head` before the body.
    pub fn with_head(mut self, head: Vec<u8>) -> Self {
        self.head = head;
        self
    }

    /// Everything is written.
    pub fn done(&self) -> bool {
        self.ended && self.queue.is_empty() && self.head_written == self.head.len()
    }

    /// Grows whenever bytes come from the body or go to the socket: compare two readings
    /// to tell whether a write made progress.
    pub fn moved(&self) -> u64 {
        self.moved
    }

    /// Everything taken from the body so far is written and the body has not ended: the
    /// writer waits for the body's next frame (the peer sending it), not for the socket.
    pub fn awaits_body(&self) -> bool {
        !self.ended
            && self.failed.is_none()
            && self.queue.is_empty()
            && self.head_written == self.head.len()
    }

    /// Takes the body frames that are ready now, so that they go out in the head's write.
    pub fn prime(&mut self, cx: &mut Context<'_>) {
        while !self.ended
            && self.failed.is_none()
            && self.queue.len() + 3 <= MAX_SLICES
            && self.queue.iter().map(Bytes::len).sum::<usize>() < MAX_PRIMED
        {
            let step = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => self.take(frame),
                Poll::Ready(None) => self.finish(),
                Poll::Ready(Some(Err(e))) => Err(WriteError::Body(e)),
                Poll::Pending => return,
            };
            if let Err(e) = step {
                self.failed = Some(e);
                return;
            }
            // Small pieces join the head, in order (never past a piece left queued).
            if self.head_written == 0 {
                while let Some(front) = self.queue.front() {
                    if front.len() > COPY_MAX {
                        break;
                    }
                    self.head.extend_from_slice(front);
                    self.queue.pop_front();
                }
            }
        }
    }

    /// Writes the rest of the head and the body to `io`.
    pub fn poll_write<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut W,
    ) -> Poll<Result<(), WriteError>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        loop {
            let head = &self.head[self.head_written..];
            if !head.is_empty() || !self.queue.is_empty() {
                let mut n = {
                    let mut slices = arrayvec::ArrayVec::<io::IoSlice<'_>, MAX_SLICES>::new();
                    if !head.is_empty() {
                        slices.push(io::IoSlice::new(head));
                    }
                    for piece in &self.queue {
                        if slices.is_full() {
                            break;
                        }
                        slices.push(io::IoSlice::new(piece));
                    }
                    ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?
                };
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                self.moved += n as u64;
                let from_head = n.min(self.head.len() - self.head_written);
                self.head_written += from_head;
                n -= from_head;
                while n > 0 {
                    let Some(front) = self.queue.front_mut() else {
                        break;
                    };
                    if front.len() <= n {
                        n -= front.len();
                        self.queue.pop_front();
                    } else {
                        front.advance(n);
                        n = 0;
                    }
                }
                continue;
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => self.finish()?,
                Some(Err(e)) => return Poll::Ready(Err(WriteError::Body(e))),
                Some(Ok(frame)) => self.take(frame)?,
            }
        }
    }

    /// The body ended: the chunked terminator, or a check of the declared length.
    fn finish(&mut self) -> Result<(), WriteError> {
        self.ended = true;
        match self.framing {
            Framing::Chunked => self.push(Bytes::from_static(b"0\r\n\r\n")),
            Framing::Length(n) if n != self.written => return Err(WriteError::Length),
            _ => {}
        }
        Ok(())
    }

    /// Queues `piece` after what is queued; a small one goes straight into the head while
    /// nothing of the head is written and nothing is queued (no queue allocated for a
    /// small answer's only frame).
    fn push(&mut self, piece: Bytes) {
        if self.head_written == 0 && self.queue.is_empty() && piece.len() <= COPY_MAX {
            self.head.extend_from_slice(&piece);
        } else {
            self.queue.push_back(piece);
        }
    }

    /// Queues one frame's bytes, framed; refuses data past a declared length (on the
    /// wire it would read as the start of the next message).
    fn take(&mut self, frame: Frame<Bytes>) -> Result<(), WriteError> {
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                self.written += data.len() as u64;
                self.moved += data.len() as u64;
                match self.framing {
                    Framing::Length(n) if self.written > n => return Err(WriteError::Length),
                    Framing::None => return Err(WriteError::Length),
                    _ => {}
                }
                if self.framing == Framing::Chunked {
                    let mut size = itoa_hex(data.len());
                    size.extend_from_slice(b"\r\n");
                    self.push(Bytes::from(size));
                    self.push(data);
                    self.push(Bytes::from_static(b"\r\n"));
                } else {
                    self.push(data);
                }
            }
            Err(frame) => {
                // Trailers travel only in a chunked body; elsewhere they are dropped.
                if let (Ok(trailers), Framing::Chunked) = (frame.into_trailers(), self.framing) {
                    let mut last = b"0\r\n".to_vec();
                    if self.trailers {
                        for (name, value) in &trailers {
                            header_line(&mut last, name, value.as_bytes());
                        }
                    }
                    last.extend_from_slice(b"\r\n");
                    self.push(Bytes::from(last));
                    self.ended = true;
                }
            }
        }
        Ok(())
    }
}

/// `n` in lowercase hexadecimal.
fn itoa_hex(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    let digits = usize::BITS as usize / 4 - (n | 1).leading_zeros() as usize / 4;
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (i * 4)) & 0xf]);
    }
    out
}

/// For the fuzz targets (`fuzz/`, built with the `fuzzing` feature): feeds `raw` into a
/// read buffer in pieces of the sizes `sizes` gives (the rest at once when it runs out),
/// calling `step` after each piece until it returns a result, then again on what is left
/// (pipelined messages). A result starting with `error` or `end` stops it. Returns each
/// result with how many bytes of `raw` had been consumed by then, and `incomplete` when the
/// input ran out inside a message.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_read(
    raw: &[u8],
    sizes: &mut dyn Iterator<Item = usize>,
    mut step: impl FnMut(&mut BytesMut) -> Option<String>,
) -> Vec<String> {
    let mut buf = BytesMut::new();
    let mut at = 0;
    let mut results = Vec::new();
    loop {
        if let Some(result) = step(&mut buf) {
            let stop = result.starts_with("error") || result.starts_with("end");
            results.push(format!("{result} @{}", at - buf.len()));
            if stop {
                return results;
            }
            continue;
        }
        if at == raw.len() {
            results.push(format!("incomplete @{}", at - buf.len()));
            return results;
        }
        let n = sizes.next().unwrap_or(raw.len()).clamp(1, raw.len() - at);
        buf.extend_from_slice(&raw[at..at + n]);
        at += n;
    }
}

/// For the fuzz targets that split their input into reads: the input's first 8 bytes
/// (each read's size, less one, in turn) and the bytes that arrive.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_split(data: &[u8]) -> (impl Iterator<Item = usize> + '_, &[u8]) {
    let (cuts, raw) = data.split_at(data.len().min(8));
    (cuts.iter().map(|&c| usize::from(c) + 1).cycle(), raw)
}

/// Decodes what `buf` holds of a chunked body into `data`: `Ok(Some(trailers))` at its
/// end, `Ok(None)` when more bytes are needed.
#[cfg(any(test, feature = "fuzzing"))]
fn fuzz_decode(
    chunk: &mut Chunk,
    buf: &mut BytesMut,
    data: &mut Vec<u8>,
) -> Result<Option<HeaderMap>, InvalidChunk> {
    loop {
        match decode_chunk(chunk, buf)? {
            Decoded::Data(piece) => {
                assert!(!piece.is_empty(), "an empty data piece");
                data.extend_from_slice(&piece);
            }
            Decoded::Again => {}
            Decoded::NeedMore(want) => {
                assert!(want > 0, "needs more, but asks for nothing");
                return Ok(None);
            }
            Decoded::End(trailers) => return Ok(Some(trailers)),
        }
    }
}

/// For the fuzz targets: decodes the input as a chunked body once with all of it in the
/// buffer and once arriving in pieces ([`fuzz_split`]), and panics when the data, the
/// trailers, the error or where the body ends differ. Inputs longer than 4 KiB are
/// skipped: the chunk-size line's limit is counted in buffered bytes.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_chunked(input: &[u8]) {
    let (mut sizes, raw) = fuzz_split(input);
    if raw.len() > 4096 {
        return;
    }
    let decode = |sizes: &mut dyn Iterator<Item = usize>| {
        let mut chunk = Chunk::Size;
        let mut data = Vec::new();
        let results = fuzz_read(raw, sizes, |buf| {
            match fuzz_decode(&mut chunk, buf, &mut data) {
                Ok(None) => None,
                Ok(Some(trailers)) => Some(format!("end {trailers:?}")),
                Err(InvalidChunk) => Some("error".into()),
            }
        });
        (data, results)
    };
    let whole = decode(&mut std::iter::once(raw.len()));
    let pieces = decode(&mut sizes);
    assert_eq!(whole, pieces, "whole vs in pieces");
}

/// For the fuzz targets: writes a head and a body through a [`BodyWriter`] the way the
/// codecs do, frames and writes interleaved as `ops` says (the socket taking a few bytes
/// per write and sometimes none; a write that finds no frame waiting ends the body), and
/// panics unless what reached the socket is the head, then the body's bytes framed as
/// declared (a chunked body decodes to them and its trailers), or a length error when
/// the body and its declared length differ.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_body_writer(ops: &[u8]) {
    let Some((&first, ops)) = ops.split_first() else {
        return;
    };
    // (kind, argument) pairs: a data frame, a trailers frame (the body's end), or writes.
    let frame_len = |arg: u8| usize::from(arg) * 61 % 6000;
    let mut total = 0u64;
    for pair in ops.chunks_exact(2) {
        match pair[0] % 3 {
            0 => total += frame_len(pair[1]) as u64,
            2 => break,
            _ => {}
        }
    }
    let framing = match first % 3 {
        0 => Framing::Chunked,
        1 => Framing::Length((total + u64::from(first / 3 % 3)).saturating_sub(1)),
        _ => Framing::Close,
    };
    let trailers = first & 0x40 != 0;
    let head = vec![b'H'; usize::from(first >> 4 & 7) * 700];
    let mut writer = BodyWriter::new(ProxyBody::Empty, framing, trailers).with_head(head.clone());
    let mut socket = Budget::default();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut data = Vec::new();
    let mut sent_trailers = None;
    let mut failed = None;
    let mut counter = 0u8;
    for pair in ops.chunks_exact(2) {
        let (kind, arg) = (pair[0], pair[1]);
        let step = match kind % 3 {
            0 => {
                let piece: Vec<u8> = (0..frame_len(arg))
                    .map(|_| {
                        counter = counter.wrapping_add(1);
                        counter
                    })
                    .collect();
                data.extend_from_slice(&piece);
                writer.take(Frame::data(Bytes::from(piece)))
            }
            1 => {
                socket.per_call = usize::from(arg % 50) + 1;
                socket.calls = usize::from(kind / 3 % 4) + 1;
                match writer.poll_write(&mut cx, &mut socket) {
                    Poll::Ready(result) => result,
                    Poll::Pending => Ok(()),
                }
            }
            _ => {
                let mut map = HeaderMap::new();
                map.insert("x-t", HeaderValue::from(u16::from(arg)));
                sent_trailers = Some(map.clone());
                writer.take(Frame::trailers(map))
            }
        };
        if let Err(e) = step {
            failed = Some(e);
            break;
        }
        // Trailers end the body; so does a write that found no frame waiting (the body
        // here is empty, so the writer polls it to its end).
        if sent_trailers.is_some() || writer.ended {
            break;
        }
    }
    if failed.is_none() && !writer.ended {
        failed = writer.finish().err();
    }
    if failed.is_none() {
        // The rest in larger writes (short ones were tried above): the fuzzer stays fast.
        socket.calls = usize::MAX;
        socket.per_call = socket.per_call.max(1) * 64;
        match writer.poll_write(&mut cx, &mut socket) {
            Poll::Ready(Ok(())) => assert!(writer.done()),
            other => panic!("the last write: {other:?}"),
        }
    }
    let declared = match framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    let sent = data.len() as u64;
    if let Some(e) = failed {
        assert!(
            matches!(e, WriteError::Length) && declared.is_some_and(|n| n != sent),
            "{e:?} with {framing:?}, {sent} bytes"
        );
        return;
    }
    assert!(
        declared.is_none_or(|n| n == sent),
        "a wrong length not refused"
    );
    let written = &socket.out;
    assert!(written.starts_with(&head), "the head first");
    let body = &written[head.len()..];
    if framing != Framing::Chunked {
        assert!(body == data.as_slice(), "the body's bytes as they were");
        return;
    }
    let mut buf = BytesMut::from(body);
    let mut decoded = Vec::new();
    let got_trailers = match fuzz_decode(&mut Chunk::Size, &mut buf, &mut decoded) {
        Ok(Some(trailers)) => trailers,
        other => panic!("the chunked body does not decode: {other:?}"),
    };
    assert!(buf.is_empty(), "bytes after the chunked body");
    assert!(decoded == data, "the chunked body decodes to its bytes");
    let expected = sent_trailers.filter(|_| trailers).unwrap_or_default();
    assert_eq!(got_trailers, expected);
}

/// A socket that takes at most `per_call` bytes per write, for `calls` writes, then is
/// not writable.
#[cfg(any(test, feature = "fuzzing"))]
#[derive(Default)]
struct Budget {
    out: Vec<u8>,
    per_call: usize,
    calls: usize,
}

#[cfg(any(test, feature = "fuzzing"))]
impl AsyncWrite for Budget {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.calls == 0 {
            return Poll::Pending;
        }
        self.calls -= 1;
        let mut left = self.per_call.max(1);
        let mut n = 0;
        for buf in bufs {
            let take = buf.len().min(left);
            self.out.extend_from_slice(&buf[..take]);
            n += take;
            left -= take;
            if left == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input in `fuzz/seeds/` (the fuzz targets' starting points and each input that
    /// once found a bug) through the fuzz targets' checks.
    #[test]
    fn fuzz_seeds_pass_the_fuzz_checks() {
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 6] = [
            ("access_line", crate::logging::access::fuzz_access_line),
            ("connection", crate::server::fuzz::fuzz_connection),
            ("request_head", crate::server::h1::fuzz_request_heads),
            ("response_head", crate::upstream::h1::fuzz_response_heads),
            ("chunked", fuzz_chunked),
            ("body_writer", fuzz_body_writer),
        ];
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        for (name, target) in targets {
            let mut count = 0;
            for entry in
                std::fs::read_dir(seeds.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
            {
                let path = entry
                    .map(|e| e.path())
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let data =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                target(&data);
                count += 1;
            }
            assert!(count >= 10, "{name}: only {count} seeds");
        }
    }

    #[test]
    fn chunk_sizes_are_strict_hex() {
        assert_eq!(parse_chunk_size(b"1a"), Some(26));
        assert_eq!(parse_chunk_size(b"1A;name=value"), Some(26));
        assert_eq!(parse_chunk_size(b"5 ;ext"), Some(5));
        for bad in [&b""[..], b"g", b" 5", b"-1", b"0x5", b"11111111111111111"] {
            assert_eq!(
                parse_chunk_size(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A socket that takes at most 5 bytes per write, across the buffers of a vectored one.
    fn trickle() -> Budget {
        Budget {
            out: Vec::new(),
            per_call: 5,
            calls: usize::MAX,
        }
    }

    fn write_out(body: &'static str, framing: Framing, prime: bool) -> String {
        let big = Bytes::from(body.repeat(1000));
        let mut writer = BodyWriter::new(ProxyBody::Full(Some(big)), framing, false)
            .with_head(b"HEAD\r\n".to_vec());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if prime {
            writer.prime(&mut cx);
        }
        let mut out = trickle();
        assert!(matches!(
            writer.poll_write(&mut cx, &mut out),
            Poll::Ready(Ok(()))
        ));
        assert!(writer.done());
        String::from_utf8(out.out).unwrap_or_default()
    }

    #[test]
    fn head_and_body_survive_short_vectored_writes() {
        for prime in [false, true] {
            let body = "x".repeat(5000);
            assert_eq!(
                write_out("x", Framing::Chunked, prime),
                format!("HEAD\r\n3e8\r\n{}\r\n0\r\n\r\n", &body[..1000])
            );
            assert_eq!(
                write_out("abcde", Framing::Length(5000), prime),
                format!("HEAD\r\n{}", "abcde".repeat(1000))
            );
        }
    }

    #[test]
    fn small_frames_before_and_after_a_large_one_keep_their_order() {
        let big = "x".repeat(5000);
        for (framing, expected) in [
            (
                Framing::Chunked,
                format!("HEAD\r\n2\r\nab\r\n1388\r\n{big}\r\n2\r\ncd\r\n0\r\n\r\n"),
            ),
            (Framing::Length(5004), format!("HEAD\r\nab{big}cd")),
        ] {
            let mut writer =
                BodyWriter::new(ProxyBody::Empty, framing, false).with_head(b"HEAD\r\n".to_vec());
            for piece in ["ab", big.as_str(), "cd"] {
                assert!(writer
                    .take(Frame::data(Bytes::copy_from_slice(piece.as_bytes())))
                    .is_ok());
            }
            assert!(writer.finish().is_ok());
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let mut out = trickle();
            assert!(matches!(
                writer.poll_write(&mut cx, &mut out),
                Poll::Ready(Ok(()))
            ));
            assert_eq!(String::from_utf8(out.out).unwrap_or_default(), expected);
        }
    }

    #[test]
    fn a_body_longer_than_its_length_is_an_error_not_extra_bytes() {
        let mut writer = BodyWriter::new(
            ProxyBody::from_static("too long"),
            Framing::Length(3),
            false,
        );
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = trickle();
        assert!(matches!(
            writer.poll_write(&mut cx, &mut out),
            Poll::Ready(Err(WriteError::Length))
        ));
        assert!(out.out.is_empty());
    }

    #[test]
    fn connection_tokens_decide_keep_alive_whatever_their_order() {
        let tokens = |lines: &[&str]| {
            let mut t = ConnectionTokens::default();
            let named: Vec<bool> = lines.iter().map(|l| t.see(l.as_bytes())).collect();
            (t, named)
        };
        let (t, named) = tokens(&["keep-alive, close"]);
        assert!(!t.keep_alive(http::Version::HTTP_10) && !t.keep_alive(http::Version::HTTP_11));
        assert_eq!(named, [false]);
        let (t, _) = tokens(&["close", "Keep-Alive"]);
        assert!(
            !t.keep_alive(http::Version::HTTP_10),
            "close wins in any order"
        );
        let (t, named) = tokens(&[" Keep-Alive ", "Upgrade, x-secret"]);
        assert!(t.keep_alive(http::Version::HTTP_10) && t.upgrade);
        assert_eq!(named, [false, true], "the second line names other headers");
        let (t, _) = tokens(&[",,"]);
        assert!(t.keep_alive(http::Version::HTTP_11) && !t.keep_alive(http::Version::HTTP_10));
    }

    #[test]
    fn content_lengths_are_one_number_or_an_error() {
        assert_eq!(content_length(b"5", None), Ok(5));
        assert_eq!(content_length(b"5, 5", None), Ok(5));
        assert_eq!(content_length(b" 5 ", Some(5)), Ok(5));
        assert_eq!(
            content_length(b"6", Some(5)),
            Err("differing content-lengths")
        );
        for bad in [&b""[..], b"5,", b"+5", b"5 5", b"0x5", b"\x0c5"] {
            assert!(
                content_length(bad, None).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn spans_never_point_outside_the_head() {
        let head = b"GET / HTTP/1.1\r\n";
        assert_eq!(span(head, &head[4..5]), (4, 1));
        assert_eq!(span(head, b""), (0, 0));
        assert_eq!(span(head, b"elsewhere"), (0, 0));
        assert_eq!(span(&head[..4], &head[2..8]), (0, 0));
    }

    #[test]
    fn hex_sizes_have_no_leading_zeros() {
        for n in [0usize, 1, 15, 16, 255, 4096, 16384, 0x1_0000_0000] {
            assert_eq!(itoa_hex(n), format!("{n:x}").into_bytes());
        }
    }

    #[test]
    fn a_chunked_body_decodes_across_any_split() {
        let raw: &[u8] = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 1\r\n\r\nNEXT";
        for split in 0..=raw.len() {
            let mut buf = BytesMut::from(&raw[..split]);
            let mut rest = &raw[split..];
            let mut chunk = Chunk::Size;
            let mut body = Vec::new();
            let trailers = loop {
                match decode_chunk(&mut chunk, &mut buf) {
                    Ok(Decoded::Data(d)) => body.extend_from_slice(&d),
                    Ok(Decoded::End(t)) => break t,
                    Ok(Decoded::Again) => {}
                    Ok(Decoded::NeedMore(_)) => {
                        assert!(!rest.is_empty(), "stuck at split {split}");
                        buf.extend_from_slice(&rest[..1]);
                        rest = &rest[1..];
                    }
                    Err(InvalidChunk) => panic!("invalid at split {split}"),
                }
            };
            assert_eq!(body, b"hello world", "split {split}");
            assert_eq!(trailers["x-sum"], "1", "split {split}");
            // What follows the body is left for the next message.
            buf.extend_from_slice(rest);
            assert_eq!(&buf[..], b"NEXT", "split {split}");
        }
    }
}
