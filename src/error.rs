//! kiln's one public error: a stable code (the cloud API's names), a message that says what failed,
//! where and what to do, and the I/O error underneath when there is one.

use std::fmt;
use std::io;
use std::path::Path;

/// Stable error codes. Their `as_str` spelling is part of kiln's interface: scripts match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    MissingParameter,
    InvalidParameter,
    InvalidDeviceMalformed,
    InvalidDeviceInUse,
    NoSystemDisk,
    MultipleSystemDisks,
    QuotaExceedDataDisk,
    InvalidSize,
    InvalidOutputDir,
    SnapshotNotFound,
    SnapshotUnsupported,
    SnapshotCorrupt,
    InsufficientSpace,
    IoError,
    Internal,
    InvalidImageNameMalformed,
    InvalidImageNameDuplicated,
    InvalidImageFamilyMalformed,
    InvalidImageVersionMalformed,
    InvalidDescriptionMalformed,
    InvalidPlatformMalformed,
    InvalidArchitectureMalformed,
    InvalidBootModeMalformed,
    QuotaExceedTags,
    InvalidTagKeyMalformed,
    InvalidTagValueMalformed,
    DuplicateTagKey,
    InvalidClientTokenMalformed,
    IdempotenceParamNotMatch,
    /// `--dry-run`: the request would have started. Exit 0.
    DryRunOperation,
    InvalidImageIdNotFound,
    /// The image is in a state that does not allow the operation (e.g. deleting one still Creating).
    IncorrectImageStatus,
    /// `kiln verify` found a file whose checksum differs.
    ChecksumMismatch,
    /// A disk of the instance is open for writing (the instance looks running).
    IncorrectInstanceStatus,
    /// A snapshot file is open for writing by another process.
    SnapshotNotReady,
    /// The instance's domain XML cannot be read (not XML, not a domain, a disk without a source).
    InvalidInstanceMalformed,
    /// The instance has a disk kiln cannot read (a network disk, a driver type other than raw/qcow2).
    InstanceDiskUnsupported,
    /// The domain XML's `<backingStore>` disagrees with the backing chain the file names.
    InstanceBackingMismatch,
    /// A qcow2 names a backing file kiln may not follow (outside the named image's directory tree
    /// and every `--backing-dir`, not a regular file, or a protocol such as `nbd:`).
    BackingDenied,
    /// A source changed (shrank, grew or was rewritten) while it was being copied.
    SourceChanged,
    /// A path inside the store is a symlink or of the wrong type (planted, never made by kiln).
    UnsafePath,
    /// `InstanceId`: no such domain XML file (or libvirt domain).
    InstanceNotFound,
    /// `Features.ImdsSupport` other than v1 or v2.
    InvalidImdsSupport,
    /// A malformed `ResourceGroupId`.
    InvalidResourceGroup,
    /// A parameter whose meaning needs support kiln does not have yet (encryption).
    Unsupported,
    /// The key given for an encrypted source opens none of its LUKS key slots.
    KeyMismatch,
    /// A `--target` destination's documented rule would be broken (too many disks, a size it
    /// cannot take, an architecture it does not import).
    TargetRule,
    /// Object storage refused the credentials (unknown access key, wrong secret, no permission).
    StorageAccessDenied,
    /// Object storage did not answer (refused connections, timeouts, 5xx answers) after
    /// bounded retries.
    StorageUnavailable,
    /// `--store s3://`: the server accepted a second `If-None-Match: *` put of one object (the
    /// probe), so two hosts could both claim one image name.
    ConditionalWriteUnsupported,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::MissingParameter => "MissingParameter",
            Code::InvalidParameter => "InvalidParameter",
            Code::InvalidDeviceMalformed => "InvalidDevice.Malformed",
            Code::InvalidDeviceInUse => "InvalidDevice.InUse",
            Code::NoSystemDisk => "OperationDenied.NoSystemDisk",
            Code::MultipleSystemDisks => "OperationDenied.MultipleSystemDisks",
            Code::QuotaExceedDataDisk => "QuotaExceed.DataDisk",
            Code::InvalidSize => "InvalidSize.ValueNotSupported",
            Code::InvalidOutputDir => "InvalidOutputDir.NotEmpty",
            Code::SnapshotNotFound => "InvalidSnapshotId.NotFound",
            Code::SnapshotUnsupported => "InvalidSnapshot.Unsupported",
            Code::SnapshotCorrupt => "InvalidSnapshot.Corrupt",
            Code::InsufficientSpace => "InsufficientSpace",
            Code::IoError => "IoError",
            Code::Internal => "InternalError",
            Code::InvalidImageNameMalformed => "InvalidImageName.Malformed",
            Code::InvalidImageNameDuplicated => "InvalidImageName.Duplicated",
            Code::InvalidImageFamilyMalformed => "InvalidImageFamily.Malformed",
            Code::InvalidImageVersionMalformed => "InvalidImageVersion.Malformed",
            Code::InvalidDescriptionMalformed => "InvalidDescription.Malformed",
            Code::InvalidPlatformMalformed => "InvalidPlatform.Malformed",
            Code::InvalidArchitectureMalformed => "InvalidArchitecture.Malformed",
            Code::InvalidBootModeMalformed => "InvalidBootMode.Malformed",
            Code::QuotaExceedTags => "QuotaExceed.Tags",
            Code::InvalidTagKeyMalformed => "InvalidTagKey.Malformed",
            Code::InvalidTagValueMalformed => "InvalidTagValue.Malformed",
            Code::DuplicateTagKey => "Duplicate.TagKey",
            Code::InvalidClientTokenMalformed => "InvalidClientToken.Malformed",
            Code::IdempotenceParamNotMatch => "IdempotenceParamNotMatch",
            Code::DryRunOperation => "DryRunOperation",
            Code::InvalidImageIdNotFound => "InvalidImageId.NotFound",
            Code::IncorrectImageStatus => "IncorrectImageStatus",
            Code::ChecksumMismatch => "InvalidImage.ChecksumMismatch",
            Code::IncorrectInstanceStatus => "IncorrectInstanceStatus",
            Code::SnapshotNotReady => "InvalidSnapshotId.NotReady",
            Code::InvalidInstanceMalformed => "InvalidInstance.Malformed",
            Code::InstanceDiskUnsupported => "InvalidInstance.DiskUnsupported",
            Code::InstanceBackingMismatch => "InvalidInstance.BackingChainMismatch",
            Code::BackingDenied => "InvalidSnapshot.BackingDenied",
            Code::SourceChanged => "InvalidSnapshot.Changed",
            Code::UnsafePath => "InvalidStore.UnsafePath",
            Code::InstanceNotFound => "InvalidInstanceId.NotFound",
            Code::InvalidImdsSupport => "InvalidParameter.FeaturesImdsSupport",
            Code::InvalidResourceGroup => "InvalidResourceGroup.NotFound",
            Code::Unsupported => "OperationDenied.Unsupported",
            Code::KeyMismatch => "InvalidSnapshot.KeyMismatch",
            Code::TargetRule => "OperationDenied.TargetRule",
            Code::StorageAccessDenied => "Forbidden.ObjectStorage",
            Code::StorageUnavailable => "ServiceUnavailable.ObjectStorage",
            Code::ConditionalWriteUnsupported => "OperationDenied.ConditionalWriteUnsupported",
        }
    }

    /// 2 for a request kiln refuses (nothing was written), 1 for a failure while running (or a
    /// failed `verify`), 0 for DryRunOperation (the request would have started).
    pub fn exit_status(self) -> u8 {
        match self {
            Code::DryRunOperation => 0,
            Code::InsufficientSpace
            | Code::IoError
            | Code::Internal
            | Code::ChecksumMismatch
            | Code::SourceChanged
            | Code::StorageUnavailable
            | Code::UnsafePath => 1,
            _ => 2,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug)]
