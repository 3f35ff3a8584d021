//! The event stream's HTTP transport with a bound: a response body ends as soon as the event
//! server sends a line or an event longer than allowed, before the SSE parser, which buffers a
//! line and an event whole, can be made to hold it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use launchdarkly_sdk_transport::{
    ByteStream, HttpTransport, Request, ResponseFuture, TransportError,
};

/// One transport (connection pool, TLS configuration with its root certificates) shared by every
/// stream, behind a handle that names no concrete type: a stream costs its connection, not a
/// client of its own.
#[derive(Clone)]
pub struct SharedTransport(
    Arc<dyn Fn(Request<Option<Bytes>>) -> ResponseFuture + Send + Sync + 'static>,
);

impl SharedTransport {
    pub fn new<T: HttpTransport>(transport: T) -> Self {
        SharedTransport(Arc::new(move |request| transport.request(request)))
    }
}

impl HttpTransport for SharedTransport {
    fn request(&self, request: Request<Option<Bytes>>) -> ResponseFuture {
        (self.0)(request)
    }
}

/// Why a response body was cut off; what a stream's `Reconnecting` reason says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TooLong {
    /// More than this many bytes without a line end.
    #[error("the event server sent a line longer than {0} bytes")]
    Line(usize),
    /// More than this many bytes without a blank line (the end of an event).
    #[error("the event server sent an event longer than {0} bytes")]
    Event(usize),
}

/// Where in a chunk a bound was broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exceeded {
    /// The index of the first byte past the bound; the bytes before it are within bounds.
    pub at: usize,
    /// Which bound.
    pub what: TooLong,
}

/// Counts, across chunks, the bytes of the current line and of the current event.
///
/// A line ends at `\n`, `\r` or `\r\n` (as SSE defines it; a `\r\n` split across two chunks is
/// still one line end). An event ends at a blank line. The line count holds the bytes after the
/// last line end; the event count holds every byte after the last blank line, each line end
/// counting one, so many short lines cannot add up to an unbounded event either.
#[derive(Clone, Debug)]
pub struct FrameBounds {
    max: usize,
    line: usize,
    event: usize,
    /// The last byte was `\r`: a `\n` now belongs to the same line end.
    after_cr: bool,
}

impl FrameBounds {
    /// Bounds of `max` bytes for a line and for an event.
    pub fn new(max: usize) -> Self {
        FrameBounds {
            max,
            line: 0,
            event: 0,
            after_cr: false,
        }
    }

    /// Counts `chunk`; fails at the first byte that makes a line or an event too long.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), Exceeded> {
        for (at, &byte) in chunk.iter().enumerate() {
            if byte == b'\n' && std::mem::take(&mut self.after_cr) {
                // The `\n` of a `\r\n`: the line end was counted at the `\r`.
                continue;
            }
            self.after_cr = byte == b'\r';
            if byte == b'\n' || byte == b'\r' {
                if self.line == 0 {
                    // A blank line: the event is complete.
                    self.event = 0;
                    continue;
                }
                self.line = 0;
                // Counted, but never the byte that fails: a line end is what the parser
                // needs to make progress.
                self.event += 1;
                continue;
            }
            self.line += 1;
            self.event += 1;
            if self.line > self.max {
                return Err(Exceeded {
                    at,
                    what: TooLong::Line(self.max),
                });
            }
            if self.event > self.max {
                return Err(Exceeded {
                    at,
                    what: TooLong::Event(self.max),
                });
            }
        }
        Ok(())
    }
}

/// A response body that passes chunks through while they stay within [`FrameBounds`], then
/// the bytes before the offending one, then a [`TooLong`] error, then nothing.
pub struct BoundedBody {
    inner: ByteStream,
    bounds: FrameBounds,
    /// The error to yield after the last good bytes.
    pending: Option<TooLong>,
    done: bool,
}

impl BoundedBody {
    /// Bounds `inner` to lines and events of at most `max_bytes`.
    pub fn new(inner: ByteStream, max_bytes: usize) -> Self {
        BoundedBody {
            inner,
            bounds: FrameBounds::new(max_bytes),
            pending: None,
            done: false,
        }
    }
}

