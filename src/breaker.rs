//! The circuit breaker on the main server as a whole. Pure: the caller passes the time, so the
//! transitions are tested without waiting.
//!
//! Closed: every attempt counts in a sliding window; when at least `min_attempts` fell in it
//! and `failure_rate` of them failed for reasons about the server (it could not be reached,
//! timed out, failed TLS, or answered 502/503/504), the breaker opens. Open: nothing is
//! claimed; after `probe_min` one message is let through as a probe (half-open). A probe that
//! succeeds lets 2, then 4, ... deliveries run at once until the full concurrency, and the
//! breaker closes; a server failure while half-open opens it again, the next probe twice as
//! far off (at most `probe_max`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::delivery::DeliveryError;

/// The breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Off: the worker never stops claiming (the old worker's behaviour).
    pub enabled: bool,
    /// The share of server failures among the window's attempts that opens the breaker.
    pub failure_rate: f64,
    /// The fewest attempts in the window for the rate to count.
    pub min_attempts: u32,
    /// How far back attempts count.
    pub window: Duration,
    /// The first probe's wait after opening; it doubles after each failed probe.
    pub probe_min: Duration,
    /// The longest wait between probes.
    pub probe_max: Duration,
}

/// The breaker's state, as exported in `worker_circuit_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    /// The gauge's value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

/// What one attempt says about the main server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It answered 2xx.
    Success,
    /// It could not be reached, timed out, failed TLS or answered 502, 503 or 504.
    ServerFailure,
    /// It answered, about the message (4xx, 500, ...): no sign of an outage.
    Answered,
}

impl Verdict {
    pub fn of(result: &Result<(), DeliveryError>) -> Verdict {
        match result {
            Ok(()) => Verdict::Success,
            Err(DeliveryError::Status { status, .. }) => match status {
                502..=504 => Verdict::ServerFailure,
                _ => Verdict::Answered,
            },
            Err(_) => Verdict::ServerFailure,
        }
    }
}

/// A change of state, to log and export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    /// Open: the wait until the next probe.
    pub next_probe_in: Option<Duration>,
}

/// Attempts in one slice of the window.
#[derive(Debug, Clone, Copy)]
struct Slice {
    started: Instant,
    attempts: u32,
    failures: u32,
}

/// The breaker.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: State,
    slices: VecDeque<Slice>,
    /// Open: when the next probe may go.
    probe_at: Instant,
    /// Open: the wait before the next probe; doubles after each failed one.
    interval: Duration,
    /// Half-open: deliveries allowed at once.
    limit: usize,
}

/// Slices per window: the window slides in steps of a tenth.
const SLICES: u32 = 10;

impl Breaker {
    pub fn new(settings: BreakerSettings, now: Instant) -> Breaker {
        Breaker {
            settings,
            state: State::Closed,
            slices: VecDeque::with_capacity(SLICES as usize + 1),
            probe_at: now,
            interval: settings.probe_min,
            limit: 1,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Records an attempt's verdict; returns the transition it caused, if any.
    pub fn record(&mut self, verdict: Verdict, now: Instant) -> Option<Transition> {
        if !self.settings.enabled {
            return None;
        }
        match (self.state, verdict) {
            (State::Closed, _) => {
                self.count(verdict, now);
                let (attempts, failures) = self.slices.iter().fold((0u32, 0u32), |(a, f), s| {
                    (a.saturating_add(s.attempts), f.saturating_add(s.failures))
                });
                let rate = f64::from(failures) / f64::from(attempts.max(1));
                if attempts >= self.settings.min_attempts && rate >= self.settings.failure_rate {
                    self.interval = self.settings.probe_min;
                    return Some(self.open(now));
                }
                None
            }
            (State::HalfOpen, Verdict::ServerFailure) => {
                self.interval = (self.interval * 2).min(self.settings.probe_max);
                Some(self.open(now))
            }
            (State::HalfOpen, _) => {
                // The server answered: let twice as many through, then close.
                self.limit = self.limit.saturating_mul(2);
                None
            }
            // Open: what was already under way when it opened says nothing new; the probe
            // decides.
            (State::Open, _) => None,
        }
    }

    /// How many deliveries may be under way now, out of `concurrency`; moves from open to
    /// half-open when a probe is due and from half-open to closed once the limit reaches the
    /// full concurrency. Returns the limit and the transition, if any.
    pub fn admit(&mut self, concurrency: usize, now: Instant) -> (usize, Option<Transition>) {
        if !self.settings.enabled {
            return (concurrency, None);
        }
        match self.state {
            State::Closed => (concurrency, None),
            State::Open if now >= self.probe_at => {
                self.limit = 1;
                (1, Some(self.enter(State::HalfOpen, None)))
            }
            State::Open => (0, None),
            State::HalfOpen if self.limit >= concurrency => {
                self.slices.clear();
                (concurrency, Some(self.enter(State::Closed, None)))
            }
            State::HalfOpen => (self.limit, None),
        }
    }

    /// When the next probe may go, while open.
    pub fn next_probe(&self) -> Option<Instant> {
        (self.state == State::Open).then_some(self.probe_at)
    }

    fn open(&mut self, now: Instant) -> Transition {
        self.probe_at = now + self.interval;
        self.enter(State::Open, Some(self.interval))
    }

    fn enter(&mut self, to: State, next_probe_in: Option<Duration>) -> Transition {
        let from = self.state;
        self.state = to;
        Transition {
            from,
            to,
            next_probe_in,
        }
    }

    fn count(&mut self, verdict: Verdict, now: Instant) {
        let step = self.settings.window / SLICES;
        while self
            .slices
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.started) >= self.settings.window)
        {
            self.slices.pop_front();
        }
        let fresh = self
            .slices
            .back()
            .is_some_and(|s| now.saturating_duration_since(s.started) < step);
        if !fresh {
            self.slices.push_back(Slice {
                started: now,
                attempts: 0,
                failures: 0,
            });
        }
        if let Some(slice) = self.slices.back_mut() {
            slice.attempts = slice.attempts.saturating_add(1);
            if verdict == Verdict::ServerFailure {
                slice.failures = slice.failures.saturating_add(1);
            }
        }
    }
}

