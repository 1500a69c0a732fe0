//! CPU time, which a shared machine disturbs far less than wall-clock time: time another process
//! takes the core for is not counted. Shared by the scenario harness (`overhead`: CPU per call)
//! and `benches/layers.rs` (ns per call on one thread).

use std::time::Duration;

/// CPU time the whole process has used (user + system, every thread), from `getrusage(2)`.
pub fn process() -> Duration {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed value it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    timeval(usage.ru_utime) + timeval(usage.ru_stime)
}

/// CPU time the calling thread has used, from `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`.
pub fn thread() -> Duration {
    // SAFETY: `clock_gettime` writes one `timespec` into the zeroed value it is given.
    let time = unsafe {
        let mut time: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time);
        time
    };
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000)
}
