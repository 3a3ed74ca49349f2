//! When the container backend tops its spare helpers up: one at once for a pool that a
//! start emptied, the rest once the daemon is quiet, all on one thread.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Refills of spare helpers wait for a quiet moment: a refill's clone, cgroup directories
/// and veth take the same CPUs and kernel locks (cgroup_mutex, rtnl) as the start or exec
/// that just used a spare, and as the one that usually follows it (`launch`, then `exec`).
/// Run right after each start, the refill ate what making veths ahead saved.
#[derive(Default)]
pub struct Quiet {
    /// Starts and execs running now, and when the last one ended.
    state: Mutex<(usize, Option<Instant>)>,
}

impl Quiet {
    /// Quiet this long after the last start or exec ends.
    pub const AFTER: Duration = Duration::from_millis(15);
    /// A refill waits no longer than this, so a steady stream of starts still gets spares.
    pub const AT_MOST: Duration = Duration::from_millis(150);

    fn lock(&self) -> MutexGuard<'_, (usize, Option<Instant>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a start or exec as running until the guard drops.
    pub fn enter(self: &Arc<Self>) -> impl Drop {
        self.lock().0 += 1;
        QuietGuard(self.clone())
    }

    /// How much longer a refill asked for before `deadline` should wait: `None` once
    /// nothing ran for [`Self::AFTER`], or at the deadline.
    fn left(&self, deadline: Instant) -> Option<Duration> {
        let now = Instant::now();
        let pause = match *self.lock() {
            (0, None) => return None,
            (0, Some(last)) => Self::AFTER.checked_sub(now - last)?,
            _ => Self::AFTER,
        };
        let until_deadline = deadline.checked_duration_since(now)?;
        (!until_deadline.is_zero()).then(|| pause.min(until_deadline))
    }
}

struct QuietGuard(Arc<Quiet>);

impl Drop for QuietGuard {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.0 -= 1;
        state.1 = Some(Instant::now());
    }
}

/// What a job does: top its reserve up to this many spares (its size at most).
pub type RefillJob = Box<dyn Fn(usize) + Send + Sync>;

/// Runs refills on one thread of its own (a refill waits on the kernel, not the runtime).
/// A request tops its job up to one spare at once, and fully when quiet: waiting for quiet
/// alone starved the pool in a stream of starts (28 of 40 back-to-back `run --rm --network
/// none` made their own helper). One thread rather than one per request: in a stream of
/// starts those piled up, 15 or more alive at once, and the daemon kept each one's stack
/// and malloc arena after it ended (15 KiB per instance over 50 launches).
pub struct Refiller {
    shared: Arc<Shared>,
}

struct Shared {
    quiet: Arc<Quiet>,
    jobs: Vec<RefillJob>,
    state: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    /// Jobs to top up to one spare now.
    now: BTreeSet<usize>,
    /// Jobs to top up fully when quiet.
    later: BTreeSet<usize>,
    /// When the oldest of `later` was asked for.
    since: Option<Instant>,
    closed: bool,
}

impl Refiller {
    /// `jobs` are requested by index. Without a thread (none could start), requests are
    /// dropped: a start without a spare makes its own helper.
    pub fn new(quiet: Arc<Quiet>, jobs: Vec<RefillJob>) -> Refiller {
        let shared = Arc::new(Shared {
            quiet,
            jobs,
            state: Default::default(),
            wake: Condvar::new(),
        });
        let worker = shared.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("ltv-refill".into())
            .spawn(move || worker.run())
        {
            tracing::warn!("no refill thread ({e}): starts make their own helpers");
            shared.lock().closed = true;
        }
        Refiller { shared }
    }

    pub fn request(&self, job: usize) {
        let mut pending = self.shared.lock();
        if pending.closed || job >= self.shared.jobs.len() {
            return;
        }
        pending.now.insert(job);
        pending.later.insert(job);
        pending.since.get_or_insert_with(Instant::now);
        self.shared.wake.notify_one();
    }
}

