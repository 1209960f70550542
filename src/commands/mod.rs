//! One library function per command; each returns an outcome that the output module renders.

pub mod check;
pub mod convert;
pub mod create;
pub mod inspect;
