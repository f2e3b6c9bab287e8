//! Names and labels shared by every record. Names are DNS labels because they
//! end up in host names, RBD image names, systemd units and URLs.

use std::collections::BTreeMap;

use crate::error::{invalid, CommandError};

pub const MAX_LABELS: usize = 64;

pub use basalt_proto::names::is_host_port;

/// Object names are DNS labels ([`basalt_proto::names::is_dns_label`]).
pub fn validate_name(what: &str, name: &str) -> Result<(), CommandError> {
    if basalt_proto::names::is_dns_label(name) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} name {name:?} must be 1-63 characters of a-z 0-9 '-', starting and ending with a letter or digit"
        )))
    }
}

/// Label keys may carry a `prefix/` like `topology/rack`; values may be empty.
pub fn validate_labels(what: &str, labels: &BTreeMap<String, String>) -> Result<(), CommandError> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(format!("{what} has {} labels, at most {MAX_LABELS} are allowed", labels.len())));
    }
    let key_ok = |k: &str| {
        !k.is_empty()
            && k.len() <= 63
            && k.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c))
            && k.as_bytes()[0].is_ascii_alphanumeric()
    };
    let value_ok = |v: &str| v.len() <= 63 && v.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c));
    for (k, v) in labels {
        if !key_ok(k) {
            return Err(invalid(format!(
                "{what}: label key {k:?} must be 1-63 characters of A-Z a-z 0-9 - _ . / starting with a letter or digit"
            )));
        }
        if !value_ok(v) {
            return Err(invalid(format!(
                "{what}: label {k}={v:?} has a value that is not 0-63 characters of A-Z a-z 0-9 - _ ."
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for good in ["a", "web-1", "0abc", &"x".repeat(63)] {
            assert!(validate_name("vm", good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", &"x".repeat(64)] {
            let e = validate_name("vm", bad).expect_err(bad);
            assert!(e.message().contains("vm name"), "{e}");
        }
    }

    #[test]
    fn labels_are_checked() {
        let mut l = BTreeMap::from([("topology/rack".to_string(), "r1".to_string()), ("ssd".into(), String::new())]);
        assert!(validate_labels("node n1", &l).is_ok());
        l.insert("bad key".into(), "x".into());
        assert!(validate_labels("node n1", &l).unwrap_err().message().contains("label key \"bad key\""));
        let l = BTreeMap::from([("rack".to_string(), "r 1".to_string())]);
        assert!(validate_labels("node n1", &l).unwrap_err().message().contains("rack=\"r 1\""));
        let many: BTreeMap<String, String> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_labels("vm x", &many).unwrap_err().message().contains("65 labels"));
    }
}
