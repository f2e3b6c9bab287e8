//! The rules for the names and addresses the API's messages carry, in one
//! place: the controllers refuse what breaks them, and the agents check their
//! own configuration and requests against the same rules.

/// A DNS label (RFC 1123): 1-63 of a-z 0-9 '-', starting and ending with a
/// letter or digit. Object names (VMs, nodes, volumes, profiles) are these,
/// because they end up in host names, RBD image names and paths.
pub fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// `host:port` with a non-empty host and a port from 1 to 65535: the shape of
/// every address the cluster stores or dials (agents, controllers, peers).
pub fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        for ok in ["web", "web-1", "a", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "..", "../etc", "a/b", "-a", "a-", "Web", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
        for ok in ["10.0.0.1:7001", "host:1", "[::1]:80"] {
            assert!(is_host_port(ok), "{ok}");
        }
        for bad in ["10.0.0.1", ":7001", "h:0", "h:70000", "h:x"] {
            assert!(!is_host_port(bad), "{bad:?}");
        }
    }
}
