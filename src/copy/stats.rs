//! What a copy did, shared by the engine that counts it and the reporters that show it.

/// What the copy did, in bytes of guest data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct CopyStats {
    /// Non-zero data written.
    #[serde(rename = "BytesCopied")]
    pub(crate) copied: u64,
    /// Ranges skipped without reading: holes, unallocated and zero clusters, growth.
    #[serde(rename = "HolesSkipped")]
    pub(crate) holes: u64,
    /// Data read and found to be all zeros (not written).
    #[serde(rename = "ZerosDetected")]
    pub(crate) zeros: u64,
}

impl CopyStats {
    pub(crate) fn add(&mut self, o: &CopyStats) {
        self.copied += o.copied;
        self.holes += o.holes;
        self.zeros += o.zeros;
    }
}
