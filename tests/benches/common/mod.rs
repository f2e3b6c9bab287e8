//! What the benchmarks share: `mod common;`.

// Each benchmark is its own crate and uses only part of this.
#![allow(dead_code)]

/// The median, or `None` for no samples.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// `value` of `key=value` among the whitespace-separated fields of a
/// `BENCH-ROUND` line; `-` when it is not there.
pub fn field(line: &str, key: &str) -> String {
    line.split_whitespace().find_map(|f| f.strip_prefix(key)?.strip_prefix('=')).unwrap_or("-").to_string()
}

/// A markdown table row: the label columns, both medians and their ratio
/// basalt/qemu (`—` for what is missing).
pub fn comparison_row(labels: &[&str], basalt: Option<f64>, qemu: Option<f64>, decimals: usize) -> String {
    let show = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{x:.decimals$}"));
    let ratio = match (basalt, qemu) {
        (Some(b), Some(q)) if q > 0.0 => format!("{:.2}", b / q),
        _ => "—".into(),
    };
    format!("| {} | {} | {} | {ratio} |", labels.join(" | "), show(basalt), show(qemu))
}

/// A positive number from the environment, or `default`.
pub fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default).max(1)
}

/// The disk with Debian's arm64 qemu (deploy/arm64-host/build-qemudisk).
pub fn qemu_disk(arts: &basalt_tests::rig::Artifacts) -> std::path::PathBuf {
    let d = arts.kernel.parent().unwrap_or(std::path::Path::new(".")).join("qemu.img");
    assert!(d.is_file(), "{} is missing: run deploy/arm64-host/build-qemudisk", d.display());
    d
}

/// (vmm, case, round) for every round and case, alternating which VMM goes
/// first so that drift in the machine's load falls on both.
pub fn alternating<'a>(rounds: u32, cases: &[&'a str]) -> Vec<(&'static str, &'a str, u32)> {
    let mut plan = Vec::new();
    for r in 1..=rounds {
        for c in cases {
            let order = if r % 2 == 1 { ["basalt", "qemu"] } else { ["qemu", "basalt"] };
            plan.extend(order.map(|v| (v, *c, r)));
        }
    }
    plan
}
