//! Typed reads of a JSON request object's fields, for the dialects read without serde derive (JD
//! Cloud, Huawei), so each error is the dialect's own (made by `invalid`) and names where the
//! field is (`dataDisks[2].cloudDiskSpec.`).

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::request::file::nearest;

/// One JSON object of a request and where it sits in it.
pub(crate) struct Fields<'a> {
    pub(crate) o: &'a Map<String, Value>,
    /// The object's place, a prefix of its fields' names in messages (empty at the top).
    pub(crate) at: &'a str,
    /// The dialect's "malformed parameter" error.
    pub(crate) invalid: fn(String) -> Error,
}

impl Fields<'_> {
    /// A string field; absent or null is None.
    pub(crate) fn string(&self, k: &str) -> Result<Option<String>> {
        match self.o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err((self.invalid)(format!("{}{k} must be a string", self.at))),
        }
    }

    pub(crate) fn boolean(&self, k: &str) -> Result<Option<bool>> {
        match self.o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err((self.invalid)(format!(
                "{}{k} must be true or false",
                self.at
            ))),
        }
    }

    /// A whole non-negative number.
    pub(crate) fn integer(&self, k: &str) -> Result<Option<u64>> {
        match self.o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| (self.invalid)(format!("{}{k} must be a whole number", self.at))),
        }
    }

    /// Refuses a key not in `known`, naming the nearest; `api` names the operation.
    pub(crate) fn check_keys(&self, known: &[&str], api: &str) -> Result<()> {
        for k in self.o.keys() {
            if !known.contains(&k.as_str()) {
                let hint = nearest(k, known)
                    .map(|n| format!("; did you mean '{}{n}'?", self.at))
                    .unwrap_or_default();
                return Err((self.invalid)(format!(
                    "{}{k} is not a parameter of {api}{hint}",
                    self.at
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    fn invalid(m: String) -> Error {
        Error::new(Code::InvalidParameter, m)
    }

    #[test]
    fn fields_read_their_types_and_name_their_place() {
        let v = serde_json::json!({"s": "x", "b": true, "n": 3, "bad": -1, "nul": null});
        let f = Fields {
            o: v.as_object().unwrap(),
            at: "list[2].",
            invalid,
        };
        assert_eq!(f.string("s").unwrap().as_deref(), Some("x"));
        assert_eq!(f.string("nul").unwrap(), None);
        assert_eq!(f.boolean("b").unwrap(), Some(true));
        assert_eq!(f.integer("n").unwrap(), Some(3));
        assert_eq!(f.integer("missing").unwrap(), None);
        let e = f.integer("bad").unwrap_err();
        assert_eq!(e.message(), "list[2].bad must be a whole number");
        assert!(f.string("b").is_err() && f.boolean("s").is_err());
        let e = f.check_keys(&["s", "b", "n", "nul"], "X").unwrap_err();
        assert!(
            e.message()
                .starts_with("list[2].bad is not a parameter of X"),
            "{e}"
        );
    }
}
