//! Canary rollouts: the rules that promote a canary or roll it back, from its figures and
//! the current version's over the same window.
//!
//! A canary is judged on what its clients saw: the share of its answers that were 5xx (a
//! panic is answered 500, so it counts), and its p99 time to the response head. Both are
//! compared with the current version's over the same stretch of time, so a slow database or a
//! burst of bad requests that hits both versions fails neither. The error rate is checked
//! continuously once the canary has answered `min_requests`, so a broken build is rolled back
//! within seconds; latency is checked when the canary is due for promotion.

use std::time::Duration;

use crate::plugin::route::{Share, Sticky};
use crate::plugin::stats::{GenerationStats, BUCKETS};

/// How canaries run and are judged (`hotswap serve --canary…`, the `[canary]` table).
#[derive(Debug, Clone)]
pub(crate) struct CanaryPolicy {
    /// Every new build starts as a canary with this share (`--canary`); `None`: a new build
    /// serves every new request at once, unless a canary is started by hand.
    pub(crate) auto: Option<Share>,
    /// New builds found in the plugin directory do not serve by themselves (`--hold`): a
    /// canary or a pin started by hand (or deploy/rollout.sh) serves them.
    pub(crate) hold: bool,
    /// The version the host starts with, pinned (`--pin`): what a fleet released, so that a
    /// host that restarts does not serve a newer build no rollout has released.
    pub(crate) start_pin: Option<semver::Version>,
    /// Where a request's sticky key is: requests with one key go to one version.
    pub(crate) sticky: Option<Sticky>,
    /// Promoted once it has answered this many requests (if healthy).
    pub(crate) requests: u64,
    /// Or once it has run this long, if it answered at least `min_requests` (if healthy).
    pub(crate) duration: Duration,
    /// Judged only once it has answered this many requests.
    pub(crate) min_requests: u64,
    /// The most its rate of 5xx answers may exceed the current version's, in percentage
    /// points.
    pub(crate) max_error_rate: f64,
    /// The most its p99 time to the response head may be, as a multiple of the current
    /// version's, plus `latency_slack`.
    pub(crate) max_latency_ratio: f64,
    /// Differences of p99 below this are noise (scheduling on a busy machine, a canary's
    /// first requests), not a regression.
    pub(crate) latency_slack: Duration,
}

impl Default for CanaryPolicy {
    fn default() -> CanaryPolicy {
        CanaryPolicy {
            auto: None,
            hold: false,
            start_pin: None,
            sticky: None,
            requests: 1000,
            duration: Duration::from_secs(600),
            min_requests: 100,
            max_error_rate: 1.0,
            max_latency_ratio: 1.5,
            latency_slack: Duration::from_millis(10),
        }
    }
}

/// A version's answers over a window: how many, how many were 5xx, and when their response
/// heads were ready (per latency bucket, the last one +Inf).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Window {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) buckets: [u64; 17],
}

impl Window {
    /// Everything `stats` has counted so far.
    pub(crate) fn of(stats: &GenerationStats) -> Window {
        let mut window = Window::default();
        for (status, totals) in stats.by_status() {
            window.requests += totals.count;
            if status >= 500 {
                window.errors += totals.count;
            }
            for (sum, n) in window.buckets.iter_mut().zip(totals.buckets) {
                *sum += n;
            }
        }
        window
    }

    /// What was counted after `start`.
    pub(crate) fn since(&self, start: &Window) -> Window {
        Window {
            requests: self.requests.saturating_sub(start.requests),
            errors: self.errors.saturating_sub(start.errors),
            buckets: std::array::from_fn(|i| self.buckets[i].saturating_sub(start.buckets[i])),
        }
    }

    /// The share of 5xx answers, in percent (0 without answers).
    pub(crate) fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        self.errors as f64 * 100.0 / self.requests as f64
    }

    /// The 99th percentile of the time to the response head, interpolated within its bucket
    /// (`None` without answers). Past the last bound, the last bound.
    pub(crate) fn p99(&self) -> Option<Duration> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (total as f64 * 0.99).ceil().max(1.0);
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let low = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
                let Some(&high) = BUCKETS.get(i) else { return Some(Duration::from_secs_f64(low)) };
                let within = (rank - below as f64) / n as f64;
                return Some(Duration::from_secs_f64(low + (high - low) * within));
            }
            below += n;
        }
        None
    }
}

/// What to do with a canary now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Not yet due: how far it is.
    Wait(String),
    /// Healthy and due: why.
    Promote(String),
    /// Unhealthy: the measured reason.
    RollBack(String),
}

