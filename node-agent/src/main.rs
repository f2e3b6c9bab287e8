//! `basalt-agent`: runs on every arm64 host. Registers the host with the
//! controllers, follows its VM assignments and runs one `basalt-vmm` process
//! per assigned VM. Exit status: 0 stopped by a signal, 1 failed while
//! running, 2 bad configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

mod agent;
mod config;
mod controllers;
mod cpu;
mod metrics;
mod network;
mod nic;
mod node_service;
mod reporter;
mod supervisor;
mod vmm;

#[derive(Parser, Debug)]
#[command(version, about = "Basalt node agent: registers this host and runs its VMs")]
struct Args {
    /// TOML configuration file (see node-agent/README.md); flags override it.
    #[arg(long, short, env = "BASALT_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Stable id of this host in the cluster (a-z, 0-9, '-').
    #[arg(long)]
    host_id: Option<String>,
    /// host:port other hosts reach this one at (migrations).
    #[arg(long)]
    address: Option<String>,
    /// A controller's host:port (repeatable; any of them will do).
    #[arg(long = "controller", value_name = "HOST:PORT")]
    controllers: Vec<String>,
    /// A label for the scheduler, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Where each VM's config, console log and control socket live.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The basalt-vmm binary (a path, or a name found in PATH).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Serve the node service (VM console, counters, vGIC state) here
    /// (default: all addresses, the port of --address).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// vCPUs offered to VMs (default: this host's CPUs).
    #[arg(long)]
    vcpus: Option<u32>,
    /// MiB offered to VMs (default: this host's memory minus 256 MiB).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// ceph.conf for the VMs' RBD disks.
    #[arg(long)]
    ceph_conf: Option<PathBuf>,
    /// cephx id the VMs' disks use (a `profile rbd` client, never admin).
    #[arg(long)]
    ceph_id: Option<String>,
    /// Keyring of that cephx id.
    #[arg(long)]
    ceph_keyring: Option<PathBuf>,
    /// NIC tuning profile applied at start: `none` (default), `spread`, or
    /// one the config file defines under `nic_profiles`.
    #[arg(long)]
    nic_profile: Option<String>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, default_value = "info", env = "BASALT_LOG")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("basalt-agent: --log {:?}: {e}", args.log);
            return ExitCode::from(2);
        }
    };
    // Colours only for a terminal (and not with NO_COLOR, e.g. on a serial console).
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr)
        .init();
    let file = match &args.config {
        Some(p) => match config::FileConfig::load(p) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("basalt-agent: {e}");
                return ExitCode::from(2);
            }
        },
        None => config::FileConfig::default(),
    };
    let flags = config::Flags {
        host_id: args.host_id,
        address: args.address,
        controllers: args.controllers,
        labels: args.labels,
        state_dir: args.state_dir,
        vmm: args.vmm,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        ceph_conf: args.ceph_conf,
        ceph_id: args.ceph_id,
        ceph_keyring: args.ceph_keyring,
        nic_profile: args.nic_profile,
    };
    let cfg = match config::Config::resolve(file, flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("basalt-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("basalt-agent: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        host = %cfg.host_id, controllers = ?cfg.controllers, vmm = %cfg.vmm.display(), state_dir = %cfg.state_dir.display(),
        "basalt-agent starting"
    );
    match rt.block_on(agent::Agent::new(cfg).run(shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without handlers the default action (exit) still applies.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
