//! Properties of the response parsing, fed arbitrary bytes cut at arbitrary points: it never
//! panics, never hands out more than it was given, and reads the same response however the
//! bytes arrive.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use proptest::prelude::*;
use tokio::io::{AsyncRead, ReadBuf};

use super::*;

/// A connection that hands out its bytes in the given pieces, one read at most a piece, then
/// ends: the network's way of cutting a response wherever it likes.
struct Pieces(VecDeque<Vec<u8>>);

impl Pieces {
    fn new(pieces: Vec<Vec<u8>>) -> Self {
        // An empty read is the connection's end, so an empty piece is no piece.
        Pieces(pieces.into_iter().filter(|p| !p.is_empty()).collect())
    }

    fn unread(&self) -> Vec<u8> {
        self.0.iter().flatten().copied().collect()
    }
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(piece) = self.0.front_mut() {
            let n = piece.len().min(buf.remaining());
            buf.put_slice(&piece[..n]);
            piece.drain(..n);
            if piece.is_empty() {
                self.0.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// `bytes` cut at the given points (taken modulo its length).
pub(crate) fn cut(bytes: &[u8], points: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = points.iter().map(|p| p % (bytes.len() + 1)).collect();
    points.sort_unstable();
    points.dedup();
    let mut pieces = Vec::new();
    let mut start = 0;
    for point in points.into_iter().chain([bytes.len()]) {
        pieces.push(bytes[start..point].to_vec());
        start = point;
    }
    pieces
}

/// How reading one response went.
#[derive(Debug, PartialEq, Eq)]
struct Read {
    /// The status, when the head was read.
    status: Option<u16>,
    /// The body data handed out, before the end or an error.
    body: Vec<u8>,
    /// The error the head or the body ended with.
    error: Option<String>,
    /// Whether the body ended where its framing says.
    complete: bool,
    /// What is left after the response: still buffered, and not yet read.
    left: Vec<u8>,
}

/// Reads one response off `pieces` as the event stream transport does: the head, then the
/// body to its end.
fn read_response(pieces: Vec<Vec<u8>>) -> Read {
    let total: usize = pieces.iter().map(Vec::len).sum();
    let mut io = Pieces::new(pieces);
    let mut buf = BytesMut::new();
    let mut read = Read {
        status: None,
        body: Vec::new(),
        error: None,
        complete: false,
        left: Vec::new(),
    };
    let finish = |mut read: Read, buf: BytesMut, io: &Pieces| {
        read.left = buf.to_vec();
        read.left.extend(io.unread());
        read
    };
    let framing = loop {
        match parse_head(&mut buf) {
            Ok(Some((head, framing))) => {
                read.status = Some(head.status().as_u16());
                break framing;
            }
            Ok(None) => {}
            Err(error) => {
                read.error = Some(error.to_string());
                return finish(read, buf, &io);
            }
        }
        if buf.len() >= MAX_HEAD_BYTES {
            read.error = Some(Http1Error::HeadTooLong.to_string());
            return finish(read, buf, &io);
        }
        match futures::executor::block_on(read_some(&mut io, &mut buf)) {
            Ok(0) => {
                read.error = Some(Http1Error::Incomplete.to_string());
                return finish(read, buf, &io);
            }
            Ok(_) => {}
            Err(error) => panic!("the pieces cannot fail: {error}"),
        }
    };
    let mut body = ResponseBody::new(framing);
    // Every piece of data holds at least a byte: more rounds than bytes is a loop.
    for _ in 0..=total {
        match futures::executor::block_on(body.next(&mut io, &mut buf)) {
            Ok(Some(data)) => {
                assert!(!data.is_empty(), "an empty piece of body");
                read.body.extend_from_slice(&data);
            }
            Ok(None) => {
                read.complete = body.is_complete();
                return finish(read, buf, &io);
            }
            Err(error) => {
                read.error = Some(error.to_string());
                return finish(read, buf, &io);
            }
        }
    }
    panic!("the body never ended");
}

/// A response the tests make, and what reading it must give.
#[derive(Clone, Debug)]
struct WellFormed {
    bytes: Vec<u8>,
    status: u16,
    body: Vec<u8>,
    /// What follows the response: the next one on a keep-alive connection.
    after: Vec<u8>,
    /// Whether the body runs until the connection closes (so `after` is body too).
    until_close: bool,
}

/// A line end: HTTP's own, or the bare `\n` servers also send.
fn line_end() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("\r\n"), Just("\n")]
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(200u16),
        Just(201),
        Just(202),
        Just(400),
        Just(404),
        Just(500),
        Just(503),
    ]
}

