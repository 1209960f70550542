//! Archives that hold a whole image for one destination: the vSphere OVA ([`ova`], with its OVF
//! descriptor in [`ovf`]).

pub(crate) mod ova;
pub(crate) mod ovf;