/// Judges a canary that has answered `canary` over the window in which the current version
/// answered `current`, `elapsed` after it started.
pub(crate) fn judge(policy: &CanaryPolicy, canary: &Window, current: &Window, elapsed: Duration) -> Verdict {
    let errors = |w: &Window| format!("{:.1} % of {} requests", w.error_rate(), w.requests);
    // Judged from `min_requests` on, and at the latest when it is due by count.
    let judged = policy.min_requests.min(policy.requests).max(1);
    if canary.requests >= judged && canary.error_rate() > current.error_rate() + policy.max_error_rate {
        return Verdict::RollBack(format!(
            "its 5xx answers and panics were {}, against {} for the current version over the same window \
             (allowed: {:.1} points more)",
            errors(canary),
            errors(current),
            policy.max_error_rate
        ));
    }
    let due = canary.requests >= policy.requests || (elapsed >= policy.duration && canary.requests >= policy.min_requests);
    if !due {
        return Verdict::Wait(format!(
            "{} of {} requests answered ({} s of {} s; judged after {} requests)",
            canary.requests,
            policy.requests,
            elapsed.as_secs(),
            policy.duration.as_secs(),
            policy.min_requests
        ));
    }
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    if let (Some(theirs), Some(ours)) = (canary.p99(), current.p99()) {
        // Saturating: the ratio and slack are the operator's, and may be absurdly large.
        let scaled = Duration::try_from_secs_f64(ours.as_secs_f64() * policy.max_latency_ratio).unwrap_or(Duration::MAX);
        let allowed = scaled.saturating_add(policy.latency_slack);
        if theirs > allowed {
            return Verdict::RollBack(format!(
                "its p99 time to the response head was {}, against {} for the current version over the same window \
                 (allowed: {} × {} + {} = {})",
                ms(theirs),
                ms(ours),
                policy.max_latency_ratio,
                ms(ours),
                ms(policy.latency_slack),
                ms(allowed)
            ));
        }
    }
    Verdict::Promote(format!(
        "healthy after {} requests: 5xx {:.1} % (current {:.1} %), p99 {} (current {})",
        canary.requests,
        canary.error_rate(),
        current.error_rate(),
        canary.p99().map_or_else(|| "-".into(), ms),
        current.p99().map_or_else(|| "-".into(), ms)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(requests: u64, errors: u64, bucket: usize) -> Window {
        let mut buckets = [0; 17];
        buckets[bucket] = requests;
        Window { requests, errors, buckets }
    }

    #[test]
    fn a_canary_failing_a_fifth_of_its_requests_is_rolled_back_once_judged() {
        let policy = CanaryPolicy { min_requests: 50, ..CanaryPolicy::default() };
        let current = window(900, 0, 2);
        assert!(matches!(judge(&policy, &window(40, 8, 2), &current, Duration::ZERO), Verdict::Wait(_)));
        let Verdict::RollBack(reason) = judge(&policy, &window(50, 10, 2), &current, Duration::ZERO) else { panic!() };
        assert!(reason.contains("20.0 % of 50 requests"), "{reason}");
    }

    #[test]
    fn errors_both_versions_see_fail_neither() {
        let policy = CanaryPolicy { requests: 100, ..CanaryPolicy::default() };
        let verdict = judge(&policy, &window(100, 10, 2), &window(900, 90, 2), Duration::ZERO);
        assert!(matches!(verdict, Verdict::Promote(_)), "{verdict:?}");
    }

    #[test]
    fn a_healthy_canary_is_promoted_by_count_or_by_time() {
        let policy = CanaryPolicy { requests: 200, min_requests: 20, duration: Duration::from_secs(60), ..CanaryPolicy::default() };
        let current = window(2000, 1, 3);
        assert!(matches!(judge(&policy, &window(199, 0, 3), &current, Duration::from_secs(59)), Verdict::Wait(_)));
        assert!(matches!(judge(&policy, &window(200, 0, 3), &current, Duration::ZERO), Verdict::Promote(_)));
        assert!(matches!(judge(&policy, &window(20, 0, 3), &current, Duration::from_secs(60)), Verdict::Promote(_)));
        assert!(matches!(judge(&policy, &window(19, 0, 3), &current, Duration::from_secs(600)), Verdict::Wait(_)));
    }

    #[test]
    fn a_slower_canary_is_rolled_back_when_due() {
        let policy = CanaryPolicy { requests: 100, ..CanaryPolicy::default() };
        // 50-100 ms against 0.5-1 ms.
        let Verdict::RollBack(reason) = judge(&policy, &window(100, 0, 9), &window(900, 0, 3), Duration::ZERO) else { panic!() };
        assert!(reason.contains("p99") && reason.contains("+ 10.00 ms"), "{reason}");
        // The same bucket is within any ratio of at least one; 5-10 ms is within the slack.
        assert!(matches!(judge(&policy, &window(100, 0, 9), &window(900, 0, 9), Duration::ZERO), Verdict::Promote(_)));
        assert!(matches!(judge(&policy, &window(100, 0, 6), &window(900, 0, 3), Duration::ZERO), Verdict::Promote(_)));
        let strict = CanaryPolicy { latency_slack: Duration::ZERO, ..policy.clone() };
        assert!(matches!(judge(&strict, &window(100, 0, 6), &window(900, 0, 3), Duration::ZERO), Verdict::RollBack(_)));
        // Absurd bounds allow anything, without overflowing.
        let lax = CanaryPolicy { latency_slack: Duration::MAX, max_latency_ratio: 1e300, ..policy };
        assert!(matches!(judge(&lax, &window(100, 0, 9), &window(900, 0, 3), Duration::ZERO), Verdict::Promote(_)));
    }

    #[test]
    fn errors_are_judged_by_the_time_it_is_due_whatever_min_requests_says() {
        let policy = CanaryPolicy { requests: 50, min_requests: 100, ..CanaryPolicy::default() };
        assert!(matches!(judge(&policy, &window(50, 50, 2), &window(500, 0, 2), Duration::ZERO), Verdict::RollBack(_)));
    }

    #[test]
    fn the_p99_is_interpolated_within_its_bucket() {
        assert_eq!(Window::default().p99(), None);
        let p99 = window(100, 0, 3).p99().unwrap(); // all in (0.5 ms, 1 ms]
        assert!(p99 > Duration::from_micros(990) && p99 <= Duration::from_millis(1), "{p99:?}");
        let mut w = window(99, 0, 0);
        w.buckets[16] = 1;
        w.requests = 100;
        assert_eq!(w.p99(), Some(Duration::from_micros(100)));
        let Window { buckets, .. } = window(1, 0, 16);
        assert_eq!(Window { requests: 1, errors: 0, buckets }.p99(), Some(Duration::from_secs(10)));
    }
}