/// Headers that say nothing about framing.
fn other_headers() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,20}"), 0..4).prop_map(|headers| {
        headers
            .into_iter()
            .map(|(name, value)| (name, value.trim().to_owned()))
            .collect()
    })
}

/// How the test frames its body.
#[derive(Clone, Debug)]
enum Framed {
    Length,
    /// The body in these chunk lengths (each at least 1), with or without extensions, and
    /// trailer lines.
    Chunked {
        chunks: Vec<usize>,
        extensions: bool,
        upper_case: bool,
        trailers: Vec<(String, String)>,
    },
    UntilClose,
}

fn framed() -> impl Strategy<Value = Framed> {
    prop_oneof![
        Just(Framed::Length),
        Just(Framed::UntilClose),
        (
            proptest::collection::vec(1usize..40, 0..6),
            any::<bool>(),
            any::<bool>(),
            other_headers(),
        )
            .prop_map(|(chunks, extensions, upper_case, trailers)| {
                Framed::Chunked {
                    chunks,
                    extensions,
                    upper_case,
                    trailers,
                }
            }),
    ]
}

prop_compose! {
    fn well_formed()(
        status in status(),
        headers in other_headers(),
        framed in framed(),
        end in line_end(),
        data in proptest::collection::vec(any::<u8>(), 0..300),
        after in proptest::collection::vec(any::<u8>(), 0..40),
    ) -> WellFormed {
        let mut head = format!("HTTP/1.1 {status} Whatever{end}");
        for (name, value) in &headers {
            head.push_str(&format!("{name}: {value}{end}"));
        }
        let mut bytes = Vec::new();
        let body = match &framed {
            Framed::Length => {
                head.push_str(&format!("Content-Length: {}{end}{end}", data.len()));
                bytes.extend_from_slice(head.as_bytes());
                bytes.extend_from_slice(&data);
                data
            }
            Framed::UntilClose => {
                head.push_str(end);
                bytes.extend_from_slice(head.as_bytes());
                bytes.extend_from_slice(&data);
                data
            }
            Framed::Chunked { chunks, extensions, upper_case, trailers } => {
                // A length too, which chunked wins over.
                head.push_str(&format!(
                    "Content-Length: 3{end}Transfer-Encoding: gzip, chunked{end}{end}"
                ));
                bytes.extend_from_slice(head.as_bytes());
                let mut body = Vec::new();
                let mut rest = &data[..];
                for &len in chunks {
                    let len = len.min(rest.len());
                    if len == 0 {
                        break;
                    }
                    let size = if *upper_case { format!("{len:X}") } else { format!("{len:x}") };
                    let extension = if *extensions { ";name=value" } else { "" };
                    bytes.extend_from_slice(format!("{size}{extension}{end}").as_bytes());
                    bytes.extend_from_slice(&rest[..len]);
                    bytes.extend_from_slice(end.as_bytes());
                    body.extend_from_slice(&rest[..len]);
                    rest = &rest[len..];
                }
                bytes.extend_from_slice(format!("0{end}").as_bytes());
                for (name, value) in trailers {
                    bytes.extend_from_slice(format!("{name}: {value}{end}").as_bytes());
                }
                bytes.extend_from_slice(end.as_bytes());
                body
            }
        };
        bytes.extend_from_slice(&after);
        WellFormed {
            bytes,
            status,
            body,
            after,
            until_close: matches!(framed, Framed::UntilClose),
        }
    }
}

/// Bytes that look like a response often enough to reach the body: a valid head or the start
/// of one, then anything.
fn any_response() -> impl Strategy<Value = Vec<u8>> {
    let head = prop_oneof![
        Just(Vec::new()),
        Just(b"HTTP/1.1 200 OK\r\n".to_vec()),
        Just(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()),
        Just(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n".to_vec()),
        Just(b"HTTP/1.0 200 OK\r\n\r\n".to_vec()),
    ];
    let tail = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        // Mostly hex digits and line ends: chunk sizes, extensions and trailers.
        proptest::collection::vec(
            prop_oneof![
                Just(b'\r'),
                Just(b'\n'),
                Just(b';'),
                Just(b'0'),
                Just(b'1'),
                Just(b'a'),
                Just(b'F'),
                any::<u8>(),
            ],
            0..200
        ),
    ];
    (head, tail).prop_map(|(mut head, tail)| {
        head.extend(tail);
        head
    })
}