impl Drop for Refiller {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        // Lowest priority: in a stream of requests, a refill overlapped about half of the
        // `launch`es and `exec`s it followed; at nice 19 it takes mostly the CPU they
        // leave idle (system `launch` + `exec` back to back 2-4 % faster).
        // SAFETY: setpriority on our own thread id, no pointers.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        let mut pending = self.lock();
        while !pending.closed {
            // Between two jobs, what a start just emptied goes first.
            let (job, count) = if let Some(job) = pending.now.pop_first() {
                (job, 1)
            } else if let Some(since) = pending.since {
                if let Some(pause) = self.quiet.left(since + Quiet::AT_MOST) {
                    pending = self.wait(pending, Some(pause));
                    continue;
                }
                let Some(job) = pending.later.pop_first() else {
                    pending.since = None;
                    continue;
                };
                if pending.later.is_empty() {
                    pending.since = None;
                }
                (job, usize::MAX)
            } else {
                pending = self.wait(pending, None);
                continue;
            };
            drop(pending);
            (self.jobs[job])(count);
            pending = self.lock();
        }
    }

    fn wait<'a>(
        &self,
        pending: MutexGuard<'a, Pending>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, Pending> {
        match timeout {
            Some(t) => match self.wake.wait_timeout(pending, t) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            },
            None => self.wake.wait(pending).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver};

    /// A refiller of one job that reports each call: (count, time since `t`).
    fn reporting(quiet: &Arc<Quiet>, t: Instant) -> (Refiller, Receiver<(usize, Duration)>) {
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let job: RefillJob = Box::new(move |count| {
            let _ = tx.lock().unwrap().send((count, t.elapsed()));
        });
        (Refiller::new(quiet.clone(), vec![job]), rx)
    }

    fn next(rx: &Receiver<(usize, Duration)>) -> (usize, Duration) {
        rx.recv_timeout(Duration::from_secs(10)).expect("a refill")
    }

    #[test]
    fn refills_wait_for_quiet() {
        let quiet = Arc::new(Quiet::default());
        let t = Instant::now();
        let (refiller, rx) = reporting(&quiet, t);
        // Nothing ever ran: one spare, then the rest, without waiting.
        refiller.request(0);
        assert_eq!(next(&rx).0, 1);
        let (count, at) = next(&rx);
        assert_eq!(count, usize::MAX);
        assert!(at < Quiet::AT_MOST, "no wait when nothing ran: {at:?}");
        // A start running: the full refill waits for it to end, then for the quiet period.
        let busy = quiet.enter();
        let t = Instant::now();
        refiller.request(0);
        let (count, at) = next(&rx);
        assert_eq!(count, 1, "one spare first");
        assert!(at < Quiet::AT_MOST, "at once, not at the deadline: {at:?}");
        std::thread::sleep(Duration::from_millis(40));
        drop(busy);
        let (count, _) = next(&rx);
        assert_eq!(count, usize::MAX);
        assert!(t.elapsed() >= Duration::from_millis(40) + Quiet::AFTER);
    }

    #[test]
    fn a_stream_of_starts_gets_one_spare_at_once_and_one_full_refill() {
        let quiet = Arc::new(Quiet::default());
        // A stream of starts: never quiet.
        let _busy = quiet.enter();
        let t = Instant::now();
        let (refiller, rx) = reporting(&quiet, t);
        for _ in 0..10 {
            refiller.request(0);
        }
        let (count, at) = next(&rx);
        assert_eq!(count, 1, "one spare first");
        assert!(at < Quiet::AT_MOST, "without waiting for quiet: {at:?}");
        // Repeated requests for one spare may each run (each is quick); the full ones
        // coalesce into one, at the deadline.
        let mut full = Vec::new();
        while let Ok((count, at)) = rx.recv_timeout(Quiet::AT_MOST * 3) {
            if count == usize::MAX {
                full.push(at);
            }
        }
        assert_eq!(full.len(), 1, "one full refill: {full:?}");
        assert!(
            full[0] >= Quiet::AT_MOST,
            "after waiting for quiet: {full:?}"
        );
        // Dropped, the thread ends, and its job (holding the sender) with it.
        drop(refiller);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn refills_run_at_the_lowest_priority() {
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let job: RefillJob = Box::new(move |_| {
            // SAFETY: getpriority of our own thread id, no pointers.
            let nice =
                unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
            let _ = tx.lock().unwrap().send(nice);
        });
        let refiller = Refiller::new(Arc::new(Quiet::default()), vec![job]);
        refiller.request(0);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(19));
    }

    #[test]
    fn an_unknown_job_is_ignored() {
        let quiet = Arc::new(Quiet::default());
        let (refiller, rx) = reporting(&quiet, Instant::now());
        refiller.request(7);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    }
}
