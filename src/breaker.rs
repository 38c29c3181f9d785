//! The circuit breaker on the main server as a whole. Pure: the caller passes the time, so the
//! transitions are tested without waiting.
//!
//! It tells a dead main server from a struggling one by the most recent attempts, not by an
//! average over a long window (which a burst of earlier success dilutes):
//!
//! - **Closed.** The last `min_attempts` attempts (none older than `window`) are kept. When at
//!   least `failure_rate` of them were server faults (unreachable, reset, TLS, timeout,
//!   502/503/504), the breaker opens: with the defaults, all of the last 40. A server that
//!   still answers a real share with success keeps the circuit closed; the adaptive limit, the
//!   retry schedule and `Retry-After` take that pressure instead.
//! - **Retried messages delivered.** While the last retried message (one that had failed
//!   before) was delivered within `retry_grace`, and no retried message has failed with a
//!   server fault since, failures of first attempts alone do not open it: a server that fails
//!   a first attempt and takes the second is not dead.
//! - **Rejections for everybody.** When among the last `same_status` attempts (of different
//!   messages: a rejected message is not tried again) at most one in ten was delivered and at least
//!   half were rejected with one 4xx (a 404 or 401 after a bad deploy, perhaps beside 503s of a
//!   rolling restart), that is the server's fault, not each message's: it opens, and while it
//!   is open or probing every rejection counts as a server fault, so the messages go back to
//!   the queue instead of to the dead-letter list.
//! - **Open.** Nothing is claimed. What was under way and fails as the breaker saw coming goes
//!   back to the queue unchanged. After `probe_min` it turns half-open.
//! - **Half-open.** One delivery at a time, twice as many after each that the server answers,
//!   until the full concurrency: then closed. Judged by the rate of its attempts, not by its
//!   first failure: once `PROBES` of them were tried, a share of faults at `failure_rate` or
//!   above opens it again, the next probe twice as far off (at most `probe_max`). A probe the
//!   server fails goes to the back of the queue unchanged (no attempt used: a long outage
//!   exhausts nobody), so a message that fails on its own cannot be the probe every time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub(crate) use crate::config::BreakerSettings;
use crate::policy::{Kind, Outcome};

/// Attempts a half-open breaker judges before it may open again.
pub(crate) const PROBES: u32 = 5;

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

/// Why the breaker opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Server faults: unreachable, TLS, timeouts, 502/503/504.
    Failing,
    /// Every delivery rejected with this status.
    SameStatus(u16),
}

/// What one attempt says about the main server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Delivered.
    Success,
    /// A server fault (see `Outcome::server_fault`).
    ServerFault,
    /// Rejected with this status: about the message, unless everybody's is.
    Rejected(u16),
    /// Any other answer (429, 500, ...): the server is there.
    Answered,
}

impl Verdict {
    pub(crate) fn of(outcome: &Outcome) -> Verdict {
        match (outcome.kind, outcome.status) {
            (Kind::Delivered, _) => Verdict::Success,
            _ if outcome.server_fault => Verdict::ServerFault,
            (Kind::Rejected, Some(status)) => Verdict::Rejected(status),
            _ => Verdict::Answered,
        }
    }
}

/// How the worker is to treat an attempt, given what the breaker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Treat {
    /// As its outcome says.
    AsClassified,
    /// The server's failure, seen while open: back to the queue unchanged, no attempt used.
    Release,
    /// The server's failure, seen while probing: to the back of the queue unchanged, no
    /// attempt used, so that the next probe is another message.
    Rotate,
}

/// A change of state, to log and export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    pub from: State,
    pub to: State,
    /// Open: the wait until the next probe.
    pub next_probe_in: Option<Duration>,
    /// Open: why.
    pub cause: Option<Cause>,
}

/// The breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    settings: BreakerSettings,
    state: State,
    cause: Cause,
    /// Closed: the most recent attempts, oldest first.
    recent: VecDeque<(Instant, Verdict)>,
    /// When a retried message was last delivered, unless one has failed with a fault since.
    retry_delivered: Option<Instant>,
    /// Open: when the next probe may go.
    probe_at: Instant,
    /// Open: the wait before the next probe; doubles after each failed one.
    interval: Duration,
    /// Half-open: deliveries allowed at once, attempts judged and faults among them.
    limit: usize,
    probed: u32,
    probe_faults: u32,
}

