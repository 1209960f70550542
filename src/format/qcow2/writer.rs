//! PLACEHOLDER: replaced by the qcow2 writer (helper B). Signatures only.
use std::fs::File;
use std::path::Path;

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub cluster_bits: u32,
    pub compression: Option<Compression>,
}

pub struct Qcow2Writer {}

impl Qcow2Writer {
    pub fn create(_file: File, _path: &Path, _virtual_size: u64, _opts: &WriterOptions) -> Result<Self> {
        unimplemented!()
    }
    pub fn cluster_size(&self) -> u64 {
        unimplemented!()
    }
    pub fn compression(&self) -> Option<Compression> {
        unimplemented!()
    }
    pub fn allocate(&self, _guest_offset: u64, _len: u64) -> Result<u64> {
        unimplemented!()
    }
    pub fn write_at(&self, _host_offset: u64, _data: &[u8]) -> Result<()> {
        unimplemented!()
    }
    pub fn compress_cluster(&self, _data: &[u8], _out: &mut Vec<u8>) -> Result<bool> {
        unimplemented!()
    }
    pub fn allocate_compressed(&self, _guest_offset: u64, _len: usize) -> Result<u64> {
        unimplemented!()
    }
    pub fn finish(self) -> Result<File> {
        unimplemented!()
    }
}
