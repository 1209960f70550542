//! `--target` (a request file's `Target`): the cloud or hypervisor an image is built for. A target
//! picks the output format and the destination's documented rules, which are checked before any
//! byte is copied; the manifest records the target and every adjustment it made.

use crate::error::{Code, Error, Result};
use crate::image::attributes::api_enum;

api_enum! {
    /// A destination an image is imported into.
    pub enum Target {
        Azure = "azure",
        Aws = "aws",
        Gcp = "gcp",
        Vsphere = "vsphere",
        Hyperv = "hyperv",
        Alibaba = "alibaba",
        Huawei = "huawei",
        Openstack = "openstack",
    }
}

/// A `--target` value, ignoring case.
pub(crate) fn parse(value: &str) -> Result<Target> {
    Target::parse_loose(value).ok_or_else(|| {
        Error::new(
            Code::InvalidParameter,
            format!(
                "--target '{}' is not a destination kiln knows: one of {}",
                value.trim(),
                Target::list()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_ignoring_case_and_unknown_ones_are_refused() {
        assert_eq!(parse(" Azure ").unwrap(), Target::Azure);
        assert_eq!(parse("vsphere").unwrap(), Target::Vsphere);
        let e = parse("esx").unwrap_err();
        assert_eq!(e.code(), Code::InvalidParameter);
        assert!(e.to_string().contains("azure, aws, gcp"), "{e}");
    }
}
