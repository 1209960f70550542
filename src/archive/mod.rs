//! Archives that hold disks for one destination: the vSphere OVA ([`ova`], with its OVF
//! descriptor in [`ovf`]), and GCP's `disk.raw` in a gzip tar ([`gcp`], written through
//! [`sparse_tar`]'s GNU sparse headers and [`pgzip`]'s parallel gzip).

pub(crate) mod gcp;
pub(crate) mod ova;
pub(crate) mod ovf;
pub(crate) mod pgzip;
pub(crate) mod sparse_tar;
