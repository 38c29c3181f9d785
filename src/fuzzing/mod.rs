//! What must hold for any outside bytes, one function per parser: the cargo-fuzz targets in
//! `fuzz/` and the property tests in `tests/it/properties.rs` call these same checks, so both
//! hunt for the same failures. Each returns normally or panics with what broke.
//! Built with the `fuzzing` feature only; nothing in the worker calls it.
//!
//! One file a group of parsers: `message` (a queue item), `config` (config text, the numeric
//! settings, a REDIS_URL), `dlq` (dead letters, time bounds, the admin API's input, the page
//! script's reply), `http` (the main server's answer and its Retry-After) and `differential`
//! (courier's HTTP/1.1 client against hyper's). This file holds the scripted server the two
//! HTTP checks connect to.

mod config;
mod differential;
mod dlq;
mod http;
mod message;

use std::pin::Pin;
use std::task::{Context, Poll};

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
