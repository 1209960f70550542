//! CreateImage's parameter rules, as pure functions with the API's error codes. Each returns the
//! value to record (platform, architecture and boot mode in their canonical spelling) or the error.
//! No I/O here: uniqueness of names and tokens is the store's business ([`crate::image::store`]).

use crate::error::{Code, Error, Result};
use crate::image::attributes::{Architecture, BootMode, Platform};

/// `ResourceGroupId`: `rg-` and 1 to 61 lowercase letters and digits (the shape of the document's
/// `rg-bp67acfmxazb4p****`); offline there is no resource group to look up, so a well-formed ID is
/// recorded as it is.
pub(crate) fn resource_group_id(value: &str) -> Result<()> {
    let ok = value.strip_prefix("rg-").is_some_and(|rest| {
        (1..=61).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    if ok {
        return Ok(());
    }
    Err(Error::new(
        Code::InvalidResourceGroup,
        format!("ResourceGroupId '{value}': a resource group ID is 'rg-' followed by lowercase letters and digits"),
    ))
}

/// `Features.ImdsSupport`: v1 or v2 (returned as the API spells them).
pub(crate) fn imds_support(value: &str) -> Result<&'static str> {
    ["v1", "v2"]
        .into_iter()
        .find(|v| v.eq_ignore_ascii_case(value.trim()))
        .ok_or_else(|| {
            Error::new(
                Code::InvalidImdsSupport,
                format!("Features.ImdsSupport '{value}' is not supported: v1 or v2"),
            )
        })
}

/// `Features.NvmeSupport`: supported, unsupported or auto. The documents kiln follows do not list
/// it; these are the values of the API's other image operations.
pub(crate) fn nvme_support(value: &str) -> Result<&'static str> {
    ["supported", "unsupported", "auto"]
        .into_iter()
        .find(|v| v.eq_ignore_ascii_case(value.trim()))
        .ok_or_else(|| {
            Error::new(
                Code::InvalidParameter,
                format!("Features.NvmeSupport '{value}' is not supported: supported, unsupported or auto"),
            )
        })
}

/// Longest image name or family, in characters.
pub(crate) const MAX_NAME_CHARS: usize = 128;
pub(crate) const MAX_VERSION_CHARS: usize = 40;
pub(crate) const MAX_DESCRIPTION_CHARS: usize = 256;
pub(crate) const MAX_TAGS: usize = 20;
pub(crate) const MAX_TAG_KEY_CHARS: usize = 128;
pub(crate) const MAX_TAG_VALUE_CHARS: usize = 128;
pub(crate) const MAX_CLIENT_TOKEN_CHARS: usize = 64;

/// CJK ideographs (with extensions and compatibility forms), kana and Hangul syllables.
pub(crate) fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF      // Hiragana, Katakana
        | 0x3400..=0x4DBF    // CJK Extension A
        | 0x4E00..=0x9FFF    // CJK Unified Ideographs
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0xF900..=0xFAFF    // CJK Compatibility Ideographs
        | 0x20000..=0x2FA1F) // CJK Extensions B.. and Compatibility Supplement
}

