//! `basalt-vmm`: one process per VM. The VM runner arrives with the VMM issue;
//! until then the binary says so instead of pretending.

fn main() -> std::process::ExitCode {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version") | Some("-V") => {
            println!("basalt-vmm {}", env!("CARGO_PKG_VERSION"));
            std::process::ExitCode::SUCCESS
        }
        _ => {
            eprintln!("basalt-vmm: running VMs is not implemented yet; use basalt-kvm-check to test a host");
            std::process::ExitCode::from(2)
        }
    }
}
