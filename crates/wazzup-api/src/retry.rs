//! When to try a request again: transient faults only, on an exponential schedule with full
//! jitter, bounded in attempts and in total wait; a Retry-After the answer gives wins.

use std::time::Duration;

use backon::ExponentialBuilder;

use crate::error::ApiError;

/// Retry settings for transient faults, checked once.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: usize,
    pub initial: Duration,
    pub max: Duration,
    pub max_elapsed: Duration,
}

impl RetryPolicy {
    /// The exponential schedule: steps from `initial` doubling up to `max`, at most
    /// `max_attempts` attempts, at most `max_elapsed` of waiting in all.
    pub fn schedule(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_max_times(self.max_attempts.saturating_sub(1))
            .with_total_delay(Some(self.max_elapsed))
    }

    /// How long to wait after `error` when the schedule's step is `step`: the answer's
    /// Retry-After (bounded by the total wait), or a point drawn uniformly in `0..=step`
    /// (`draw` in 0..=1). None when `error` is not worth retrying.
    pub fn delay(&self, error: &ApiError, step: Duration, draw: f64) -> Option<Duration> {
        match error {
            ApiError::Transient {
                retry_after: Some(wait),
                ..
            } => Some((*wait).min(self.max_elapsed)),
            ApiError::Transient { .. } => Some(step.mul_f64(draw.clamp(0.0, 1.0))),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(60),
        }
    }

    fn transient(retry_after: Option<Duration>) -> ApiError {
        ApiError::Transient {
            reason: "HTTP 503".into(),
            retry_after,
        }
    }

    #[test]
    fn retry_after_wins_and_is_bounded_by_the_total_wait() {
        let p = policy();
        let step = Duration::from_secs(1);
        assert_eq!(
            p.delay(&transient(Some(Duration::from_secs(7))), step, 0.5),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            p.delay(&transient(Some(Duration::from_secs(600))), step, 0.5),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn without_retry_after_the_wait_is_jittered_over_the_step() {
        let p = policy();
        let step = Duration::from_secs(2);
        assert_eq!(p.delay(&transient(None), step, 0.0), Some(Duration::ZERO));
        assert_eq!(
            p.delay(&transient(None), step, 0.25),
            Some(Duration::from_millis(500))
        );
        assert_eq!(p.delay(&transient(None), step, 1.0), Some(step));
    }

    #[test]
    fn rejections_and_refused_tokens_are_never_retried() {
        let p = policy();
        let rejected = ApiError::Rejected {
            status: 400,
            code: "X".into(),
            description: String::new(),
            indexes: vec![],
        };
        assert_eq!(p.delay(&rejected, Duration::from_secs(1), 0.5), None);
        let refused = ApiError::Unauthorized { status: 401 };
        assert_eq!(p.delay(&refused, Duration::from_secs(1), 0.5), None);
    }
}
