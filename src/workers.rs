//! Thread-per-core serving: client connections run on `workers` threads, each a single-threaded tokio runtime.
//!
//! A connection stays on the thread it was handed to, with everything its requests do: the upstream
//! connection they borrow comes from that thread's own pool ([`slot`]), so a forwarded request's four socket
//! events (client read, upstream write, upstream read, client write) wake tasks on one thread. On tokio's
//! work-stealing runtime those wake-ups crossed threads, each a futex call and a context switch: measured in
//! BENCHMARKS.md. The accept loop hands connections out in turn; keep-alive clients (the PowerJob client,
//! load generators) spread evenly that way.
//!
//! Work that is not a client connection (the admin listener, Redis's connection drivers, signals) stays on the
//! runtime that called [`Workers::start`].
//!
//! On Linux the workers run under the `SCHED_BATCH` policy (`batch_scheduling`, on by default). Under the normal
//! policy a worker woken by its sockets preempted whatever ran on its CPU, most often the very client or upstream
//! thread that had just written to it and would have blocked a moment later: on CPUs shared with other busy
//! programs, pairs of threads took turns of a few microseconds, and the machine sat idle 16–19% of the time.
//! A batch thread gets the same share of CPU but waits for the running thread's turn to end: measured in
//! BENCHMARKS.md.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::thread;

use tokio::sync::mpsc;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// This thread's worker index, on worker threads.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The slot of per-thread state to use on this thread: `1 + index` on worker `index`, 0 anywhere else (a
/// slot shared by every other thread).
pub fn slot() -> usize {
    WORKER.with(|worker| worker.get().map_or(0, |index| index + 1))
}

/// How many workers `workers = 0` means: one per CPU the process may use.
pub fn count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// The worker threads. Dropping this lets them finish: each drops its runtime, and with it any task still
/// there (idle upstream connections), once the connections handed to it were drained.
pub struct Workers {
    queues: Vec<mpsc::UnboundedSender<Job>>,
    next: usize,
}

impl Workers {
    /// Starts `count` worker threads, under `SCHED_BATCH` when `batch` (Linux only; elsewhere it is ignored).
    pub fn start(count: usize, batch: bool) -> io::Result<Workers> {
        let mut queues = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (queue, mut jobs) = mpsc::unbounded_channel::<Job>();
            thread::Builder::new()
                .name(format!("runonce-worker-{index}"))
                .spawn(move || {
                    WORKER.with(|worker| worker.set(Some(index)));
                    if batch {
                        if let Err(err) = batch_policy() {
                            tracing::warn!(worker = index, %err, "could not switch to SCHED_BATCH; the worker keeps the normal policy");
                        }
                    }
                    runtime.block_on(async move {
                        while let Some(job) = jobs.recv().await {
                            tokio::spawn(job);
                        }
                    });
                })?;
            queues.push(queue);
        }
        Ok(Workers { queues, next: 0 })
    }

    /// Runs `job` on the next worker in turn.
    pub fn spawn(&mut self, job: impl Future<Output = ()> + Send + 'static) {
        let queue = &self.queues[self.next];
        self.next = (self.next + 1) % self.queues.len();
        if let Err(mpsc::error::SendError(job)) = queue.send(Box::pin(job)) {
            // Its thread is gone (it cannot panic outside a task, whose panics tokio catches): serve here.
            tokio::spawn(job);
        }
    }
}

/// Puts the calling thread under `SCHED_BATCH` (an unprivileged thread may; no capability is needed).
///
/// The system call itself, not libc's wrapper: musl's `sched_setscheduler` always fails (POSIX means the
/// process, Linux's call sets one thread), and its `sched_param` has fields glibc's has not. The kernel's
/// `struct sched_param` is one `int`.
#[cfg(target_os = "linux")]
fn batch_policy() -> io::Result<()> {
    #[repr(C)]
    struct SchedParam {
        sched_priority: libc::c_int,
    }
    let param = SchedParam { sched_priority: 0 };
    // SAFETY: a plain system call; pid 0 is the calling thread, and `param` outlives the call.
    let set = unsafe {
        libc::syscall(
            libc::SYS_sched_setscheduler,
            0,
            libc::SCHED_BATCH,
            &param as *const SchedParam,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn batch_policy() -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_workers_in_turn_and_see_their_slot() {
        let mut workers = Workers::start(2, false).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        for _ in 0..4 {
            let tx = tx.clone();
            workers.spawn(async move {
                let name = thread::current().name().map(String::from);
                tx.send((slot(), name)).unwrap();
            });
        }
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(rx.recv().await.unwrap());
        }
        seen.sort();
        let worker = |i: usize| (i + 1, Some(format!("runonce-worker-{i}")));
        assert_eq!(seen, vec![worker(0), worker(0), worker(1), worker(1)]);
        assert_eq!(slot(), 0, "the test's own thread is no worker");
    }

    /// The calling thread's policy, as the kernel reports it (field 41 of its stat line).
    #[cfg(target_os = "linux")]
    fn policy() -> u32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split(' ').nth(38).unwrap().parse().unwrap()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn workers_run_under_sched_batch_when_asked_and_the_normal_policy_otherwise() {
        for (batch, expected) in [(true, libc::SCHED_BATCH), (false, libc::SCHED_OTHER)] {
            let mut workers = Workers::start(1, batch).unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            workers.spawn(async move { tx.send(policy()).unwrap() });
            assert_eq!(rx.recv().await.unwrap(), expected as u32, "batch {batch}");
        }
        assert_eq!(
            policy(),
            libc::SCHED_OTHER as u32,
            "the caller's own policy is left alone"
        );
    }

    #[test]
    fn zero_workers_means_one_per_cpu() {
        assert_eq!(count(3), 3);
        assert!(count(0) >= 1);
        assert_eq!(
            count(0),
            thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
}
