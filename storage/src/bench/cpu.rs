//! Process CPU time, so a run can say what each request cost the host.
//!
//! Process-wide on purpose: an asynchronous backend (librbd) does most of its
//! work in its own messenger threads, and that cost belongs to the request.

use std::time::Duration;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    /// CPU consumed by every thread of this process so far.
    pub fn process() -> std::io::Result<CpuTime> {
        // SAFETY: all-zero is a valid `rusage` (plain integers).
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes one `rusage` into the valid, exclusively borrowed `ru`.
        let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(CpuTime { user: timeval(ru.ru_utime), system: timeval(ru.ru_stime) })
    }

    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    /// CPU used between `earlier` and `self`; never negative.
    pub fn since(&self, earlier: &CpuTime) -> CpuTime {
        CpuTime { user: self.user.saturating_sub(earlier.user), system: self.system.saturating_sub(earlier.system) }
    }
}

fn timeval(tv: libc::timeval) -> Duration {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let micros = u64::try_from(tv.tv_usec).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(micros)
}

/// Microseconds of CPU per request; 0 when nothing completed, so reports never carry NaN.
pub fn cpu_us_per_op(cpu: Duration, ops: u64) -> f64 {
    if ops == 0 {
        return 0.0;
    }
    cpu.as_secs_f64() * 1e6 / ops as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_work_shows_up_as_cpu_time() {
        let before = CpuTime::process().expect("getrusage");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        // Bounded by wall time so a broken clock fails instead of spinning;
        // generous because a loaded machine gives this thread a fraction of a core.
        let used = loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            let used = CpuTime::process().expect("getrusage").since(&before);
            if used.total() >= Duration::from_millis(20) || start.elapsed() > Duration::from_secs(10) {
                break used;
            }
        };
        assert!(used.total() >= Duration::from_millis(20), "{used:?}");
        assert_eq!(cpu_us_per_op(Duration::from_millis(2), 1000), 2.0);
        assert_eq!(cpu_us_per_op(Duration::from_millis(2), 0), 0.0);
    }
}