fn points() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(any::<usize>(), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // A failure found is kept as a unit test beside the code, not in a file of seeds.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_bytes_read_the_same_however_cut_and_never_more_than_given(
        bytes in any_response(),
        points in points(),
    ) {
        let whole = read_response(vec![bytes.clone()]);
        let cut = read_response(cut(&bytes, &points));
        prop_assert!(whole.body.len() + whole.left.len() <= bytes.len());
        // What is left is the input's end: nothing is made up or moved.
        prop_assert!(bytes.ends_with(&whole.left));
        prop_assert_eq!(whole, cut);
    }

    #[test]
    fn a_well_formed_response_reads_whole_however_cut(
        response in well_formed(),
        points in points(),
    ) {
        let read = read_response(cut(&response.bytes, &points));
        prop_assert_eq!(read.error, None);
        prop_assert_eq!(read.status, Some(response.status));
        if response.until_close {
            // The body runs to the connection's end, so what followed is body too.
            let mut body = response.body.clone();
            body.extend_from_slice(&response.after);
            prop_assert_eq!(read.body, body);
            prop_assert!(read.left.is_empty());
            prop_assert!(!read.complete);
        } else {
            prop_assert_eq!(read.body, response.body);
            // Not a byte past the body is taken.
            prop_assert_eq!(read.left, response.after);
            prop_assert!(read.complete);
        }
    }

    #[test]
    fn a_length_is_never_read_past(
        length in 0usize..64,
        rest in proptest::collection::vec(any::<u8>(), 0..128),
        points in points(),
    ) {
        let mut bytes = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n").into_bytes();
        bytes.extend_from_slice(&rest);
        let read = read_response(cut(&bytes, &points));
        prop_assert!(read.body.len() <= length);
        if rest.len() >= length {
            prop_assert_eq!(&read.body[..], &rest[..length]);
            prop_assert_eq!(&read.left[..], &rest[length..]);
        } else {
            prop_assert_eq!(read.error, Some(Http1Error::Incomplete.to_string()));
        }
    }

}

proptest! {
    // Every size near the bound is a case of its own: few are needed.
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn heads_near_the_bound_are_judged_by_their_size_not_by_how_they_arrive(
        extra in 0usize..64,
        points in proptest::collection::vec(any::<usize>(), 0..4),
    ) {
        // A head within 32 bytes either side of the bound.
        let start = b"HTTP/1.1 200 OK\r\nx-long: ";
        let end = b"\r\ncontent-length: 0\r\n\r\n";
        let fill = MAX_HEAD_BYTES + extra - 32 - start.len() - end.len();
        let mut bytes = start.to_vec();
        bytes.resize(start.len() + fill, b'a');
        bytes.extend_from_slice(end);
        let whole = read_response(vec![bytes.clone()]);
        let cut = read_response(cut(&bytes, &points));
        if bytes.len() <= MAX_HEAD_BYTES {
            prop_assert_eq!(&whole.status, &Some(200));
        } else {
            prop_assert_eq!(&whole.error, &Some(Http1Error::HeadTooLong.to_string()));
        }
        prop_assert_eq!(whole, cut);
    }

    #[test]
    fn chunk_lines_near_the_bound_are_judged_by_their_length_not_by_how_they_arrive(
        extra in 0usize..64,
        points in proptest::collection::vec(any::<usize>(), 0..4),
    ) {
        // `1;aaaa…` within 32 bytes either side of the bound, then its data.
        let mut line = b"1;".to_vec();
        line.resize(MAX_CHUNK_LINE + extra - 32, b'a');
        let mut bytes = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        bytes.extend_from_slice(&line);
        bytes.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        let whole = read_response(vec![bytes.clone()]);
        let cut = read_response(cut(&bytes, &points));
        // The line and its `\r` are what the bound counts.
        if line.len() < MAX_CHUNK_LINE {
            prop_assert_eq!(&whole.body, b"x");
        } else {
            prop_assert_eq!(&whole.error, &Some(Http1Error::BadChunk.to_string()));
        }
        prop_assert_eq!(whole, cut);
    }
}
