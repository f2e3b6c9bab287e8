//! What the host CPU offers a guest, as the kernel lists it: reported at
//! registration so the controllers move a VM only to hosts with all of the
//! features its guest may have started using.

use tracing::warn;

/// The feature flags of the first CPU in `cpuinfo` (arm64's `Features`
/// line, x86's `flags`), sorted, each kept only if the controllers accept
/// it (lower-case `[a-z0-9_]`, at most 32 bytes).
pub fn parse_features(cpuinfo: &str) -> Vec<String> {
    let line = cpuinfo.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        matches!(key.trim(), "Features" | "flags").then_some(value)
    });
    let mut f: Vec<String> = line
        .unwrap_or_default()
        .split_whitespace()
        .filter(|t| t.len() <= 32 && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        .map(str::to_string)
        .collect();
    f.sort();
    f.dedup();
    f.truncate(512);
    f
}

/// This host's features; none (and a warning) when /proc/cpuinfo cannot be
/// read, which leaves the check to basalt-vmm's at the start of a migration.
pub fn host_features() -> Vec<String> {
    match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(s) => parse_features(&s),
        Err(e) => {
            warn!("cannot read /proc/cpuinfo ({e}); CPU features not reported");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cpus_flags_are_reported_sorted_and_clean() {
        let arm = "processor\t: 0\nBogoMIPS\t: 125.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid\n\
                   CPU implementer\t: 0x41\n\nprocessor\t: 1\nFeatures\t: fp\n";
        assert_eq!(parse_features(arm), ["aes", "asimd", "cpuid", "crc32", "evtstrm", "fp", "pmull", "sha1", "sha2"]);
        let x86 = "processor : 0\nflags : fpu vme de sse2 sse2 Weird ok_1\n";
        assert_eq!(parse_features(x86), ["de", "fpu", "ok_1", "sse2", "vme"]);
        assert!(parse_features("processor : 0\n").is_empty());
    }
}