impl Stream for BoundedBody {
    type Item = Result<Bytes, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(too_long) = self.pending.take() {
            self.done = true;
            return Poll::Ready(Some(Err(TransportError::new(too_long))));
        }
        let chunk = match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => chunk,
            Poll::Ready(other) => return Poll::Ready(other),
        };
        match self.bounds.feed(&chunk) {
            Ok(()) => Poll::Ready(Some(Ok(chunk))),
            Err(Exceeded { at: 0, what }) => {
                self.done = true;
                Poll::Ready(Some(Err(TransportError::new(what))))
            }
            // The bytes within bounds still go to the parser: an event completed in them is
            // delivered before the connection ends.
            Err(Exceeded { at, what }) => {
                self.pending = Some(what);
                Poll::Ready(Some(Ok(chunk.slice(..at))))
            }
        }
    }
}

/// A transport whose response bodies are [`BoundedBody`]s.
#[derive(Clone)]
pub struct BoundedTransport<T> {
    inner: T,
    max_bytes: usize,
}

impl<T: HttpTransport> BoundedTransport<T> {
    /// Wraps `inner`, bounding lines and events to `max_bytes`.
    pub fn new(inner: T, max_bytes: usize) -> Self {
        BoundedTransport { inner, max_bytes }
    }
}

