//! `basalt-controller`: one member of the Raft group that holds the cluster
//! state. Configuration from a TOML file and/or flags (flags win).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use basalt_controller::config::{Config, FileConfig};

#[derive(Parser, Debug)]
#[command(version, about = "Basalt controller: Raft-replicated cluster state and the public gRPC API")]
struct Args {
    /// TOML configuration file (see controller/README.md); flags override it.
    #[arg(long, short, env = "BASALT_CONTROLLER_CONFIG")]
    config: Option<PathBuf>,
    /// Raft node id, unique in the cluster, at least 1.
    #[arg(long)]
    node_id: Option<u64>,
    /// Address of the gRPC port (public, agent and Raft services).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// host:port peers and clients dial (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Directory for this controller's RocksDB.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Another controller, ID=HOST:PORT (repeatable): the initial members for --bootstrap.
    #[arg(long = "peer", value_name = "ID=HOST:PORT")]
    peers: Vec<String>,
    /// Initialise a new cluster of this controller and its --peer list, unless the data dir already belongs to one.
    #[arg(long)]
    bootstrap: bool,
    /// ceph.conf of the Ceph the leader creates pools and images in (the
    /// [ceph] section's `conf`); without a [ceph] section volumes are records only.
    #[arg(long)]
    ceph_conf: Option<PathBuf>,
    /// cephx client id for it, without "client." (default admin).
    #[arg(long)]
    ceph_id: Option<String>,
    /// Keyring of that client (default: what ceph.conf says).
    #[arg(long)]
    ceph_keyring: Option<PathBuf>,
    /// The cephx client VMs open their disks with, without "client." (e.g.
    /// vm): the leader sets its caps to the pools Basalt volumes use.
    #[arg(long)]
    ceph_vm_client: Option<String>,
    /// A pool that client keeps access to besides the volumes' (repeatable;
    /// replaces the file's vm_client_pools).
    #[arg(long = "ceph-vm-client-pool", value_name = "POOL")]
    ceph_vm_client_pools: Vec<String>,
    /// Log filter (tracing EnvFilter syntax), e.g. "info,openraft=warn".
    #[arg(long, env = "BASALT_LOG", default_value = "info,openraft=warn")]
    log: String,
}

/// How long the runtime's remaining tasks and blocking calls get once the
/// server has stopped.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(2);
/// From then on, the whole exit.
const EXIT_DEADLINE: Duration = Duration::from_secs(5);

extern "C" {
    fn _exit(status: std::os::raw::c_int) -> !;
}

fn config(args: &Args) -> Result<Config, String> {
    let mut f = match &args.config {
        Some(p) => FileConfig::load(p).map_err(|e| e.to_string())?,
        None => FileConfig::default(),
    };
    f.node_id = args.node_id.or(f.node_id);
    f.listen = args.listen.or(f.listen);
    f.advertise = args.advertise.clone().or(f.advertise);
    f.data_dir = args.data_dir.clone().or(f.data_dir);
    f.metrics_listen = args.metrics_listen.or(f.metrics_listen);
    f.bootstrap |= args.bootstrap;
    if args.ceph_conf.is_some()
        || args.ceph_id.is_some()
        || args.ceph_keyring.is_some()
        || args.ceph_vm_client.is_some()
        || !args.ceph_vm_client_pools.is_empty()
    {
        let c = f.ceph.get_or_insert_with(Default::default);
        c.conf = args.ceph_conf.clone().or(c.conf.take());
        c.id = args.ceph_id.clone().or(c.id.take());
        c.keyring = args.ceph_keyring.clone().or(c.keyring.take());
        c.vm_client = args.ceph_vm_client.clone().or(c.vm_client.take());
        if !args.ceph_vm_client_pools.is_empty() {
            c.vm_client_pools = Some(args.ceph_vm_client_pools.clone());
        }
    }
    for p in &args.peers {
        let (id, addr) = p.split_once('=').ok_or_else(|| format!("--peer {p:?}: expected ID=HOST:PORT"))?;
        f.peers.insert(id.to_string(), addr.to_string());
    }
    f.validate().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("basalt-controller: --log {:?}: {e}", args.log);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cfg = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("basalt-controller: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("basalt-controller: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(basalt_controller::server::run(cfg));
    // Stopping must not depend on Ceph: a librados call still running on the
    // blocking pool (a connect to monitors that do not answer, an OSD op)
    // ends only by its own timeout, so neither the runtime nor the process
    // exit waits for it. Returning from main runs libc's exit handlers and
    // librados's C++ static destructors while such a call may still be
    // using them; if the exit hangs there, leave without them, with status 3
    // (Raft's writes are synced when made: nothing is lost).
    std::thread::spawn(|| {
        std::thread::sleep(EXIT_DEADLINE);
        eprintln!("basalt-controller: still exiting after {EXIT_DEADLINE:?}; leaving now");
        // SAFETY: _exit(2) ends the process at once; it is async-signal-safe
        // and needs no state from other threads.
        unsafe { _exit(3) }
    });
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