impl Breaker {
    pub(crate) fn new(settings: BreakerSettings, now: Instant) -> Breaker {
        Breaker {
            settings,
            state: State::Closed,
            cause: Cause::Failing,
            recent: VecDeque::with_capacity(Self::kept(&settings) + 1),
            retry_delivered: None,
            probe_at: now,
            interval: settings.probe_min,
            limit: 1,
            probed: 0,
            probe_faults: 0,
        }
    }

    /// How many recent attempts are kept: enough for either rule.
    fn kept(settings: &BreakerSettings) -> usize {
        usize::try_from(settings.min_attempts.max(settings.same_status).max(1)).unwrap_or(usize::MAX)
    }

    #[cfg(test)]
    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// Records an attempt's verdict; `retried`: its message had failed before. Returns how to
    /// treat the attempt and the transition it caused, if any.
    pub(crate) fn record(&mut self, verdict: Verdict, retried: bool, now: Instant) -> (Treat, Option<Transition>) {
        if !self.settings.enabled {
            return (Treat::AsClassified, None);
        }
        match self.state {
            State::Closed => self.record_closed(verdict, retried, now),
            State::Open if self.suspect(verdict) => (Treat::Release, None),
            // What was already under way when it opened and got an answer says nothing new;
            // the probes decide.
            State::Open => (Treat::AsClassified, None),
            State::HalfOpen => {
                self.probed = self.probed.saturating_add(1);
                if !self.suspect(verdict) {
                    // The server answered: let twice as many through, then close.
                    self.limit = self.limit.saturating_mul(2);
                    return (Treat::AsClassified, None);
                }
                self.probe_faults = self.probe_faults.saturating_add(1);
                if self.probed >= PROBES && self.share(self.probe_faults, self.probed) {
                    self.interval = self.interval.saturating_mul(2).min(self.settings.probe_max);
                    let cause = self.cause;
                    return (Treat::Rotate, Some(self.open(cause, now)));
                }
                (Treat::Rotate, None)
            }
        }
    }

    fn record_closed(&mut self, verdict: Verdict, retried: bool, now: Instant) -> (Treat, Option<Transition>) {
        match (verdict, retried) {
            (Verdict::Success, true) => self.retry_delivered = Some(now),
            (Verdict::ServerFault, true) => self.retry_delivered = None,
            _ => {}
        }
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= self.settings.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= Self::kept(&self.settings) {
            self.recent.pop_front();
        }
        self.recent.push_back((now, verdict));
        if let (Verdict::Rejected(_), Some(status)) = (verdict, self.rejecting()) {
            self.interval = self.settings.probe_min;
            return (Treat::Release, Some(self.open(Cause::SameStatus(status), now)));
        }
        if verdict != Verdict::ServerFault {
            return (Treat::AsClassified, None);
        }
        let judged = usize::try_from(self.settings.min_attempts.max(1)).unwrap_or(usize::MAX);
        let faults = self
            .recent
            .iter()
            .rev()
            .take(judged)
            .filter(|(_, v)| *v == Verdict::ServerFault)
            .count();
        let retries_get_through = self
            .retry_delivered
            .is_some_and(|at| now.saturating_duration_since(at) <= self.settings.retry_grace);
        if self.recent.len() >= judged
            && self.share(u32::try_from(faults).unwrap_or(u32::MAX), self.settings.min_attempts)
            // A first attempt's fault while retries get through does not count.
            && (retried || !retries_get_through)
        {
            self.interval = self.settings.probe_min;
            return (Treat::AsClassified, Some(self.open(Cause::Failing, now)));
        }
        (Treat::AsClassified, None)
    }

    /// The status a misdeployed server rejects (nearly) everything with: among the last
    /// `same_status` attempts at most one in ten was delivered and at least half were rejected with
    /// that one status (the rest rejected otherwise or failed: a bad deploy during a rolling
    /// restart answers 404 and 503).
    fn rejecting(&self) -> Option<u16> {
        let run = usize::try_from(self.settings.same_status).unwrap_or(usize::MAX);
        if run == 0 || self.recent.len() < run {
            return None;
        }
        let mut delivered: usize = 0;
        let mut statuses: Vec<(u16, usize)> = Vec::new();
        for (_, verdict) in self.recent.iter().rev().take(run) {
            match verdict {
                Verdict::Success => delivered += 1,
                Verdict::Rejected(status) => match statuses.iter_mut().find(|(s, _)| s == status) {
                    Some((_, count)) => *count += 1,
                    None => statuses.push((*status, 1)),
                },
                _ => {}
            }
        }
        let (status, count) = statuses.into_iter().max_by_key(|(_, count)| *count)?;
        (delivered.saturating_mul(10) <= run && count.saturating_mul(2) >= run).then_some(status)
    }

