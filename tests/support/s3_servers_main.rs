//! `s3-servers DIR`: starts the object-storage tests' S3 servers on loopback ([`s3_servers`]) with
//! their data under DIR, writes their endpoints to DIR/env (`NAME=VALUE` lines, written whole
//! before it appears) and waits; the servers get SIGKILL when this process ends. `.ci/run` runs it
//! for the length of the test run.

#[path = "s3_servers.rs"]
mod s3_servers;

use std::path::PathBuf;

fn main() {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: s3-servers DIR");
        std::process::exit(2);
    };
    let started = match s3_servers::start(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("s3-servers: {e}");
            std::process::exit(1);
        }
    };
    let tmp = dir.join("env.tmp");
    let written = std::fs::write(&tmp, s3_servers::to_env(&started))
        .and_then(|()| std::fs::rename(&tmp, dir.join("env")));
    if let Err(e) = written {
        eprintln!("s3-servers: writing {}: {e}", dir.join("env").display());
        std::process::exit(1);
    }
    // The servers are children of this thread (PR_SET_PDEATHSIG): it waits until killed.
    loop {
        std::thread::park();
    }
}