fn starts_with_url(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// The shared rule of ImageName and ImageFamily: 2 to 128 characters, starting with a letter or a
/// CJK character, then letters, CJK, digits, `.`, `:`, `_`, `-`; not starting with http(s)://.
fn name_like(what: &str, flag: &str, value: &str, code: Code) -> Result<()> {
    let bad = |why: String| {
        Error::new(
            code,
            format!(
                "{flag} '{value}': {why}; {what} is 2 to 128 characters, starts with a letter or a CJK character, \
                 and may contain letters, CJK characters, digits, '.', ':', '_' and '-'"
            ),
        )
    };
    let n = value.chars().count();
    if !(2..=MAX_NAME_CHARS).contains(&n) {
        return Err(bad(format!("{n} characters")));
    }
    if starts_with_url(value) {
        return Err(bad("starts with http:// or https://".into()));
    }
    let mut chars = value.chars();
    if let Some(first) = chars.next() {
        if !(first.is_ascii_alphabetic() || is_cjk(first)) {
            return Err(bad(format!("starts with '{first}'")));
        }
    }
    if let Some(c) = chars
        .find(|&c| !(c.is_ascii_alphanumeric() || is_cjk(c) || matches!(c, '.' | ':' | '_' | '-')))
    {
        return Err(bad(format!("contains '{}'", c.escape_debug())));
    }
    Ok(())
}

pub(crate) fn image_name(value: &str) -> Result<()> {
    name_like(
        "an image name",
        "--name",
        value,
        Code::InvalidImageNameMalformed,
    )
}

pub(crate) fn image_family(value: &str) -> Result<()> {
    name_like(
        "an image family",
        "--family",
        value,
        Code::InvalidImageFamilyMalformed,
    )
}

pub(crate) fn image_version(value: &str) -> Result<()> {
    let n = value.chars().count();
    if !(1..=MAX_VERSION_CHARS).contains(&n) {
        return Err(Error::new(
            Code::InvalidImageVersionMalformed,
            format!("--image-version '{value}': {n} characters; give 1 to 40"),
        ));
    }
    Ok(())
}

pub(crate) fn description(value: &str) -> Result<()> {
    let n = value.chars().count();
    if !(2..=MAX_DESCRIPTION_CHARS).contains(&n) {
        return Err(Error::new(
            Code::InvalidDescriptionMalformed,
            format!("--description: {n} characters; give 2 to 256"),
        ));
    }
    if starts_with_url(value) {
        return Err(Error::new(
            Code::InvalidDescriptionMalformed,
            "--description must not start with http:// or https://",
        ));
    }
    Ok(())
}

/// Picks the value spelled `value` ignoring case, or the error naming every allowed spelling.
fn one_of<T>(
    value: &str,
    parse: fn(&str) -> Option<T>,
    list: fn() -> String,
    flag: &str,
    code: Code,
) -> Result<T> {
    parse(value)
        .ok_or_else(|| Error::new(code, format!("{flag} '{value}' is not one of: {}", list())))
}

pub(crate) fn platform(value: &str) -> Result<Platform> {
    one_of(
        value,
        Platform::parse_loose,
        Platform::list,
        "--platform",
        Code::InvalidPlatformMalformed,
    )
}

pub(crate) fn architecture(value: &str) -> Result<Architecture> {
    one_of(
        value,
        Architecture::parse_loose,
        Architecture::list,
        "--arch",
        Code::InvalidArchitectureMalformed,
    )
}

pub(crate) fn boot_mode(value: &str) -> Result<BootMode> {
    one_of(
        value,
        BootMode::parse_loose,
        BootMode::list,
        "--boot-mode",
        Code::InvalidBootModeMalformed,
    )
}

/// At most 20 tags; keys 1 to 128 characters without http:// or https://; values 0 to 128
/// characters; each key once.
pub(crate) fn tags(tags: &[(String, String)]) -> Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(Error::new(
            Code::QuotaExceedTags,
            format!("{} tags given; an image has at most {MAX_TAGS}", tags.len()),
        ));
    }
    for (i, (k, v)) in tags.iter().enumerate() {
        let n = k.chars().count();
        if !(1..=MAX_TAG_KEY_CHARS).contains(&n) {
            return Err(Error::new(
                Code::InvalidTagKeyMalformed,
                format!("tag key '{k}': {n} characters; give 1 to 128"),
            ));
        }
        let lower = k.to_ascii_lowercase();
        if lower.contains("http://") || lower.contains("https://") {
            return Err(Error::new(
                Code::InvalidTagKeyMalformed,
                format!("tag key '{k}' must not contain http:// or https://"),
            ));
        }
        let n = v.chars().count();
        if n > MAX_TAG_VALUE_CHARS {
            return Err(Error::new(
                Code::InvalidTagValueMalformed,
                format!("the value of tag '{k}': {n} characters; give at most 128"),
            ));
        }
        if tags[..i].iter().any(|(prev, _)| prev == k) {
            return Err(Error::new(
                Code::DuplicateTagKey,
                format!("tag key '{k}' is given twice; each key may appear once"),
            ));
        }
    }
    Ok(())
}

/// ASCII (printable), 1 to 64 characters.
pub(crate) fn client_token(value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= MAX_CLIENT_TOKEN_CHARS
        && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if !ok {
        return Err(Error::new(
            Code::InvalidClientTokenMalformed,
            format!(
                "--client-token '{}': a client token is 1 to 64 printable ASCII characters",
                value.escape_debug()
            ),
        ));
    }
    Ok(())
}

