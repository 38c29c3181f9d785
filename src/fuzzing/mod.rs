//! What must hold for any outside bytes, one function per parser: the cargo-fuzz targets in
//! `fuzz/` and the property tests in `tests/it/properties.rs` call these same checks, so both
//! hunt for the same failures. Each returns normally or panics with what broke.
//! Built with the `fuzzing` feature only; nothing in the worker calls it.
//!
//! One file a group of parsers: `message` (a queue item), `config` (config text, the numeric
//! settings, a REDIS_URL), `dlq` (dead letters, time bounds, the admin API's input, the page
//! script's reply), `http` (the main server's answer and its Retry-After) and `differential`
//! (courier's HTTP/1.1 client against hyper's). This file holds the scripted servers the two
//! HTTP checks connect to: `Pieces` for `http`, `Script` for `differential`.

mod config;
mod differential;
mod dlq;
mod http;
mod message;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use self::config::{config_text, redis_url, worker_numbers};
pub use self::differential::http_differential;
pub use self::dlq::{admin_input, dead_letter_record, dlq_header, dlq_page_reply, time_bound};
pub use self::http::{http_answer, retry_after};
pub use self::message::queue_item;

/// What polling a scripted stream comes to.
type Polled<T> = Poll<std::io::Result<T>>;

/// The server's side of a connection a check scripts: what it sends, and what it makes of each
/// write of the client's (it always takes the whole write).
trait Server: Unpin {
    /// Fills `buf` with what the server sends next, as `AsyncRead::poll_read` does.
    fn send(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Polled<()>;

    /// Hears one write of the client's.
    fn heard(&mut self, _written: &[u8]) {}
}

/// A `Server` as the byte stream a client under test connects over.
struct Stream<S>(S);

impl<S: Server> AsyncRead for Stream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Polled<()> {
        self.get_mut().0.send(cx, buf)
    }
}

impl<S: Server> AsyncWrite for Stream<S> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Polled<usize> {
        self.get_mut().0.heard(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Polled<()> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Polled<()> {
        Poll::Ready(Ok(()))
    }
}

/// A server that takes any write and sends `answer` back `piece` bytes at a time, then ends.
struct Pieces {
    answer: Vec<u8>,
    /// How much of `answer` was read, kept where the check can see it once the connection
    /// owns the stream.
    at: Arc<AtomicUsize>,
    piece: usize,
}

impl Server for Pieces {
    fn send(&mut self, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Polled<()> {
        let at = self.at.load(Ordering::Relaxed);
        let rest = self.answer.get(at..).unwrap_or_default();
        let n = rest.len().min(self.piece).min(buf.remaining());
        buf.put_slice(rest.get(..n).unwrap_or_default());
        self.at.store(at.saturating_add(n), Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

/// How a scripted stream ends once every answer has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    Reset,
    /// The server neither answers nor closes: the request timeout ends it.
    Pending,
}

/// A server's side of a connection, scripted: answer `k` is released when the `k`-th request
/// starts (each request goes out in one write), read `piece` bytes at a time; after the last,
/// the stream ends as `end` says. Writes are taken whole.
struct Script {
    answers: Vec<Vec<u8>>,
    /// Answers released (requests seen), and how far into them reading has come.
    released: usize,
    answer: usize,
    at: usize,
    piece: usize,
    end: End,
    waiting: Option<Waker>,
}

impl Script {
    fn new(answers: &[Vec<u8>], piece: usize, end: End) -> Script {
        Script {
            answers: answers.to_vec(),
            released: 0,
            answer: 0,
            at: 0,
            piece,
            end,
            waiting: None,
        }
    }
}

impl Server for Script {
    fn send(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Polled<()> {
        loop {
            if self.answer >= self.released {
                if self.answer < self.answers.len() {
                    // The server waits for the next request.
                    self.waiting = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                return match self.end {
                    End::Eof => Poll::Ready(Ok(())),
                    End::Reset => Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into())),
                    End::Pending => Poll::Pending,
                };
            }
            let (answer, at, piece) = (self.answer, self.at, self.piece);
            let rest = self.answers.get(answer).and_then(|a| a.get(at..)).unwrap_or_default();
            if rest.is_empty() {
                self.answer = answer.saturating_add(1);
                self.at = 0;
                continue;
            }
            let n = rest.len().min(piece).min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            self.at = at.saturating_add(n);
            return Poll::Ready(Ok(()));
        }
    }

    fn heard(&mut self, written: &[u8]) {
        // Each request goes out in one write: its start releases the next answer.
        if written.starts_with(b"POST /") || written.starts_with(b"HEAD /") {
            self.released = self.released.saturating_add(1).min(self.answers.len());
            if let Some(waker) = self.waiting.take() {
                waker.wake();
            }
        }
    }
}
