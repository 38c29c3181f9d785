//! HTTP/1.1 to the main server, written and read by the task that sends the request: the
//! request goes out in one write, and the answer is read into the connection's own buffer and
//! parsed there with `httparse` (the parser hyper uses). There is no connection task and no
//! channel between tasks, so a delivery on a kept connection costs its write, its read and its
//! parse (docs/performance.md measures what hyper's connection task cost on top).
//!
//! The answer is outside input. Its head is bounded (`MAX_HEAD`, `MAX_HEADERS`, `MAX_INTERIM`);
//! its body's framing follows RFC 9112 section 6.3 (Transfer-Encoding before Content-Length,
//! conflicting lengths refused, a body without either read until the server closes); chunked
//! framing is read as strictly as hyper reads it (`1*HEXDIG [ext] CRLF`, CRLF line ends only)
//! and bounded (`MAX_LINE`, `MAX_FRAMING`); and the body is read at most to
//! `MAX_RESPONSE_BODY`. An answer's head decides: once it has arrived, a body that breaks off,
//! stalls past the request timeout or ends in a TCP close without TLS `close_notify` leaves the
//! answer what its head said, marked incomplete, and the connection is not kept. The parsing is
//! sans-IO (`parse_head`, `BodyReader`) so that the fuzz targets and the property tests drive
//! exactly what the connection runs; `fuzz/fuzz_targets/http_differential.rs` reads the same
//! bytes with hyper's client and compares.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::trace::TraceHeaders;

/// The most of a response body courier reads. Only an error's text is of use, and the first
/// 200 characters of it at that: a main server that answers with megabytes costs 64 KiB.
pub(crate) const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// The most an answer's head (status line and headers) may take.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// The most headers an answer may carry (hyper's limit too).
pub(crate) const MAX_HEADERS: usize = 100;

/// The most interim (1xx) answers read before the final one.
pub(crate) const MAX_INTERIM: usize = 8;

/// The longest line of chunked framing: a chunk's size with its extensions, or a trailer.
pub(crate) const MAX_LINE: usize = 8 * 1024;

/// The most bytes of chunked framing (sizes, extensions, trailers) read for one answer, so
/// that a body of one-byte chunks cannot keep the worker reading framing. At most hyper's
/// bounds (16 KiB of extensions, 16 KiB of trailers), so that nothing hyper refuses for its
/// size courier reads.
pub(crate) const MAX_FRAMING: u64 = 16 * 1024;

/// The bounds an answer is read within: `Limits::DEFAULT` for the main server; the fuzz
/// harness makes them small enough for the fuzzer to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Status line and headers (`MAX_HEAD`).
    pub head: usize,
    /// Interim (1xx) answers before the final one (`MAX_INTERIM`).
    pub interim: usize,
    /// A line of chunked framing (`MAX_LINE`).
    pub line: usize,
    /// All chunked framing of one answer (`MAX_FRAMING`).
    pub framing: u64,
    /// The body read (`MAX_RESPONSE_BODY`).
    pub body: usize,
}

impl Limits {
    /// The bounds for the main server's answers.
    pub(crate) const DEFAULT: Limits = Limits {
        head: MAX_HEAD,
        interim: MAX_INTERIM,
        line: MAX_LINE,
        framing: MAX_FRAMING,
        body: MAX_RESPONSE_BODY,
    };
}

/// How much a read asks for.
const READ_SIZE: usize = 8 * 1024;

/// A request to the main server: its head and its whole body.
#[derive(Debug)]
pub struct Outgoing<'a> {
    pub method: Method,
    /// The path and query, origin form.
    pub path: &'a PathAndQuery,
    /// The headers every request of its kind carries, shared rather than cloned.
    pub headers: &'a HeaderMap,
    /// Headers of this request's own (the Idempotency-Key).
    pub extra: &'a [(&'a HeaderName, HeaderValue)],
    /// The trace context, sent after `extra`: `traceparent`, then `tracestate` if any.
    pub trace: Option<TraceHeaders<'a>>,
    pub body: Bytes,
}

