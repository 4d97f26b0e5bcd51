//! A global allocator that counts the allocations of each thread, for the tests that assert a path allocates nothing.
//! Per thread, so that what the test harness's other threads allocate meanwhile (output capture, the slow-test
//! timer) is not counted: with one process-wide counter tests/alloc.rs saw 4 stray allocations in 8 of 24 runs
//! under CPU contention.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;
thread_local! {
    /// Allocations made by this thread (a const thread-local: no lazy initialisation inside the allocator).
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by the calling thread so far.
pub fn allocations() -> usize {
    ALLOCATIONS.with(|a| a.get())
}