    /// Whether `part` of `whole` reaches the failure rate.
    fn share(&self, part: u32, whole: u32) -> bool {
        f64::from(part) >= self.settings.failure_rate * f64::from(whole.max(1))
    }

    /// A verdict that, while open or probing, counts against the server.
    fn suspect(&self, verdict: Verdict) -> bool {
        match (verdict, self.cause) {
            (Verdict::ServerFault, _) => true,
            // A misdeployed server's rejections, whatever the status.
            (Verdict::Rejected(_), Cause::SameStatus(_)) => true,
            _ => false,
        }
    }

    /// How many deliveries may be under way now, out of `concurrency`; moves from open to
    /// half-open when a probe is due and from half-open to closed once the limit reaches the
    /// full concurrency. Returns the limit and the transition, if any.
    pub(crate) fn admit(&mut self, concurrency: usize, now: Instant) -> (usize, Option<Transition>) {
        if !self.settings.enabled {
            return (concurrency, None);
        }
        match self.state {
            State::Closed => (concurrency, None),
            State::Open if now >= self.probe_at => {
                self.limit = 1;
                self.probed = 0;
                self.probe_faults = 0;
                (1, Some(self.enter(State::HalfOpen, None, None)))
            }
            State::Open => (0, None),
            State::HalfOpen if self.limit >= concurrency => {
                self.recent.clear();
                (concurrency, Some(self.enter(State::Closed, None, None)))
            }
            State::HalfOpen => (self.limit, None),
        }
    }

    /// When the next probe may go, while open.
    pub(crate) fn next_probe(&self) -> Option<Instant> {
        (self.state == State::Open).then_some(self.probe_at)
    }

    fn open(&mut self, cause: Cause, now: Instant) -> Transition {
        self.cause = cause;
        self.probe_at = now + self.interval;
        self.enter(State::Open, Some(self.interval), Some(cause))
    }

    fn enter(&mut self, to: State, next_probe_in: Option<Duration>, cause: Option<Cause>) -> Transition {
        let from = self.state;
        self.state = to;
        Transition {
            from,
            to,
            next_probe_in,
            cause,
        }
    }
}

/// Adaptive concurrency: an AIMD limit on deliveries under way, between 1 and the configured
/// concurrency. Each delivery that succeeds in normal time raises it by 1/limit (one step per
/// limit's worth of deliveries, about one per round trip); a 429, a 503, a timeout or a delivery
/// taking over three times the running average (and 50 ms more) halves it, at most once per
/// average latency.
#[derive(Debug)]
pub(crate) struct Aimd {
    limit: f64,
    max: f64,
    /// Running average of successful deliveries' latency, seconds (0: none yet).
    average: f64,
    last_cut: Option<Instant>,
}

impl Aimd {
    pub(crate) fn new(max: usize) -> Aimd {
        let max = max.max(1) as f64;
        Aimd {
            limit: 1.0_f64.max(max / 4.0).min(max),
            max,
            average: 0.0,
            last_cut: None,
        }
    }

    /// The whole deliveries that may be under way.
    pub(crate) fn limit(&self) -> usize {
        // Between 1 and `max`, which came from a usize: the conversion is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let limit = self.limit.floor() as usize;
        limit.max(1)
    }