/// Writes `request` as HTTP/1.1, head and body together, for one write. Header names and
/// values come from `http`'s types, which refuse CR, LF and NUL, or are a `traceparent`'s hex
/// digits and dashes, so nothing in them can end a line early. A Host, Content-Length or
/// Transfer-Encoding among `headers` is left out: the request states its own.
pub(crate) fn encode(out: &mut Vec<u8>, request: &Outgoing<'_>, host: &HeaderValue) {
    let Outgoing {
        method,
        path,
        headers,
        extra,
        trace,
        body,
    } = request;
    out.reserve(256usize.saturating_add(body.len()));
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    let own = extra.iter().map(|(name, value)| (*name, value));
    for (name, value) in headers.iter().chain(own) {
        if name == HOST || name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(trace) = trace {
        out.extend_from_slice(b"traceparent: ");
        out.extend_from_slice(&trace.parent);
        out.extend_from_slice(b"\r\n");
        if let Some(state) = trace.state {
            out.extend_from_slice(b"tracestate: ");
            out.extend_from_slice(state.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    if !body.is_empty() || !(method == Method::GET || method == Method::HEAD) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// What the server answered: status, headers, and, for answers other than 2xx, the body up to
/// `MAX_RESPONSE_BODY` (a success's body is read and dropped, its headers not kept).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The body was read to its end (or to the cap). False when it broke off, stalled past the
    /// request timeout, or ended in a TCP close without TLS `close_notify` (RFC 9112 section
    /// 9.8): the status stands, the kept text is only what arrived.
    pub complete: bool,
}

impl Answer {
    /// An answer whose head has arrived and none of its body.
    pub fn new(status: StatusCode, headers: HeaderMap) -> Answer {
        Answer {
            status,
            headers,
            body: Vec::new(),
            complete: false,
        }
    }
}

/// How much of an answer's body courier keeps, over HTTP/1.1 and HTTP/2 alike: an error's
/// first `cap` bytes, none of a success's; reading stops at the cap either way.
#[derive(Debug)]
pub(crate) struct KeptBody {
    keep: bool,
    seen: usize,
    cap: usize,
}

impl KeptBody {
    /// Nothing read yet of the body of an answer with `status`, up to `MAX_RESPONSE_BODY`.
    pub(crate) fn new(status: StatusCode) -> KeptBody {
        KeptBody::with_cap(status, MAX_RESPONSE_BODY)
    }

    /// Nothing read yet of the body of an answer with `status`, up to `cap` bytes.
    pub(crate) fn with_cap(status: StatusCode, cap: usize) -> KeptBody {
        KeptBody {
            keep: !status.is_success(),
            seen: 0,
            cap,
        }
    }

    /// Takes the body's next bytes into `into`: false once the cap is reached, where reading
    /// stops.
    pub(crate) fn take(&mut self, into: &mut Vec<u8>, data: &[u8]) -> bool {
        let room = self.cap.saturating_sub(self.seen);
        self.seen = self.seen.saturating_add(data.len());
        if self.keep {
            into.extend_from_slice(data.get(..data.len().min(room)).unwrap_or_default());
        }
        data.is_empty() || data.len() < room
    }
}

/// What is wrong with an answer courier cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AnswerError {
    #[error("the main server's answer is not HTTP/1.1 ({0})")]
    Malformed(httparse::Error),
    #[error("the main server's answer head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the main server's answer has more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("the main server sent more than {MAX_INTERIM} interim (1xx) answers")]
    TooManyInterim,
    #[error("the main server switched protocols (101) unasked")]
    SwitchedProtocols,
    #[error("the main server's answer has an invalid or conflicting Content-Length")]
    BadLength,
    #[error("the main server's HTTP/1.0 answer has a Transfer-Encoding")]
    EncodedHttp10,
    #[error("the main server's chunked body is malformed: {0}")]
    BadChunk(&'static str),
}

/// How an answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body: 204, 304, an answer to HEAD, or Content-Length 0.
    Empty,
    /// Content-Length bytes.
    Length(u64),
    Chunked,
    /// Everything until the server closes the connection.
    UntilClose,
}

/// An answer's head, as far as courier uses it.
#[derive(Debug)]
pub(crate) struct Head {
    pub status: StatusCode,
    /// The headers of an answer other than 2xx (its Retry-After and Location are read); a
    /// success's are not kept.
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once this answer's body is read.
    pub keep_alive: bool,
}

/// A complete head at the start of a buffer.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// An interim answer (1xx other than 101): another head follows.
    Interim,
    Final(Head),
}

/// Parses the answer head at the start of `buf`: `None` while it is incomplete, else how many
/// bytes it took and what it says. `to_head` is whether the request was a HEAD. A header folded
/// over lines (`obs-fold`) is read with each fold as one space (RFC 9112 section 5.2).
pub(crate) fn parse_head(buf: &[u8], to_head: bool, limits: &Limits) -> Result<Option<(usize, Parsed)>, AnswerError> {
    // Left uninitialised: httparse fills only the slots the answer uses, and writing 100 empty
    // ones first cost more than the parse of a typical answer.
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .allow_obsolete_multiline_headers_in_responses(true)
        .parse_response_with_uninit_headers(&mut answer, buf, &mut slots);
    let used = match parsed {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) if buf.len() >= limits.head => return Err(AnswerError::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(AnswerError::TooManyHeaders),
        Err(e) => return Err(AnswerError::Malformed(e)),
    };
    if used > limits.head {
        return Err(AnswerError::HeadTooLarge);
    }
    let code = answer.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| AnswerError::Malformed(httparse::Error::Status))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(AnswerError::SwitchedProtocols);
    }
    if status.is_informational() {
        return Ok(Some((used, Parsed::Interim)));
    }
    let http11 = answer.version == Some(1);

    let mut length: Option<u64> = None;
    let mut bad_length = false;
    let mut encoded = false;
    let mut chunked_last = false;
    let mut close = false;
    // Only the three headers that frame the answer are read (and unfolded) here.
    for header in answer.headers.iter() {
        let name = header.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            for part in list(&unfold(header.value)) {
                match decimal(part) {
                    Some(n) if length.is_none_or(|seen| seen == n) => length = Some(n),
                    _ => bad_length = true,
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encoded = true;
            // As hyper reads it: the last header's last item, an empty one included (so that
            // `chunked,` is not chunked but read to the close), and only in a text value.
            let value = unfold(header.value);
            chunked_last = value.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
                && list(&value).last().is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= list(&unfold(header.value)).any(|t| t.eq_ignore_ascii_case(b"close"));
        }
    }
    // RFC 9112 6.3: no body for these whatever the headers say (their lengths not even
    // checked, as hyper does); Transfer-Encoding over Content-Length (and the connection
    // closed after, as the two disagree); chunked only as the last coding, else the body runs
    // to the close.
    let (framing, reusable) = if to_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        (Framing::Empty, true)
    } else if encoded {
        if !http11 {
            return Err(AnswerError::EncodedHttp10);
        }
        if chunked_last {
            (Framing::Chunked, length.is_none() && !bad_length)
        } else {
            (Framing::UntilClose, false)
        }
    } else if bad_length {
        return Err(AnswerError::BadLength);
    } else {
        match length {
            Some(0) => (Framing::Empty, true),
            Some(n) => (Framing::Length(n), true),
            None => (Framing::UntilClose, false),
        }
    };
    let headers = if status.is_success() {
        HeaderMap::new()
    } else {
        let mut map = HeaderMap::with_capacity(answer.headers.len());
        for header in answer.headers.iter() {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(header.name.as_bytes()),
                HeaderValue::from_bytes(&unfold(header.value)),
            ) {
                map.append(name, value);
            }
        }
        map
    };
    Ok(Some((
        used,
        Parsed::Final(Head {
            status,
            headers,
            framing,
            // HTTP/1.0 keep-alive is not offered: such a server gets a new connection each time.
            keep_alive: reusable && http11 && !close,
        }),
    )))
}

