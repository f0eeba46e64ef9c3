//! How local training shares a machine's cores when several participants train in one
//! process (a simulation), instead of every participant's thread competing for every core.

use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

/// The policy for trainings that run at the same time in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sharing {
    /// One training per core, each on one thread; the others wait for a core.
    #[default]
    PerCore,
    /// One training at a time, each on all cores.
    OneAtATime,
    /// No limit: every training runs at once on the process-wide pool (one thread per core).
    Unmanaged,
}

impl std::str::FromStr for Sharing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "per-core" => Ok(Sharing::PerCore),
            "one-at-a-time" => Ok(Sharing::OneAtATime),
            "unmanaged" => Ok(Sharing::Unmanaged),
            _ => Err(format!(
                "unknown sharing {s:?}: use per-core, one-at-a-time or unmanaged"
            )),
        }
    }
}

impl std::fmt::Display for Sharing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sharing::PerCore => "per-core",
            Sharing::OneAtATime => "one-at-a-time",
            Sharing::Unmanaged => "unmanaged",
        })
    }
}

/// Compute pools handed out to trainings: a training takes a pool, runs on it (its tensor
/// kernels' parallel loops use that pool's threads only) and gives it back.
#[derive(Debug)]
pub struct ComputeSlots {
    sharing: Sharing,
    free: Mutex<Vec<Arc<rayon::ThreadPool>>>,
    returned: Condvar,
}

impl ComputeSlots {
    /// Pools for `cores` cores under `sharing` (at least one core).
    pub fn new(sharing: Sharing, cores: usize) -> std::io::Result<Arc<ComputeSlots>> {
        let cores = cores.max(1);
        let build = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("cohort-train-{i}"))
                .build()
                .map(Arc::new)
                .map_err(std::io::Error::other)
        };
        let free = match sharing {
            Sharing::PerCore => (0..cores).map(|_| build(1)).collect::<Result<_, _>>()?,
            Sharing::OneAtATime => vec![build(cores)?],
            Sharing::Unmanaged => Vec::new(),
        };
        Ok(Arc::new(ComputeSlots {
            sharing,
            free: Mutex::new(free),
            returned: Condvar::new(),
        }))
    }

    /// Pools for every core of this machine.
    pub fn for_this_machine(sharing: Sharing) -> std::io::Result<Arc<ComputeSlots>> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        ComputeSlots::new(sharing, cores)
    }

    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// Runs `f` on a free pool, waiting for one if all are taken (blocks the calling thread:
    /// call it from a blocking task).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        if self.sharing == Sharing::Unmanaged {
            return f();
        }
        let pool = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(p) = free.pop() {
                    break p;
                }
                free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner());
            }
        };
        // Give the pool back even if `f` panics.
        struct Return<'a>(&'a ComputeSlots, Option<Arc<rayon::ThreadPool>>);
        impl Drop for Return<'_> {
            fn drop(&mut self) {
                if let Some(p) = self.1.take() {
                    let mut free = self.0.free.lock().unwrap_or_else(|e| e.into_inner());
                    free.push(p);
                    self.0.returned.notify_one();
                }
            }
        }
        let guard = Return(self, Some(pool.clone()));
        let out = pool.install(f);
        drop(guard);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn per_core_runs_at_most_one_training_per_core_each_on_one_thread() {
        let slots = ComputeSlots::new(Sharing::PerCore, 2).unwrap();
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        std::thread::scope(|s| {
            for _ in 0..6 {
                let (slots, now, most) = (slots.clone(), now.clone(), most.clone());
                s.spawn(move || {
                    slots.run(|| {
                        assert_eq!(rayon::current_num_threads(), 1);
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        now.fetch_sub(1, Ordering::SeqCst);
                    })
                });
            }
        });
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn one_at_a_time_uses_every_core_and_a_panic_returns_the_pool() {
        let slots = ComputeSlots::new(Sharing::OneAtATime, 3).unwrap();
        assert_eq!(slots.run(rayon::current_num_threads), 3);
        let s2 = slots.clone();
        assert!(
            std::thread::spawn(move || s2.run(|| panic!("training failed")))
                .join()
                .is_err()
        );
        assert_eq!(slots.run(|| 7), 7, "the pool came back after the panic");
        assert_eq!("per-core".parse::<Sharing>(), Ok(Sharing::PerCore));
        assert!("all".parse::<Sharing>().unwrap_err().contains("per-core"));
    }
}
