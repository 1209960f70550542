//! Preparing sources: every command that reads a disk opens it through here.

pub mod qemu_lock;