/// A header value with each `obs-fold` (a line break and the spaces and tabs around it)
/// replaced by one space, as hyper does; borrowed as it is when it has none (httparse leaves
/// line breaks in a value only for a fold).
fn unfold(value: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !value.contains(&b'\n') {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = Vec::with_capacity(value.len());
    let mut folding = false;
    for &b in value {
        match b {
            b'\r' | b'\n' => {
                folding = true;
                while matches!(out.last(), Some(b' ' | b'\t')) {
                    out.pop();
                }
            }
            // The spaces and tabs that begin a continuation line belong to the fold.
            b' ' | b'\t' if folding => {}
            _ => {
                if folding {
                    out.push(b' ');
                    folding = false;
                }
                out.push(b);
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A header's comma-separated items, each without the spaces and tabs around it.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i.saturating_add(1));
    bytes.get(start..end).unwrap_or_default()
}

/// A Content-Length: ASCII digits only, at most `u64::MAX - 2` (hyper's largest length).
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits
        .iter()
        .try_fold(0u64, |n, &d| {
            let digit = d.checked_sub(b'0').filter(|d| *d <= 9)?;
            n.checked_mul(10)?.checked_add(u64::from(digit))
        })
        .filter(|n| *n <= u64::MAX - 2)
}

/// Reads a body by its framing from whatever bytes arrive, one step at a time.
#[derive(Debug)]
pub(crate) struct BodyReader {
    state: State,
    framing_read: u64,
    trailers: usize,
    max_line: usize,
    max_framing: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailer,
    UntilClose,
    Done,
}

impl BodyReader {
    /// A reader for a body framed as `framing` says, nothing of it read yet.
    pub(crate) fn new(framing: Framing, limits: &Limits) -> BodyReader {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        BodyReader {
            state,
            framing_read: 0,
            trailers: 0,
            max_line: limits.line,
            max_framing: limits.framing,
        }
    }

    /// The whole body has been read.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes what it can from the start of `input`: how many bytes it used, and the body's
    /// data among them. Using none means it needs more bytes than `input` holds.
    pub(crate) fn step<'a>(&mut self, input: &'a [u8]) -> Result<(usize, &'a [u8]), AnswerError> {
        match self.state {
            State::Done => Ok((0, &[])),
            State::Length(left) | State::ChunkData(left) => {
                let n = usize::try_from(left).map_or(input.len(), |left| left.min(input.len()));
                let left = left.saturating_sub(u64::try_from(n).unwrap_or(u64::MAX));
                self.state = match (self.state, left) {
                    (State::Length(_), 0) => State::Done,
                    (State::Length(_), left) => State::Length(left),
                    (_, 0) => State::ChunkEnd,
                    (_, left) => State::ChunkData(left),
                };
                Ok((n, input.get(..n).unwrap_or_default()))
            }
            // A line over the bound is refused whether it arrived whole or in pieces.
            State::ChunkSize => match chunk_size_line(input).map_err(AnswerError::BadChunk)? {
                Some((used, _)) if used > self.max_line => Err(AnswerError::BadChunk("a chunk size line is too long")),
                Some((used, size)) => {
                    self.framing(used)?;
                    self.state = if size == 0 {
                        State::Trailer
                    } else {
                        State::ChunkData(size)
                    };
                    Ok((used, &[]))
                }
                None if input.len() >= self.max_line => Err(AnswerError::BadChunk("a chunk size line is too long")),
                None => Ok((0, &[])),
            },
            State::ChunkEnd => match input {
                [b'\r', b'\n', ..] => {
                    self.framing(2)?;
                    self.state = State::ChunkSize;
                    Ok((2, &[]))
                }
                [] | [b'\r'] => Ok((0, &[])),
                _ => Err(AnswerError::BadChunk("a chunk's data is not followed by CRLF")),
            },
            // RFC 9112 7.1.2: header fields, each line ending in CRLF, then an empty line.
            State::Trailer => {
                let Some(end) = input.iter().position(|&b| b == b'\n') else {
                    if input.len() >= self.max_line {
                        return Err(AnswerError::BadChunk("a trailer line is too long"));
                    }
                    if input.split_last().is_some_and(|(_, before)| before.contains(&b'\r')) {
                        return Err(AnswerError::BadChunk("a trailer line has a CR without LF"));
                    }
                    return Ok((0, &[]));
                };
                let line = match input.get(..end).and_then(|l| l.strip_suffix(b"\r")) {
                    Some(line) if !line.contains(&b'\r') => line,
                    Some(_) => return Err(AnswerError::BadChunk("a trailer line has a CR without LF")),
                    None => return Err(AnswerError::BadChunk("a trailer line ends in a bare LF")),
                };
                let used = end.saturating_add(1);
                if used > self.max_line {
                    return Err(AnswerError::BadChunk("a trailer line is too long"));
                }
                self.framing(used)?;
                if line.is_empty() {
                    self.state = State::Done;
                } else {
                    self.trailers = self.trailers.saturating_add(1);
                    if self.trailers > MAX_HEADERS {
                        return Err(AnswerError::BadChunk("too many trailers"));
                    }
                    if !is_field(line) {
                        return Err(AnswerError::BadChunk("a trailer is not a header field"));
                    }
                }
                Ok((used, &[]))
            }
            State::UntilClose => Ok((input.len(), input)),
        }
    }

    /// The server closed the connection: whether that completes the body.
    pub(crate) fn closed(&mut self) -> bool {
        if self.state == State::UntilClose {
            self.state = State::Done;
        }
        self.is_done()
    }

    fn framing(&mut self, used: usize) -> Result<(), AnswerError> {
        self.framing_read = self
            .framing_read
            .saturating_add(u64::try_from(used).unwrap_or(u64::MAX));
        if self.framing_read > self.max_framing {
            return Err(AnswerError::BadChunk("too much chunk framing"));
        }
        Ok(())
    }
}

/// A chunk-size line at the start of `input`, read as hyper reads it: `1*HEXDIG`, then spaces
/// or tabs, then an optional `;` extension of any bytes but CR and LF, then CRLF. `None` while
/// incomplete; else how many bytes it took and the size. Refused: no digit first, a size over
/// 64 bits, a bare LF anywhere, a CR not followed by LF, anything else after the size.
fn chunk_size_line(input: &[u8]) -> Result<Option<(usize, u64)>, &'static str> {
    let mut size = 0u64;
    let mut at = 0usize;
    while let Some(digit) = input.get(at).and_then(|&b| char::from(b).to_digit(16)) {
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(digit)))
            .ok_or("a chunk size is larger than 64 bits")?;
        at = at.saturating_add(1);
    }
    if at == 0 {
        return if input.is_empty() {
            Ok(None)
        } else {
            Err("a chunk size line does not start with a hex digit")
        };
    }
    while matches!(input.get(at), Some(b' ' | b'\t')) {
        at = at.saturating_add(1);
    }
    if input.get(at) == Some(&b';') {
        match input
            .get(at..)
            .and_then(|rest| rest.iter().position(|&b| matches!(b, b'\r' | b'\n')))
        {
            Some(end) => at = at.saturating_add(end),
            None => return Ok(None),
        }
        if input.get(at) == Some(&b'\n') {
            return Err("a chunk extension contains a bare LF");
        }
    }
    match (input.get(at), input.get(at.saturating_add(1))) {
        (None, _) | (Some(b'\r'), None) => Ok(None),
        (Some(b'\r'), Some(b'\n')) => Ok(Some((at.saturating_add(2), size))),
        (Some(b'\r'), Some(_)) => Err("a chunk size line has a CR without LF"),
        (Some(b'\n'), _) => Err("a chunk size line ends in a bare LF"),
        (Some(_), _) => Err("a chunk size is not hexadecimal"),
    }
}

