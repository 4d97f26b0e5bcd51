//! Owners of the locks and markers in shared memory, so that whoever meets one left behind by a killed process can
//! tell, and repair what it guarded (the way nginx's `ngx_shmtx` keeps its owner's pid and the master force-unlocks
//! what a dead worker held).
//!
//! A process is named by its pid and its start time (`/proc/PID/stat` field 22, clock ticks since boot): a pid that
//! the kernel gave to another process since has another start time, so a reused pid is not mistaken for the owner.
//! The engine asks the host through [`Processes`]; any `Fn(u32) -> bool` is one (liveness only, no start times),
//! which is what tests with made-up pids use.

/// What the engine needs to know about the processes sharing a region.
pub trait Processes {
    /// Whether a process with this pid exists.
    fn alive(&self, pid: u32) -> bool;

    /// The start time of process `pid` (any number that differs between two processes given the same pid), or 0
    /// when unknown; only compared for equality.
    fn start_time(&self, _pid: u32) -> u64 {
        0
    }

    /// Called by a configuration writer in the middle of its critical section, with the writer lock held and the
    /// seqlock of the upstream it is rewriting odd. Does nothing; a test host pauses here, so that a test can kill
    /// the writer at the worst moment.
    fn in_critical_section(&self) {}
}

impl<F: Fn(u32) -> bool> Processes for F {
    fn alive(&self, pid: u32) -> bool {
        self(pid)
    }
}

/// An owner word: pid in the low 32 bits, the low 32 bits of the start time above.
#[inline]
pub fn word(pid: u32, start: u64) -> u64 {
    ((start & 0xffff_ffff) << 32) | pid as u64
}

/// The pid of an owner word.
#[inline]
pub fn pid_of(word: u64) -> u32 {
    word as u32
}

/// The owner word of process `pid` now.
pub fn word_of(procs: &dyn Processes, pid: u32) -> u64 {
    word(pid, procs.start_time(pid))
}

/// Whether the process recorded in owner word `w` still runs: its pid exists and, when both start times are known,
/// it is the same process (not another one given the pid since).
pub fn running(procs: &dyn Processes, w: u64) -> bool {
    let pid = pid_of(w);
    if pid == 0 || !procs.alive(pid) {
        return false;
    }
    let recorded = w >> 32;
    let now = procs.start_time(pid) & 0xffff_ffff;
    recorded == 0 || now == 0 || recorded == now
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Host;
    impl Processes for Host {
        fn alive(&self, pid: u32) -> bool {
            pid == 10
        }
        fn start_time(&self, pid: u32) -> u64 {
            if pid == 10 { 5 } else { 0 }
        }
    }

    #[test]
    fn an_owner_is_its_pid_and_start_time() {
        assert!(running(&Host, word(10, 5)));
        assert!(!running(&Host, word(10, 6)), "pid 10 reused by another process");
        assert!(!running(&Host, word(11, 5)), "dead");
        assert!(running(&Host, word(10, 0)), "start time unknown when recorded: the pid decides");
        assert!(!running(&Host, 0));
        assert!(running(&|p: u32| p == 3, word(3, 99)), "a plain closure knows no start times");
        assert_eq!(pid_of(word_of(&Host, 10)), 10);
    }
}
