//! `basaltctl`: the cluster admin CLI.
//!
//! Exit codes: 0 done; 1 the cluster refused or failed the request (the
//! message says why); 2 bad command line; 3 no controller reachable; 4 a
//! `--wait` gave up.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod cluster;
mod migration;
mod network;
mod objects;
mod storage_bench;
mod vm_host;

#[derive(Parser, Debug)]
#[command(version, about = "Administer a Basalt cluster")]
struct Cli {
    /// Controller gRPC endpoints, comma separated (host:port).
    #[arg(long, env = "BASALT_ENDPOINTS", value_delimiter = ',', default_value = "127.0.0.1:7001", value_parser = parse_endpoint, global = true)]
    endpoints: Vec<String>,
    /// Output format: tables for people, JSON for scripts.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print basaltctl's version and the endpoints it would use.
    Version,
    /// Cluster overview: controllers, leader, term, counts of nodes and VMs.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Controller membership (Raft): list, add a learner, promote, remove.
    Controller {
        #[command(subcommand)]
        cmd: cluster::ControllerCmd,
    },
    /// Nodes (arm64 hosts running basalt-agent): list, show, cordon, uncordon, drain, remove.
    Node {
        #[command(subcommand)]
        cmd: objects::NodeCmd,
    },
    /// Virtual machines: create, list, show, start, stop, restart, migrate, delete, console, stats, vgic-state.
    Vm {
        #[command(subcommand)]
        cmd: objects::VmCmd,
    },
    /// Volumes (RBD images): create, list, show, resize, delete.
    Volume {
        #[command(subcommand)]
        cmd: objects::VolumeCmd,
    },
    /// Storage profiles (replicated or erasure-coded pools, OSD tunables).
    Profile {
        #[command(subcommand)]
        cmd: objects::ProfileCmd,
    },
    /// Tenant networks (an IPv4 subnet on a VXLAN segment; IPAM for VM NICs).
    Network {
        #[command(subcommand)]
        cmd: network::NetworkCmd,
    },
    /// Live migrations: list, show, cancel.
    Migration {
        #[command(subcommand)]
        cmd: migration::MigrationCmd,
    },
    /// The cluster's event log: what changed and why.
    Events(objects::EventsArgs),
    /// Storage: measure a disk.
    Storage {
        #[command(subcommand)]
        cmd: StorageCmd,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Show the cluster's status (a linearizable read unless --stale).
    Status {
        /// Answer from the contacted controller's local state.
        #[arg(long)]
        stale: bool,
    },
}

#[derive(Subcommand, Debug)]
enum StorageCmd {
    /// Benchmark an RBD image (POOL/IMAGE) or a file: IOPS, MB/s and MiB/s,
    /// latency percentiles, CPU per request.
    Bench(storage_bench::BenchArgs),
}

fn parse_endpoint(s: &str) -> Result<String, String> {
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not host:port"))?;
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    port.parse::<u16>().map_err(|_| format!("{s:?}: port {port:?} is not a number from 0 to 65535"))?;
    Ok(s.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Version => {
            let v = env!("CARGO_PKG_VERSION");
            match cli.output {
                Output::Table => println!("basaltctl {v}\nendpoints {}", cli.endpoints.join(",")),
                Output::Json => {
                    let eps: Vec<String> = cli.endpoints.iter().map(|e| format!("{e:?}")).collect();
                    println!("{{\"version\":\"{v}\",\"endpoints\":[{}]}}", eps.join(","))
                }
            }
        }
        Command::Cluster { cmd: ClusterCmd::Status { stale } } => {
            return finish(cluster::status(&cli.endpoints, stale, cli.output == Output::Json), "cluster status")
        }
        Command::Node { cmd: objects::NodeCmd::Drain(a) } => {
            return finish(migration::drain(&cli.endpoints, &a, json), "node drain")
        }
        Command::Node { cmd } => return finish(objects::node(&cli.endpoints, &cmd, json), "node"),
        Command::Vm { cmd: objects::VmCmd::Migrate(a) } => {
            return finish(migration::migrate(&cli.endpoints, &a, json), "vm migrate")
        }
        Command::Vm { cmd } => return finish(objects::vm(&cli.endpoints, &cmd, json), "vm"),
        Command::Migration { cmd } => return finish(migration::migration(&cli.endpoints, &cmd, json), "migration"),
        Command::Volume { cmd } => return finish(objects::volume(&cli.endpoints, &cmd, json), "volume"),
        Command::Profile { cmd } => return finish(objects::profile(&cli.endpoints, &cmd, json), "profile"),
        Command::Network { cmd } => return finish(network::network(&cli.endpoints, &cmd, json), "network"),
        Command::Events(a) => return finish(objects::events(&cli.endpoints, &a, json), "events"),
        Command::Controller { cmd } => {
            return finish(cluster::controller(&cli.endpoints, &cmd, cli.output == Output::Json), "controller")
        }
        Command::Storage { cmd: StorageCmd::Bench(a) } => match storage_bench::run(&a, cli.output == Output::Json) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("basaltctl storage bench: {e}");
                return ExitCode::from(1);
            }
        },
    }
    ExitCode::SUCCESS
}

fn finish(r: Result<String, cluster::CliError>, what: &str) -> ExitCode {
    match r {
        Ok(text) => {
            // Empty when the command streamed its output itself (vm console).
            if !text.is_empty() {
                println!("{}", text.trim_end());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("basaltctl {what}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn endpoints_are_validated() {
        let ok = Cli::try_parse_from(["basaltctl", "--endpoints", "a:1,10.0.0.1:7001", "version"]).expect("valid");
        assert_eq!(ok.endpoints, vec!["a:1", "10.0.0.1:7001"]);
        let err = Cli::try_parse_from(["basaltctl", "--endpoints", "a:99999", "version"]).unwrap_err().to_string();
        assert!(err.contains("port"), "{err}");
        assert!(Cli::try_parse_from(["basaltctl", "--endpoints", "nohost", "version"]).is_err());
    }
}
