//! When an unanswered message is sent again: the first retry after a base delay, then
//! each delay doubled up to a maximum. The one schedule of every retry loop.

#[derive(Clone, Copy, Debug)]
pub(crate) struct RetrySchedule {
    pub(crate) next_tick: u64,
    backoff_ticks: u64,
}

impl RetrySchedule {
    pub(crate) fn starting(now_ticks: u64, first_backoff_ticks: u64) -> RetrySchedule {
        RetrySchedule {
            next_tick: now_ticks + first_backoff_ticks,
            backoff_ticks: first_backoff_ticks,
        }
    }

    pub(crate) fn is_due(&self, now_ticks: u64) -> bool {
        self.next_tick <= now_ticks
    }

    /// The message was sent again now: schedule the next time, twice as far.
    pub(crate) fn backed_off(&mut self, now_ticks: u64, max_backoff_ticks: u64) {
        self.backoff_ticks = (self.backoff_ticks * 2).min(max_backoff_ticks);
        self.next_tick = now_ticks + self.backoff_ticks;
    }
}