impl<T: HttpTransport> HttpTransport for BoundedTransport<T> {
    fn request(&self, request: Request<Option<Bytes>>) -> ResponseFuture {
        let response = self.inner.request(request);
        let max_bytes = self.max_bytes;
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Box::pin(BoundedBody::new(body, max_bytes)) as ByteStream))
        })
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// Feeds `chunks` in order; the chunk index and the error of the first failure.
    fn feed_all(max: usize, chunks: &[&[u8]]) -> Result<(), (usize, Exceeded)> {
        let mut bounds = FrameBounds::new(max);
        for (i, chunk) in chunks.iter().enumerate() {
            bounds.feed(chunk).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    #[test]
    fn many_events_within_the_bound_pass_whatever_their_total() {
        let event = b"data:{\"type\":\"ping\",\"counter\":1}\n\n";
        let chunks: Vec<&[u8]> = std::iter::repeat_n(&event[..], 1000).collect();
        assert_eq!(feed_all(event.len(), &chunks), Ok(()));
    }

    #[test]
    fn a_line_of_exactly_the_bound_passes_and_one_byte_more_fails_there() {
        assert_eq!(feed_all(8, &[b"12345678\n\n"]), Ok(()));
        assert_eq!(
            feed_all(8, &[b"123456789\n\n"]),
            Err((
                0,
                Exceeded {
                    at: 8,
                    what: TooLong::Line(8)
                }
            ))
        );
    }

    #[test]
    fn a_line_split_across_chunks_is_counted_as_one() {
        // 4 + 3 + 1 bytes fit; the 9th, at index 1 of the third chunk, does not.
        assert_eq!(
            feed_all(8, &[b"data", b":ab", b"cde\n"]),
            Err((
                2,
                Exceeded {
                    at: 1,
                    what: TooLong::Line(8)
                }
            ))
        );
        // A blank line split from its event by the chunking still ends it.
        assert_eq!(
            feed_all(8, &[b"data:abc\n", b"\ndata:abc\n", b"\n"]),
            Ok(())
        );
    }

    #[test]
    fn an_endless_line_fails_however_it_is_chunked() {
        let mut bounds = FrameBounds::new(1024);
        let mut sent = 0;
        let failed = loop {
            match bounds.feed(&[b'x'; 100]) {
                Ok(()) => sent += 100,
                Err(e) => break sent + e.at,
            }
        };
        assert_eq!(failed, 1024);
    }

    #[test]
    fn short_lines_add_up_to_an_event_until_a_blank_line() {
        // Each `a\n` is two bytes of the event; the sixth line's `a` is byte 11 of 10.
        let lines: &[u8] = b"a\na\na\na\na\na\n";
        assert_eq!(
            feed_all(10, &[lines]),
            Err((
                0,
                Exceeded {
                    at: 10,
                    what: TooLong::Event(10)
                }
            ))
        );
        // A blank line in between ends the event, in each of SSE's line end forms.
        for end in [&b"\n"[..], b"\r", b"\r\n"] {
            let mut stream = Vec::new();
            for _ in 0..3 {
                // `a`, `a`, blank: an event of 3 bytes (`a`, a line end, `a`).
                for part in [&b"a"[..], end, b"a", end, end] {
                    stream.extend_from_slice(part);
                }
            }
            assert_eq!(feed_all(3, &[&stream]), Ok(()), "{end:?}");
        }
    }

    #[test]
    fn crlf_is_one_line_end_even_when_split_across_chunks() {
        // `abcd\r` | `\nefgh\r\n` is two lines of one event (10 bytes); if the `\n` after the
        // split were a blank line, the event would restart and `x` would not fail.
        assert_eq!(
            feed_all(10, &[b"abcd\r", b"\nefgh\r\n", b"x"]),
            Err((
                2,
                Exceeded {
                    at: 0,
                    what: TooLong::Event(10)
                }
            ))
        );
        // And `\r\n\r\n` is a line end then a blank line, split or not.
        assert_eq!(
            feed_all(10, &[b"abcd\r", b"\n\r", b"\nabcdefghi\r\n\r\n"]),
            Ok(())
        );
        // A `\r\n` counts one byte, not two.
        assert_eq!(feed_all(5, &[b"ab\r\ncd\r\n\r\n"]), Ok(()));
    }

    fn body(chunks: &[&'static [u8]]) -> ByteStream {
        let items: Vec<Result<Bytes, TransportError>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect();
        Box::pin(futures::stream::iter(items))
    }

    #[tokio::test]
    async fn the_body_passes_the_good_bytes_then_fails_then_ends() {
        let mut bounded = BoundedBody::new(
            body(&[b"data:{}\n\n", b"data:{}\n\nxxxxxxxxxxxx", b"never read"]),
            8,
        );
        assert_eq!(bounded.next().await.unwrap().unwrap(), &b"data:{}\n\n"[..]);
        assert_eq!(
            bounded.next().await.unwrap().unwrap(),
            &b"data:{}\n\nxxxxxxxx"[..]
        );
        let error = bounded.next().await.unwrap().unwrap_err();
        assert_eq!(
            error.inner().downcast_ref::<TooLong>(),
            Some(&TooLong::Line(8))
        );
        assert_eq!(
            error.inner().to_string(),
            "the event server sent a line longer than 8 bytes"
        );
        assert!(bounded.next().await.is_none());
    }

    #[tokio::test]
    async fn a_chunk_over_the_bound_from_its_first_byte_is_an_error_at_once() {
        let mut bounded = BoundedBody::new(body(&[b"12345678", b"9"]), 8);
        assert_eq!(bounded.next().await.unwrap().unwrap(), &b"12345678"[..]);
        assert!(bounded.next().await.unwrap().is_err());
        assert!(bounded.next().await.is_none());
    }

    #[derive(Clone)]
    struct Canned(&'static [&'static [u8]]);

    impl HttpTransport for Canned {
        fn request(&self, _request: Request<Option<Bytes>>) -> ResponseFuture {
            let chunks = self.0;
            Box::pin(async move {
                http::Response::builder()
                    .status(200)
                    .body(body(chunks))
                    .map_err(TransportError::new)
            })
        }
    }

    #[tokio::test]
    async fn the_transport_bounds_every_response_body() {
        let transport = BoundedTransport::new(Canned(&[b"data:", b"0123456789"]), 8);
        let request = Request::builder().uri("http://x/sse").body(None).unwrap();
        let mut body = transport.request(request).await.unwrap().into_body();
        assert_eq!(body.next().await.unwrap().unwrap(), &b"data:"[..]);
        assert_eq!(body.next().await.unwrap().unwrap(), &b"012"[..]);
        assert!(body.next().await.unwrap().is_err());
        assert!(body.next().await.is_none());
    }
}