    /// Records a delivery's outcome and latency.
    pub(crate) fn record(&mut self, outcome: &Outcome, elapsed: Duration, now: Instant) {
        let seconds = elapsed.as_secs_f64();
        let delivered = outcome.kind == Kind::Delivered;
        // Slower than three times the average and by at least 50 ms: a sign of queueing at the
        // server, not the noise of a fast one.
        let overloaded = outcome.overload
            || (delivered && self.average > 0.0 && seconds > 3.0 * self.average && seconds > self.average + 0.05);
        if delivered {
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
        } else if delivered {
            self.limit = (self.limit + 1.0 / self.limit).min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::DeliveryError;
    use crate::policy::Outcomes;

    const SETTINGS: BreakerSettings = BreakerSettings {
        enabled: true,
        failure_rate: 1.0,
        min_attempts: 40,
        window: Duration::from_secs(60),
        probe_min: Duration::from_secs(1),
        probe_max: Duration::from_secs(8),
        same_status: 20,
        retry_grace: Duration::from_secs(2),
    };

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Feeds `n` verdicts 1 ms apart from `at`; returns how many went in before it opened.
    fn feed(b: &mut Breaker, n: u32, at: &mut Instant, mut verdict: impl FnMut(u32) -> (Verdict, bool)) -> Option<u32> {
        for i in 0..n {
            *at += secs(0.001);
            let (v, retried) = verdict(i);
            if let (_, Some(t)) = b.record(v, retried, *at) {
                if t.to == State::Open {
                    return Some(i + 1);
                }
            }
        }
        None
    }

    #[test]
    fn a_dead_server_opens_it_within_the_recent_attempts_whatever_came_before() {
        for earlier in [0, 40, 480, 100_000] {
            let mut now = Instant::now();
            let mut b = Breaker::new(SETTINGS, now);
            assert_eq!(feed(&mut b, earlier, &mut now, |_| (Verdict::Success, false)), None);
            let opened = feed(&mut b, 1000, &mut now, |_| (Verdict::ServerFault, false));
            assert_eq!(opened, Some(40), "after {earlier} successes");
            assert_eq!(b.admit(16, now + secs(0.5)), (0, None), "nothing goes while open");
        }
    }

    #[test]
    fn a_server_that_answers_a_real_share_keeps_it_closed() {
        // 60% faults at random (a fixed seed), 40% delivered, over 100,000 attempts.
        let mut rng = fastrand::Rng::with_seed(7);
        let mut now = Instant::now();
        let mut b = Breaker::new(SETTINGS, now);
        let opened = feed(&mut b, 100_000, &mut now, |_| match rng.f64() < 0.6 {
            true => (Verdict::ServerFault, rng.bool()),
            false => (Verdict::Success, rng.bool()),
        });
        assert_eq!(opened, None);
        // 4xx and other answers are the server being there, not failing.
        let mut b = Breaker::new(SETTINGS, now);
        let opened = feed(&mut b, 10_000, &mut now, |i| match i % 3 {
            0 => (Verdict::Answered, false),
            1 => (Verdict::Rejected(400 + (i % 50) as u16), false),
            _ => (Verdict::ServerFault, false),
        });
        assert_eq!(opened, None);
    }

    #[test]
    fn first_attempts_failing_while_retries_are_delivered_do_not_open_it() {
        let mut now = Instant::now();
        let mut b = Breaker::new(SETTINGS, now);
        assert_eq!(feed(&mut b, 1, &mut now, |_| (Verdict::Success, true)), None);
        assert_eq!(
            feed(&mut b, 1000, &mut now, |_| (Verdict::ServerFault, false)),
            None,
            "first attempts fail for a second: retries get through"
        );
        // A retried message failing too ends that at once.
        let opened = feed(&mut b, 1, &mut now, |_| (Verdict::ServerFault, true));
        assert_eq!(opened, Some(1));
        // And the grace runs out on its own.
        let mut b = Breaker::new(SETTINGS, now);
        feed(&mut b, 1, &mut now, |_| (Verdict::Success, true));
        now += secs(2.5);
        assert_eq!(
            feed(&mut b, 1000, &mut now, |_| (Verdict::ServerFault, false)),
            Some(40)
        );
    }

    #[test]
    fn old_attempts_are_forgotten() {
        let mut now = Instant::now();
        let mut b = Breaker::new(SETTINGS, now);
        assert_eq!(feed(&mut b, 39, &mut now, |_| (Verdict::ServerFault, false)), None);
        now += secs(61.0);
        assert_eq!(feed(&mut b, 39, &mut now, |_| (Verdict::ServerFault, false)), None);
        assert_eq!(feed(&mut b, 1, &mut now, |_| (Verdict::ServerFault, false)), Some(1));
    }

    #[test]
    fn everybody_rejected_opens_it_and_rejections_are_then_the_server_s() {
        let mut now = Instant::now();
        let mut b = Breaker::new(SETTINGS, now);
        // One message's 404 among successes is that message's; so are many rejections while
        // the server delivers the rest.
        let opened = feed(&mut b, 10_000, &mut now, |i| match i % 10 {
            0 => (Verdict::Rejected(404), false),
            _ => (Verdict::Success, false),
        });
        assert_eq!(opened, None);
        let opened = feed(&mut b, 10_000, &mut now, |i| match i % 3 {
            0 => (Verdict::Rejected(400), false),
            1 => (Verdict::Rejected(422), false),
            _ => (Verdict::Success, false),
        });
        assert_eq!(opened, None);
        // Rejections of many statuses with no success are many messages' faults.
        let opened = feed(&mut b, 100, &mut now, |i| {
            (Verdict::Rejected(400 + (i % 7) as u16), false)
        });
        assert_eq!(opened, None);
        // A bad deploy during a rolling restart: 404s and 503s, one success: the 404 that
        // makes ten of the last twenty is not dead-lettered, it opens the breaker.
        let mut b = Breaker::new(SETTINGS, now);
        let pattern = |i: u32| match i {
            0 => (Verdict::Success, false),
            i if i % 2 == 1 => (Verdict::ServerFault, false),
            _ => (Verdict::Rejected(404), false),
        };
        assert_eq!(feed(&mut b, 19, &mut now, pattern), None);
        now += secs(0.001);
        let (treat, opened) = b.record(Verdict::Rejected(404), false, now);
        assert_eq!(treat, Treat::Release);
        let opened = opened.expect("opens");
        assert_eq!(opened.cause, Some(Cause::SameStatus(404)));
        // What was under way and is rejected goes back, whatever the status; a success is one.
        assert_eq!(b.record(Verdict::Rejected(404), false, now).0, Treat::Release);
        assert_eq!(b.record(Verdict::Rejected(422), false, now).0, Treat::Release);
        assert_eq!(b.record(Verdict::Success, false, now).0, Treat::AsClassified);
        // The probe is rejected again: to the back of the queue, not dead-lettered.
        now += secs(1.0);
        assert_eq!(b.admit(16, now).0, 1);
        assert_eq!(b.record(Verdict::Rejected(404), false, now).0, Treat::Rotate);
        // 90% 404s and a success now and then: still the server's.
        let mut b = Breaker::new(SETTINGS, now);
        let opened = feed(&mut b, 100, &mut now, |i| match i % 10 {
            0 => (Verdict::Success, false),
            _ => (Verdict::Rejected(404), false),
        });
        assert!(opened.is_some_and(|n| n <= 20), "{opened:?}");
    }

    #[test]
    fn probes_are_judged_by_their_rate_and_back_off() {
        let mut now = Instant::now();
        let mut b = Breaker::new(SETTINGS, now);
        feed(&mut b, 40, &mut now, |_| (Verdict::ServerFault, false));
        assert_eq!(b.state(), State::Open);
        // First probe after 1 s; all five of its attempts fail: the next after 2 s, then 4,
        // then 8, 8 (the cap). Each failed probe uses its message's attempt.
        for wait in [1.0, 2.0, 4.0, 8.0, 8.0] {
            assert_eq!(b.admit(16, now + secs(wait - 0.01)).0, 0, "not yet");
            now += secs(wait);
            let (limit, to) = b.admit(16, now);
            assert_eq!(
                (limit, to.map(|t| t.to)),
                (1, Some(State::HalfOpen)),
                "probe after {wait} s"
            );
            for _ in 0..4 {
                assert_eq!(b.record(Verdict::ServerFault, false, now), (Treat::Rotate, None));
            }
            let (treat, reopened) = b.record(Verdict::ServerFault, false, now);
            assert_eq!(treat, Treat::Rotate);
            assert_eq!(reopened.expect("reopens").to, State::Open);
        }
        // A probe that fails first and then finds the server answering: not reopened by the
        // first failure; 2, 4, 8, 16 at once, then closed.
        now += secs(8.0);
        assert_eq!(b.admit(16, now).0, 1);
        assert_eq!(b.record(Verdict::ServerFault, true, now), (Treat::Rotate, None));
        let mut limits = Vec::new();
        for i in 0..8 {
            let verdict = if i % 2 == 0 {
                Verdict::Success
            } else {
                Verdict::ServerFault
            };
            b.record(verdict, false, now);
            let (limit, to) = b.admit(16, now);
            limits.push(limit);
            if to.is_some_and(|t| t.to == State::Closed) {
                break;
            }
        }
        assert_eq!(limits, [2, 2, 4, 4, 8, 8, 16]);
        assert_eq!(b.state(), State::Closed);
        // Closed again with a clean slate, and the first probe 1 s off again.
        let opened = feed(&mut b, 40, &mut now, |_| (Verdict::ServerFault, false));
        assert_eq!(opened, Some(40));
        assert_eq!(b.next_probe(), Some(now + secs(1.0)));
    }

    #[test]
    fn what_was_under_way_when_it_opened_goes_back_unchanged() {
        let mut now = Instant::now();
        let mut b = Breaker::new(SETTINGS, now);
        feed(&mut b, 40, &mut now, |_| (Verdict::ServerFault, false));
        assert_eq!(b.record(Verdict::ServerFault, false, now).0, Treat::Release);
        assert_eq!(b.record(Verdict::Success, false, now).0, Treat::AsClassified);
        assert_eq!(b.record(Verdict::Rejected(404), false, now).0, Treat::AsClassified);
    }

    #[test]
    fn adaptive_concurrency_climbs_on_good_answers_and_halves_on_overload() {
        let table = Outcomes::default();
        let t0 = Instant::now();
        let mut aimd = Aimd::new(64);
        assert_eq!(aimd.limit(), 16, "starts at a quarter");
        let ms = Duration::from_millis;
        let ok = table.classify(&Ok(()));
        for i in 0..2000 {
            aimd.record(&ok, ms(10), t0 + ms(i));
        }
        assert_eq!(aimd.limit(), 64, "good answers take it to the full concurrency");
        let busy = table.classify(&Err(DeliveryError::Status {
            status: 429,
            retry_after: None,
            body: String::new(),
        }));
        aimd.record(&busy, ms(10), t0 + ms(3000));
        assert_eq!(aimd.limit(), 32);
        aimd.record(&busy, ms(10), t0 + ms(3001));
        assert_eq!(aimd.limit(), 32, "one cut per average latency (10 ms)");
        aimd.record(&ok, ms(25), t0 + ms(3050));
        assert_eq!(aimd.limit(), 32, "a little slower than usual is noise");
        aimd.record(&ok, ms(500), t0 + ms(3100));
        assert_eq!(aimd.limit(), 16, "a delivery far slower than usual is overload too");
        for i in 0..100 {
            aimd.record(&busy, ms(10), t0 + ms(4000 + i * 100));
        }
        assert_eq!(aimd.limit(), 1, "never below one");
        let refused = table.classify(&Err(DeliveryError::Connect(std::sync::Arc::new(
            std::io::Error::other("x"),
        ))));
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
            assert_eq!(b.record(Verdict::ServerFault, false, t0), (Treat::AsClassified, None));
            assert_eq!(b.record(Verdict::Rejected(404), false, t0), (Treat::AsClassified, None));
        }
        assert_eq!(b.admit(16, t0), (16, None));
    }

    #[test]
    fn verdicts_read_the_classified_outcome() {
        let status = |status| {
            Err(DeliveryError::Status {
                status,
                retry_after: None,
                body: String::new(),
            })
        };
        let of = |table: &Outcomes, result| Verdict::of(&table.classify(&result));
        let table = Outcomes::default();
        let transport = Err(DeliveryError::Connect(std::sync::Arc::new(std::io::Error::other(
            "refused",
        ))));
        assert_eq!(of(&table, Ok(())), Verdict::Success);
        assert_eq!(of(&table, transport), Verdict::ServerFault);
        for s in [502, 503, 504] {
            assert_eq!(of(&table, status(s)), Verdict::ServerFault, "{s}");
        }
        for s in [429, 500] {
            assert_eq!(of(&table, status(s)), Verdict::Answered, "{s}");
        }
        for s in [400, 404, 422] {
            assert_eq!(of(&table, status(s)), Verdict::Rejected(s), "{s}");
        }
        // What the operator set is what the breaker sees.
        let set = Outcomes::parse("409=delivered,503=reject,404=retry").unwrap();
        assert_eq!(of(&set, status(409)), Verdict::Success);
        assert_eq!(of(&set, status(503)), Verdict::Rejected(503));
        assert_eq!(of(&set, status(404)), Verdict::Answered);
    }
}
