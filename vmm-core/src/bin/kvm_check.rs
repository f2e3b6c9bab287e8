//! Checks that this host can run Basalt's arm64 KVM guests. Exit status 0
//! when it can; 1 with the reason otherwise.

#[cfg(target_arch = "aarch64")]
fn main() -> std::process::ExitCode {
    match basalt_vmm::kvm_check::run() {
        Ok(report) => {
            println!("{report}");
            println!("basalt-kvm-check: PASS");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("basalt-kvm-check: FAIL: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(not(target_arch = "aarch64"))]
fn main() -> std::process::ExitCode {
    eprintln!("basalt-kvm-check: FAIL: Basalt runs guests on arm64 hosts only; this is {}", std::env::consts::ARCH);
    std::process::ExitCode::FAILURE
}
