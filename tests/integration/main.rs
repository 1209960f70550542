//! kiln's integration tests, as one test binary (as ripgrep has): one module per area, each running
//! the real `kiln` binary or the library on real files, with `qemu-img`/`qemu-io` as the oracle.
//! `common` holds the helpers they share. The fuzz target (`tests/fuzz/`) is a separate cargo-fuzz
//! workspace that `cargo test` does not build.

mod common;

mod convert;
mod create;
mod detect;
mod dialects;
mod encryption;
mod golden;
mod inspect;
mod instance;
mod malformed;
mod ova;
mod property;
mod qcow2_reader;
mod qcow2_writer;
mod qemu_lock;
mod reliability;
mod request_file;
mod s3;
mod s3store;
mod store;
mod target;
mod validation;
mod variants;
mod vdi;
mod vhd;
mod vhdx;
mod vmdk;
