//! The status reporter: sends the main server a status update for each retried or
//! dead-lettered message, holding them while the circuit is not closed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::settle::StatusReport;
use crate::breaker::State;
use crate::delivery::Deliverer;
use crate::metrics::Metrics;

/// Messages whose status update waits (the circuit is not closed, or a try failed), one
/// update per message; past this new ones are dropped (and counted).
const WAITING_MESSAGES: usize = 4096;
/// Status updates the settler has handed over and the reporter not yet taken; past this the
/// settler drops new ones (and counts them) rather than wait.
const HANDED_OVER: usize = 4096;

/// The settler's end and the reporter's end of the hand-over of status updates.
pub(super) fn channel() -> (mpsc::Sender<StatusReport>, mpsc::Receiver<StatusReport>) {
    mpsc::channel(HANDED_OVER)
}

/// The status updates to send, and the circuit's state they wait on.
pub(super) struct Statuses {
    pub(super) reports: mpsc::Receiver<StatusReport>,
    pub(super) circuit: watch::Receiver<State>,
}

/// Sends status updates with at most `limit` under way at once. While the circuit breaker is
/// not closed (open, or probing a server that may still be down) the updates wait, one per
/// message (the latest wins), and go out when it closes; past `WAITING_MESSAGES` messages
/// waiting, new ones are dropped and counted. An update the server did not take (unreachable,
/// 429, 5xx) waits again, and so do all the others: after 1 s (then 2, 4, ... up to a minute)
/// one goes alone as a probe, and only when the server takes it do the rest follow. A server
/// that fails status updates while taking deliveries gets one a second or less, not every
/// update again and again. An update is given up (counted as dropped) after `PUT_TRIES`.
pub(super) async fn report_statuses(
    deliverer: Arc<Deliverer>,
    metrics: Arc<Metrics>,
    statuses: Statuses,
    limit: usize,
) {
    let Statuses {
        mut reports,
        mut circuit,
    } = statuses;
    let slots = Arc::new(Semaphore::new(limit));
    let tasks = TaskTracker::new();
    let mut waiting: HashMap<String, Waiting> = HashMap::new();
    let (done, mut answers) = mpsc::unbounded_channel::<(Waiting, bool)>();
    let mut open_circuit = true;
    // After an update the server did not take: nothing goes before this, then one alone.
    let mut paused: Option<tokio::time::Instant> = None;
    let mut backoff = PUT_RETRY_FIRST;
    let mut probing = false;
    loop {
        let closing = tokio::select! {
            report = reports.recv() => match report {
                Some(report) => {
                    if waiting.len() >= WAITING_MESSAGES && !waiting.contains_key(&report.message_id) {
                        metrics.status_update("dropped");
                    } else {
                        waiting.insert(report.message_id.clone(), Waiting { report, tries: 0 });
                    }
                    false
                }
                None => true,
            },
            Some((update, taken)) = answers.recv() => {
                probing = false;
                if taken {
                    paused = None;
                    backoff = PUT_RETRY_FIRST;
                } else {
                    paused = Some(tokio::time::Instant::now() + backoff);
                    backoff = backoff.saturating_mul(2).min(PUT_RETRY_LONGEST);
                    // Kept, unless a newer update for the message is already waiting.
                    if update.tries >= PUT_TRIES || waiting.len() >= WAITING_MESSAGES {
                        metrics.status_update("dropped");
                    } else {
                        waiting.entry(update.report.message_id.clone()).or_insert(update);
                    }
                }
                false
            }
            changed = circuit.changed(), if open_circuit => {
                open_circuit = changed.is_ok();
                if *circuit.borrow() == State::Closed {
                    // The server answers deliveries again: the held updates go now.
                    paused = None;
                    backoff = PUT_RETRY_FIRST;
                }
                false
            }
            () = sleep_until_or_forever(paused.filter(|_| !probing)) => false,
        };
        let mut sending: Vec<String> = Vec::new();
        if closing {
            sending.extend(waiting.keys().cloned());
        } else if *circuit.borrow() == State::Closed && !probing {
            match paused {
                None => sending.extend(waiting.keys().cloned()),
                Some(at) if at <= tokio::time::Instant::now() => {
                    if let Some(id) = waiting.keys().next() {
                        probing = true;
                        sending.push(id.clone());
                    }
                }
                Some(_) => {}
            }
        }
        for id in sending {
            let Some(mut update) = waiting.remove(&id) else {
                continue;
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let deliverer = deliverer.clone();
            let metrics = metrics.clone();
            let done = done.clone();
            tasks.spawn(async move {
                let StatusReport {
                    message_id,
                    status,
                    attempt_count,
                    error,
                    trace,
                } = &update.report;
                let taken = match deliverer
                    .update_status(message_id, *status, *attempt_count, error, trace)
                    .await
                {
                    Ok(()) => {
                        metrics.status_update("ok");
                        true
                    }
                    Err(e) => {
                        metrics.status_update("failed");
                        // Counted in worker_status_updates_total{result="failed"}; during an outage
                        // every failed delivery brings one, so they stay out of the normal log.
                        debug!(
                            message_id = %message_id,
                            trace_id = %trace.trace_id,
                            status = status.as_str(),
                            error = %e,
                            "Status update failed; the message itself is safe"
                        );
                        // Any answer but a failure is final.
                        !not_taken(&e)
                    }
                };
                update.tries = update.tries.saturating_add(1);
                let _ = done.send((update, taken));
                drop(permit);
            });
        }
        if closing {
            break;
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// A status update waiting to go (again).
struct Waiting {
    report: StatusReport,
    /// Times it was sent.
    tries: u32,
}

/// Tries of one status update before it is given up (counted as dropped).
const PUT_TRIES: u32 = 10;
/// The pause after a status update the server did not take; it doubles up to
/// `PUT_RETRY_LONGEST` while the probes fail.
const PUT_RETRY_FIRST: Duration = Duration::from_secs(1);
const PUT_RETRY_LONGEST: Duration = Duration::from_secs(60);

/// Whether the server did not take a status update: it could not be reached, or it failed
/// (5xx). Any other answer is final.
fn not_taken(error: &crate::delivery::DeliveryError) -> bool {
    match error {
        crate::delivery::DeliveryError::Status { status, .. } => *status >= 500 || *status == 429,
        _ => true,
    }
}

async fn sleep_until_or_forever(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
