//! Object storage over the S3 protocol (AWS S3, Alibaba OSS, Huawei OBS, Ceph RGW, MinIO,
//! Garage): `s3://BUCKET/KEY` names, the one client, and its errors as kiln's stable codes.
//!
//! The client is the AWS SDK (`aws-sdk-s3`), configured the way AWS tools are: the `AWS_*`
//! environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`), then the profiles of
//! `~/.aws/credentials` and `~/.aws/config`. `--endpoint-url` overrides the endpoint and
//! `--s3-addressing` (or `KILN_S3_ADDRESSING_STYLE`) picks path-style or virtual-hosted requests:
//! path-style by default when an endpoint URL is configured (a self-hosted server rarely has a
//! wildcard DNS name per bucket), virtual-hosted otherwise (AWS's default; OSS requires it).
//! Checksums are computed and validated only when an operation requires them, so servers that do
//! not know the newer checksum headers work; kiln sends the checksums it wants explicitly.
//!
//! The SDK is asynchronous; kiln is not. One small tokio runtime, owned here, runs every request,
//! and callers block on it ([`block_on`]) from whichever thread they are on: each copy thread
//! issues its own ranged GETs.

pub(crate) mod download;
mod object;
pub(crate) mod store;
pub(crate) mod upload;

pub(crate) use object::{delete, head, Object, ObjectStamp};

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::Client;

use crate::error::{Code, Error, Result};

/// The scheme prefix of an object's name.
pub(crate) const SCHEME: &str = "s3://";

/// An object (or a prefix) in a bucket: `s3://BUCKET/KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct S3Url {
    pub(crate) bucket: String,
    pub(crate) key: String,
}

impl S3Url {
    /// `s3://BUCKET/KEY` parsed; `Ok(None)` when `s` does not start with `s3://`. The bucket must
    /// be a DNS-style bucket name (3 to 63 lowercase letters, digits, `-` and `.`), the key
    /// non-empty unless `prefix_ok`.
    pub(crate) fn parse(s: &str, prefix_ok: bool) -> Result<Option<S3Url>> {
        let Some(rest) = s.strip_prefix(SCHEME) else {
            return Ok(None);
        };
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let bad = |why: &str| {
            Error::new(
                Code::InvalidParameter,
                format!("'{s}' is not an object name (s3://BUCKET/KEY): {why}"),
            )
        };
        if !bucket_name_ok(bucket) {
            return Err(bad(&format!(
                "'{bucket}' is not a bucket name (3 to 63 lowercase letters, digits, '-' and '.')"
            )));
        }
        if key.is_empty() && !prefix_ok {
            return Err(bad("the key is empty"));
        }
        if key.len() > 1024 || key.chars().any(char::is_control) {
            return Err(bad(
                "the key is longer than 1024 bytes or holds control characters",
            ));
        }
        Ok(Some(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        }))
    }

    /// The object a path names when it is `s3://BUCKET/KEY`; `Ok(None)` for a local path.
    pub(crate) fn from_path(path: &Path) -> Result<Option<S3Url>> {
        match path.to_str() {
            Some(s) => S3Url::parse(s, false),
            None => Ok(None),
        }
    }

    /// Its name as a path (`s3://BUCKET/KEY`), the way sources are named in plans and manifests.
    pub(crate) fn to_path(&self) -> PathBuf {
        PathBuf::from(self.to_string())
    }

    /// The object `name` under this prefix (the key followed by `name`, in the same bucket).
    pub(crate) fn child(&self, name: &str) -> S3Url {
        S3Url {
            bucket: self.bucket.clone(),
            key: format!("{}{name}", self.key),
        }
    }

    /// The key's "directory": everything up to and including its last `/` (empty at the top).
    pub(crate) fn prefix(&self) -> &str {
        self.key.rfind('/').map_or("", |i| &self.key[..=i])
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.bucket, self.key)
    }
}

/// Whether a path names an object in a bucket.
pub(crate) fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.starts_with(SCHEME))
}

fn bucket_name_ok(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && !b.starts_with(['-', '.'])
        && !b.ends_with(['-', '.'])
}

/// Path-style (`http://host/BUCKET/KEY`) or virtual-hosted (`http://BUCKET.host/KEY`) requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Addressing {
    Path,
    Virtual,
}

/// What the command line says about object storage (`--endpoint-url`, `--s3-addressing`); the
/// rest comes from the environment and the AWS profiles.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub endpoint_url: Option<String>,
    pub addressing: Option<Addressing>,
}

static SETTINGS: Mutex<Option<Settings>> = Mutex::new(None);

/// Sets the command line's settings; call before the first request (later calls are ignored once
/// the client exists).
pub fn configure(s: Settings) {
    if let Ok(mut g) = SETTINGS.lock() {
        *g = Some(s);
    }
}

/// The runtime every request runs on: two worker threads are plenty, requests mostly wait.
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kiln-s3")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| {
        Error::new(
            Code::Internal,
            format!("starting the object storage runtime: {e}"),
        )
    })
}

