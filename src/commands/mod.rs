//! One library function per command; each returns an outcome that [`crate::output`] renders.

pub mod check;
pub mod completions;
pub mod convert;
pub mod create;
pub mod delete;
pub mod describe;
pub mod inspect;
pub mod push;
pub(crate) mod target;
pub mod verify;