/// Adaptive concurrency: an AIMD limit on deliveries under way, between 1 and the configured
/// concurrency. Each delivery that succeeds in normal time raises it by 1/limit (one step per
/// limit's worth of deliveries, about one per round trip); a 429, a 503, a timeout or a delivery
/// taking over three times the running average (and 50 ms more) halves it, at most once per
/// average latency.
#[derive(Debug)]
pub struct Aimd {
    limit: f64,
    max: f64,
    /// Running average of successful deliveries' latency, seconds (0: none yet).
    average: f64,
    last_cut: Option<Instant>,
}

impl Aimd {
    pub fn new(max: usize) -> Aimd {
        let max = max.max(1) as f64;
        Aimd {
            limit: 1.0_f64.max(max / 4.0).min(max),
            max,
            average: 0.0,
            last_cut: None,
        }
    }

    /// The whole deliveries that may be under way.
    pub fn limit(&self) -> usize {
        // Between 1 and `max`, which came from a usize: the conversion is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let limit = self.limit.floor() as usize;
        limit.max(1)
    }

    /// Records a delivery's outcome and latency.
    pub fn record(&mut self, result: &Result<(), DeliveryError>, elapsed: Duration, now: Instant) {
        let seconds = elapsed.as_secs_f64();
        let overloaded = match result {
            // Slower than three times the average and by at least 50 ms: a sign of queueing
            // at the server, not the noise of a fast one.
            Ok(()) => self.average > 0.0 && seconds > 3.0 * self.average && seconds > self.average + 0.05,
            Err(DeliveryError::Status { status: 429 | 503, .. }) | Err(DeliveryError::Timeout(_)) => true,
            Err(_) => false,
        };
        if result.is_ok() {
            self.average = if self.average == 0.0 {
                seconds
            } else {
                0.9 * self.average + 0.1 * seconds
            };
        }
        if overloaded {
            let recent = self
                .last_cut
                .is_some_and(|at| now.saturating_duration_since(at).as_secs_f64() < self.average.max(0.001));
            if !recent {
                self.limit = (self.limit / 2.0).max(1.0);
                self.last_cut = Some(now);
            }
        } else if result.is_ok() {
            self.limit = (self.limit + 1.0 / self.limit).min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: BreakerSettings = BreakerSettings {
        enabled: true,
        failure_rate: 0.5,
        min_attempts: 10,
        window: Duration::from_secs(10),
        probe_min: Duration::from_secs(1),
        probe_max: Duration::from_secs(8),
    };

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn opens_on_a_failure_rate_over_enough_attempts_and_not_before() {
        let t0 = Instant::now();
        let mut b = Breaker::new(SETTINGS, t0);
        for i in 0..9 {
            assert_eq!(
                b.record(Verdict::ServerFailure, t0 + secs(f64::from(i) * 0.01)),
                None,
                "too few yet"
            );
        }
        let opened = b.record(Verdict::ServerFailure, t0 + secs(0.1)).expect("opens");
        assert_eq!((opened.from, opened.to), (State::Closed, State::Open));
        assert_eq!(opened.next_probe_in, Some(secs(1.0)));
        assert_eq!(b.admit(16, t0 + secs(0.5)), (0, None), "nothing goes while open");
    }

    #[test]
    fn answers_about_the_message_and_old_failures_do_not_open_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(SETTINGS, t0);
        for i in 0..100 {
            let verdict = if i % 2 == 0 {
                Verdict::Answered
            } else {
                Verdict::Success
            };
            assert_eq!(b.record(verdict, t0 + secs(f64::from(i) * 0.01)), None);
        }
        // 9 failures long ago, then 9 successes and 2 failures now: 2 of 11 in the window.
        let mut b = Breaker::new(SETTINGS, t0);
        for _ in 0..9 {
            b.record(Verdict::ServerFailure, t0);
        }
        let later = t0 + secs(11.0);
        for _ in 0..9 {
            assert_eq!(b.record(Verdict::Success, later), None);
        }
        assert_eq!(b.record(Verdict::ServerFailure, later), None);
        assert_eq!(b.record(Verdict::ServerFailure, later), None);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn probes_back_off_and_a_good_probe_closes_gradually() {
        let t0 = Instant::now();
        let mut b = Breaker::new(SETTINGS, t0);
        for _ in 0..10 {
            b.record(Verdict::ServerFailure, t0);
        }
        assert_eq!(b.state(), State::Open);
        // First probe after 1 s; it fails: the next after 2 s, then 4, then 8, 8 (the cap).
        let mut now = t0;
        for wait in [1.0, 2.0, 4.0, 8.0, 8.0] {
            assert_eq!(b.admit(16, now + secs(wait - 0.01)).0, 0, "not yet");
            now += secs(wait);
            let (limit, to) = b.admit(16, now);
            assert_eq!(
                (limit, to.map(|t| t.to)),
                (1, Some(State::HalfOpen)),
                "probe after {wait} s"
            );
            let reopened = b.record(Verdict::ServerFailure, now).expect("reopens");
            assert_eq!(reopened.to, State::Open);
        }
        // A probe that succeeds: 1, 2, 4, 8, 16 at once, then closed.
        now += secs(8.0);
        assert_eq!(b.admit(16, now).0, 1);
        let mut limits = Vec::new();
        for _ in 0..5 {
            b.record(Verdict::Success, now);
            let (limit, to) = b.admit(16, now);
            limits.push(limit);
            if let Some(to) = to {
                assert_eq!(to.to, State::Closed);
            }
        }
        assert_eq!(limits, [2, 4, 8, 16, 16]);
        assert_eq!(b.state(), State::Closed);
        // Closed again with a clean window (the one success since): it takes a full count of
        // attempts to reopen, and the first probe is 1 s off again.
        for _ in 0..8 {
            assert_eq!(b.record(Verdict::ServerFailure, now), None);
        }
        assert_eq!(
            b.record(Verdict::ServerFailure, now).and_then(|t| t.next_probe_in),
            Some(secs(1.0))
        );
    }

    #[test]
    fn adaptive_concurrency_climbs_on_good_answers_and_halves_on_overload() {
        let t0 = Instant::now();
        let mut aimd = Aimd::new(64);
        assert_eq!(aimd.limit(), 16, "starts at a quarter");
        let ms = Duration::from_millis;
        for i in 0..2000 {
            aimd.record(&Ok(()), ms(10), t0 + ms(i));
        }
        assert_eq!(aimd.limit(), 64, "good answers take it to the full concurrency");
        let busy = Err(DeliveryError::Status {
            status: 429,
            retry_after: None,
            body: String::new(),
        });
        aimd.record(&busy, ms(10), t0 + ms(3000));
        assert_eq!(aimd.limit(), 32);
        aimd.record(&busy, ms(10), t0 + ms(3001));
        assert_eq!(aimd.limit(), 32, "one cut per average latency (10 ms)");
        aimd.record(&Ok(()), ms(25), t0 + ms(3050));
        assert_eq!(aimd.limit(), 32, "a little slower than usual is noise");
        aimd.record(&Ok(()), ms(500), t0 + ms(3100));
        assert_eq!(aimd.limit(), 16, "a delivery far slower than usual is overload too");
        for i in 0..100 {
            aimd.record(&busy, ms(10), t0 + ms(4000 + i * 100));
        }
        assert_eq!(aimd.limit(), 1, "never below one");
        let refused = Err(DeliveryError::Connect(std::sync::Arc::new(std::io::Error::other("x"))));
        aimd.record(&refused, ms(1), t0 + ms(20_000));
        assert_eq!(aimd.limit(), 1, "an unreachable server is the breaker's business");
    }

    #[test]
    fn disabled_it_never_stops_anything() {
        let t0 = Instant::now();
        let mut b = Breaker::new(
            BreakerSettings {
                enabled: false,
                ..SETTINGS
            },
            t0,
        );
        for _ in 0..1000 {
            assert_eq!(b.record(Verdict::ServerFailure, t0), None);
        }
        assert_eq!(b.admit(16, t0), (16, None));
    }

    #[test]
    fn verdicts_follow_the_issue_s_list() {
        let status = |status| {
            Err(DeliveryError::Status {
                status,
                retry_after: None,
                body: String::new(),
            })
        };
        let transport = Err(DeliveryError::Connect(std::sync::Arc::new(std::io::Error::other(
            "refused",
        ))));
        assert_eq!(Verdict::of(&Ok(())), Verdict::Success);
        assert_eq!(Verdict::of(&transport), Verdict::ServerFailure);
        for s in [502, 503, 504] {
            assert_eq!(Verdict::of(&status(s)), Verdict::ServerFailure, "{s}");
        }
        for s in [400, 404, 422, 429, 500] {
            assert_eq!(Verdict::of(&status(s)), Verdict::Answered, "{s}");
        }
    }
}