/// A header field line: a token, a colon, then a value of visible characters, spaces and tabs
/// (what httparse takes, and so what hyper takes in trailers).
fn is_field(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let (name, value) = line.split_at(colon);
    !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        && value.iter().skip(1).all(|&b| b == b'\t' || (b >= b' ' && b != 0x7f))
}

/// A TLS or plain TCP stream (any byte stream, for the fuzz target).
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An answer read to its end or to where courier stopped reading.
#[derive(Debug)]
pub(crate) struct Exchanged {
    pub answer: Answer,
    /// The answer was read to its end and the server keeps the connection open: it can take
    /// the next request.
    pub reusable: bool,
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The connection closed or broke before any byte of an answer arrived. On a kept
    /// connection, the server may have closed it as the request went out.
    Unanswered(io::Error),
    /// It broke in the middle of the answer's head.
    Broken(io::Error),
    Answer(AnswerError),
}

/// One HTTP/1.1 connection: its stream, the bytes read from it and not yet parsed
/// (`buf[start..]`), the buffer a request is written from, and the bounds its answers are
/// read within.
pub(crate) struct Connection {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    start: usize,
    out: Vec<u8>,
    limits: Limits,
}

impl Connection {
    /// A connection over `io`, connected (and through TLS) already.
    pub(crate) fn new(io: impl Io + 'static) -> Connection {
        Connection::with_limits(io, Limits::DEFAULT)
    }

