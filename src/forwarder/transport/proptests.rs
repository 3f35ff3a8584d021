//! Properties of the frame bounds, fed arbitrary bytes cut at arbitrary points: they fail at
//! the same byte however the stream is cut, exactly where a line or an event first grows past
//! the bound, and a bounded body hands on exactly the bytes before that one.

use bytes::Bytes;
use futures::StreamExt;
use launchdarkly_sdk_transport::{ByteStream, TransportError};
use proptest::prelude::*;

use super::*;

/// Where in the whole stream the bounds fail, fed in `pieces`.
fn fail_at(max: usize, pieces: &[&[u8]]) -> Option<(usize, TooLong)> {
    let mut bounds = FrameBounds::new(max);
    let mut offset = 0;
    for piece in pieces {
        if let Err(Exceeded { at, what }) = bounds.feed(piece) {
            return Some((offset + at, what));
        }
        offset += piece.len();
    }
    None
}

/// The same, worked out line by line: a line ends at `\r\n`, `\r` or `\n`; an event's size is
/// its lines' bytes plus one per line end, and a blank line ends it. The byte that fails is
/// the first that makes a line, or else the event, longer than `max`.
fn expected_fail_at(max: usize, bytes: &[u8]) -> Option<(usize, TooLong)> {
    let mut event = 0usize;
    let mut start = 0usize;
    while start <= bytes.len() {
        let rest = &bytes[start..];
        let len = rest
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(rest.len());
        // The line's k-th byte (from 0) makes the line k + 1 long and the event
        // event + k + 1; the line is checked first. A line end never fails.
        let line_fails = (len > max).then_some(max);
        let event_fails = (len > 0 && event + len > max).then(|| max.saturating_sub(event));
        match (line_fails, event_fails) {
            (Some(k), Some(e)) if k <= e => return Some((start + k, TooLong::Line(max))),
            (_, Some(e)) => return Some((start + e, TooLong::Event(max))),
            (Some(k), None) => return Some((start + k, TooLong::Line(max))),
            (None, None) => {}
        }
        let end = start + len;
        if end == bytes.len() {
            return None;
        }
        let ending = if bytes[end..].starts_with(b"\r\n") {
            2
        } else {
            1
        };
        event = if len == 0 { 0 } else { event + len + 1 };
        start = end + ending;
    }
    None
}

/// Bytes rich in line ends, so lines, events and blank lines of every size come up.
fn stream_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            4 => Just(b'\n'),
            3 => Just(b'\r'),
            6 => Just(b'a'),
            1 => any::<u8>(),
        ],
        0..300,
    )
}

fn pieces<'a>(bytes: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = points.iter().map(|p| p % (bytes.len() + 1)).collect();
    points.sort_unstable();
    points.dedup();
    let mut pieces = Vec::new();
    let mut start = 0;
    for point in points.into_iter().chain([bytes.len()]) {
        pieces.push(&bytes[start..point]);
        start = point;
    }
    pieces
}

fn body(pieces: &[&[u8]]) -> ByteStream {
    let items: Vec<Result<Bytes, TransportError>> = pieces
        .iter()
        .map(|p| Ok(Bytes::copy_from_slice(p)))
        .collect();
    Box::pin(futures::stream::iter(items))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // A failure found is kept as a unit test beside the code, not in a file of seeds.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_bounds_fail_at_the_first_byte_too_many_however_the_stream_is_cut(
        max in 1usize..24,
        bytes in stream_bytes(),
        points in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let whole = fail_at(max, &[&bytes]);
        prop_assert_eq!(whole, expected_fail_at(max, &bytes));
        prop_assert_eq!(fail_at(max, &pieces(&bytes, &points)), whole);
    }

    #[test]
    fn a_bounded_body_passes_exactly_the_bytes_before_the_failure(
        max in 1usize..24,
        bytes in stream_bytes(),
        points in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let cut = pieces(&bytes, &points);
        let mut bounded = BoundedBody::new(body(&cut), max);
        let (passed, error) = futures::executor::block_on(async {
            let mut passed = Vec::new();
            let mut error = None;
            while let Some(item) = bounded.next().await {
                match item {
                    Ok(chunk) => passed.extend_from_slice(&chunk),
                    Err(e) => {
                        error = e.inner().downcast_ref::<TooLong>().copied();
                        break;
                    }
                }
            }
            // Nothing after the error.
            assert!(bounded.next().await.is_none());
            (passed, error)
        });
        match expected_fail_at(max, &bytes) {
            Some((at, what)) => {
                prop_assert_eq!(&passed[..], &bytes[..at]);
                prop_assert_eq!(error, Some(what));
            }
            None => {
                prop_assert_eq!(&passed[..], &bytes[..]);
                prop_assert_eq!(error, None);
            }
        }
    }
}
