//! Named moments in a create, for crash tests. In debug builds, `KILN_TEST_STOP_AT=NAME[#N]` makes
//! the process stop itself (SIGSTOP) the N-th time (default: the first) it passes checkpoint NAME,
//! so a test can kill it there with SIGKILL, or change a source and let it go on with SIGCONT. Release
//! builds compile every checkpoint to nothing.
//!
//! The names, in the order a create passes them: `prepared` (sources open and locked),
//! `staging` (staging directory made), `chunk` (after each chunk is written), `disk-copied` (a
//! disk's last chunk written, before its tables are written), `hashing` (after each MiB hashed),
//! `disk-done` (a disk hashed and flushed), `manifest` (manifest written), `sums` (SHA256SUMS
//! written), `renamed` (image renamed into place, record not yet Available), `available` (record
//! written Available).

/// Passes the checkpoint `name`.
#[inline]
pub(crate) fn checkpoint(name: &str) {
    #[cfg(debug_assertions)]
    imp::checkpoint(name);
    #[cfg(not(debug_assertions))]
    let _ = name;
}

#[cfg(debug_assertions)]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    fn target() -> &'static Option<(String, u64)> {
        static T: OnceLock<Option<(String, u64)>> = OnceLock::new();
        T.get_or_init(|| {
            let v = std::env::var("KILN_TEST_STOP_AT").ok()?;
            match v.split_once('#') {
                Some((n, c)) => Some((n.to_string(), c.parse().ok()?)),
                None => Some((v, 1)),
            }
        })
    }

    pub(crate) fn checkpoint(name: &str) {
        let Some((want, nth)) = target() else {
            return;
        };
        if want != name {
            return;
        }
        static COUNTS: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
        let counts = COUNTS.get_or_init(|| Mutex::new(HashMap::new()));
        let hit = {
            let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
            let n = c.entry(name.to_string()).or_insert(0);
            *n += 1;
            *n == *nth
        };
        if hit {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        }
    }
}
