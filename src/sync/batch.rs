//! The batch queue: which records go in the next request, and what to do with the records of
//! a batch Wazzup refused. Pure: the caller sends and records; the queue answers with an
//! action, the way a retry policy does.
//!
//! - A refused batch is split by the indexes the answer names, or halved, until the refused
//!   records stand alone.
//! - A record refused because its phone is taken is held for one more try once the others have
//!   landed (two users swapping phones in one cycle).
//! - Once a single record is refused because the account is full, later creates are refused
//!   without being sent, while updates still go.

/// What to do with a batch Wazzup refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SplitStep {
    /// The answer named the offending records: refuse them, resend the rest.
    Named(Vec<usize>),
    /// A single record: it is the one refused.
    Alone,
    /// Split in two at this index and send each half.
    Halve(usize),
}

/// Decides how to single out the refused records of a batch of `len`.
pub fn split_step(len: usize, indexes: &[usize]) -> SplitStep {
    let named: Vec<usize> = indexes.iter().copied().filter(|i| *i < len).collect();
    if len == 1 {
        SplitStep::Alone
    } else if !named.is_empty() && named.len() == indexes.len() {
        SplitStep::Named(named)
    } else {
        SplitStep::Halve(len / 2)
    }
}

/// Why Wazzup refused a batch, as far as the queue cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The account holds as many users as it may (`USER_LIMIT_EXCEEDED`): about the account,
    /// not the records, so never singled out by index.
    UserLimit,
    /// A phone is taken by another user (`USER_ALREADY_EXISTS`): it may be freed this cycle.
    PhoneTaken,
    /// Anything else about the records.
    Other,
}

/// The queue's answer to a refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<T> {
    /// These records are refused for good this cycle: dead-letter them.
    Refuse(Vec<T>),
    /// The batch's single record is held for one more try; if it is still held when sending
    /// stops ([`BatchQueue::into_held`]), this refusal stands.
    Held,
    /// Nothing to record: the batch went back into the queue, split.
    Requeued,
}

/// The next request's records.
#[derive(Debug, PartialEq, Eq)]
pub struct Next<T> {
    /// Send these.
    pub send: Vec<T>,
    /// Refuse these without sending: creates, once the account is full.
    pub full: Vec<T>,
}

/// Records waiting to be sent, in batches of at most `batch_size`, in their original order.
#[derive(Debug)]
pub struct BatchQueue<T> {
    stack: Vec<Vec<T>>,
    batch_size: usize,
    held: Vec<T>,
    second_round: bool,
    full: bool,
    landed: usize,
}

impl<T> BatchQueue<T> {
    pub fn new(items: Vec<T>, batch_size: usize) -> Self {
        let mut queue = Self {
            stack: Vec::new(),
            batch_size: batch_size.max(1),
            held: Vec::new(),
            second_round: false,
            full: false,
            landed: 0,
        };
        queue.push_all(items);
        queue
    }