pub struct Error {
    code: Code,
    message: String,
    source: Option<io::Error>,
    /// The request's own dialect's code and message (JD Cloud, Huawei), set at the dialect
    /// boundary; `code` still decides the exit status.
    vendor: Option<VendorCode>,
    /// The image device (`/dev/xvdb`) an error is about, so a dialect can name it its own way.
    device: Option<String>,
}

/// An error as a vendor's API answers it: its code (`OUT_OF_RANGE`, `IMS.0002`), its HTTP status
/// and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VendorCode {
    pub dialect: crate::image::attributes::Dialect,
    pub code: String,
    pub http_status: u16,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            source: None,
            vendor: None,
            device: None,
        }
    }

    /// The same error, about image device `device`.
    pub(crate) fn on_device(mut self, device: &str) -> Self {
        self.device = Some(device.to_string());
        self
    }

    /// The same error, answered in a vendor's terms.
    pub(crate) fn with_vendor(mut self, v: VendorCode) -> Self {
        self.vendor = Some(v);
        self
    }

    pub fn vendor(&self) -> Option<&VendorCode> {
        self.vendor.as_ref()
    }

    pub(crate) fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// An I/O failure on `path` while doing `what` (e.g. "reading at offset 4096").
    /// ENOSPC and EDQUOT become InsufficientSpace.
    pub(crate) fn io(path: &Path, what: &str, err: io::Error) -> Self {
        // A read from object storage that failed carries kiln's own error (its code and message
        // name the object) through the `io::Error` that `RandomRead` returns.
        let err = if err.get_ref().is_some_and(|e| e.is::<Error>()) {
            match err.into_inner().map(|e| e.downcast::<Error>()) {
                Some(Ok(e)) => return *e,
                Some(Err(other)) => io::Error::other(other),
                None => io::Error::other("an object storage read failed"),
            }
        } else {
            err
        };
        let code = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::InsufficientSpace,
            _ => Code::IoError,
        };
        Error {
            code,
            message: format!("{} failed on {}", what, path.display()),
            source: Some(err),
            vendor: None,
            device: None,
        }
    }

    /// A source file that is not what it claims to be.
    pub(crate) fn corrupt(path: &Path, what: impl fmt::Display) -> Self {
        Error::new(
            Code::SnapshotCorrupt,
            format!(
                "{}: {}; the image is damaged (check it with `qemu-img check`)",
                path.display(),
                what
            ),
        )
    }

    /// A source file using a feature kiln does not read.
    pub(crate) fn unsupported(path: &Path, what: impl fmt::Display) -> Self {
        Error::new(
            Code::SnapshotUnsupported,
            format!("{}: {}", path.display(), what),
        )
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message followed by its cause, as printed to users.
    pub(crate) fn full_message(&self) -> String {
        match &self.source {
            Some(src) => format!("{}: {}", self.message, src),
            None => self.message.clone(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.full_message())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_insufficient_space() {
        let e = Error::io(
            Path::new("/x"),
            "writing",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(e.code(), Code::InsufficientSpace);
        assert_eq!(e.code().exit_status(), 1);
        assert!(e.full_message().contains("/x"));
    }

    #[test]
    fn request_errors_exit_2() {
        assert_eq!(Code::InvalidSize.exit_status(), 2);
        assert_eq!(Code::SnapshotCorrupt.as_str(), "InvalidSnapshot.Corrupt");
    }
}
