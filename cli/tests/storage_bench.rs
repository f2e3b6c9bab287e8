//! `basaltctl storage bench` as an operator runs it: against a file here, and
//! against an RBD image of the dev Ceph (`deploy/ceph-dev/up`).

use std::process::Command;

fn basaltctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_basaltctl"))
}

#[test]
fn benchmarks_a_file_as_json_and_refuses_bad_workloads() {
    let f = tempfile::NamedTempFile::new().expect("tmp");
    f.as_file().set_len(16 << 20).expect("size");
    let out = basaltctl()
        .args(["--output", "json", "storage", "bench", "--file"])
        .arg(f.path())
        .args(["--rw", "randwrite", "--bs", "4k", "--iodepth", "8", "--size", "4m", "--ramp", "0"])
        .output()
        .expect("run basaltctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["write"]["ops"], 1024, "4 MiB in 4 KiB writes: {v}");
    assert!(v["write"]["iops"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(v["write"]["latency_us"]["p99"].as_f64().is_some());

    let bad = basaltctl()
        .args(["storage", "bench", "--file"])
        .arg(f.path())
        .args(["--bs", "1000", "--runtime", "1"])
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("1000"), "the message names the bad block size: {err}");
    let bad = basaltctl().args(["storage", "bench", "--image", "no-slash"]).output().expect("run");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("POOL/IMAGE"));
}

#[test]
fn benchmarks_an_rbd_image_of_the_dev_ceph() {
    let dir = std::env::var("BASALT_CEPH_DIR").unwrap_or_else(|_| "/tmp/basalt-ceph".into());
    let conf = format!("{dir}/ceph.conf");
    assert!(std::path::Path::new(&conf).is_file(), "{conf} missing: start deploy/ceph-dev/up");
    let image = format!("cli-bench-{}", std::process::id());
    let st = Command::new("rbd")
        .args(["-c", &conf, "create", &format!("rbd/{image}"), "--size", "32M"])
        .status()
        .expect("rbd");
    assert!(st.success());
    let out = basaltctl()
        .args(["--output", "json", "storage", "bench", "--conf", &conf, "--image", &format!("rbd/{image}")])
        .args([
            "--rw",
            "randrw",
            "--rwmix-read",
            "50",
            "--bs",
            "4k",
            "--iodepth",
            "16",
            "--runtime",
            "2",
            "--ramp",
            "0",
        ])
        .output()
        .expect("run basaltctl");
    let _ = Command::new("rbd").args(["-c", &conf, "rm", &format!("rbd/{image}")]).output();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert!(v["read"]["ops"].as_u64().unwrap_or(0) > 0 && v["write"]["ops"].as_u64().unwrap_or(0) > 0, "{v}");
}
