//! Named moments in a create, for crash tests. In debug builds, `KILN_TEST_STOP_AT=NAME[#N]` makes
//! the process stop itself (SIGSTOP) the N-th time (default: the first) it passes checkpoint NAME,
//! so a test can kill it there with SIGKILL, or change a source and let it go on with SIGCONT.
//! `KILN_TEST_WAIT_AT=NAME[#N]` instead holds only the thread that passes there, until the file
//! named by `KILN_TEST_GO` exists, while the process's other threads go on. Release builds compile
//! every checkpoint to nothing.
//!
//! The names, in the order a create passes them: `prepared` (sources open and locked),
//! `staging` (staging directory made), `chunk` (after each chunk is written), `disk-copied` (a
//! disk's last chunk written, before its tables are written), `hashing` (after each MiB hashed),
//! `disk-done` (a disk hashed and flushed), `manifest` (manifest written), `sums` (SHA256SUMS
//! written), `renamed` (image renamed into place, record not yet Available), `available` (record
//! written Available). Transfers: `part` (after each multipart part sent), `uploaded` (a disk of
//! `create --output-dir s3://` uploaded while the build goes on).

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

    fn parse(var: &str) -> Option<(String, u64)> {
        let v = std::env::var(var).ok()?;
        match v.split_once('#') {
            Some((n, c)) => Some((n.to_string(), c.parse().ok()?)),
            None => Some((v, 1)),
        }
    }

    fn stop_at() -> &'static Option<(String, u64)> {
        static T: OnceLock<Option<(String, u64)>> = OnceLock::new();
        T.get_or_init(|| parse("KILN_TEST_STOP_AT"))
    }

    fn wait_at() -> &'static Option<(String, u64)> {
        static T: OnceLock<Option<(String, u64)>> = OnceLock::new();
        T.get_or_init(|| parse("KILN_TEST_WAIT_AT"))
    }

    /// Whether this pass of `name` is the N-th one `target` names.
    fn hit(target: &Option<(String, u64)>, which: &str, name: &str) -> bool {
        let Some((want, nth)) = target else {
            return false;
        };
        if want != name {
            return false;
        }
        static COUNTS: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
        let counts = COUNTS.get_or_init(|| Mutex::new(HashMap::new()));
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.entry(format!("{which}:{name}")).or_insert(0);
        *n += 1;
        *n == *nth
    }

    pub(crate) fn checkpoint(name: &str) {
        if hit(wait_at(), "wait", name) {
            // Only this thread waits, until the file KILN_TEST_GO names exists (at most 2 min).
            let go = std::env::var_os("KILN_TEST_GO").map(std::path::PathBuf::from);
            let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while go.as_ref().is_some_and(|g| !g.exists()) && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        if hit(stop_at(), "stop", name) {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        }
    }
}
