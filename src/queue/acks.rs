//! The acknowledging task of one queue (`Acks`): the LREMs of delivered messages, gathered
//! into pipelines.

use bytes::Bytes;

use super::{Conn, QueueError};

/// The most acks sent in one pipeline.
const MAX_ACK_BATCH: usize = 256;

/// A delivered message to remove from processing, and where to say whether it was there.
type AckRequest = (Bytes, tokio::sync::oneshot::Sender<Result<bool, QueueError>>);

/// Acknowledgements for one queue, gathered: every LREM the delivery tasks ask for while the
/// previous batch is on its way, or in the runtime's next turn, goes out in the next pipeline,
/// one write and one read for all of them instead of one each. Each caller still learns
/// whether its message was there, and a batch that fails fails each of its callers, who try
/// again as before.
///
/// Every LREM that settles a message (here and in the retry, dead-letter and release
/// scripts) searches from the tail of the processing list: claims are pushed at the head, so
/// the tail holds the oldest, which are the deliveries most likely to be finishing. From the
/// head, Redis compared each ack against most of the list (64 messages at concurrency 64).
#[derive(Clone)]
pub struct Acks {
    tx: tokio::sync::mpsc::UnboundedSender<AckRequest>,
}

impl Acks {
    /// Removes a delivered message from the processing list; true when it was there.
    pub async fn ack(&self, raw: &Bytes) -> Result<bool, QueueError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || {
            QueueError::Redis(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the acknowledging task has stopped",
            )))
        };
        self.tx.send((raw.clone(), reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Starts the task that sends the LREMs asked of `Acks` for the list `key` on `conn`.
pub(super) fn spawn(mut conn: Conn, key: String) -> Acks {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<AckRequest>();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(MAX_ACK_BATCH);
        while rx.recv_many(&mut batch, MAX_ACK_BATCH).await > 0 {
            // One more turn of the runtime before sending: the answers that arrive with the
            // next poll of the network go in the same pipeline.
            tokio::task::yield_now().await;
            while batch.len() < MAX_ACK_BATCH {
                match rx.try_recv() {
                    Ok(ack) => batch.push(ack),
                    Err(_) => break,
                }
            }
            // Each command sized up front: growing them argument by argument costs more
            // than the rest of the acknowledgement.
            let mut pipe = redis::Pipeline::with_capacity(batch.len());
            for (raw, _) in &batch {
                let size = "LREM".len() + key.len() + "-1".len() + raw.len();
                let mut lrem = redis::Cmd::with_capacity(4, size);
                lrem.arg("LREM").arg(&key).arg("-1").arg(raw.as_ref());
                pipe.add_command(lrem);
            }
            match pipe.query_async::<Vec<i64>>(&mut conn).await {
                Ok(removed) => {
                    let mut removed = removed.into_iter();
                    for (_, reply) in batch.drain(..) {
                        let _ = reply.send(Ok(removed.next().unwrap_or(0) > 0));
                    }
                }
                Err(e) => {
                    for (_, reply) in batch.drain(..) {
                        let _ = reply.send(Err(QueueError::Redis(e.clone())));
                    }
                }
            }
        }
    });
    Acks { tx }
}
