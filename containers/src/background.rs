//! One thread for the work of a start or an exit that no caller waits for: closing
//! detached mounts, deleting directory trees and links already out of every name. A
//! thread per job cost a clone, a fresh stack and a malloc arena on every container run.

use std::sync::mpsc::{channel, Sender};
use std::sync::OnceLock;

type Job = Box<dyn FnOnce() + Send>;

/// Runs `job` on the background thread, after the jobs queued before it; on the
/// caller's thread if that one cannot be started. Jobs still queued when the process
/// exits do not run, so each must leave nothing that a restart cannot find and finish.
pub fn run(job: impl FnOnce() + Send + 'static) {
    static WORKER: OnceLock<Option<Sender<Job>>> = OnceLock::new();
    let worker = WORKER.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name("ltv-background".into())
            .spawn(move || rx.into_iter().for_each(|job| job()))
            .map_err(|e| tracing::warn!("no background thread ({e}): its jobs run inline"))
            .ok()
            .map(|_| tx)
    });
    let job: Job = Box::new(job);
    match worker {
        Some(tx) => {
            if let Err(returned) = tx.send(job) {
                (returned.0)()
            }
        }
        None => job(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn jobs_run_in_order_off_the_caller() {
        let (tx, rx) = std::sync::mpsc::channel();
        let caller = std::thread::current().id();
        for i in 0..3 {
            let tx = tx.clone();
            super::run(move || {
                tx.send((i, std::thread::current().id())).unwrap();
            });
        }
        for i in 0..3 {
            let (n, thread) = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
            assert_eq!(n, i);
            assert_ne!(thread, caller);
        }
    }
}