/// The refusal of a key given as an argument.
pub(crate) fn key_on_argv(flag: &str) -> Error {
    Error::new(
        Code::InvalidParameter,
        format!("{flag}: a key is never taken from the command line (every user can read it there); use --key-file FILE, --key-fd N or --key-env NAME"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code<T: std::fmt::Debug>(r: Result<T>) -> Code {
        r.unwrap_err().code()
    }

    #[test]
    fn name_length_is_2_to_128() {
        assert_eq!(code(image_name("a")), Code::InvalidImageNameMalformed);
        assert!(image_name("ab").is_ok());
        assert!(image_name(&format!("a{}", "b".repeat(127))).is_ok());
        assert_eq!(
            code(image_name(&format!("a{}", "b".repeat(128)))),
            Code::InvalidImageNameMalformed
        );
        // Characters, not bytes: 128 CJK characters are fine.
        assert!(image_name(&"镜".repeat(128)).is_ok());
    }

    #[test]
    fn name_starts_with_a_letter_or_cjk() {
        assert!(image_name("镜像-1").is_ok());
        assert!(image_name("イメージ").is_ok());
        assert!(image_name("Web.v1:prod_x-2").is_ok());
        for bad in ["1abc", "-ab", ".ab", "_ab", ":ab", "éab"] {
            assert_eq!(
                code(image_name(bad)),
                Code::InvalidImageNameMalformed,
                "{bad}"
            );
        }
    }

    #[test]
    fn name_characters_and_urls() {
        for bad in [
            "ab cd",
            "ab/cd",
            "ab@cd",
            "ab\ncd",
            "http://x",
            "https://x",
            "HTTP://x",
        ] {
            assert_eq!(
                code(image_name(bad)),
                Code::InvalidImageNameMalformed,
                "{bad}"
            );
        }
        assert!(image_name("httpd-server").is_ok());
    }

    #[test]
    fn family_has_the_name_rules_and_its_own_code() {
        assert!(image_family("web").is_ok());
        assert_eq!(code(image_family("w")), Code::InvalidImageFamilyMalformed);
        assert_eq!(code(image_family("9w")), Code::InvalidImageFamilyMalformed);
    }

    #[test]
    fn version_is_1_to_40() {
        assert!(image_version("1").is_ok());
        assert!(image_version(&"v".repeat(40)).is_ok());
        assert_eq!(code(image_version("")), Code::InvalidImageVersionMalformed);
        assert_eq!(
            code(image_version(&"v".repeat(41))),
            Code::InvalidImageVersionMalformed
        );
    }

    #[test]
    fn description_is_2_to_256_without_url_prefix() {
        assert_eq!(code(description("a")), Code::InvalidDescriptionMalformed);
        assert!(description("ab").is_ok());
        assert!(description(&"d".repeat(256)).is_ok());
        assert_eq!(
            code(description(&"d".repeat(257))),
            Code::InvalidDescriptionMalformed
        );
        assert_eq!(
            code(description("https://example.com/x")),
            Code::InvalidDescriptionMalformed
        );
        assert!(description("see https://example.com").is_ok());
    }

    #[test]
    fn enumerations_are_canonicalised() {
        assert_eq!(platform("ubuntu").unwrap(), Platform::Ubuntu);
        assert_eq!(
            platform("Windows Server 2022").unwrap(),
            Platform::WindowsServer2022
        );
        assert_eq!(platform("Others Linux").unwrap(), Platform::default());
        assert_eq!(code(platform("Windows 11")), Code::InvalidPlatformMalformed);
        assert_eq!(architecture("ARM64").unwrap(), Architecture::Arm64);
        assert_eq!(
            code(architecture("aarch64")),
            Code::InvalidArchitectureMalformed
        );
        assert_eq!(
            boot_mode("uefi-preferred").unwrap(),
            BootMode::UefiPreferred
        );
        assert_eq!(code(boot_mode("legacy")), Code::InvalidBootModeMalformed);
    }

    fn t(n: usize) -> Vec<(String, String)> {
        (0..n).map(|i| (format!("k{i}"), format!("v{i}"))).collect()
    }

    #[test]
    fn at_most_20_tags() {
        assert!(tags(&t(20)).is_ok());
        assert_eq!(code(tags(&t(21))), Code::QuotaExceedTags);
    }

    #[test]
    fn tag_keys_and_values() {
        let one = |k: &str, v: &str| tags(&[(k.to_string(), v.to_string())]);
        assert_eq!(code(one("", "v")), Code::InvalidTagKeyMalformed);
        assert!(one("k", "").is_ok());
        assert!(one(&"k".repeat(128), &"v".repeat(128)).is_ok());
        assert_eq!(
            code(one(&"k".repeat(129), "v")),
            Code::InvalidTagKeyMalformed
        );
        assert_eq!(code(one("a-http://b", "v")), Code::InvalidTagKeyMalformed);
        assert_eq!(
            code(one("k", &"v".repeat(129))),
            Code::InvalidTagValueMalformed
        );
        assert_eq!(
            code(tags(&[("k".into(), "1".into()), ("k".into(), "2".into())])),
            Code::DuplicateTagKey
        );
    }

    #[test]
    fn client_tokens_are_ascii_up_to_64() {
        assert!(client_token("a").is_ok());
        assert!(client_token(&"t".repeat(64)).is_ok());
        assert_eq!(
            code(client_token(&"t".repeat(65))),
            Code::InvalidClientTokenMalformed
        );
        assert_eq!(
            code(client_token("tökén")),
            Code::InvalidClientTokenMalformed
        );
        assert_eq!(code(client_token("")), Code::InvalidClientTokenMalformed);
    }
}