/// Runs one request (future) to its end on the runtime, from any thread that is not one of the
/// runtime's own.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    Ok(runtime()?.block_on(f))
}

/// The client, built once per process.
pub(crate) fn client() -> Result<&'static Client> {
    static CLIENT: OnceLock<std::result::Result<Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| build_client().map_err(|e| e.message().to_string()))
        .as_ref()
        .map_err(|e| Error::new(Code::InvalidParameter, e.clone()))
}

/// Attempts per request (the first and the retries), with the SDK's exponential backoff.
const MAX_ATTEMPTS: u32 = 4;

fn build_client() -> Result<Client> {
    use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
    use aws_smithy_http_client::tls;
    let settings = SETTINGS
        .lock()
        .ok()
        .and_then(|g| g.clone())
        .unwrap_or_default();
    let env_style = std::env::var("KILN_S3_ADDRESSING_STYLE").ok();
    let addressing = match (settings.addressing, env_style.as_deref()) {
        (Some(a), _) => Some(a),
        (None, None | Some("") | Some("auto")) => None,
        (None, Some("path")) => Some(Addressing::Path),
        (None, Some("virtual")) => Some(Addressing::Virtual),
        (None, Some(other)) => {
            return Err(Error::new(
                Code::InvalidParameter,
                format!("KILN_S3_ADDRESSING_STYLE={other}: use path, virtual or auto"),
            ))
        }
    };
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(30))
        .operation_attempt_timeout(Duration::from_secs(120))
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(timeouts)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let sdk = block_on(loader.load())?;
    let mut b = aws_sdk_s3::config::Builder::from(&sdk)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    if sdk.region().is_none() {
        // What AWS's own S3 tools assume without a configured region; self-hosted servers
        // usually accept any region, or name theirs (AWS_REGION).
        b = b.region(aws_config::Region::from_static("us-east-1"));
    }
    let path_style = match addressing {
        Some(a) => a == Addressing::Path,
        None => sdk.endpoint_url().is_some(),
    };
    Ok(Client::from_conf(b.force_path_style(path_style).build()))
}

/// Turns a failed request on `url` into kiln's error: a missing bucket or key is
/// `InvalidSnapshotId.NotFound` (`missing`), refused credentials `Forbidden.ObjectStorage`, a
/// changed object `InvalidSnapshot.Changed`, no answer (after retries)
/// `ServiceUnavailable.ObjectStorage`.
pub(crate) fn error<E>(
    err: SdkError<E, HttpResponse>,
    what: &str,
    url: &S3Url,
    missing: Code,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_string);
    let detail = match (&code, err.message()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.clone(),
        _ => match status {
            Some(s) => format!("HTTP {s}"),
            None => aws_sdk_s3::error::DisplayErrorContext(&err).to_string(),
        },
    };
    let (kind, hint) = match (code.as_deref(), status) {
        (Some("NoSuchBucket"), _) => (missing, "the bucket does not exist"),
        (Some("NoSuchKey" | "NotFound"), _) | (None, Some(404)) => (missing, "no such object"),
        (Some("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied"), _)
        | (_, Some(401 | 403)) => (
            Code::StorageAccessDenied,
            "the credentials were refused: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS_PROFILE in use",
        ),
        (Some("PreconditionFailed"), _) | (_, Some(412)) => (
            Code::SourceChanged,
            "the object changed (its ETag is not the one read first) while it was being read; nothing was published",
        ),
        (_, Some(s)) if s >= 500 => (
            Code::StorageUnavailable,
            "the server failed the request after retries",
        ),
        (_, Some(_)) => (Code::IoError, "the server refused the request"),
        (_, None) => (
            Code::StorageUnavailable,
            "the server did not answer (after retries): check --endpoint-url / AWS_ENDPOINT_URL and that it is up",
        ),
    };
    Error::new(kind, format!("{url}: {what}: {hint} ({detail})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_parse() {
        let u = S3Url::parse("s3://my-bucket/dir/a.qcow2", false)
            .unwrap()
            .unwrap();
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.key, "dir/a.qcow2");
        assert_eq!(u.prefix(), "dir/");
        assert_eq!(u.to_string(), "s3://my-bucket/dir/a.qcow2");
        assert_eq!(S3Url::parse("/tmp/x", false).unwrap(), None);
        for bad in [
            "s3://Bad_Bucket/x",
            "s3://ab/x",
            "s3://bucket",
            "s3://bucket/",
            "s3:///x",
        ] {
            let e = S3Url::parse(bad, false).unwrap_err();
            assert_eq!(e.code(), Code::InvalidParameter, "{bad}");
        }
        let p = S3Url::parse("s3://bucket/images/", true).unwrap().unwrap();
        assert_eq!(p.key, "images/");
        assert!(is_remote(Path::new("s3://bucket/k")));
        assert!(!is_remote(Path::new("./s3:/k")));
    }
}