    /// A connection over `io` whose answers are read within `limits`.
    pub(crate) fn with_limits(io: impl Io + 'static, limits: Limits) -> Connection {
        Connection {
            io: Box::new(io),
            buf: Vec::new(),
            start: 0,
            out: Vec::new(),
            limits,
        }
    }

    /// Whether a kept connection can take a request: the server has neither closed it nor
    /// sent anything unasked. Looks without waiting; no system call when nothing arrived.
    pub(crate) fn is_open(&mut self) -> bool {
        if self.start < self.buf.len() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        Pin::new(&mut *self.io).poll_read(&mut cx, &mut probe).is_pending()
    }

    /// Sends `request` and reads the answer. Once a final answer's head has arrived, the
    /// answer is in `arrived`, its body filling in: a caller whose deadline passes first takes
    /// it from there, as the head decides (and the connection goes with the dropped exchange).
    pub(crate) async fn exchange(
        &mut self,
        request: &Outgoing<'_>,
        host: &HeaderValue,
        arrived: &mut Option<Answer>,
    ) -> Result<Exchanged, Failure> {
        self.out.clear();
        encode(&mut self.out, request, host);
        let written = self.write_out().await;
        if self.out.capacity() > 4 * READ_SIZE {
            self.out = Vec::new();
        }
        // The server may answer before taking the whole request (a 413 or 401 to a large
        // body, then a close): its answer stands, and the connection is not used again.
        let whole = matches!(written, Ok(true));
        let head = match (self.read_head(request.method == Method::HEAD).await, written) {
            (Ok(head), _) => head,
            // Nothing came back after a failed write: the write's error is the failure.
            (Err(Failure::Unanswered(_)), Err(e)) => return Err(Failure::Unanswered(e)),
            (Err(failure), _) => return Err(failure),
        };
        let mut reader = BodyReader::new(head.framing, &self.limits);
        let mut kept = KeptBody::with_cap(head.status, self.limits.body);
        let status = head.status;
        let answer = arrived.insert(Answer::new(head.status, head.headers));
        let (complete, ended) = loop {
            if reader.is_done() {
                break (true, true);
            }
            let (used, data) = match reader.step(self.buf.get(self.start..).unwrap_or_default()) {
                Ok(step) => step,
                Err(e) => {
                    // The answer's head arrived: a body that breaks off does not change it.
                    tracing::debug!(error = %e, "main server's answer broke off");
                    break (false, false);
                }
            };
            if !kept.take(&mut answer.body, data) {
                // The cap: as much as courier reads, not the end of the body.
                break (true, false);
            }
            self.consume(used);
            if used > 0 {
                continue;
            }
            match self.fill().await {
                Ok(0) => {
                    let done = reader.closed();
                    break (done, done);
                }
                Ok(_) => {}
                // RFC 9112 9.8: a TLS connection closed without close_notify may have been cut
                // by anyone on the way, so a body read to the close is incomplete.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    tracing::debug!("main server closed the connection without TLS close_notify");
                    break (false, false);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "main server's answer broke off");
                    break (false, false);
                }
            }
        };
        answer.complete = complete;
        let reusable = ended && whole && head.keep_alive && self.start == self.buf.len();
        if reusable && self.buf.capacity() > 4 * READ_SIZE {
            self.buf = Vec::new();
            self.start = 0;
        }
        let answer = arrived.take().unwrap_or_else(|| Answer::new(status, HeaderMap::new()));
        Ok(Exchanged { answer, reusable })
    }

    /// Writes the request in `out`. While the server takes no more of it, reads what the server
    /// sends: a server may answer early (a 413 or 401 to a large body) and stop reading, and its
    /// answer must not be lost to the write's failure. True when the request went out whole,
    /// false when a final answer arrived first. No read is tried while writes go through, so
    /// a request that fits the socket's buffer costs its write alone.
    async fn write_out(&mut self) -> io::Result<bool> {
        let mut written = 0usize;
        let mut reading = true;
        std::future::poll_fn(|cx| loop {
            let Some(rest) = self.out.get(written..).filter(|rest| !rest.is_empty()) else {
                return Pin::new(&mut *self.io).poll_flush(cx).map_ok(|()| true);
            };
            match Pin::new(&mut *self.io).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    written = written.saturating_add(n);
                    continue;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if !reading => return Poll::Pending,
                Poll::Pending => {}
            }
            match self.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                // The read side ended: the write (or the read of the head after it) tells why.
                Poll::Ready(Ok(0) | Err(_)) => reading = false,
                Poll::Ready(Ok(_)) => {
                    if self.answer_arrived() {
                        return Poll::Ready(Ok(false));
                    }
                }
            }
        })
        .await
    }

    /// Whether what has been read holds a final answer's head (or an answer courier refuses),
    /// after any interim ones.
    fn answer_arrived(&self) -> bool {
        let mut at = self.start;
        for _ in 0..=self.limits.interim {
            match parse_head(self.buf.get(at..).unwrap_or_default(), false, &self.limits) {
                Ok(Some((used, Parsed::Interim))) => at = at.saturating_add(used),
                Ok(None) => return false,
                Ok(Some((_, Parsed::Final(_)))) | Err(_) => return true,
            }
        }
        true
    }

    /// Reads until a final answer's head is complete, skipping interim ones.
    async fn read_head(&mut self, to_head: bool) -> Result<Head, Failure> {
        let mut interim = 0usize;
        loop {
            match parse_head(self.buf.get(self.start..).unwrap_or_default(), to_head, &self.limits)
                .map_err(Failure::Answer)?
            {
                Some((used, Parsed::Final(head))) => {
                    self.consume(used);
                    return Ok(head);
                }
                Some((used, Parsed::Interim)) => {
                    self.consume(used);
                    interim = interim.saturating_add(1);
                    if interim > self.limits.interim {
                        return Err(Failure::Answer(AnswerError::TooManyInterim));
                    }
                    continue;
                }
                None => {}
            }
            let nothing_yet = interim == 0 && self.start == self.buf.len();
            let failed = match self.fill().await {
                Ok(0) => io::Error::new(io::ErrorKind::UnexpectedEof, "the main server closed the connection"),
                Ok(_) => continue,
                Err(e) => e,
            };
            return Err(if nothing_yet {
                Failure::Unanswered(failed)
            } else {
                Failure::Broken(failed)
            });
        }
    }

    fn consume(&mut self, used: usize) {
        self.start = self.start.saturating_add(used).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Reads what has arrived, up to `READ_SIZE` more: how many bytes, 0 at the end.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(READ_SIZE);
        self.io.read_buf(&mut self.buf).await
    }

    /// `fill` as a poll, for reading while a write waits (rare: the buffer is zeroed first).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let filled = self.buf.len();
        self.buf.resize(filled.saturating_add(READ_SIZE), 0);
        let mut read = ReadBuf::new(self.buf.get_mut(filled..).unwrap_or_default());
        let polled = Pin::new(&mut *self.io).poll_read(cx, &mut read);
        let n = read.filled().len();
        self.buf.truncate(filled.saturating_add(n));
        polled.map_ok(|()| n)
    }
}

