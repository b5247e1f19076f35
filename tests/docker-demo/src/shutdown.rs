//! Exiting on SIGTERM/SIGINT. In a container this binary is PID 1, and the
//! kernel drops signals that PID 1 has no handler for, so without one every
//! `docker stop` or service scale-down would wait out the whole grace period
//! before the SIGKILL. The original (a Go program) exits on these signals.

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

// std links the C library already; declaring the two functions we need keeps
// the binary free of extra crates.
extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn _exit(status: i32) -> !;
}

extern "C" fn exit_now(_signum: i32) {
    // SAFETY: `_exit` is async-signal-safe; nothing needs flushing or unwinding.
    unsafe { _exit(0) }
}

pub fn exit_on_termination_signals() {
    for signum in [SIGINT, SIGTERM] {
        // SAFETY: installs a handler that only calls an async-signal-safe function.
        unsafe {
            signal(signum, exit_now);
        }
    }
}
