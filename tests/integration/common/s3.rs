//! Real S3 servers for the object-storage tests, started once per test process on loopback:
//! a three-node Garage cluster (from `garage`) and s3s-fs (from `s3s-fs`), both on PATH or in
//! ~/.cargo/bin, where `.ci/test` installs them. A missing binary fails the test (never skips).
//!
//! The servers are children of one thread that lives as long as the test process, and get
//! SIGKILL when it ends (`PR_SET_PDEATHSIG`), so nothing outlives the tests.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;

use super::Run;

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
    _dir: tempfile::TempDir,
}

/// The bucket every test works in (tests use distinct key prefixes).
pub const BUCKET: &str = "kiln-test";

/// The servers, started on first use.
pub fn servers() -> &'static Servers {
    static S: OnceLock<Servers> = OnceLock::new();
    S.get_or_init(|| {
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

fn binary(name: &str) -> Result<PathBuf, String> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .chain([home.join(".cargo/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!("{name} is not installed: run .ci/test, which installs it (cargo install)")
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn spawn(cmd: &mut Command, log: &Path) -> Result<Child, String> {
    let log = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("starting {cmd:?}: {e}"))
}

fn wait_port(port: u16, what: &str) -> Result<(), String> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what} did not listen on port {port} within 30 s"))
}

fn start() -> Result<Servers, String> {
    remove_stale();
    let dir = tempfile::Builder::new()
        .prefix(&format!("kiln-s3-{}-", std::process::id()))
        .tempdir()
        .map_err(|e| e.to_string())?;
    let garage = start_garage(dir.path())?;
    let s3s = start_s3s(dir.path())?;
    let servers = Servers {
        garage,
        s3s,
        _dir: dir,
    };
    for e in [&servers.garage[0], &servers.s3s] {
        make_bucket(e, BUCKET);
    }
    Ok(servers)
}

/// The servers' directory lives as long as the test process, whose statics are never dropped:
/// each run removes those left by test processes that have ended (`kiln-s3-PID-*`).
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

fn start_s3s(root: &Path) -> Result<Endpoint, String> {
    let (e, _child) = own_s3s(root, free_port())?;
    Ok(e)
}

/// An s3s-fs of the caller's own over the directory `root` (made if missing) on `port`, for a
/// test that stops and restarts its server; the child is the caller's to kill.
pub fn own_s3s(root: &Path, port: u16) -> Result<(Endpoint, Child), String> {
    let bin = binary("s3s-fs")?;
    let data = root.join("s3s");
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let (ak, sk) = ("kilntestaccess", "kilntestsecretkey0123456789");
    let child = spawn(
        Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ak, "--secret-key", sk])
            .arg(&data),
        &root.join(format!("s3s-{port}.log")),
    )?;
    wait_port(port, "s3s-fs")?;
    let e = Endpoint {
        name: "s3s-fs",
        url: format!("http://127.0.0.1:{port}"),
        region: "us-east-1",
        access_key: ak.into(),
        secret_key: sk.into(),
    };
    Ok((e, child))
}

/// A free loopback port.
pub fn port() -> u16 {
    free_port()
}

/// Creates `bucket` on `e` (or finds it there).
pub fn bucket(e: &Endpoint, bucket: &str) {
    make_bucket(e, bucket);
}

/// Waits until the node of `conf` has layout 1 as its only live version and sees all three nodes
/// up. Before that, a quorum read through one node need not meet a quorum write through another:
/// under load, a CompleteMultipartUpload through node B missed parts written through node A.
fn settled(conf: &Path) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let history = garage(conf, &["layout", "history"])?;
        let status = garage(conf, &["status"])?;
        let up = status.lines().filter(|l| l.contains("127.0.0.1:")).count();
        if history.contains("stable state") && up == 3 && !status.contains("FAILED") {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "garage never settled on layout 1:\n{history}\n{status}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `garage -c CONF ARGS`, which must succeed; its stdout.
fn garage(conf: &Path, args: &[&str]) -> Result<String, String> {
    let bin = binary("garage")?;
    let t = Instant::now();
    loop {
        let o = Command::new(&bin)
            .arg("-c")
            .arg(conf)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            return Ok(String::from_utf8_lossy(&o.stdout).into_owned());
        }
        // Nodes answer RPCs a moment after they listen.
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "garage {args:?} failed: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start_garage(root: &Path) -> Result<Vec<Endpoint>, String> {
    let bin = binary("garage")?;
    let secret: String = super::noise(7, 32)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut confs = Vec::new();
    let mut s3_ports = Vec::new();
    for n in 0..3 {
        let node = root.join(format!("garage{n}"));
        std::fs::create_dir_all(&node).map_err(|e| e.to_string())?;
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let conf = node.join("garage.toml");
        std::fs::write(
            &conf,
            format!(
                r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "lmdb"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
                meta = node.join("meta").display(),
                data = node.join("data").display(),
            ),
        )
        .map_err(|e| e.to_string())?;
        spawn(
            Command::new(&bin).arg("-c").arg(&conf).arg("server"),
            &node.join("garage.log"),
        )?;
        wait_port(rpc, "garage")?;
        confs.push(conf);
        s3_ports.push(s3);
    }
    let mut ids = Vec::new();
    for c in &confs {
        let id = garage(c, &["node", "id", "-q"])?;
        ids.push(id.trim().to_string());
    }
    for id in &ids[1..] {
        garage(&confs[0], &["node", "connect", id])?;
    }
    for id in &ids {
        let short = id.split('@').next().unwrap_or(id);
        garage(
            &confs[0],
            &["layout", "assign", "-z", "dc1", "-c", "1G", short],
        )?;
    }
    garage(&confs[0], &["layout", "apply", "--version", "1"])?;
    for c in &confs {
        settled(c)?;
    }
    let key = garage(&confs[0], &["key", "create", "kiln-test"])?;
    let field = |name: &str| {
        key.lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            .ok_or_else(|| format!("no '{name}' in garage key create's output: {key}"))
    };
    let (ak, sk) = (field("Key ID:")?, field("Secret key:")?);
    garage(&confs[0], &["bucket", "create", BUCKET])?;
    garage(
        &confs[0],
        &[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            BUCKET,
            "--key",
            "kiln-test",
        ],
    )?;
    for p in &s3_ports {
        wait_port(*p, "garage's S3 API")?;
    }
    Ok(s3_ports
        .iter()
        .map(|p| Endpoint {
            name: "garage",
            url: format!("http://127.0.0.1:{p}"),
            region: "garage",
            access_key: ak.clone(),
            secret_key: sk.clone(),
        })
        .collect())
}

impl Endpoint {
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