impl Drop for Connection {
    /// Ends the connection as hyper's connection task did: TLS `close_notify`, then the TCP
    /// write side shut, so the server sees a clean close rather than a cut. One try without
    /// waiting: a connection that cannot take those bytes now is closed all the same.
    fn drop(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        let _ = Pin::new(&mut *self.io).poll_shutdown(&mut cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<(usize, Parsed)>, AnswerError> {
        parse_head(text.as_bytes(), false, &Limits::DEFAULT)
    }

    fn final_head(text: &str) -> Head {
        match head(text) {
            Ok(Some((used, Parsed::Final(head)))) => {
                assert_eq!(used, text.len(), "{text:?}: the whole head");
                head
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }

    /// Reads a body fed in pieces of `piece` bytes; the data and whether it completed.
    fn read_body(framing: Framing, bytes: &[u8], piece: usize) -> Result<(Vec<u8>, bool, usize), AnswerError> {
        let mut reader = BodyReader::new(framing, &Limits::DEFAULT);
        let mut data = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut fed = 0;
        loop {
            if reader.is_done() {
                return Ok((data, true, buf.len() + bytes.len() - fed));
            }
            let (used, got) = reader.step(&buf)?;
            data.extend_from_slice(got);
            buf.drain(..used);
            if used > 0 {
                continue;
            }
            if fed == bytes.len() {
                let done = reader.closed();
                return Ok((data, done, buf.len()));
            }
            let next = (fed + piece).min(bytes.len());
            buf.extend_from_slice(&bytes[fed..next]);
            fed = next;
        }
    }

    #[test]
    fn the_request_is_one_head_and_its_body() {
        let path = PathAndQuery::from_static("/api/internal/messages/deliver");
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        let key = HeaderName::from_static("idempotency-key");
        let state = HeaderValue::from_static("congo=t61rcWkgMzE");
        let request = Outgoing {
            method: Method::POST,
            path: &path,
            headers: &headers,
            extra: &[(&key, HeaderValue::from_static("m-1"))],
            trace: Some(TraceHeaders {
                parent: *b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                state: Some(&state),
            }),
            body: Bytes::from_static(b"{\"a\":1}"),
        };
        let mut out = Vec::new();
        encode(&mut out, &request, &HeaderValue::from_static("main:8443"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /api/internal/messages/deliver HTTP/1.1\r\nhost: main:8443\r\n\
             content-type: application/json\r\nidempotency-key: m-1\r\n\
             traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
             tracestate: congo=t61rcWkgMzE\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
        );

        let get = Outgoing {
            method: Method::GET,
            body: Bytes::new(),
            extra: &[],
            trace: None,
            ..request
        };
        let mut out = Vec::new();
        encode(&mut out, &get, &HeaderValue::from_static("main"));
        assert!(
            !String::from_utf8(out).unwrap().contains("content-length"),
            "a GET has no length"
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
                Framing::Length(12),
                true,
            ),
            ("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", Framing::Empty, true),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            // Both: Transfer-Encoding wins and the connection is not kept.
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::Chunked,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Framing::UntilClose,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n",
                Framing::UntilClose,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::UntilClose, false),
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, Close\r\n\r\n",
                Framing::Length(2),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
                Framing::Length(2),
                false,
            ),
        ];
        for (text, framing, keep_alive) in cases {
            let head = final_head(text);
            assert_eq!((head.framing, head.keep_alive), (framing, keep_alive), "{text:?}");
        }
        let to_head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", true, &Limits::DEFAULT);
        assert!(matches!(
            to_head,
            Ok(Some((
                _,
                Parsed::Final(Head {
                    framing: Framing::Empty,
                    ..
                })
            )))
        ));
    }

    #[test]
    fn bad_heads_are_named() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
                AnswerError::BadLength,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                AnswerError::BadLength,
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", AnswerError::BadLength),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
                AnswerError::BadLength,
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n", AnswerError::BadLength),
            (
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                AnswerError::EncodedHttp10,
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                AnswerError::SwitchedProtocols,
            ),
            (
                "HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
                AnswerError::Malformed(httparse::Error::HeaderName),
            ),
            (
                "HTTP/2 200 OK\r\n\r\n",
                AnswerError::Malformed(httparse::Error::Version),
            ),
        ];
        for (text, error) in cases {
            assert_eq!(head(text).err(), Some(error), "{text:?}");
        }
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "x: y\r\n".repeat(MAX_HEADERS + 1));
        assert_eq!(head(&many).err(), Some(AnswerError::TooManyHeaders));
        let long = format!("HTTP/1.1 200 OK\r\nx: {}", "y".repeat(MAX_HEAD));
        assert_eq!(head(&long).err(), Some(AnswerError::HeadTooLarge));
        assert!(
            matches!(head(&long[..MAX_HEAD / 2]), Ok(None)),
            "incomplete, not yet too large"
        );
    }

    #[test]
    fn interim_answers_are_skipped_and_only_errors_keep_headers() {
        let text = "HTTP/1.1 100 Continue\r\n\r\n\
                    HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n";
        let Ok(Some((used, Parsed::Interim))) = head(text) else {
            panic!("an interim answer first");
        };
        let busy = final_head(&text[used..]);
        assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers.get("retry-after").map(|v| v.as_bytes()), Some(&b"7"[..]));
        let ok = final_head("HTTP/1.1 200 OK\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n");
        assert!(ok.headers.is_empty(), "a success's headers are not kept");
    }

    #[test]
    fn chunked_bodies_read_alike_in_any_pieces() {
        let body = b"5;ext=\"a b\"\r\nhello\r\n0006\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for piece in 1..body.len() {
            let (data, done, left) = read_body(Framing::Chunked, body, piece).unwrap();
            assert_eq!(
                (data.as_slice(), done),
                (&b"hello world"[..], true),
                "pieces of {piece}"
            );
            assert_eq!(left, 4, "pieces of {piece}: the bytes after the body are left");
        }
        let (data, done, _) = read_body(Framing::Length(4), b"abcdef", 1).unwrap();
        assert_eq!((data.as_slice(), done), (&b"abcd"[..], true));
        let (data, done, _) = read_body(Framing::UntilClose, b"to the end", 3).unwrap();
        assert_eq!((data.as_slice(), done), (&b"to the end"[..], true));
        let (data, done, _) = read_body(Framing::Length(9), b"short", 2).unwrap();
        assert_eq!((data.as_slice(), done), (&b"short"[..], false), "cut off");
    }

    #[test]
    fn bad_chunked_framing_is_refused() {
        let bad: [&[u8]; 4] = [
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n",
            b"ffffffffffffffffff\r\n",
            b"1\r\na\r\n",
        ];
        for body in bad.iter().take(3) {
            assert!(read_body(Framing::Chunked, body, 64).is_err(), "{body:?}");
        }
        // Incomplete rather than wrong: the connection closing ends it unfinished.
        assert!(matches!(read_body(Framing::Chunked, bad[3], 64), Ok((_, false, _))));
        let long_size = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(MAX_LINE));
        for piece in [4096, long_size.len()] {
            assert_eq!(
                read_body(Framing::Chunked, long_size.as_bytes(), piece).err(),
                Some(AnswerError::BadChunk("a chunk size line is too long")),
                "in pieces of {piece}"
            );
        }
        let long_trailer = format!("0\r\nT: {}\r\n\r\n", "e".repeat(MAX_LINE));
        for piece in [4096, long_trailer.len()] {
            assert_eq!(
                read_body(Framing::Chunked, long_trailer.as_bytes(), piece).err(),
                Some(AnswerError::BadChunk("a trailer line is too long")),
                "in pieces of {piece}"
            );
        }
        let tiny: Vec<u8> = b"1;e\r\na\r\n".repeat(usize::try_from(MAX_FRAMING).unwrap() / 6);
        assert_eq!(
            read_body(Framing::Chunked, &tiny, 4096).err(),
            Some(AnswerError::BadChunk("too much chunk framing"))
        );
    }

    #[test]
    fn chunk_size_lines_are_read_as_strictly_as_hyper_reads_them() {
        let good: [(&[u8], u64); 6] = [
            (b"5\r\nhello\r\n0\r\n\r\n", 5),
            (b"5 \t\r\nhello\r\n0\r\n\r\n", 5),
            (b"5 ;a=b\r\nhello\r\n0\r\n\r\n", 5),
            (b"5;\x80\"\t\r\nhello\r\n0\r\n\r\n", 5),
            (b"0000000000000000000005\r\nhello\r\n0\r\n\r\n", 5),
            (b"A\r\n0123456789\r\n0\r\n\r\n", 10),
        ];
        for (body, size) in good {
            let (data, done, left) = read_body(Framing::Chunked, body, 1).unwrap();
            assert_eq!((data.len() as u64, done, left), (size, true, 0), "{body:?}");
        }
        // What hyper refuses ("missing size digit", "chunk extension contains newline",
        // "Invalid Size", "overflow", "Invalid chunk size LF"), in whatever pieces it arrives.
        let bad: [(&[u8], &str); 10] = [
            (b"\r\n\r\n", "does not start with a hex digit"),
            (b";ext\r\nhello\r\n", "does not start with a hex digit"),
            (b" 5\r\nhello\r\n", "does not start with a hex digit"),
            (b"5;a\nb\r\nhello\r\n", "extension contains a bare LF"),
            (b"5\nhello\r\n", "ends in a bare LF"),
            (b"5 5\r\nhello\r\n", "not hexadecimal"),
            (b"5x\r\nhello\r\n", "not hexadecimal"),
            (b"5\rhello\r\n", "CR without LF"),
            (b"10000000000000000\r\n", "larger than 64 bits"),
            (b"5\r\nhello\n0\r\n\r\n", "not followed by CRLF"),
        ];
        for (body, named) in bad {
            for piece in [1, 3, 64] {
                match read_body(Framing::Chunked, body, piece) {
                    Err(AnswerError::BadChunk(why)) => assert!(why.contains(named), "{body:?}: {why}"),
                    other => panic!("{body:?} in pieces of {piece}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn trailers_are_header_fields_on_crlf_lines() {
        let (data, done, _) = read_body(Framing::Chunked, b"1\r\na\r\n0\r\nA: b\r\nC:\td e\r\n\r\n", 2).unwrap();
        assert_eq!((data.as_slice(), done), (&b"a"[..], true));
        let bad: [&[u8]; 5] = [
            b"0\r\nA: b\n\r\n",
            b"0\r\n\n",
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n folded: x\r\n\r\n",
            b"0\r\nA: b\rc\r\n\r\n",
        ];
        for body in bad {
            assert!(
                matches!(read_body(Framing::Chunked, body, 1), Err(AnswerError::BadChunk(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn a_folded_header_reads_as_one_line_with_a_space() {
        let busy = final_head(
            "HTTP/1.1 503 Busy\r\nRetry-After:\r\n 7\r\nX-Why: over\r\n \t loaded \r\n\
             Content-Length: 0\r\n\r\n",
        );
        assert_eq!(busy.headers.get("retry-after").map(|v| v.as_bytes()), Some(&b"7"[..]));
        assert_eq!(
            busy.headers.get("x-why").map(|v| v.as_bytes()),
            Some(&b"over loaded"[..])
        );
        assert_eq!(busy.framing, Framing::Empty);
        let folded_length = final_head("HTTP/1.1 500 Oops\r\nContent-Length:\r\n 3\r\n\r\n");
        assert_eq!(folded_length.framing, Framing::Length(3));
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551614\r\n\r\n").err(),
            Some(AnswerError::BadLength),
            "over hyper's largest length"
        );
    }
}
