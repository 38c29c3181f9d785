//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` a queue item
//! may carry, read once at the edge, and the headers courier sends with a parent id of its
//! own for every request. Ids are hex-encoded into fixed buffers: no formatting machinery
//! and no allocation but the header value itself on the delivery path.

use std::fmt;

use hyper::header::{HeaderName, HeaderValue};

/// The `traceparent` header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The `tracestate` header.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Length of a version-00 `traceparent`: `00-` + 32 + `-` + 16 + `-` + 2.
pub const TRACEPARENT_LEN: usize = 55;

/// The longest `tracestate` forwarded (the W3C limit is 32 members; 512 characters is what
/// the specification asks every vendor to be able to pass on).
pub const MAX_TRACESTATE: usize = 512;

/// The flags courier sets on a trace it starts: `sampled`, so the main server's spans are
/// recorded under it.
const SAMPLED: u8 = 0x01;

/// A 16-byte trace id, never all zero. Shown as 32 lower-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

impl TraceId {
    /// A fresh random trace id.
    pub fn random() -> TraceId {
        loop {
            let id = fastrand::u128(..).to_be_bytes();
            if id != [0; 16] {
                return TraceId(id);
            }
        }
    }

    /// The id as 32 lower-case hex digits.
    pub fn hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex_into(&mut out, &self.0);
        out
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.hex();
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&hex).unwrap_or_default())
    }
}

/// The trace a message belongs to: its id, the producer's flags, and the producer's
/// `tracestate` when its `traceparent` was valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    pub flags: u8,
    pub state: Option<HeaderValue>,
}

impl TraceContext {
    /// A new trace, started by courier.
    pub fn start() -> TraceContext {
        TraceContext {
            trace_id: TraceId::random(),
            flags: SAMPLED,
            state: None,
        }
    }

    /// A `traceparent` naming a new random parent id (courier's own span) in this trace.
    pub fn traceparent(&self) -> [u8; TRACEPARENT_LEN] {
        let parent = loop {
            let id = fastrand::u64(..);
            if id != 0 {
                break id.to_be_bytes();
            }
        };
        let mut out = [0u8; TRACEPARENT_LEN];
        out[..3].copy_from_slice(b"00-");
        hex_into(&mut out[3..35], &self.trace_id.0);
        out[35] = b'-';
        hex_into(&mut out[36..52], &parent);
        out[52] = b'-';
        hex_into(&mut out[53..55], &[self.flags]);
        out
    }

    /// The headers a request in this trace carries: a `traceparent` with a new parent id,
    /// and the producer's `tracestate`, if any. Written into the request's head by the
    /// HTTP/1.1 encoder, no header value built.
    pub fn headers(&self) -> TraceHeaders<'_> {
        TraceHeaders {
            parent: self.traceparent(),
            state: self.state.as_ref(),
        }
    }
}

/// A request's trace context: its `traceparent` (lower-case hex digits and dashes, always a
/// valid header value) and the `tracestate` forwarded with it.
#[derive(Debug, Clone, Copy)]
pub struct TraceHeaders<'a> {
    pub parent: [u8; TRACEPARENT_LEN],
    pub state: Option<&'a HeaderValue>,
}

impl TraceHeaders<'_> {
    /// `traceparent` as a header value (for HTTP/2, whose requests hold `HeaderValue`s).
    pub fn parent_value(&self) -> HeaderValue {
        // Hex digits and dashes are always a valid header value.
        HeaderValue::from_bytes(&self.parent).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Reads a `traceparent` value: `Some((trace id, flags))` when it is valid, `None` when it
/// must be replaced. Valid means W3C's rules: two lower-case hex digits of version other
/// than `ff`; for version `00` exactly 55 characters, for a later version at least 55 with
/// a `-` after the flags; lower-case hex ids, neither all zero.
pub fn parse_traceparent(value: &[u8]) -> Option<(TraceId, u8)> {
    if value.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = hex_byte(&value[0..2])?;
    match version {
        0xff => return None,
        0x00 if value.len() != TRACEPARENT_LEN => return None,
        0x00 => {}
        _ if value.len() > TRACEPARENT_LEN && value[TRACEPARENT_LEN] != b'-' => return None,
        _ => {}
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let mut trace = [0u8; 16];
    for (i, byte) in trace.iter_mut().enumerate() {
        *byte = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
    }
    let mut parent_zero = true;
    for i in 0..8 {
        parent_zero &= hex_byte(&value[36 + 2 * i..38 + 2 * i])? == 0;
    }
    let flags = hex_byte(&value[53..55])?;
    if trace == [0; 16] || parent_zero {
        return None;
    }
    Some((TraceId(trace), flags))
}

/// A `tracestate` worth forwarding: printable ASCII (what a header value may hold), not
/// empty, at most `MAX_TRACESTATE` characters. Anything else is dropped, not forwarded.
pub fn parse_tracestate(value: &str) -> Option<HeaderValue> {
    let ok = !value.trim().is_empty()
        && value.len() <= MAX_TRACESTATE
        && value.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t');
    if !ok {
        return None;
    }
    HeaderValue::from_str(value).ok()
}

/// Two lower-case hex digits as a byte; upper case is invalid in a `traceparent`.
fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    match two {
        [high, low] => Some((digit(*high)? << 4) | digit(*low)?),
        _ => None,
    }
}

/// Each byte's two lower-case hex digits, so that a byte is one load and one store.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [DIGITS[byte >> 4], DIGITS[byte & 0x0f]];
        byte += 1;
    }
    pairs
};

/// `bytes` as lower-case hex into `out`, which is twice as long.
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(*byte)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_gives_its_trace_id_and_flags() {
        let (id, flags) = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(flags, 1);
        // A later version may carry more after the flags.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes";
        assert_eq!(parse_traceparent(later.as_bytes()).map(|(_, f)| f), Some(0));
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-011",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn courier_sends_the_trace_with_a_parent_id_of_its_own() {
        let (trace_id, flags) = parse_traceparent(VALID.as_bytes()).unwrap();
        let context = TraceContext {
            trace_id,
            flags,
            state: None,
        };
        let first = context.traceparent();
        let second = context.traceparent();
        for sent in [first, second] {
            let text = std::str::from_utf8(&sent).unwrap();
            assert!(text.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{text}");
            assert!(text.ends_with("-01"), "{text}");
            assert_ne!(&text[36..52], "00f067aa0ba902b7", "the parent id is courier's");
            assert!(parse_traceparent(&sent).is_some(), "{text}");
        }
        assert_ne!(first, second, "a new parent id per request");
        let started = TraceContext::start();
        let sent = started.traceparent();
        assert_eq!(parse_traceparent(&sent), Some((started.trace_id, 1)));
    }

    #[test]
    fn every_byte_is_written_as_two_lower_case_hex_digits() {
        let bytes: Vec<u8> = (0..=255).collect();
        let mut out = vec![0u8; 512];
        hex_into(&mut out, &bytes);
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn only_printable_tracestates_are_forwarded() {
        assert!(parse_tracestate("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7").is_some());
        assert!(parse_tracestate("a=b\r\nx-evil: 1").is_none());
        assert!(parse_tracestate("").is_none());
        assert!(parse_tracestate(&"a".repeat(513)).is_none());
        assert!(parse_tracestate("naïve=1").is_none());
    }
}
