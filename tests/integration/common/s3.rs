//! Real S3 servers for the object-storage tests, on loopback: a three-node Garage cluster and
//! s3s-fs ([`support`]). `.ci/run` starts them once for the whole run and names them in the
//! environment; a test process that finds none there (a plain `cargo test`) starts its own, once,
//! as children of a thread that lives as long as the process, so they get SIGKILL when it ends
//! (`PR_SET_PDEATHSIG`) and nothing outlives the tests.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::{mpsc, OnceLock};

use aws_sdk_s3::primitives::ByteStream;

use super::Run;

#[path = "../../support/s3_servers.rs"]
mod support;

/// One S3 server (or one node of a cluster) as a client sees it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: &'static str,
    pub url: String,
    pub region: &'static str,
    pub access_key: String,
    pub secret_key: String,
}

/// Every server the tests use.
pub struct Servers {
    /// Garage's three nodes (one cluster: what is written through one is read through another).
    pub garage: Vec<Endpoint>,
    pub s3s: Endpoint,
    /// The servers' data, when this process started them.
    _dir: Option<tempfile::TempDir>,
}

/// The bucket every test works in (tests use distinct key prefixes).
pub const BUCKET: &str = support::BUCKET;

/// The servers `.ci/run` started (named in the environment), else this process's own, started on
/// first use.
pub fn servers() -> &'static Servers {
    static S: OnceLock<Servers> = OnceLock::new();
    S.get_or_init(|| {
        if let Some(started) = support::from_env().unwrap_or_else(|e| panic!("{e}")) {
            return ready(started, None);
        }
        let (tx, rx) = mpsc::channel();
        // The servers' parent thread: it never ends, so PDEATHSIG fires only when the process does.
        std::thread::spawn(move || {
            let started = start();
            let failed = started.is_err();
            tx.send(started).expect("send servers");
            if failed {
                return;
            }
            loop {
                std::thread::park();
            }
        });
        rx.recv()
            .expect("server thread")
            .unwrap_or_else(|e| panic!("{e}"))
    })
}

/// The servers' data under a directory that lives as long as the test process (statics are never
/// dropped; [`remove_stale`] removes those of ended processes), each with its bucket.
fn start() -> Result<Servers, String> {
    remove_stale();
    let dir = tempfile::Builder::new()
        .prefix(&format!("kiln-s3-{}-", std::process::id()))
        .tempdir()
        .map_err(|e| e.to_string())?;
    let started = support::start(dir.path())?;
    Ok(ready(started, Some(dir)))
}

/// The endpoints of `started`, with [`BUCKET`] made on each.
fn ready(started: support::Started, dir: Option<tempfile::TempDir>) -> Servers {
    let servers = Servers {
        garage: started
            .garage
            .into_iter()
            .map(|g| Endpoint::of(g, "garage", "garage"))
            .collect(),
        s3s: Endpoint::of(started.s3s, "s3s-fs", "us-east-1"),
        _dir: dir,
    };
    for e in [&servers.garage[0], &servers.s3s] {
        make_bucket(e, BUCKET);
    }
    servers
}

/// Removes the server directories of test processes that have ended (`kiln-s3-PID-*`).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("kiln-s3-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// An s3s-fs of the caller's own over the directory `root` (made if missing) on `port`, for a
/// test that stops and restarts its server; the child is the caller's to kill.
pub fn own_s3s(root: &Path, port: u16) -> Result<(Endpoint, Child), String> {
    let (server, child) = support::s3s(root, port)?;
    Ok((Endpoint::of(server, "s3s-fs", "us-east-1"), child))
}

/// A free loopback port.
pub fn port() -> u16 {
    support::free_port()
}

/// Creates `bucket` on `e` (or finds it there).
pub fn bucket(e: &Endpoint, bucket: &str) {
    make_bucket(e, bucket);
}

impl Endpoint {
    fn of(s: support::Server, name: &'static str, region: &'static str) -> Endpoint {
        Endpoint {
            name,
            url: s.url,
            region,
            access_key: s.access_key,
            secret_key: s.secret_key,
        }
    }

    /// The environment a client of this server gets (and nothing from ~/.aws).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", self.region.to_string()),
            ("AWS_ENDPOINT_URL", self.url.clone()),
            ("AWS_CONFIG_FILE", "/nonexistent/kiln-test/config".into()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/kiln-test/credentials".into(),
            ),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// A client of this server, for the tests' own puts and gets.
    pub fn client(&self) -> aws_sdk_s3::Client {
        let creds = aws_sdk_s3::config::Credentials::new(
            &self.access_key,
            &self.secret_key,
            None,
            None,
            "kiln-test",
        );
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .credentials_provider(creds)
            .region(aws_sdk_s3::config::Region::new(self.region))
            .endpoint_url(&self.url)
            .force_path_style(true)
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// Puts `bytes` at `key` in [`BUCKET`].
    pub fn put(&self, key: &str, bytes: Vec<u8>) {
        self.put_in(BUCKET, key, bytes);
    }

    /// Puts `bytes` at `key` in `bucket` (unconditionally).
    pub fn put_in(&self, bucket: &str, key: &str, bytes: Vec<u8>) {
        let c = self.client();
        rt().block_on(
            c.put_object()
                .bucket(bucket)
                .key(key)
                .body(ByteStream::from(bytes))
                .send(),
        )
        .unwrap_or_else(|e| panic!("put {key} on {}: {e:?}", self.name));
    }

    /// Every key in `bucket`, sorted.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let c = self.client();
        let mut keys = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let out = rt()
                .block_on(
                    c.list_objects_v2()
                        .bucket(bucket)
                        .set_continuation_token(next.take())
                        .send(),
                )
                .unwrap_or_else(|e| panic!("list {bucket} on {}: {e:?}", self.name));
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .map(String::from),
            );
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => next = Some(t.to_string()),
                _ => break,
            }
        }
        keys.sort();
        keys
    }

    /// Puts a local file at `key`.
    pub fn put_file(&self, key: &str, path: &Path) {
        self.put(key, std::fs::read(path).expect("read file to put"));
    }

    /// `kiln ARGS` in `dir`, as a client of this server.
    pub fn kiln(&self, dir: &Path, args: &[&str]) -> Run {
        self.kiln_with(dir, &[], args)
    }

    /// `kiln ARGS` in `dir` with this server's environment and `extra` on top (an empty value
    /// removes the variable).
    pub fn kiln_with(&self, dir: &Path, extra: &[(&str, String)], args: &[&str]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        for k in [
            "AWS_PROFILE",
            "AWS_DEFAULT_REGION",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL_S3",
        ] {
            cmd.env_remove(k);
        }
        cmd.envs(self.env());
        for (k, v) in extra {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        Run::from(cmd.args(args).current_dir(dir).output().expect("run kiln"))
    }
}

fn make_bucket(e: &Endpoint, bucket: &str) {
    let c = e.client();
    let r = rt().block_on(c.create_bucket().bucket(bucket).send());
    if let Err(err) = r {
        let exists = rt().block_on(c.head_bucket().bucket(bucket).send()).is_ok();
        assert!(exists, "creating bucket {bucket} on {}: {err:?}", e.name);
    }
}

/// The tests' own runtime for their puts.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}
