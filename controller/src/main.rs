//! `basalt-controller`: loads and validates its configuration. The Raft node
//! and the gRPC API arrive with the controller issue; until then it says so.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use basalt_controller::config;

#[derive(Parser, Debug)]
#[command(version, about = "Basalt controller: Raft-replicated cluster state and the public gRPC API")]
struct Args {
    /// TOML configuration file.
    #[arg(long, short, env = "BASALT_CONTROLLER_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match config::Config::load(&args.config) {
        Ok(cfg) => {
            eprintln!("basalt-controller: config for node {} is valid; serving is not implemented yet", cfg.node_id);
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("basalt-controller: {e}");
            ExitCode::FAILURE
        }
    }
}
