//! Real S3 servers on loopback for the object-storage tests: a three-node Garage cluster (from
//! `garage`) and s3s-fs (from `s3s-fs`), both on PATH or in ~/.cargo/bin, where `.ci/install`
//! installs them. A missing binary is an error (the tests fail, never skip).
//!
//! One file, two users:
//! - `.ci/run` starts the servers once for the whole run with the `s3-servers` example
//!   (`tests/support/s3_servers_main.rs`), which hands their endpoints to the tests in the
//!   environment ([`to_env`], [`from_env`]) and stops them when it is killed;
//! - a test process that finds no endpoints in its environment (a plain `cargo test`) starts its
//!   own through the tests' fixture (`tests/integration/common/s3.rs`).
//!
//! Every server is a child of the thread that called [`start`] and gets SIGKILL when that thread
//! ends (`PR_SET_PDEATHSIG`), so nothing outlives its starter.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where one server (or one node of a cluster) answers, and the key it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub url: String,
    pub access_key: String,
    pub secret_key: String,
}

/// Every server the tests use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// Garage's three nodes (one cluster: what is written through one is read through another).
    pub garage: Vec<Server>,
    pub s3s: Server,
}

/// The bucket made on Garage at start (tests make their other buckets themselves).
pub const BUCKET: &str = "kiln-test";
/// The environment variables that carry [`Started`]: a URL list, then `ACCESS:SECRET`.
const ENV_GARAGE: &str = "KILN_TEST_S3_GARAGE";
const ENV_GARAGE_KEY: &str = "KILN_TEST_S3_GARAGE_KEY";
const ENV_S3S: &str = "KILN_TEST_S3_S3S";
const ENV_S3S_KEY: &str = "KILN_TEST_S3_S3S_KEY";
/// s3s-fs's fixed key (it takes one on its command line).
const S3S_KEY: (&str, &str) = ("kilntestaccess", "kilntestsecretkey0123456789");

/// Starts Garage and s3s-fs with their data under `root`; returns once both answer.
pub fn start(root: &Path) -> Result<Started, String> {
    let garage = start_garage(root)?;
    let (s3s, _child) = s3s(root, free_port())?;
    Ok(Started { garage, s3s })
}

/// [`Started`] as `NAME=VALUE` lines, for `set -a; . FILE`.
// Used by the `s3-servers` example; the tests' fixture includes this file too and only reads.
#[allow(dead_code)]
pub fn to_env(s: &Started) -> String {
    let urls: Vec<&str> = s.garage.iter().map(|g| g.url.as_str()).collect();
    let g = &s.garage[0];
    format!(
        "{ENV_GARAGE}={}\n{ENV_GARAGE_KEY}={}:{}\n{ENV_S3S}={}\n{ENV_S3S_KEY}={}:{}\n",
        urls.join(","),
        g.access_key,
        g.secret_key,
        s.s3s.url,
        s.s3s.access_key,
        s.s3s.secret_key
    )
}

/// The servers the environment names ([`to_env`]'s variables); None when it names none, an error
/// when it names some but not all.
// Used by the tests' fixture; the `s3-servers` example includes this file too and only writes.
#[allow(dead_code)]
pub fn from_env() -> Result<Option<Started>, String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let vars = [ENV_GARAGE, ENV_GARAGE_KEY, ENV_S3S, ENV_S3S_KEY].map(var);
    let [Some(urls), Some(gkey), Some(s3s), Some(skey)] = vars else {
        if vars.iter().any(Option::is_some) {
            return Err(format!(
                "set all of {ENV_GARAGE}, {ENV_GARAGE_KEY}, {ENV_S3S} and {ENV_S3S_KEY}, or none"
            ));
        }
        return Ok(None);
    };
    let server = |url: &str, key: &str, name: &str| {
        let (access, secret) = key
            .split_once(':')
            .ok_or_else(|| format!("{name} is not ACCESS:SECRET"))?;
        Ok::<_, String>(Server {
            url: url.to_string(),
            access_key: access.to_string(),
            secret_key: secret.to_string(),
        })
    };
    let garage = urls
        .split(',')
        .map(|u| server(u, &gkey, ENV_GARAGE_KEY))
        .collect::<Result<Vec<_>, _>>()?;
    if garage.len() != 3 {
        return Err(format!("{ENV_GARAGE} names {} nodes, not 3", garage.len()));
    }
    Ok(Some(Started {
        garage,
        s3s: server(&s3s, &skey, ENV_S3S_KEY)?,
    }))
}

/// An s3s-fs over the directory `root/s3s` (made if missing) on `port`; the child is the
/// caller's to kill (or dies with the calling thread).
pub fn s3s(root: &Path, port: u16) -> Result<(Server, Child), String> {
    let bin = binary("s3s-fs")?;
    let data = root.join("s3s");
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let (ak, sk) = S3S_KEY;
    let child = spawn(
        Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ak, "--secret-key", sk])
            .arg(&data),
        &root.join(format!("s3s-{port}.log")),
    )?;
    wait_port(port, "s3s-fs")?;
    let server = Server {
        url: format!("http://127.0.0.1:{port}"),
        access_key: ak.into(),
        secret_key: sk.into(),
    };
    Ok((server, child))
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

fn start_garage(root: &Path) -> Result<Vec<Server>, String> {
    let bin = binary("garage")?;
    let secret = rpc_secret()?;
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
        .map(|p| Server {
            url: format!("http://127.0.0.1:{p}"),
            access_key: ak.clone(),
            secret_key: sk.clone(),
        })
        .collect())
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
            format!("{name} is not installed: run .ci/install, which installs it (cargo install)")
        })
}

/// A free loopback port.
pub fn free_port() -> u16 {
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

/// 32 random bytes in hex, for the cluster's RPC secret.
fn rpc_secret() -> Result<String, String> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