    fn push_all(&mut self, items: Vec<T>) {
        let mut batches: Vec<Vec<T>> = Vec::new();
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            batches.push(items.by_ref().take(self.batch_size).collect());
        }
        self.stack.extend(batches.into_iter().rev());
    }

    /// Marks the account full from the start (an earlier round found it so).
    pub fn set_full(&mut self) {
        self.full = true;
    }

    /// True once a record was refused because the account is full.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// The next batch, or None when the queue is empty. Once the account is full, creates
    /// come back in `full` instead of `send`.
    pub fn next(&mut self, is_create: impl Fn(&T) -> bool) -> Option<Next<T>> {
        loop {
            let batch = self.stack.pop()?;
            let (send, full) = if self.full {
                batch.into_iter().partition(|r| !is_create(r))
            } else {
                (batch, Vec::new())
            };
            if !send.is_empty() || !full.is_empty() {
                return Some(Next { send, full });
            }
        }
    }

    /// Once everything else was answered: records held after a taken phone get their one more
    /// try, if anything landed meanwhile. True when they went back into the queue.
    pub fn second_round(&mut self) -> bool {
        if !self.stack.is_empty() || self.held.is_empty() || self.second_round || self.landed == 0 {
            return false;
        }
        self.second_round = true;
        let held = std::mem::take(&mut self.held);
        self.push_all(held);
        true
    }

    /// Notes that `n` records of the last batch landed.
    pub fn landed(&mut self, n: usize) {
        self.landed += n;
    }

    /// Decides what happens to a refused batch.
    pub fn refused(
        &mut self,
        mut batch: Vec<T>,
        refusal: Refusal,
        indexes: &[usize],
    ) -> Verdict<T> {
        if refusal == Refusal::UserLimit && batch.len() == 1 {
            self.full = true;
        }
        let indexes = if refusal == Refusal::UserLimit {
            &[]
        } else {
            indexes
        };
        match split_step(batch.len(), indexes) {
            SplitStep::Alone if refusal == Refusal::PhoneTaken && !self.second_round => {
                self.held.extend(batch);
                Verdict::Held
            }
            SplitStep::Alone => Verdict::Refuse(batch),
            SplitStep::Named(named) => {
                let (mut refused, mut rest) = (Vec::new(), Vec::new());
                for (i, r) in batch.into_iter().enumerate() {
                    if named.contains(&i) {
                        refused.push(r);
                    } else {
                        rest.push(r);
                    }
                }
                if !rest.is_empty() {
                    self.stack.push(rest);
                }
                Verdict::Refuse(refused)
            }
            SplitStep::Halve(mid) => {
                let second = batch.split_off(mid);
                self.stack.push(second);
                self.stack.push(batch);
                Verdict::Requeued
            }
        }
    }

    /// Takes the records still held when sending stops: refused for good this cycle.
    pub fn take_held(&mut self) -> Vec<T> {
        std::mem::take(&mut self.held)
    }

    /// Records still queued (held ones included).
    pub fn len(&self) -> usize {
        self.stack.iter().map(Vec::len).sum::<usize>() + self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u32) -> Vec<u32> {
        (1..=n).collect()
    }

    #[test]
    fn a_refused_batch_is_split_by_named_indexes_or_in_halves() {
        assert_eq!(split_step(100, &[3, 7]), SplitStep::Named(vec![3, 7]));
        assert_eq!(split_step(100, &[]), SplitStep::Halve(50));
        assert_eq!(split_step(3, &[5]), SplitStep::Halve(1));
        assert_eq!(split_step(1, &[]), SplitStep::Alone);
    }

    #[test]
    fn records_go_in_batches_of_the_size_in_their_order() {
        let mut q = BatchQueue::new(ids(5), 2);
        let sent: Vec<Vec<u32>> = std::iter::from_fn(|| q.next(|_| true).map(|n| n.send)).collect();
        assert_eq!(sent, [vec![1, 2], vec![3, 4], vec![5]]);
    }

    #[test]
    fn halving_singles_out_one_refused_record_among_a_hundred() {
        let mut q = BatchQueue::new(ids(100), 100);
        let mut refused = Vec::new();
        let mut sent = 0;
        while let Some(next) = q.next(|_| true) {
            sent += 1;
            if next.send.contains(&42) {
                match q.refused(next.send, Refusal::Other, &[]) {
                    Verdict::Refuse(r) => refused.extend(r),
                    Verdict::Held | Verdict::Requeued => {}
                }
            } else {
                q.landed(next.send.len());
            }
        }
        assert_eq!(refused, [42]);
        assert!(sent <= 15, "about 2 log2(100) requests, not 100: {sent}");
    }

    #[test]
    fn named_records_are_refused_and_the_rest_sent_again_whole() {
        let mut q = BatchQueue::new(ids(10), 10);
        let first = q.next(|_| true).unwrap().send;
        assert_eq!(
            q.refused(first, Refusal::Other, &[2, 5]),
            Verdict::Refuse(vec![3, 6])
        );
        assert_eq!(q.next(|_| true).unwrap().send, [1, 2, 4, 5, 7, 8, 9, 10]);
    }

    #[test]
    fn a_taken_phone_gets_one_more_try_after_the_others_landed() {
        let mut q = BatchQueue::new(ids(2), 1);
        let one = q.next(|_| true).unwrap().send;
        assert_eq!(q.refused(one, Refusal::PhoneTaken, &[]), Verdict::Held);
        let two = q.next(|_| true).unwrap().send;
        assert_eq!(two, [2]);
        assert!(
            q.next(|_| true).is_none(),
            "held until everything else was answered"
        );
        q.landed(1);
        assert!(q.second_round());
        let again = q.next(|_| true).unwrap().send;
        assert_eq!(again, [1], "held record comes back");
        assert_eq!(
            q.refused(again, Refusal::PhoneTaken, &[]),
            Verdict::Refuse(vec![1]),
            "only one more try"
        );
        assert!(q.next(|_| true).is_none());
        assert!(!q.second_round(), "one more try, not two");
    }

    #[test]
    fn a_held_record_is_not_retried_when_nothing_landed() {
        let mut q = BatchQueue::new(ids(1), 1);
        let one = q.next(|_| true).unwrap().send;
        q.refused(one, Refusal::PhoneTaken, &[]);
        assert!(q.next(|_| true).is_none());
        assert!(!q.second_round());
        assert_eq!(q.take_held(), [1]);
    }

    #[test]
    fn once_the_account_is_full_creates_are_refused_unsent_and_updates_still_go() {
        // Even numbers are updates, odd ones creates.
        let is_create = |r: &u32| r % 2 == 1;
        let mut q = BatchQueue::new(ids(6), 2);
        let first = q.next(is_create).unwrap().send;
        assert_eq!(
            q.refused(first, Refusal::UserLimit, &[0]),
            Verdict::Requeued,
            "halved, index ignored"
        );
        let one = q.next(is_create).unwrap().send;
        assert_eq!(
            q.refused(one, Refusal::UserLimit, &[]),
            Verdict::Refuse(vec![1])
        );
        assert!(q.is_full());
        let next = q.next(is_create).unwrap();
        assert_eq!((next.send, next.full), (vec![2], vec![]));
        let next = q.next(is_create).unwrap();
        assert_eq!((next.send, next.full), (vec![4], vec![3]));
        let next = q.next(is_create).unwrap();
        assert_eq!((next.send, next.full), (vec![6], vec![5]));
        assert!(q.next(is_create).is_none());
    }
}
